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
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from genrun.contract.api import RunRef, parse_spec
from genrun.contract.errors import EXIT_RUN_FAILED, UserError
from genrun.operator import conditions as c
from genrun.operator.loop import RunLoop
from genrun.operator.planner import (
    CreateMergeJob,
    CreateShardJob,
    Event,
    JobPhase,
    ObservedJob,
    Plan,
    job_spec,
)
from genrun.operator.show import Progress, print_report
from genrun.worker import records as rec
from genrun.worker.storage import Storage, StorageError, open_storage

STATE = "_genrun"  # runner bookkeeping under the output: job specs, logs, failed attempts
POLL_SECONDS = 0.5


def _die_with_parent() -> None:
    """Worker processes die with the runner (kill -9 included), so a rerun never races an orphan."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class _Proc:
    name: str
    kind: Literal["shard", "merge"]
    round: int
    seed: int | None
    attempt: int
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
        self.ref, self.raw_spec, self.storage = ref, raw_spec, storage
        self.spec = parse_spec(raw_spec)
        self.state = state_dir
        self.max_jobs, self.engine, self.out, self.quiet = max(1, jobs), engine, out, quiet
        self.procs: dict[str, _Proc] = {}
        self.finished: dict[str, ObservedJob] = {}
        self.stopping = False
        self.progress = Progress(out, storage, self.spec.target.unique_examples, quiet)

    # -- the backend: Jobs are local processes --------------------------------------------------------------
    async def jobs(self) -> Sequence[ObservedJob]:
        out = {j.name: j for j in self._failed_attempts()}
        out.update(self.finished)
        for p in self.procs.values():
            out[p.name] = ObservedJob(p.name, p.kind, p.round, p.seed, p.attempt, "Running")
        return tuple(out.values())

    async def start(self, action: CreateShardJob | CreateMergeJob) -> None:
        # Jobs over the concurrency bound are not started: the planner asks for them again next time.
        if action.name not in self.procs and len(self.procs) < self.max_jobs:
            self._start(action)  # in this thread: a worker dies with the thread that started it

    async def publish(self, status: dict[str, Any], events: Sequence[Event], changed: bool) -> None:
        return None  # status.json is the local run's status (written by the loop); Events have no reader here

    def _failed_attempts(self) -> list[ObservedJob]:
        out = []
        for p in sorted((self.state / "jobs").glob("*.failed.json")):
            d = json.loads(p.read_text())
            out.append(
                ObservedJob(
                    d["name"], d["kind"], d["round"], d["seed"], d["attempt"], "Failed", d["retriable"], d["message"]
                )
            )
        return out

    # -- effects -----------------------------------------------------------------------------------------
    def _start(self, action: CreateShardJob | CreateMergeJob) -> None:
        spec = job_spec(action, self.ref, self.raw_spec)
        (self.state / "jobs").mkdir(parents=True, exist_ok=True)
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        job_file = self.state / "jobs" / f"{action.name}.json"
        job_file.write_text(rec.to_json(spec))
        cmd = [sys.executable, "-P", "-m", "genrun.operator.cli", "worker"]
        if isinstance(action, CreateShardJob):
            cmd += ["generate", "--job", str(job_file), "--engine", self.engine]
            kind: Literal["shard", "merge"] = "shard"
            rnd, seed = action.shard.round, action.shard.seed
        else:
            cmd += ["merge", "--job", str(job_file)]
            kind, rnd, seed = "merge", action.round, None
        log = open(self.state / "logs" / f"{action.name}.log", "a")  # noqa: SIM115 (closed when the process ends)
        popen = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        self.procs[action.name] = _Proc(action.name, kind, rnd, seed, action.attempt, popen, log)

    def reap(self) -> bool:
        changed = False
        for name, p in list(self.procs.items()):
            code = p.popen.poll()
            if code is None:
                continue
            changed = True
            p.log.close()
            del self.procs[name]
            if self.stopping or code in (-signal.SIGINT, 128 + signal.SIGINT):
                # Interrupted (by us, or by the Ctrl-C that reached the whole process group before it reached our
                # loop): not a failed attempt; the shard simply runs again.
                continue
            phase: JobPhase = "Succeeded" if code == 0 else "Failed"
            retriable = code not in rec.NON_RETRIABLE_EXIT_CODES
            tail = _tail(self.state / "logs" / f"{name}.log")
            job = ObservedJob(
                name, p.kind, p.round, p.seed, p.attempt, phase, retriable, f"exit code {code}: {tail}" if code else ""
            )
            self.finished[name] = job
            if code != 0:
                (self.state / "jobs" / f"{name}.failed.json").write_text(
                    json.dumps(
                        {
                            "name": name,
                            "kind": p.kind,
                            "round": p.round,
                            "seed": p.seed,
                            "attempt": p.attempt,
                            "retriable": retriable,
                            "message": job.message,
                        }
                    )
                )
        return changed

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> Plan:
        return asyncio.run(self._run())

    async def _run(self) -> Plan:
        old: dict[str, Any] = {}
        with contextlib.suppress(KeyError, ValueError):
            old = json.loads(self.storage.read_bytes(rec.STATUS_KEY))["status"]

        def warn(message: str) -> None:
            if not self.quiet:
                self.out.write(f"\nwarning: {message}\n")

        loop = RunLoop(self.ref, self.raw_spec, self.spec, self.storage, self, status=old, warn=warn)
        try:
            while True:
                plan = await loop.step()
                self.progress(plan, loop.observed)
                if plan.finished and not self.procs:
                    return plan
                if not plan.actions and not self.procs and plan.condition(c.SUSPENDED).status == "True":
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


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    errs = [x for x in text if "error" in x.lower()]
    return " | ".join((errs or text)[-lines:])[:300]


def _state_dir(storage: Storage, output: str) -> Path:
    if output.startswith("s3://"):
        safe = output.removeprefix("s3://").replace("/", "_")
        return Path(os.environ.get("GENRUN_CACHE", Path.home() / ".cache" / "genrun")) / "runs" / safe
    return Path(storage.location(STATE))


def run_manifest(
    path: Path, *, output: str | None, jobs: int, engine: str, quiet: bool, out: TextIO = sys.stderr
) -> int:
    from genrun.operator.validate import ManifestError, SpecError, load_run_manifest

    try:  # the one validation path, --output included, before anything touches the output folder
        doc, ref, spec = load_run_manifest(path, output)
    except (ManifestError, SpecError) as exc:
        for e in exc.errors if isinstance(exc, SpecError) else [str(exc)]:
            print(f"{path}: {e}", file=sys.stderr)
        return rec.EXIT_USAGE
    storage = open_storage(spec.output.path, spec.output.s3.endpoint if spec.output.s3 else "")
    try:
        storage.check()
    except StorageError as exc:
        raise UserError(f"spec.output.path: {exc}") from exc
    runner = LocalRunner(
        ref, doc["spec"], storage, _state_dir(storage, spec.output.path), jobs=jobs, engine=engine, out=out, quiet=quiet
    )
    try:
        plan = runner.run()
    except KeyboardInterrupt:
        out.write(f"\nstopped; nothing finished is lost. Run the same command again to resume ({storage.url}).\n")
        return 130
    out.write("\n")
    if plan.condition(c.SUSPENDED).status == "True":
        out.write(f"suspended (spec.suspend is true): {storage.url}\n")
        return 0
    print_report(spec.output.path, file=sys.stdout)
    ok = plan.condition(c.SUCCEEDED).status == "True"
    verdict = plan.condition(c.SUCCEEDED if ok else c.FAILED)
    out.write(f"{'Succeeded' if ok else 'Failed'} ({verdict.reason}): {verdict.message}\n")
    if plan.status.get("output"):
        out.write(f"dataset: {plan.status['output']['dataset']}\nreport:  {plan.status['output']['report']}\n")
    return 0 if ok else EXIT_RUN_FAILED
