"""The embedded default: a whole GenerationRun on one machine. The planner's shard Jobs are served by one engine host
process (`genrun worker serve`: the engine is started once for the whole run, not once per shard), its merge Jobs by
one merge host process (`genrun worker serve-merges`: the imports and embedding model a merge needs are loaded once,
while round 1 generates; a merge asked for while it is busy runs in a process of its own, up to `--jobs` at once),
storage is a local folder (or s3://), and the status is written next to the output in the custom resource's shape.

Observation is derived from what exists: round plans, shard markers and round reports on storage, plus the
processes this runner started and the failed attempts it recorded. So Ctrl-C or kill -9 and a rerun resumes, and a
finished shard is never generated twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from genrun.contract import errors
from genrun.contract import records as rec
from genrun.contract.api import RunRef, parse_spec
from genrun.contract.status import RunStatus
from genrun.operator import conditions as c
from genrun.operator.loop import RunLoop, recorded_status, started
from genrun.operator.planner import CreateMergeJob, CreateShardJob, Event, ObservedJob, Plan, job_spec
from genrun.operator.show import Progress
from genrun.worker.storage import Storage

STATE = "_genrun"  # runner bookkeeping under the output: job specs, logs, failed attempts
POLL_SECONDS = 0.5


# The merge host's niceness. Its start-up (imports, the embedding model: several CPU-seconds) overlaps round 1's
# generation by design (`_warm_merger`), and on a machine of few cores it competes with the engine for them; niced,
# it gets what the engine leaves (bench/README.md has what that measured: suggestive, not conclusive). The merges
# themselves never run beside generation here (a round is planned after the last one is merged), so they lose
# nothing, and a merge that overflows to a process of its own is not niced.
MERGE_HOST_NICE = 10

# Looked up here, in the runner, not in a forked child: loading a library after fork can deadlock on a lock another
# of the parent's threads held (the runner may run beside other threads).
try:
    _PRCTL: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """Worker processes die with the runner (kill -9 included), so a rerun never races an orphan."""
    if _PRCTL is not None:
        with contextlib.suppress(Exception):
            _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _niced(by: int) -> Callable[[], None]:
    """A child's set-up: die with the runner, and run `by` steps nicer than it (0: as nice as it)."""

    def setup() -> None:
        _die_with_parent()
        if by:
            with contextlib.suppress(OSError):
                os.nice(by)

    return setup


@dataclass
class _Proc:
    job: ObservedJob
    popen: subprocess.Popen[bytes]
    log: TextIO


@dataclass
class _Host:
    """A host process (the engine host, the merge host) and the jobs queued to it, by name."""

    popen: subprocess.Popen[bytes]
    log: TextIO
    jobs: dict[str, ObservedJob]
    queue: Path


class LocalRunner:
    def __init__(
        self,
        ref: RunRef,
        raw_spec: dict[str, Any],
        storage: Storage,
        state_dir: Path,
        *,
        jobs: int = 1,
        engine: str = "vllm",
        out: TextIO = sys.stderr,
        quiet: bool = False,
    ) -> None:
        # The storage is the one truth about where this run lives: workers get its location, not a stale path.
        raw_spec = {**raw_spec, "output": {**raw_spec.get("output", {}), "path": storage.url}}
        self.ref, self.raw_spec, self.storage, self.state = ref, raw_spec, storage, state_dir
        self.spec = parse_spec(raw_spec)
        self.max_jobs, self.engine, self.out, self.quiet = max(1, jobs), engine, out, quiet
        self.procs: dict[str, _Proc] = {}  # merge processes of their own (the merge host was busy)
        self.host: _Host | None = None  # the engine host
        self.merger: _Host | None = None  # the merge host
        self.finished: dict[str, ObservedJob] = {}
        self.stopping = False
        self.queue, self.merge_queue = self.state / "queue", self.state / "merges"
        # Job files a run killed before left behind are stale: the planner asks again for what is not done.
        for queue in (self.queue, self.merge_queue):
            shutil.rmtree(queue, ignore_errors=True)

    # -- the backend: Jobs are local processes --------------------------------------------------------------
    async def jobs(self) -> Sequence[ObservedJob]:
        # Failed attempts are kept on disk: a rerun counts them against spec.budget.maxShardRetries.
        failed = [j for p in self._failed_files() if (j := _failed_attempt(p)) is not None]
        running = [dataclasses.replace(p.job, phase="Running") for p in self.procs.values()]
        running += [j for h in self.hosts() for j in h.jobs.values()]
        return tuple({j.name: j for j in (*failed, *self.finished.values(), *running)}.values())

    async def start(self, action: CreateShardJob | CreateMergeJob) -> None:
        for folder in ("jobs", "logs", "queue", "merges"):
            (self.state / folder).mkdir(parents=True, exist_ok=True)
        spec = rec.to_json(job_spec(action, self.ref, self.raw_spec))
        if isinstance(action, CreateShardJob):
            self._queue_shard(action, spec)
            return
        if action.name in self.procs or (self.merger is not None and action.name in self.merger.jobs):
            return
        if self.merger is None or not self.merger.jobs:
            self._queue(self.merger or self._start_merger(), action, spec)
            return
        # Merges over the concurrency bound are not started: the planner asks for them again next time.
        if len(self.procs) + 1 >= self.max_jobs:
            return
        job_file = self.state / "jobs" / f"{action.name}.json"
        job_file.write_text(spec)
        cmd = [*WORKER, "merge", "--job", str(job_file)]
        log = open(self.state / "logs" / f"{action.name}.log", "a")  # noqa: SIM115 (closed when the process ends)
        self.procs[action.name] = _Proc(started(action), _spawn(cmd, log), log)

    def _queue_shard(self, action: CreateShardJob, spec: str) -> None:
        """Queue the shard to the engine host, starting the host when there is none."""
        if self.host is not None and action.name in self.host.jobs:
            return
        if self.host is None:
            cmd = [*WORKER, "serve", "--queue", str(self.queue), "--engine", self.engine]
            self.host = self._start_host(cmd, "engine-host", self.queue)
        self._queue(self.host, action, spec)

    def _start_merger(self) -> _Host:
        """The merge host, told the run's spec so that it loads what the merges need before the first is queued."""
        warm = self.state / "run-spec.json"
        warm.write_text(json.dumps({"spec": self.raw_spec}))
        cmd = [*WORKER, "serve-merges", "--queue", str(self.merge_queue), "--warm", str(warm)]
        self.merger = self._start_host(cmd, "merge-host", self.merge_queue, nice=MERGE_HOST_NICE)
        return self.merger

    def _start_host(self, cmd: list[str], name: str, queue: Path, *, nice: int = 0) -> _Host:
        log = open(self.state / "logs" / f"{name}.log", "a")  # noqa: SIM115 (closed when the host ends)
        return _Host(_spawn([*cmd, "--logs", str(self.state / "logs")], log, nice=nice), log, {}, queue)

    def _queue(self, host: _Host, action: CreateShardJob | CreateMergeJob, spec: str) -> None:
        job_file = host.queue / f"{action.name}.json"
        tmp = job_file.with_suffix(".tmp")
        tmp.write_text(spec)
        tmp.replace(job_file)  # whole, or not there: the host never reads half a job
        host.jobs[action.name] = started(action)

    def _warm_merger(self) -> None:
        """Start the merge host once the engine host is generating (its start-up has the CPUs to itself until then),
        so that the merge host's imports and model load overlap round 1 rather than delay its merge."""
        if self.merger is None and self.host is not None and any(self.queue.glob("*.started")):
            self._start_merger()

    def hosts(self) -> list[_Host]:
        return [h for h in (self.host, self.merger) if h is not None]

    def _drop(self, host: _Host) -> None:
        """Forget a host that ended or is being stopped: the next job of its kind starts a new one."""
        self.host, self.merger = (None if h is host else h for h in (self.host, self.merger))

    async def publish(self, status: RunStatus, events: Sequence[Event], changed: bool) -> None:
        return None  # status.json is the local run's status (written by the loop); Events have no reader here

    def _failed_files(self) -> list[Path]:
        return sorted((self.state / "jobs").glob("*.failed.json"))

    def reap(self) -> bool:
        """Collect the workers and shard jobs that ended; True if any did."""
        ended = [(name, p, code) for name, p in self.procs.items() if (code := p.popen.poll()) is not None]
        for name, p, code in ended:
            p.log.close()
            del self.procs[name]
            self._finish(p.job, code)
        reaped = [self._reap_host(h) for h in self.hosts()]
        self._warm_merger()
        return any(reaped) or bool(ended)

    def _reap_host(self, host: _Host) -> bool:
        done = []
        for name, job in list(host.jobs.items()):
            answer = host.queue / f"{name}.exit"
            if answer.exists():
                done.append((job, int(answer.read_text() or errors.EXIT_FAILED)))
                _forget(host.queue, name)
                del host.jobs[name]
        ended = host.popen.poll()
        if ended is not None:
            # The host ended: the job it was running is a failed attempt (unless a restart was asked for or the run is
            # stopping); the jobs only waiting lose nothing and are queued again to the next host.
            host.log.close()
            self._drop(host)
            for name, job in host.jobs.items():
                if (host.queue / f"{name}.started").exists() and ended != errors.EXIT_RESTART:
                    done.append((job, ended or errors.EXIT_FAILED))
                _forget(host.queue, name)
        for job, c_ in done:
            self._finish(job, c_)
        return bool(done) or ended is not None

    def _finish(self, job: ObservedJob, code: int) -> None:
        if self.stopping:
            # Interrupted, by us or by the Ctrl-C that reached the whole process group: whatever the exit code (a
            # worker still starting dies with 1 from a KeyboardInterrupt inside `import site`), not a failed
            # attempt; the shard simply runs again.
            return
        name = job.name
        why = f"exit code {code}: {_tail(self.state / 'logs' / f'{name}.log')}" if code else ""
        job = dataclasses.replace(job, phase="Failed" if code else "Succeeded", message=why,
                                  retriable=code not in errors.NON_RETRIABLE_EXIT_CODES)  # fmt: skip
        self.finished[name] = job
        if code:
            (self.state / "jobs" / f"{name}.failed.json").write_text(json.dumps(dataclasses.asdict(job)))

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> Plan:
        if threading.current_thread() is not threading.main_thread():
            return asyncio.run(self._run())
        # Ctrl-C stops the run even when this process started with SIGINT ignored (a background job: `genrun run &`);
        # asyncio.run hands SIGINT to the loop only when it finds Python's default handler.
        before = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return asyncio.run(self._run())
        finally:
            signal.signal(signal.SIGINT, before)

    @contextlib.contextmanager
    def _stopping_on_interrupt(self) -> Iterator[None]:
        """Mark the runner as stopping the moment SIGINT arrives, then hand the signal on (to asyncio's handler, which
        cancels the loop's task at its next await). Python runs handlers at the next bytecode, so the flag is set
        before this thread can reap a worker that the same Ctrl-C ended."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers belong to the main thread; a runner elsewhere is stopped by its caller
            return
        before = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            self.stopping = True
            if callable(before):
                before(signum, frame)
            elif before == signal.SIG_DFL:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, before)

    async def _run(self) -> Plan:
        def warn(message: str) -> None:
            if not self.quiet:
                self.out.write(f"\nwarning: {message}\n")

        status = recorded_status(self.storage)
        loop = RunLoop(self.ref, self.raw_spec, self.spec, self.storage, self, status=status, warn=warn)
        progress = Progress(self.out, self.storage, self.spec.target.unique_examples, self.quiet)
        try:
            with self._stopping_on_interrupt():
                while True:
                    plan = await loop.step()
                    progress(plan, loop.observed)
                    suspended = not plan.actions and plan.condition(c.SUSPENDED).status == "True"
                    if (plan.finished or suspended) and not self.procs and not any(h.jobs for h in self.hosts()):
                        self.stop_host(self.merger)
                        if self.host is not None:
                            self.stop_host(self.host)  # the engine's devices are released once no shard needs them
                            plan = await loop.step()  # the status then counts the engine's whole session
                        return plan
                    deadline = time.monotonic() + POLL_SECONDS
                    while not self.reap() and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.stopping = True
        popens = [p.popen for p in self.procs.values()] + [h.popen for h in self.hosts()]
        for popen in popens:
            with contextlib.suppress(ProcessLookupError):
                popen.terminate()
        end = time.monotonic() + 10
        while (self.procs or self.hosts()) and time.monotonic() < end:
            self.reap()
            time.sleep(0.1)
        for popen in popens:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()

    def stop_host(self, host: _Host | None) -> None:
        """Stop an idle host (the engine host records its session as stopped on SIGTERM)."""
        if host is None:
            return
        self._drop(host)
        host.popen.terminate()
        try:
            host.popen.wait(10)
        except subprocess.TimeoutExpired:
            host.popen.kill()
            host.popen.wait()
        host.log.close()


WORKER = [sys.executable, "-P", "-m", "genrun.operator.cli", "worker"]


def _spawn(cmd: list[str], log: TextIO, *, nice: int = 0) -> subprocess.Popen[bytes]:
    # Started in the loop's thread: a worker dies with the thread that started it.
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_niced(nice)
    )


def _forget(queue: Path, name: str) -> None:
    """A collected job's files leave the queue, its spec first: the host never sees it pending again."""
    for suffix in (".json", ".started", ".exit"):
        (queue / f"{name}{suffix}").unlink(missing_ok=True)


def _failed_attempt(path: Path) -> ObservedJob | None:
    """A failed attempt as recorded; None when the record is damaged (that attempt is then not counted)."""
    try:
        return ObservedJob(**{"phase": "Failed", **json.loads(path.read_text())})
    except (OSError, ValueError, TypeError):
        return None


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    errs = [x for x in text if "error" in x.lower()]
    return " | ".join((errs or text)[-lines:])[:300]


def state_dir(storage: Storage, output: str) -> Path:
    if output.startswith("s3://"):
        safe = output.removeprefix("s3://").replace("/", "_")
        return Path(os.environ.get("GENRUN_CACHE", Path.home() / ".cache" / "genrun")) / "runs" / safe
    return Path(storage.location(STATE))
