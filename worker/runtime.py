"""The merge's execution machinery: the process's environment and allocator, the CPUs it may use, forked worker
processes and background threads.

The stages (read, tiers, QC, write, report) never fork, pin threads or tune malloc themselves: they call this module.
The worker's entry point calls `ensure_merge_env` once.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger("genrun.merge")

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


# ------------------------------------------------------------------------------------------------------------------
# Parallelism: the CPUs the process may use, forked worker processes, background threads

MERGE_WORKERS_ENV = "GENRUN_MERGE_WORKERS"
POOL_NICE = 10  # the worker processes' niceness, added to the Job's (lower priority: the Job's process runs first)
POOL_MIN_ROWS = 50_000  # below this many rows of work a pool costs more to fork than it saves: run in process
# Rows held from the merge's first pass to its second; a larger round's later shards are read again.
HOLD_BYTES = 512 * 2**20


def merge_workers() -> int:
    """Processes for the merge's QC, and threads for its dedup's numpy work: $GENRUN_MERGE_WORKERS, else the CPUs this
    process may use (its affinity, capped by its cgroup's CPU quota: a Job pod's CPU limit, not the node's cores).
    1: none (QC in the Job's own process, dedup in its one thread)."""
    raw = os.environ.get(MERGE_WORKERS_ENV, "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            log.warning("%s=%r is not a whole number: using the CPU count (1 turns worker processes off)",
                        MERGE_WORKERS_ENV, raw)  # fmt: skip
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpus()
    return max(1, min(cpus, quota)) if quota else cpus


def cgroup_cpus(root: str = "/sys/fs/cgroup") -> int | None:
    """CPUs of the cgroup's quota, rounded up (cgroup v2 cpu.max, else v1 cfs quota/period); None when unlimited."""
    import math

    for name, split in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu.cfs_period_us")):
        path = Path(root) / name
        try:
            text = path.read_text().split()
            quota, period = (text[0], text[1]) if split is None else (text[0], path.with_name(split).read_text())
            if quota in ("max", "-1"):
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        except (OSError, ValueError, IndexError):
            continue
    return None


def pool_workers(tasks: int, rows: int) -> int:
    """Worker processes for `tasks` independent tasks over `rows` rows in all: 1 (run in process) when forking would
    cost more than it saves, else one per CPU, at most one per task."""
    return min(merge_workers(), tasks) if rows >= POOL_MIN_ROWS else 1


def use_system_allocator() -> None:
    """Arrow's allocations through malloc: the merge holds a round's shards while it decides (one read each), and
    Arrow's default pool (mimalloc) keeps freed decode buffers mapped."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def background(name: str) -> ThreadPoolExecutor:
    """One thread for work that overlaps the caller's (file writes and Arrow encoding release the GIL); a context
    manager that joins it."""
    return ThreadPoolExecutor(1, thread_name_prefix=f"genrun-{name}")


# What a forked worker holds: `setup(inherited)`, made once in each worker from what it inherited at the fork.
_WORKER_STATE: Any = None


def _worker_init(setup: Callable[[Any], Any], inherited: Any) -> None:
    global _WORKER_STATE
    # Below the Job's own process: the workers fork while it still works on its critical path, and take the CPU it
    # leaves.
    os.nice(POOL_NICE)
    _WORKER_STATE = setup(inherited)


def _worker_run(task: Callable[[Any, int, Any], Any], k: int, payload: Any) -> Any:
    return task(_WORKER_STATE, k, payload)


class ForkPool:
    """Worker processes forked from this one: each inherits `inherited` through copy-on-write pages (nothing is
    pickled at the fork), makes its state once with `setup(inherited)`, and runs `task(state, k, payload)` per
    submitted task at a lower priority than this process. `setup` and `task` are module-level functions (a task is
    sent by reference). Fork only where no thread of ours runs: a fork copies no other thread, and a lock one held
    would stay held in the child.

    While the pool lives the objects that exist now stay out of the garbage collector's passes (`gc.freeze`), whose
    writes would copy their pages from the workers'."""

    def __init__(self, workers: int, setup: Callable[[Any], Any], inherited: Any, task: Callable[[Any, int, Any], Any]):
        import gc
        import multiprocessing

        gc.freeze()
        self.task = task
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            workers, multiprocessing.get_context("fork"), _worker_init, (setup, inherited)
        )

    def submit(self, k: int, payload: Any) -> Future[Any]:
        assert self._pool is not None, "the pool was closed"
        return self._pool.submit(_worker_run, self.task, k, payload)

    def close(self) -> None:
        """End the workers (what they hold of this process's pages is freed with them)."""
        import gc

        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
            gc.unfreeze()
