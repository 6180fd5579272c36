"""The embedded default: a whole GenerationRun on one machine. The planner's Jobs become local worker processes,
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
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
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


def _die_with_parent() -> None:
    """Worker processes die with the runner (kill -9 included), so a rerun never races an orphan."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class _Proc:
    job: ObservedJob
    popen: subprocess.Popen[bytes]
    log: TextIO


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
        self.procs: dict[str, _Proc] = {}
        self.finished: dict[str, ObservedJob] = {}
        self.stopping = False

    # -- the backend: Jobs are local processes --------------------------------------------------------------
    async def jobs(self) -> Sequence[ObservedJob]:
        # Failed attempts are kept on disk: a rerun counts them against spec.budget.maxShardRetries.
        failed = [j for p in self._failed_files() if (j := _failed_attempt(p)) is not None]
        running = [dataclasses.replace(p.job, phase="Running") for p in self.procs.values()]
        return tuple({j.name: j for j in (*failed, *self.finished.values(), *running)}.values())

    async def start(self, action: CreateShardJob | CreateMergeJob) -> None:
        # Jobs over the concurrency bound are not started: the planner asks for them again next time.
        if action.name in self.procs or len(self.procs) >= self.max_jobs:
            return
        job_file = self.state / "jobs" / f"{action.name}.json"
        for folder in ("jobs", "logs"):
            (self.state / folder).mkdir(parents=True, exist_ok=True)
        job_file.write_text(rec.to_json(job_spec(action, self.ref, self.raw_spec)))
        cmd = [sys.executable, "-P", "-m", "genrun.operator.cli", "worker"]
        if isinstance(action, CreateShardJob):
            cmd += ["generate", "--job", str(job_file), "--engine", self.engine]
        else:
            cmd += ["merge", "--job", str(job_file)]
        log = open(self.state / "logs" / f"{action.name}.log", "a")  # noqa: SIM115 (closed when the process ends)
        # Started in the loop's thread: a worker dies with the thread that started it.
        popen = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        self.procs[action.name] = _Proc(started(action), popen, log)

    async def publish(self, status: RunStatus, events: Sequence[Event], changed: bool) -> None:
        return None  # status.json is the local run's status (written by the loop); Events have no reader here

    def _failed_files(self) -> list[Path]:
        return sorted((self.state / "jobs").glob("*.failed.json"))

    def reap(self) -> bool:
        """Collect the workers that ended; True if any did."""
        ended = [(name, p, code) for name, p in self.procs.items() if (code := p.popen.poll()) is not None]
        for name, p, code in ended:
            p.log.close()
            del self.procs[name]
            if self.stopping:
                # Interrupted, by us or by the Ctrl-C that reached the whole process group: whatever the exit code (a
                # worker still starting dies with 1 from a KeyboardInterrupt inside `import site`), not a failed
                # attempt; the shard simply runs again.
                continue
            why = f"exit code {code}: {_tail(self.state / 'logs' / f'{name}.log')}" if code else ""
            job = dataclasses.replace(p.job, phase="Failed" if code else "Succeeded", message=why,
                                      retriable=code not in errors.NON_RETRIABLE_EXIT_CODES)  # fmt: skip
            self.finished[name] = job
            if code:
                (self.state / "jobs" / f"{name}.failed.json").write_text(json.dumps(dataclasses.asdict(job)))
        return bool(ended)

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> Plan:
        return asyncio.run(self._run())

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
                    if (plan.finished or suspended) and not self.procs:
                        return plan
                    deadline = time.monotonic() + POLL_SECONDS
                    while not self.reap() and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.stopping = True
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.popen.terminate()
        end = time.monotonic() + 10
        while self.procs and time.monotonic() < end:
            self.reap()
            time.sleep(0.1)
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.popen.kill()


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
