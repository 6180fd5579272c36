"""The merge host: one worker process for a local run that runs the run's merges one after another from a queue
folder, so that a merge pays neither an interpreter start nor the imports and the embedding model it needs: the host
loads them once, while round 1 generates.

Same protocol as the engine host (worker/serve.py): each `<job name>.json` is a merge Job's spec, written atomically
by the runner; the host writes `<job name>.started` before it runs one and answers it with `<job name>.exit`, the exit
code `genrun worker merge --job` would have ended with. A merge here is that command's own code on the same job spec,
in-process, so it writes the same bytes; it logs to its own file. When the host dies, the runner counts the merge it
had started as a failed attempt (the merge's writes are atomic: a rerun redoes it) and starts a new host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from genrun.contract import errors
from genrun.worker.serve import IDLE_POLL, LOG_FORMAT, answer, on_term, pending

log = logging.getLogger("genrun.worker.merge_host")


Command = Callable[[Sequence[str]], int]  # `genrun worker` in-process: argv -> exit code


def serve_merges(queue: Path, logs: Path | None, output: str | None, warm: Path | None, worker: Command) -> int:
    """Run the merges queued in `queue` until stopped (SIGTERM, SIGINT, or the runner gone), each as `worker(["merge",
    "--job", FILE])`. `warm`: a file holding the run's spec (`{"spec": ...}`), to load what its merges will need before
    the first one is queued."""
    signal.signal(signal.SIGTERM, on_term)
    if warm is not None:
        _warm(warm)
    while True:
        if os.getppid() == 1:  # the runner is gone (PR_SET_PDEATHSIG covers the usual case)
            return errors.EXIT_OK
        for job_file in pending(queue):
            job_file.with_suffix(".started").touch()
            answer(job_file, merge_one(job_file, logs, output, worker))
        time.sleep(IDLE_POLL)


def _warm(spec_file: Path) -> None:
    """Import the merge and load the semantic tier's model as its merges will (`semantic.apply_tier`'s call, so the
    model is cached under the same key). Best effort: a merge that then fails to load it reports why."""
    from genrun.contract.api import parse_spec
    from genrun.worker import merge  # noqa: F401 (the imports a merge needs, loaded now)
    from genrun.worker.dedup_config import DedupConfig

    try:
        sem = DedupConfig.from_spec(parse_spec(json.loads(spec_file.read_text())["spec"]).dedup).semantic
        if sem is not None:
            from genrun.worker.semantic import load_embedder

            load_embedder(sem.model, None, sem.batch_size)
    except Exception as exc:  # the merge that needs the model loads it again and says what is wrong
        log.warning("could not load ahead what the merges need (%s); each merge loads it", exc)


def merge_one(job_file: Path, logs: Path | None, output: str | None, worker: Command) -> int:
    """`genrun worker merge --job job_file` in this process: its log lines and its stdout/stderr (the result line, an
    error line) go to the job's own log file, as a merge process's would."""
    argv = ["merge", "--job", str(job_file), *(["--output", output] if output else [])]
    if logs is None:
        return _guarded(worker, argv)
    with open(logs / f"{job_file.stem}.log", "a") as out:
        handler = logging.StreamHandler(out)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                return _guarded(worker, argv)
        finally:
            logging.getLogger().removeHandler(handler)


def _guarded(worker: Command, argv: list[str]) -> int:
    try:
        return worker(argv)
    except Exception as exc:  # a crash is this merge's failed attempt, as a merge process's would be; the host goes on
        log.error("merge %s failed: %s\n%s", argv[2], exc, traceback.format_exc())
        return errors.EXIT_FAILED
