"""The engine host: one engine, started once, that generates seed shard after seed shard from a queue folder.

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
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from genrun.contract import errors
from genrun.contract import records as rec

if TYPE_CHECKING:
    from collections.abc import Callable

    from genrun.contract.api import GenerationRunSpec
    from genrun.worker.engine_types import Engine
    from genrun.worker.sessions import SessionRecorder
    from genrun.worker.storage import Storage

    GenerateShard = Callable[[Storage, GenerationRunSpec, rec.ShardPlan, Engine], rec.ShardManifest]

log = logging.getLogger("genrun.worker.serve")

IDLE_POLL = 0.1


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


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def serve(queue: Path, engine_kind: str, logs: Path | None = None, output: str | None = None) -> int:
    """Host an engine for the jobs of `queue` until stopped. Returns the process's exit code."""
    from genrun.worker.engine import ModelError, make_engine
    from genrun.worker.generate import generate_shard
    from genrun.worker.sessions import SessionRecorder, devices, session_name
    from genrun.worker.storage import open_storage

    signal.signal(signal.SIGTERM, _on_term)
    jobs = pending(queue)
    if not jobs:
        return errors.EXIT_OK
    first, spec = _read(jobs[0])
    out = spec.output
    storage = open_storage(
        output or out.path, out.s3.endpoint if out.s3 else "", out.s3.region if out.s3 else "us-east-1"
    )
    recorder = SessionRecorder(storage, session_name(f"{first.run}-engine"))
    model = spec.model
    try:
        try:
            engine = make_engine(engine_kind, spec, 0)  # sampling seeds are per request: the engine's own is unused
        except ModelError as exc:
            log.error("%s", exc)
            answer(jobs[0], errors.EXIT_MODEL)
            return errors.EXIT_MODEL
        recorder.ready(*devices(model.tensor_parallel_size))
        while True:
            if os.getppid() == 1:  # the runner is gone (PR_SET_PDEATHSIG covers the usual case)
                return errors.EXIT_OK
            jobs = pending(queue)
            if not jobs:
                recorder.heartbeat()
                time.sleep(IDLE_POLL)
                continue
            job_file = jobs[0]
            try:
                job, job_spec = _read(job_file)
            except FileNotFoundError:
                continue  # answered and collected by the runner since the listing
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("%s: not a valid job spec: %s", job_file.name, exc)
                answer(job_file, errors.EXIT_USAGE)
                continue
            if job_spec.model != model:
                log.info("%s names another model: this host stops, a new one starts for it", job_file.name)
                return errors.EXIT_RESTART
            job_file.with_suffix(".started").touch()
            code = _run_one(job_file, job, job_spec, storage, engine, generate_shard, recorder, logs)
            answer(job_file, code)
    finally:
        recorder.stop()


def _run_one(
    job_file: Path, job: rec.JobSpec, spec: GenerationRunSpec, storage: Storage, engine: Engine,
    generate: GenerateShard, recorder: SessionRecorder, logs: Path | None,
) -> int:  # fmt: skip
    """One shard on the warm engine, logged to its own file as a shard process would be."""
    handler = None
    if logs is not None:
        handler = logging.FileHandler(logs / f"{job_file.stem}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
    try:
        if job.shard is None:
            log.error("%s: a shard job needs 'shard'", job_file.name)
            return errors.EXIT_USAGE
        manifest = generate(storage, spec, job.shard, engine)
        recorder.shard_done(manifest)
        return errors.EXIT_OK
    except Exception as exc:  # one shard's failure is that shard's failed attempt; the engine serves the next
        from genrun.worker.engine import ModelError

        log.error("shard %s failed: %s\n%s", job_file.stem, exc, traceback.format_exc())
        return errors.EXIT_MODEL if isinstance(exc, ModelError) else errors.EXIT_FAILED
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
