"""The merge's execution environment: what the process sets for itself before the data path runs.

The rules (tiers, QC, the writers) never tune the process; the worker's entry point calls `ensure_merge_env` once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

# The merge process's malloc (glibc; other libcs ignore it): mappings advised for transparent huge pages, and blocks
# under 32 MiB served from malloc's heaps, reused, rather than each mapped afresh. The merge allocates and frees large
# numpy and Arrow buffers all along (bench/README.md has the page faults and times). glibc reads its tunables only at
# process start, so the merge re-executes itself once with them.
MERGE_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432"}


def merge_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with MERGE_ENV's settings added: tunables the environment already sets come after ours (glibc takes
    the last of a name), so they win."""
    out = dict(environ)
    for k, v in MERGE_ENV.items():
        out[k] = f"{v}:{environ[k]}" if environ.get(k) else v
    return out


def has_merge_env(environ: Mapping[str, str]) -> bool:
    return all(environ.get(k, "").startswith(v) for k, v in MERGE_ENV.items())


def ensure_merge_env(argv: Sequence[str] | None = None) -> None:
    """Re-execute this process with MERGE_ENV unless it already runs with it (a merge Job's pod, the local runner and
    bench/merge.py all start the merge through `genrun worker merge`, which calls this first). Returns only when the
    environment is in place."""
    if has_merge_env(os.environ):
        return
    args = [sys.executable, *(["-P"] if sys.flags.safe_path else []), *(argv if argv is not None else _argv())]
    os.execve(sys.executable, args, merge_env(os.environ))


def _argv() -> list[str]:
    # `python -P -m genrun.operator.cli worker merge ...`, the `genrun` console script or `python -m
    # genrun.worker.cli merge ...`: re-run the module that the command line named.
    main = sys.modules["__main__"]
    module = getattr(getattr(main, "__spec__", None), "name", None) or "genrun.operator.cli"
    return ["-m", module, *sys.argv[1:]]
