"""Merge, dedup and QC of a round: everything generated so far, deterministic, keep-first in (round, seed, index).

Two streaming passes over the shards, one shard in memory at a time: pass 1 reads the dedup key column and decides
which rows are first occurrences (exact normalised key, then MinHash LSH near-duplicates); pass 2 reads whole rows
again, runs QC on the unique ones and writes the dataset and the rejected rows. Outputs are published atomically;
the report is written last, as the round's completion marker.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from genrun.worker import records as rec
from genrun.worker.dedup import MinHasher, SeenIndex, components, dedup_keys, near_duplicate_labels
from genrun.worker.qc import QcPipeline
from genrun.worker.storage import Storage, local_copy

log = logging.getLogger("genrun.merge")


@dataclass
class _Shard:
    round: int
    seed: int
    manifest: rec.ShardManifest
    rows: int = 0


@dataclass
class _Pass1:
    shards: list[_Shard] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    first_text: dict[int, str] = field(default_factory=dict)  # global index -> instruction, first occurrences
    status: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # -1 kept, else index of the kept twin


def _read_table(storage: Storage, key: str, columns: list[str] | None = None) -> Any:
    import pyarrow.parquet as pq

    with local_copy(storage, key) as path:
        table = pq.read_table(path, columns=columns)
    if columns is None and not table.schema.equals(rec.example_schema(), check_metadata=False):
        raise ValueError(f"schema differs from the contract: {table.schema}")
    return table


def _pass1(storage: Storage, spec: Any, shard_ids: list[tuple[int, int]]) -> _Pass1:
    p = _Pass1()
    owner: dict[str, int] = {}
    status: list[int] = []
    for rnd, seed in sorted(shard_ids):
        mkey = rec.shard_manifest_key(rnd, seed)
        try:
            manifest = rec.shard_manifest_from(json.loads(storage.read_bytes(mkey)))
        except KeyError:
            p.missing.append(rec.shard_data_key(rnd, seed))
            continue
        dkey = rec.shard_data_key(rnd, seed)
        try:
            table = _read_table(storage, dkey)  # the whole file, schema-checked, before any row counts
        except Exception as exc:  # a corrupt or foreign file must not abort the merge: quarantine it
            log.warning("quarantined %s: %s", dkey, exc)
            p.quarantined.append(dkey)
            storage.write_bytes(f"quarantine/{dkey}.json", json.dumps({"key": dkey, "error": str(exc)}).encode())
            continue
        ins_col = table.column("instruction")
        res_col = table.column("response") if spec.dedup.key == "pair" else None
        keys = dedup_keys(ins_col, res_col, key=spec.dedup.key, normalized=spec.dedup.normalize)
        ins = ins_col.to_pylist()
        base = len(p.keys)
        for j, k in enumerate(keys):
            g = base + j
            p.keys.append(k)
            first = owner.setdefault(k, g)
            status.append(-1 if first == g else first)
            if first == g:
                p.first_text[g] = ins[j]
        p.shards.append(_Shard(rnd, seed, manifest, len(ins)))
    p.status = np.asarray(status, dtype=np.int64)
    return p


def _near(p: _Pass1, spec: Any, hasher: MinHasher) -> tuple[np.ndarray, np.ndarray]:
    """Mark near-duplicates among exact-unique rows; return (unique indices, their signatures)."""
    uniq = np.flatnonzero(p.status == -1)
    sigs = hasher.signatures([p.keys[i] for i in uniq])
    if spec.dedup.near_duplicates and len(uniq):
        labels = near_duplicate_labels(sigs, spec.dedup.threshold)
        dup = labels != np.arange(len(uniq))
        p.status[uniq[dup]] = uniq[labels[dup]]
        keep = ~dup
        return uniq[keep], sigs[keep]
    return uniq, sigs


def _near_from_reducers(p: _Pass1, spec: Any, storage: Storage, rnd: int) -> tuple[np.ndarray, np.ndarray]:
    """The partitioned path: the reducers' verified pairs (global row ids) instead of signatures computed here."""
    from genrun.worker.partitioned import load_kept_sigs, load_pairs

    parts = spec.dedup.partitions
    uniq = np.flatnonzero(p.status == -1)
    keep = np.ones(len(uniq), dtype=bool)
    if spec.dedup.near_duplicates and len(uniq):
        pos = np.full(len(p.status), -1, dtype=np.int64)
        pos[uniq] = np.arange(len(uniq))
        pairs = pos[load_pairs(storage, rnd, parts)]
        labels = components(len(uniq), pairs[(pairs >= 0).all(axis=1)])
        dup = labels != np.arange(len(uniq))
        p.status[uniq[dup]] = uniq[labels[dup]]
        keep = ~dup
    kept = uniq[keep]
    return kept, load_kept_sigs(storage, rnd, parts, kept, spec.dedup.num_perm)


def merge_round(storage: Storage, spec: Any, run: str, rnd: int, shard_ids: list[tuple[int, int]]) -> rec.RoundReport:
    import pyarrow as pa
    import pyarrow.parquet as pq

    report_key = rec.round_report_key(rnd)
    if storage.exists(report_key):
        log.info("round %d already merged: %s", rnd, storage.location(report_key))
        return rec.round_report_from(json.loads(storage.read_bytes(report_key)))
    t0 = time.monotonic()
    hasher = MinHasher(spec.dedup.num_perm, 1, spec.dedup.shingle_size)
    p = _pass1(storage, spec, shard_ids)
    if spec.dedup.partitions > 1:
        kept_idx, kept_sigs = _near_from_reducers(p, spec, storage, rnd)
    else:
        kept_idx, kept_sigs = _near(p, spec, hasher)
    n = len(p.status)

    # Duplicate clusters: every row points at the first occurrence it duplicates (chains resolved to the root).
    root = np.where(p.status == -1, np.arange(n), p.status)
    for _ in range(4):
        nxt = np.where(p.status[root] == -1, root, p.status[root])
        if np.array_equal(nxt, root):
            break
        root = nxt
    cluster = Counter(root.tolist())

    qc = QcPipeline.from_spec(spec.qc.filters)
    prefix = rec.merge_prefix(rnd)
    rejected_reason: Counter[str] = Counter()
    per_round: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # rows, new unique, new qc
    per_domain: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    per_temp: dict[float, list[int]] = defaultdict(lambda: [0, 0, 0])
    kept_total = 0
    with tempfile.TemporaryDirectory(prefix="genrun-merge-") as tmpd:
        tmp = Path(tmpd)
        ds_writer = pq.ParquetWriter(tmp / "dataset.parquet", rec.example_schema())
        rej_schema = (
            rec.example_schema()
            .append(pa.field("reject_reason", pa.string()))
            .append(pa.field("duplicate_of", pa.int64()))
        )
        rej_writer = pq.ParquetWriter(tmp / "rejected.parquet", rej_schema)
        with (
            open(tmp / "alpaca.jsonl", "w") as alpaca,
            open(tmp / "sharegpt.jsonl", "w") as sharegpt,
        ):
            g = 0
            for sh in p.shards:
                table = _read_table(storage, rec.shard_data_key(sh.round, sh.seed))
                rows = table.to_pylist()
                keep_mask, rej_rows = [], []
                for row in rows:
                    st = int(p.status[g])
                    counts_d = per_domain[row["domain"]]
                    counts_t = per_temp[round(float(row["temperature"]), 3)]
                    counts_r = per_round[sh.round]
                    for c in (counts_d, counts_t, counts_r):
                        c[0] += 1
                    reason, dup_of = None, None
                    if st != -1:
                        reason = "exact_duplicate" if p.keys[st] == p.keys[g] else "near_duplicate"
                        dup_of = st
                    else:
                        for c in (counts_d, counts_t, counts_r):
                            c[1] += 1
                        reason = qc.check(row)
                    if reason is None:
                        for c in (counts_d, counts_t, counts_r):
                            c[2] += 1
                        keep_mask.append(True)
                        alpaca.write(
                            json.dumps({"instruction": row["instruction"], "input": "", "output": row["response"]})
                            + "\n"
                        )
                        sharegpt.write(json.dumps({"conversations": [
                            {"from": "human", "value": row["instruction"]},
                            {"from": "gpt", "value": row["response"]},
                        ]}) + "\n")  # fmt: skip
                    else:
                        keep_mask.append(False)
                        rejected_reason[reason] += 1
                        rej_rows.append({**row, "reject_reason": reason, "duplicate_of": dup_of})
                    g += 1
                if any(keep_mask):
                    ds_writer.write_table(table.filter(pa.array(keep_mask)))
                    kept_total += sum(keep_mask)
                if rej_rows:
                    rej_writer.write_table(pa.Table.from_pylist(rej_rows, schema=rej_schema))
        ds_writer.close()
        rej_writer.close()

        seen = SeenIndex.empty(spec.dedup.threshold, spec.dedup.num_perm, 1, spec.dedup.shingle_size)
        seen.add([p.keys[i] for i in kept_idx], kept_sigs)
        np.savez_compressed(tmp / "seen-index.npz", **seen.to_npz())

        this_round = [s for s in p.shards if s.round == rnd]
        generated_by_round = Counter[int]()
        tokens_by_round = Counter[int]()
        skipped_by_round = Counter[int]()
        for s in p.shards:
            generated_by_round[s.round] += s.manifest.generated
            tokens_by_round[s.round] += s.manifest.tokens
            skipped_by_round[s.round] += s.manifest.skipped_online + s.manifest.skipped_in_shard
        unique_total = int((p.status == -1).sum())
        top = sorted(((c, r) for r, c in cluster.items() if c > 1), key=lambda x: (-x[0], x[1]))[:10]
        report = rec.RoundReport(
            round=rnd,
            shards=len(this_round),
            generated=generated_by_round[rnd],
            new_unique=per_round[rnd][1],
            new_qc_passed=per_round[rnd][2],
            generated_total=sum(generated_by_round.values()),
            unique_total=unique_total,
            qc_passed_total=kept_total,
            tokens=tokens_by_round[rnd],
            tokens_total=sum(tokens_by_round.values()),
            skipped_online=skipped_by_round[rnd],
            exact_duplicates=rejected_reason["exact_duplicate"],
            near_duplicates=rejected_reason["near_duplicate"],
            qc_rejected={k: v for k, v in sorted(rejected_reason.items()) if not k.endswith("_duplicate")},
            top_duplicates=tuple((p.first_text[r], c) for c, r in top),
            per_domain=tuple(rec.DomainYield(d, *v) for d, v in sorted(per_domain.items())),
            per_temperature=tuple(rec.TemperatureYield(t, *v) for t, v in sorted(per_temp.items())),
            quarantined=tuple(p.quarantined),
            dataset=storage.location(f"{prefix}/dataset.parquet"),
            report=storage.location(f"{prefix}/report.md"),
        )
        (tmp / "report.md").write_text(render_markdown(report, run, missing=p.missing))
        for name in (
            "dataset.parquet",
            "rejected.parquet",
            "alpaca.jsonl",
            "sharegpt.jsonl",
            "report.md",
            "seen-index.npz",
        ):
            storage.upload(tmp / name, f"{prefix}/{name}")
    storage.write_bytes(report_key, rec.to_json(report).encode())
    log.info(
        "round %d merged in %.1fs: %d rows, %d unique, %d kept", rnd, time.monotonic() - t0, n, unique_total, kept_total
    )
    return report


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def render_markdown(r: rec.RoundReport, run: str, missing: list[str] | None = None) -> str:
    """The round report in the problem's style: totals, duplication, top duplicates, QC rejections."""
    lines = [
        f"# genrun report: {run}, round {r.round}",
        "",
        "| | count | share |",
        "|---|---:|---:|",
        f"| Generated (instructions sampled) | {r.generated_total:,} | 100% |",
        f"| Unique after dedup | {r.unique_total:,} | {_pct(r.unique_total, r.generated_total)} |",
        f"| Duplication rate | | {100 * r.duplication_ratio:.1f}% |",
        f"| Final (unique and QC-passed) | {r.qc_passed_total:,} | {_pct(r.qc_passed_total, r.generated_total)} |",
        f"| This round: generated / new unique / new kept | {r.generated:,} / {r.new_unique:,} / {r.new_qc_passed:,} | "
        f"marginal yield {r.marginal_yield:.3f} |",
        f"| Skipped by the generators this round (seen before or in the shard) | {r.skipped_online:,} | |",
        f"| Tokens generated (all rounds) | {r.tokens_total:,} | |",
        "",
        "## Top duplicates",
        "",
        "| # | instruction | count | % of generated |",
        "|---:|---|---:|---:|",
    ]
    for i, (text, count) in enumerate(r.top_duplicates, 1):
        short = text.replace("|", "\\|").replace("\n", " ")[:100]
        lines.append(f"| {i} | {short} | {count:,} | {_pct(count, r.generated_total)} |")
    lines += ["", "## QC rejections by reason", "", "| reason | count |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(r.qc_rejected.items(), key=lambda x: -x[1])] or ["| (none) | 0 |"]
    lines += ["", f"Exact duplicates: {r.exact_duplicates:,}; near-duplicates (MinHash LSH): {r.near_duplicates:,}."]
    lines += [
        "",
        "## Yield per domain (rows written, all rounds)",
        "",
        "| domain | rows | unique | kept |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {d.domain or '(none)'} | {d.generated:,} | {d.new_unique:,} | {d.new_qc_passed:,} |" for d in r.per_domain
    ]
    lines += [
        "",
        "## Yield per temperature (rows written, all rounds)",
        "",
        "| temperature | rows | unique | kept |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {t.temperature:g} | {t.generated:,} | {t.new_unique:,} | {t.new_qc_passed:,} |" for t in r.per_temperature
    ]
    if r.quarantined or missing:
        lines += ["", "## Not merged", ""]
        lines += [f"- quarantined (unreadable): {k}" for k in r.quarantined]
        lines += [f"- missing (shard failed or not published): {k}" for k in missing or []]
    return "\n".join(lines) + "\n"


def load_seen_index(storage: Storage, rnd: int) -> SeenIndex | None:
    """The seen-index published by round `rnd`'s merge, or None (round 0, or not there)."""
    if rnd < 1:
        return None
    key = rec.seen_index_key(rnd)
    if not storage.exists(key):
        return None
    with local_copy(storage, key) as path, np.load(path) as data:
        return SeenIndex.from_npz({k: data[k] for k in data.files})
