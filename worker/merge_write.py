"""The merge's write stage: each shard's rows with the tiers' decisions and QC's verdicts, written once.

Outputs per round, each to the path `out` gives by file name (storage publishes them atomically when the merge's
block ends without an error): the dataset part (new unique QC-passed rows), the rejected part (with reject_reason
and duplicate_of, a global row id), the kept rows' ids and instructions (kept.parquet, for the report's texts), the
Alpaca and ShareGPT exports, and the semantic tier's drops with their texts. The counters the report sums come back
as `RoundCounts`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from genrun.contract import records as rec
from genrun.worker import runtime
from genrun.worker.export import json_strings, part_metadata
from genrun.worker.merge_qc import QcStage
from genrun.worker.merge_read import Shard, held_rows
from genrun.worker.merge_state import Counts
from genrun.worker.storage import Storage
from genrun.worker.tiers import DUPLICATE_REASONS, Decisions

if TYPE_CHECKING:
    from genrun.contract.api import GenerationRunSpec


@dataclass
class RoundCounts:
    """What the round's rows add to the report's totals."""

    per_domain: dict[str, Counts] = field(default_factory=dict)
    per_temperature: dict[float, Counts] = field(default_factory=dict)
    round: Counts = field(default_factory=Counts)
    rejected: Counter[str] = field(default_factory=Counter)
    per_shard: list[rec.ShardYield] = field(default_factory=list)
    left_domain: int = 0
    early: int = 0


@dataclass
class _ShardRows:
    """One shard's rows as the write stage sees them: kept (by every tier), passed (kept and QC-passed), and each
    row's reason as a code into `why` (-1: none, it passed)."""

    table: Any
    kept: np.ndarray
    passed: np.ndarray
    reason: np.ndarray
    why: list[str]
    qc_ok: np.ndarray
    fresh: np.ndarray


def _shard_rows(table: Any, dec: Decisions, g: int, qc: Any, seed: int) -> _ShardRows:
    """A duplicate's tier, else QC's verdict for the rows it checked; vectorised, no per-row Python objects."""
    first, check, (why, vcodes) = qc
    n = table.num_rows
    kept = dec.kept[g : g + n]
    if np.count_nonzero(kept[check]) != np.count_nonzero(kept):  # a kept row without a verdict would pass
        raise RuntimeError(f"shard {seed}: a kept row was not judged by QC")
    reason = np.full(n, -1, np.int64)
    reason[check] = vcodes
    qc_ok = reason < 0
    reason[~kept] = len(why) + dec.tier[g : g + n][~kept]
    why = why + list(DUPLICATE_REASONS)  # the tiers' reasons after QC's, in the order of their codes
    fresh = first & dec.fresh[g : g + n]  # the shard's yield: new against earlier rounds, once per key
    return _ShardRows(table, kept, reason < 0, reason, why, qc_ok, fresh)


def _codes(values: np.ndarray) -> tuple[np.ndarray, list[float]]:
    uniq, inv = np.unique(values, return_inverse=True)
    return inv, [float(x) for x in uniq]


def _count(counts: RoundCounts, sh: Shard, s: _ShardRows) -> None:
    """The shard's rows into the round's counters: its yield, per domain and temperature, the rows the generator's
    QC rejected before their responses (new unique examples that failed QC, judged against the same seen-index)."""
    import pyarrow.compute as pc

    table, kept, passed = s.table, s.kept, s.passed
    n = table.num_rows
    early = sh.manifest.qc_rejected_before_response
    n_early = sum(early.values())
    counts.early += n_early
    counts.rejected.update(early)
    counts.round.unique += n_early
    counts.per_shard.append(
        rec.ShardYield(sh.seed, n + n_early, sh.manifest.tokens, int(s.fresh.sum()) + n_early,
                       int((s.fresh & s.qc_ok).sum()), generated=sh.manifest.generated, kept=int((kept & s.qc_ok).sum()))
    )  # fmt: skip
    # The domain actually generated (quality column, when the generator had the embedding model), else the domain
    # asked for; rows that left their asked domain are counted.
    asked, gen = pc.fill_null(table.column("domain"), ""), table.column("generated_domain")
    counts.left_domain += int(pc.sum(pc.fill_null(pc.not_equal(gen, asked), False)).as_py() or 0)
    dom = pc.dictionary_encode(pc.coalesce(gen, asked)).combine_chunks()
    temp = np.round(table.column("temperature").to_numpy().astype(np.float64), 3)
    for codes, names, acc in (
        (np.asarray(dom.indices), dom.dictionary.to_pylist(), counts.per_domain),
        (*_codes(temp), counts.per_temperature),
    ):
        for j, name in enumerate(names):
            sel = codes == j
            c = acc.setdefault(name, Counts())
            c.rows += int(sel.sum())
            c.unique += int((sel & kept).sum())
            c.kept += int((sel & passed).sum())
    counts.round.rows += n
    counts.round.unique += int(kept.sum())
    counts.round.kept += int(passed.sum())


def _write_exports(table: Any, alpaca: IO[str], sharegpt: IO[str]) -> None:
    ins, res = (json_strings(table.column(c)) for c in ("instruction", "response"))
    alpaca.writelines(f'{{"instruction": {i}, "input": "", "output": {r}}}\n' for i, r in zip(ins, res, strict=True))
    sharegpt.writelines(
        f'{{"conversations": [{{"from": "human", "value": {i}}}, {{"from": "gpt", "value": {r}}}]}}\n'
        for i, r in zip(ins, res, strict=True)
    )


def _write_rejected(
    rj: Any, table: Any, ridx: np.ndarray, rcodes: np.ndarray, why: list[str], dup_of: np.ndarray
) -> None:
    """A shard's rejected rows with their reason (a code into `why`) and the row they duplicate (-1: none)."""
    import pyarrow as pa

    rr = pa.DictionaryArray.from_arrays(pa.array(rcodes, pa.int32()), pa.array(why, pa.string()))
    bad = table.take(pa.array(ridx)).append_column("reject_reason", rr.cast(pa.string()))
    rj.write_table(bad.append_column("duplicate_of", pa.array(dup_of, pa.int64(), mask=dup_of < 0)))


class _Parts:
    """The round's Parquet parts and JSONL exports, open while the shards are written."""

    def __init__(self, out: dict[str, Path], metadata: dict[bytes, bytes]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        def part(name: str, schema: Any, distinct: tuple[str, ...] = ()) -> Any:
            return pq.ParquetWriter(out[name], schema, use_dictionary=rec.dictionary_columns(schema, distinct))

        rej_schema = (
            rec.example_schema().append(pa.field("reject_reason", pa.string()))
            .append(pa.field("duplicate_of", pa.int64()))
        )  # fmt: skip
        # kept rows have distinct instructions; rejected rows repeat them (exact duplicates)
        self.dataset = part("dataset.parquet", rec.example_schema().with_metadata(metadata), ("instruction",))
        self.rejected = part("rejected.parquet", rej_schema)
        self.kept = part(
            "kept.parquet", pa.schema([("id", pa.int64()), ("instruction", pa.string())]), ("instruction",)
        )
        self.alpaca = open(out["alpaca.jsonl"], "w")  # noqa: SIM115 (closed in close())
        self.sharegpt = open(out["sharegpt.jsonl"], "w")  # noqa: SIM115

    def close(self) -> None:
        for f in (self.alpaca, self.sharegpt):
            f.close()
        for w in (self.dataset, self.rejected, self.kept):
            w.close()


def _write_kept(parts: _Parts, s: _ShardRows, ids: np.ndarray) -> None:
    import pyarrow as pa

    kidx = np.flatnonzero(s.kept)
    if len(kidx):
        parts.kept.write_table(
            pa.table({"id": pa.array(ids[kidx]), "instruction": s.table.column("instruction").take(pa.array(kidx))})
        )
    pidx = np.flatnonzero(s.passed)
    if len(pidx):
        good = s.table.take(pa.array(pidx))
        parts.dataset.write_table(good)
        _write_exports(good, parts.alpaca, parts.sharegpt)


def write_rows(
    storage: Storage,
    spec: GenerationRunSpec,
    run: str,
    shards: list[Shard],
    dec: Decisions,
    out: dict[str, Path],
    qc: QcStage,
) -> RoundCounts:
    """Each shard's rows (held since the read stage, or read again) with QC's verdicts: the dataset part, rejected
    rows, exports, kept rows; the rejected rows (most of a round's) are taken and encoded by a background thread
    while this one goes on to the next shard, one shard in flight."""
    import pyarrow as pa

    counts = RoundCounts()
    sem_texts = []
    drops = dec.semantic_drops
    parts = _Parts(out, part_metadata(spec, run))
    writing = None
    g = 0
    try:
        with runtime.background("rejected") as writer:
            for k, sh in enumerate(shards):
                verdicts = qc.result(k)
                # dropped as soon as written (a shard QC's workers inherited stays theirs until the pool ends)
                table, sh.table = held_rows(storage, sh), None
                n = table.num_rows
                s = _shard_rows(table, dec, g, verdicts, sh.seed)
                _count(counts, sh, s)
                if drops is not None:
                    mine = drops.rows[(drops.rows >= g) & (drops.rows < g + n)] - g
                    sem_texts.append(table.column("instruction").take(pa.array(mine, pa.int64())).combine_chunks())
                _write_kept(parts, s, dec.ids[g : g + n])
                ridx = np.flatnonzero(~s.passed)
                if len(ridx):
                    rcodes = s.reason[ridx]
                    counts.rejected.update({s.why[c]: int(m) for c, m in enumerate(np.bincount(rcodes)) if m})
                    dup_of = np.where(s.kept[ridx], -1, dec.root[g : g + n][ridx])
                    if writing is not None:
                        writing.result()
                    writing = writer.submit(_write_rejected, parts.rejected, table, ridx, rcodes, s.why, dup_of)
                g += n
            if writing is not None:
                writing.result()
    finally:
        parts.close()
    if drops is not None:
        _write_semantic(drops, sem_texts, out["semantic.parquet"])
    return counts


def _write_semantic(drops: Any, texts: list[Any], path: Path) -> None:
    """The round's semantic drops with their texts, for the report's clusters."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    col = pa.concat_arrays(texts) if texts else pa.array([], pa.string())
    pq.write_table(drops.table.append_column("instruction", col), path)
