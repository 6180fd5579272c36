"""The merge's QC stage: per shard of the round, the rows QC must judge and their verdicts.

The rows to judge are each shard's first row of every key new against earlier rounds (the shard's yield; every row
the round keeps is one of them, and a row a later tier drops only costs a verdict). QC is a pure function of each
row, so the verdicts, and every output, are the same whether they are made in this process or in forked workers
(`runtime.ForkPool`): with several workers and enough rows, the stage starts as soon as the tiers know the rows new
against earlier rounds, and the workers judge the held shards while the merge decides the rest and writes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from genrun.worker import runtime
from genrun.worker.merge_read import Shard, held_rows
from genrun.worker.qc import QcPipeline
from genrun.worker.storage import Storage

log = logging.getLogger("genrun.merge")

Verdicts = tuple[list[str], np.ndarray]  # (the distinct reasons, each row's code into them; -1: passed)


def verdict_codes(verdicts: Sequence[str | None]) -> Verdicts:
    """QC's verdicts as (the distinct reasons, each verdict's code into them; -1 for None, a pass)."""
    names = sorted({v for v in verdicts if v is not None})
    code = {v: i for i, v in enumerate(names)}
    return names, np.fromiter((-1 if v is None else code[v] for v in verdicts), np.int64, len(verdicts))


def _worker_setup(inherited: tuple[Any, list[Any], list[np.ndarray]]) -> tuple[QcPipeline, list[Any], list[np.ndarray]]:
    """In each forked worker: the pipeline, and every shard's table held at the fork with its rows to check."""
    filters, held, check = inherited
    return QcPipeline.from_spec(filters), held, check


def _worker_check(state: tuple[QcPipeline, list[Any], list[np.ndarray]], k: int, rows: Any) -> Verdicts:
    """Shard k's verdicts on its rows to check, taken from the table inherited at the fork, or `rows` when the shard
    was not held then."""
    import pyarrow as pa

    qc, held, check = state
    if rows is None:
        table = held[k]
        rows = table.select(qc.columns(table.column_names)).take(pa.array(check[k], pa.int64()))
    return verdict_codes(qc.check_table(rows))


class QcStage:
    """`start(hashes, fresh)` once the rows new against earlier rounds are known, then `result(k)` per shard in order,
    then `close()` (a context manager closes it too)."""

    def __init__(self, storage: Storage, filters: Any, shards: list[Shard]) -> None:
        self.storage, self.shards, self.filters = storage, shards, filters
        self.qc = QcPipeline.from_spec(filters)
        self.rows: list[tuple[np.ndarray, np.ndarray]] | None = None  # per shard: (first row of its key, to check)
        self.pool: runtime.ForkPool | None = None
        self.pending: dict[int, Any] = {}
        self.held: list[bool] = []
        self.submitted = self.ahead = 0

    def start(self, hashes: np.ndarray, fresh: np.ndarray) -> None:
        """The rows to check from the round's key hashes and its rows new against earlier rounds; with workers, the
        fork and the held shards' checks."""
        if self.rows is not None:
            raise RuntimeError("QC of the round started twice")
        self.rows = []
        g = 0
        for sh in self.shards:
            n = sh.rows
            _, in_shard = np.unique(hashes[g : g + n], return_index=True)
            first = np.zeros(n, dtype=bool)
            first[in_shard] = True
            self.rows.append((first, np.flatnonzero(first & fresh[g : g + n])))
            g += n
        total = sum(len(c) for _, c in self.rows)
        workers = runtime.pool_workers(len(self.shards), total) if self.qc.filters else 1  # no filters: all pass
        if workers > 1:
            # The workers inherit the shards held now and are sent only a shard's number.
            self.held = [sh.table is not None for sh in self.shards]
            inherited = (self.filters, [sh.table for sh in self.shards], [c for _, c in self.rows])
            self.pool = runtime.ForkPool(workers, _worker_setup, inherited, _worker_check)
            self.ahead = workers + 1  # shards in flight: each worker busy, one queued (bounded memory)
            log.info("QC of %d rows in %d worker processes", total, workers)
            # every held shard at once; the others from `result`, a few ahead of the writer
            while self.submitted < len(self.held) and self.held[self.submitted]:
                self._submit(self.submitted)

    def _rows(self, k: int) -> Any:
        """Shard k's rows to check, with the columns QC reads."""
        import pyarrow as pa

        assert self.rows is not None
        table = held_rows(self.storage, self.shards[k])
        return table.select(self.qc.columns(table.column_names)).take(pa.array(self.rows[k][1], pa.int64()))

    def _submit(self, k: int) -> None:
        # a shard not held at the fork is read again here, and its rows to check pickled to the worker
        assert self.pool is not None
        self.pending[k] = self.pool.submit(k, None if self.held[k] else self._rows(k))
        self.submitted = k + 1

    def result(self, k: int) -> tuple[np.ndarray, np.ndarray, Verdicts]:
        """Shard k's (first row of each key, rows checked, their verdicts as codes); call in shard order, after
        `start`, while its table is held."""
        if self.rows is None:
            raise RuntimeError("QC of the round was never started (the tiers never reported the new rows)")
        first, check = self.rows[k]
        if self.pool is None:
            judged = len(check) and self.qc.filters  # `_rows` of no filter would be a table of no columns (no rows)
            return first, check, verdict_codes(self.qc.check_table(self._rows(k)) if judged else [None] * len(check))
        while self.submitted < min(len(self.rows), k + 1 + self.ahead):
            self._submit(self.submitted)
        verdicts: Verdicts = self.pending.pop(k).result()
        return first, check, verdicts

    def close(self) -> None:
        """End the workers, once every verdict is in."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> QcStage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
