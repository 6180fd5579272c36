"""`genrun worker generate|merge --job FILE`: what shard and merge Jobs run.

Exit codes (records.EXIT_*) tell the operator whether a retry can help: 2 for a bad job spec and 5 for a missing
model are final; 1 (crash) and 4 (storage) are retried within the run's bound.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from genrun.contract import errors
from genrun.contract import records as rec

if TYPE_CHECKING:
    from genrun.contract.api import GenerationRunSpec
    from genrun.worker.dedup_config import DedupConfig
    from genrun.worker.storage import Storage

log = logging.getLogger("genrun.worker")


def _load_job(args: argparse.Namespace) -> tuple[rec.JobSpec, GenerationRunSpec]:
    from genrun.contract.api import SpecError, parse_spec

    try:
        # A file (Kubernetes Jobs mount their job-spec ConfigMap), never one argv string: Linux caps a single
        # argument at 128 KiB and a valid spec can be larger.
        data = Path(args.job).read_bytes() if args.job != "-" else sys.stdin.buffer.read()
        if data[:2] == b"\x1f\x8b":  # a large job spec comes gzip-compressed (see manifests.job_configmap)
            data = gzip.decompress(data)
        raw = data.decode("utf-8")
        job = rec.job_spec_from(json.loads(raw))
        spec = parse_spec(job.spec)
    except OSError as exc:
        raise _Fail(errors.EXIT_USAGE, f"--job {args.job}: cannot read ({exc.strerror or exc})") from exc
    except (ValueError, KeyError, TypeError, EOFError) as exc:
        raise _Fail(errors.EXIT_USAGE, f"--job {args.job}: not a valid job spec: {exc}") from exc
    except SpecError as exc:
        raise _Fail(errors.EXIT_USAGE, f"--job {args.job}: {exc}") from exc
    if args.kind != job.kind:
        raise _Fail(errors.EXIT_USAGE, f"--job {args.job}: is a {job.kind} job, not a {args.kind} job")
    return job, spec


class _Fail(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _storage(spec: GenerationRunSpec, override: str | None) -> Storage:
    from genrun.worker.storage import StorageError, open_storage

    out = spec.output
    s3 = out.s3
    storage = open_storage(override or out.path, s3.endpoint if s3 else "", s3.region if s3 else "us-east-1")
    try:
        storage.check()
    except StorageError as exc:
        raise _Fail(errors.EXIT_STORAGE, str(exc)) from exc
    return storage


def _generate(args: argparse.Namespace) -> int:
    from genrun.worker.engine import ModelError, make_engine
    from genrun.worker.generate import generate_shard

    job, spec = _load_job(args)
    if job.shard is None:
        raise _Fail(errors.EXIT_USAGE, f"--job {args.job}: a shard job needs 'shard'")
    storage = _storage(spec, args.output)
    if storage.exists(rec.shard_manifest_key(job.shard.round, job.shard.seed)):
        log.info("shard r%d s%d is already published; nothing to do", job.shard.round, job.shard.seed)
        return errors.EXIT_OK
    from genrun.worker.openai_engine import EndpointError
    from genrun.worker.sessions import SessionRecorder, devices, session_name

    # This process loads its own engine for one shard (a shard Job without a shared engine): its device time, start-up
    # included, is an engine session of its own. An endpoint engine's device time is its server's, not this pod's.
    own_engine = args.engine == "vllm" and spec.model.endpoint is None
    name = session_name(f"{job.run}-r{job.shard.round}-s{job.shard.seed}")
    recorder = SessionRecorder(storage, name) if own_engine else None
    try:
        engine = make_engine(args.engine, spec, job.shard.seed)
        if recorder is not None:
            recorder.ready(*devices(spec.model.tensor_parallel_size))
        manifest = generate_shard(storage, spec, job.shard, engine)
        if recorder is not None:
            recorder.shard_done(manifest)
    except ModelError as exc:  # also spec.model.endpoint refusing for good (bad key, no such model)
        raise _Fail(errors.EXIT_MODEL, str(exc)) from exc
    except EndpointError as exc:  # the server stayed unavailable through the retries: the Job's retry takes over
        raise _Fail(errors.EXIT_FAILED, f"spec.model.endpoint: {exc}") from exc
    finally:
        if recorder is not None:
            recorder.stop()
    return errors.EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    from genrun.worker.serve import serve

    try:
        code = serve(Path(args.queue), args.engine, Path(args.logs) if args.logs else None, args.output)
    except SystemExit as stop:  # SIGTERM: the runner stops the idle host
        code = stop.code if isinstance(stop.code, int) else errors.EXIT_FAILED
    if args.own_process and not _children():
        # The session is recorded and every shard answered: the engine's teardown at interpreter exit (seconds for
        # vLLM and torch) frees nothing the process's end does not, and the runner waits for this exit before it
        # writes the run's final status. An engine with worker processes (tensor parallel) is shut down properly.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _serve_merges(args: argparse.Namespace) -> int:
    from genrun.worker.merge_host import serve_merges
    from genrun.worker.runtime import ensure_merge_env

    if args.own_process:
        ensure_merge_env()  # the merges it runs get the allocator settings a merge process has
    logs, warm = (Path(a) if a else None for a in (args.logs, args.warm))
    return serve_merges(Path(args.queue), logs, args.output, warm, lambda argv: main(argv, own_process=False))


def _children() -> bool:
    """Whether this process has child processes (Linux; elsewhere assume it has)."""
    me = str(os.getpid())
    try:
        stats = [Path("/proc", p, "stat") for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for stat in stats:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:  # the field after the state: the parent's pid
                return True
        except (OSError, IndexError):
            continue
    return False


def _merge(args: argparse.Namespace) -> int:
    from genrun.worker.runtime import ensure_merge_env

    if args.own_process:
        ensure_merge_env()  # before anything large is allocated: glibc reads its tunables at process start
    from genrun.worker.merge import merge_round

    job, spec = _load_job(args)
    storage = _storage(spec, args.output)
    if spec.dedup.partitions > 1 and not storage.exists(rec.round_report_key(job.round)):
        from genrun.worker.dedup_config import DedupConfig

        _partitioned(storage, DedupConfig.from_spec(spec.dedup), job, args.index)
        if args.index not in (None, 0):
            return errors.EXIT_OK  # index 0 finalises
    report = merge_round(storage, spec, job.run, job.round, list(job.shards))
    print(json.dumps({"round": report.round, "unique": report.unique_total, "qcPassed": report.qc_passed_total}))
    return errors.EXIT_OK


def _partitioned(storage: Storage, cfg: DedupConfig, job: rec.JobSpec, index: int | None) -> None:
    """Map and reduce for one index of an Indexed Job (each waits for the others' outputs), or all of them in turn
    when no index is given (one machine); `cfg.partitions` of each."""
    from genrun.worker import partitioned as pt

    parts = cfg.partitions
    mine = range(parts) if index is None else [index]
    for i in mine:
        if not storage.exists(pt.map_key(job.round, i)):
            pt.dedup_map(storage, cfg, job.round, list(job.shards), i, parts)
    _wait(storage, [pt.map_key(job.round, i) for i in range(parts)])
    for i in mine:
        if not storage.exists(pt.reduce_key(job.round, i)):
            pt.dedup_reduce(storage, cfg, job.round, parts, i, parts)
    if index in (None, 0):
        _wait(storage, [pt.reduce_key(job.round, i) for i in range(parts)])


def _wait(storage: Storage, keys: list[str], poll: float = 2.0) -> None:
    # Bounded by the Job's activeDeadlineSeconds; all indexes of the Indexed Job run at once (parallelism = count).
    while missing := [k for k in keys if not storage.exists(k)]:
        log.info("waiting for %d partition output(s), e.g. %s", len(missing), missing[0])
        time.sleep(poll)


def _dedup_map(args: argparse.Namespace) -> int:
    from genrun.worker.dedup_config import DedupConfig
    from genrun.worker.partitioned import dedup_map

    job, spec = _load_job(args)
    storage = _storage(spec, args.output)
    print(
        dedup_map(
            storage, DedupConfig.from_spec(spec.dedup), job.round, list(job.shards), _index(args), spec.dedup.partitions
        )
    )
    return errors.EXIT_OK


def _dedup_reduce(args: argparse.Namespace) -> int:
    from genrun.worker.dedup_config import DedupConfig
    from genrun.worker.partitioned import dedup_reduce

    job, spec = _load_job(args)
    storage = _storage(spec, args.output)
    p = spec.dedup.partitions
    print(dedup_reduce(storage, DedupConfig.from_spec(spec.dedup), job.round, p, _index(args), p))
    return errors.EXIT_OK


def _index(args: argparse.Namespace) -> int:
    if args.index is None:
        raise _Fail(errors.EXIT_USAGE, "--index is required (or JOB_COMPLETION_INDEX, as an Indexed Job sets it)")
    return int(args.index)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genrun worker")
    sub = p.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("generate", help="generate one seed shard")
    g.add_argument("--job", required=True, help="job spec JSON file (- for stdin); Jobs mount theirs from a ConfigMap")
    g.add_argument("--engine", choices=("vllm", "replay"), default=os.environ.get("GENRUN_ENGINE", "vllm"))
    g.add_argument("--output", help="override spec.output.path")
    g.set_defaults(fn=_generate, kind="shard")
    h = sub.add_parser("serve", help="host one engine for the shard jobs of a queue folder (the local runner's)")
    h.add_argument("--queue", required=True, help="folder of shard job files; each is answered with <name>.exit")
    h.add_argument("--engine", choices=("vllm", "replay"), default=os.environ.get("GENRUN_ENGINE", "vllm"))
    h.add_argument("--logs", help="folder for one log file per job")
    h.add_argument("--output", help="override spec.output.path")
    h.set_defaults(fn=_serve, kind="serve")
    m = sub.add_parser("serve-merges", help="run the merge jobs of a queue folder one by one (the local runner's)")
    m.add_argument("--queue", required=True, help="folder of merge job files; each is answered with <name>.exit")
    m.add_argument("--logs", help="folder for one log file per job")
    m.add_argument("--output", help="override spec.output.path")
    m.add_argument("--warm", help='a file holding the run\'s spec ({"spec": ...}): load what its merges need first')
    m.set_defaults(fn=_serve_merges, kind="serve-merges")
    index_default = os.environ.get("JOB_COMPLETION_INDEX")
    for name, fn, help_ in (
        ("merge", _merge, "merge, dedup and QC everything generated up to a round"),
        ("dedup-map", _dedup_map, "map step of partitioned dedup: keys, signatures, band keys of one input partition"),
        ("dedup-reduce", _dedup_reduce, "reduce step of partitioned dedup: verified pairs of one band partition"),
    ):
        m = sub.add_parser(name, help=help_)
        m.add_argument("--job", required=True, help="job spec JSON file (- for stdin)")
        m.add_argument("--output", help="override spec.output.path")
        m.add_argument("--index", type=int, default=int(index_default) if index_default else None,
                       help="partition index (default: $JOB_COMPLETION_INDEX of an Indexed Job)")  # fmt: skip
        m.set_defaults(fn=fn, kind="merge")
    return p


def main(argv: Sequence[str] | None = None, *, own_process: bool | None = None) -> int:
    """`own_process`: this call is the process's command (the default when `argv` is None), so the merge may
    re-execute it with its allocator settings; a caller in-process (tests, `genrun dedup`) keeps its own."""
    from genrun.worker.serve import LOG_FORMAT

    logging.basicConfig(level=os.environ.get("GENRUN_LOG_LEVEL", "INFO"), format=LOG_FORMAT)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):  # their INFO lines are not the worker's story
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    args.own_process = argv is None if own_process is None else own_process
    from genrun.worker.storage import StorageError

    try:
        code: int = args.fn(args)
        return code
    except _Fail as exc:
        print(f"genrun worker: error: {exc}", file=sys.stderr)
        return exc.code
    except StorageError as exc:
        print(f"genrun worker: error: storage: {exc}", file=sys.stderr)
        return errors.EXIT_STORAGE
    except Exception as exc:  # the semantic model and dedup.against sources: user settings, retrying cannot help
        from genrun.worker.against import AgainstError
        from genrun.worker.semantic import SemanticError

        if isinstance(exc, AgainstError | SemanticError):
            print(f"genrun worker: error: {exc}", file=sys.stderr)
            return errors.EXIT_USAGE if isinstance(exc, AgainstError) else errors.EXIT_MODEL
        raise


if __name__ == "__main__":
    sys.exit(main())
