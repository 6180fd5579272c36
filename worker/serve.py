"""The engine host: one engine, started once, that generates the seed shards of a queue folder, those queued together
side by side on one batched engine (worker/batching.py), so a round's shards share the engine's batch.

The seed shard stays the unit of work, naming and restart safety: each job file in the queue is one shard Job's spec
(`<job name>.json`, written atomically by the runner), each shard still publishes its own data and completion marker,
and the host answers each job with `<job name>.exit` (its exit code, as `genrun worker generate` would have ended).
Before it starts a job it writes `<job name>.started`, so that when the host dies the runner knows which shard was
cut short (a failed attempt) and which were only waiting (they simply run again). A shard whose marker already exists
is answered at once. The host holds its engine until it is stopped (SIGTERM, SIGINT, or its parent dying) and
records its device time as an engine session (worker/sessions.py).

A job whose spec names another model than the one loaded ends the host (exit code errors.EXIT_RESTART) before it starts:
the runner starts a new host for it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from genrun.contract import errors
from genrun.contract import records as rec
from genrun.worker.batching import Batcher

if TYPE_CHECKING:
    from genrun.contract.api import GenerationRunSpec, ModelSpec
    from genrun.worker.engine_types import Engine
    from genrun.worker.sessions import SessionRecorder
    from genrun.worker.storage import Storage

log = logging.getLogger("genrun.worker.serve")

IDLE_POLL = 0.1
# A worker's log line: its process's, and each job's own log file (a host runs several jobs).
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Shards generated at once, on one batched engine: a round's shards (the planner caps a round's shard Jobs lower) and
# the next round's first ones; more would only hold more rows in memory for no larger batch.
HOST_SHARDS = 32


def pending(queue: Path) -> list[Path]:
    """Job files not answered yet, in the order the runner wrote them (names sort by round and seed)."""
    return sorted(p for p in queue.glob("*.json") if not p.with_suffix(".exit").exists())


def answer(job_file: Path, code: int) -> None:
    tmp = job_file.with_suffix(".exit.tmp")
    tmp.write_text(str(code))
    tmp.replace(job_file.with_suffix(".exit"))


def _read(job_file: Path) -> tuple[rec.JobSpec, GenerationRunSpec]:
    from genrun.contract.api import parse_spec

    job = rec.job_spec_from(json.loads(job_file.read_text()))
    return job, parse_spec(job.spec)


def on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@dataclass
class _Running:
    """A shard the host is generating, in a thread of its own; `code` and `manifest` are set before `done`."""

    job_file: Path
    code: int = errors.EXIT_FAILED
    manifest: rec.ShardManifest | None = None
    done: bool = False


def serve(queue: Path, engine_kind: str, logs: Path | None = None, output: str | None = None) -> int:
    """Host an engine for the jobs of `queue` until stopped. Returns the process's exit code."""
    from genrun.worker.engine import ModelError, make_engine
    from genrun.worker.sessions import SessionRecorder, devices, session_name
    from genrun.worker.storage import open_storage

    signal.signal(signal.SIGTERM, on_term)
    jobs = pending(queue)
    if not jobs:
        return errors.EXIT_OK
    first, spec = _read(jobs[0])
    out = spec.output
    storage = open_storage(
        output or out.path, out.s3.endpoint if out.s3 else "", out.s3.region if out.s3 else "us-east-1"
    )
    recorder = SessionRecorder(storage, session_name(f"{first.run}-engine"))
    try:
        try:
            engine = make_engine(engine_kind, spec, 0)  # sampling seeds are per request: the engine's own is unused
        except ModelError as exc:
            log.error("%s", exc)
            answer(jobs[0], errors.EXIT_MODEL)
            return errors.EXIT_MODEL
        recorder.ready(*devices(spec.model.tensor_parallel_size))
        return _Host(queue, storage, Batcher(engine), spec.model, recorder, logs).loop()
    finally:
        recorder.stop()


class _Host:
    """The host's loop: start each queued shard in a thread (up to HOST_SHARDS at once, all on one Batcher), answer
    each that ended, and stop for a job that names another model once the running shards are done."""

    def __init__(
        self, queue: Path, storage: Storage, batcher: Batcher, model: ModelSpec, recorder: SessionRecorder,
        logs: Path | None,
    ) -> None:  # fmt: skip
        self.queue, self.storage, self.batcher, self.model = queue, storage, batcher, model
        self.recorder, self.logs = recorder, logs
        self.running: dict[Path, _Running] = {}
        self.restart = False
        self.busy_since: float | None = None  # the engine's busy time, counted once however many shards overlap

    def loop(self) -> int:
        while True:
            if os.getppid() == 1:  # the runner is gone (PR_SET_PDEATHSIG covers the usual case)
                return errors.EXIT_OK
            self._answer_ended()
            if self.restart:
                if not self.running:
                    return errors.EXIT_RESTART
            else:
                self._start_new()
            self.recorder.heartbeat()
            time.sleep(IDLE_POLL)

    def _answer_ended(self) -> None:
        for job_file, r in list(self.running.items()):
            if not r.done:
                continue
            del self.running[job_file]
            now = time.monotonic()
            if r.manifest is not None:
                self.recorder.shard_done(r.manifest, now - (self.busy_since or now))
                self.busy_since = now
            if not self.running:
                self.busy_since = None
            answer(job_file, r.code)

    def _start_new(self) -> None:
        for job_file in pending(self.queue):
            if len(self.running) >= HOST_SHARDS:
                return
            if job_file in self.running:
                continue
            try:
                job, job_spec = _read(job_file)
            except FileNotFoundError:
                continue  # answered and collected by the runner since the listing
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("%s: not a valid job spec: %s", job_file.name, exc)
                answer(job_file, errors.EXIT_USAGE)
                continue
            if job_spec.model != self.model:
                log.info("%s names another model: this host stops, a new one starts for it", job_file.name)
                self.restart = True
                return
            job_file.with_suffix(".started").touch()
            self.batcher.join()  # before the thread starts: shards started together batch from their first request
            r = self.running[job_file] = _Running(job_file)
            self.busy_since = self.busy_since or time.monotonic()
            threading.Thread(target=self._shard, args=(r, job, job_spec), daemon=True).start()

    def _shard(self, r: _Running, job: rec.JobSpec, spec: GenerationRunSpec) -> None:
        try:
            r.code, r.manifest = _run_one(r.job_file, job, spec, self.storage, self.batcher, self.logs)
        finally:
            self.batcher.leave()
            r.done = True


def _run_one(
    job_file: Path, job: rec.JobSpec, spec: GenerationRunSpec, storage: Storage, engine: Engine, logs: Path | None
) -> tuple[int, rec.ShardManifest | None]:
    """One shard on the warm engine, logged to its own file as a shard process would be (this thread's records only:
    the host runs several shards at once)."""
    from genrun.worker.engine import ModelError
    from genrun.worker.generate import generate_shard

    handler = None
    if logs is not None:
        me = threading.get_ident()
        handler = logging.FileHandler(logs / f"{job_file.stem}.log")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(lambda record: record.thread == me)
        logging.getLogger().addHandler(handler)
    try:
        if job.shard is None:
            log.error("%s: a shard job needs 'shard'", job_file.name)
            return errors.EXIT_USAGE, None
        return errors.EXIT_OK, generate_shard(storage, spec, job.shard, engine)
    except Exception as exc:  # one shard's failure is that shard's failed attempt; the engine serves the next
        log.error("shard %s failed: %s\n%s", job_file.stem, exc, traceback.format_exc())
        return (errors.EXIT_MODEL if isinstance(exc, ModelError) else errors.EXIT_FAILED), None
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
