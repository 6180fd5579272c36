"""The merge's report stage: the round's cumulative totals as a `RoundReport` and its Markdown rendering.

The largest clusters name their kept row's instruction, read from the kept.parquet of the rounds that hold it; the
semantic clusters add their dropped members from the rounds' semantic.parquet.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from genrun.contract import records as rec
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.merge_state import Counts, State, state_key
from genrun.worker.storage import Storage, read_parquet
from genrun.worker.tiers import DUPLICATE_REASONS, TIERS, enabled_tiers


def _top_duplicates(storage: Storage, state: State) -> tuple[tuple[str, int], ...]:
    top = [(i, n) for i, n in state.totals.top if n > 1]
    text = _kept_texts(storage, state, np.array([i for i, _ in top], dtype=np.int64))
    return tuple((text[i], n) for i, n in top)


def _kept_texts(storage: Storage, state: State, ids: np.ndarray) -> dict[int, str]:
    """Instructions of kept rows by global id, from the kept.parquet of the rounds that hold them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rounds = sorted(state.totals.round_first_id)
    firsts = np.array([state.totals.round_first_id[r] for r in rounds])
    text: dict[int, str] = {}
    for r in {rounds[int(np.searchsorted(firsts, i, "right")) - 1] for i in ids.tolist()}:
        t = read_parquet(storage, state_key(r, "kept.parquet"))
        t = t.filter(pc.is_in(t.column("id"), value_set=pa.array(ids)))
        text.update(zip(t.column("id").to_pylist(), t.column("instruction").to_pylist(), strict=True))
    return text


def _semantic_clusters(storage: Storage, state: State, k: int = 10, sample: int = 5) -> tuple[Any, ...]:
    """The largest semantic clusters so far: the kept first row, up to `sample` dropped members (earliest first)
    with their cosine, and the cluster's size (its first and every member the semantic tier dropped)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not state.totals.sem_top:
        return ()
    ids = np.array([i for i, _ in state.totals.sem_top[:k]], dtype=np.int64)
    sizes = np.array([n for _, n in state.totals.sem_top[:k]], dtype=np.int64)
    first = _kept_texts(storage, state, ids)
    members: dict[int, list[tuple[str, float]]] = {int(i): [] for i in ids.tolist()}
    for r in sorted(state.totals.round_first_id):  # earliest rounds first: members in id order
        key = state_key(r, "semantic.parquet")
        if not storage.exists(key):
            continue
        t = read_parquet(storage, key)
        t = t.filter(pc.is_in(t.column("duplicate_of"), value_set=pa.array(ids)))
        for d, text, cos in zip(*(t.column(c).to_pylist() for c in ("duplicate_of", "instruction", "cosine")),
                                strict=True):  # fmt: skip
            if len(members[d]) < sample:
                members[d].append((str(text), round(float(cos), 4)))
    return tuple(
        rec.SemanticCluster(first[int(i)], tuple(members[int(i)]), int(n))
        for i, n in zip(ids.tolist(), sizes.tolist(), strict=True)
    )


def round_report(storage: Storage, cfg: DedupConfig, state: State, rnd: int, shards: int) -> rec.RoundReport:
    """The report of round `rnd` from the state's totals (all rounds so far)."""
    tot = state.totals
    this = tot.per_round.get(rnd, Counts())
    sem_on = cfg.semantic is not None
    return rec.RoundReport(
        round=rnd,
        shards=shards,
        generated=tot.generated.get(rnd, 0),
        new_unique=this.unique,
        new_qc_passed=this.kept,
        generated_total=sum(tot.generated.values()),
        unique_total=sum(c.unique for c in tot.per_round.values()),
        qc_passed_total=sum(c.kept for c in tot.per_round.values()),
        tokens=tot.tokens.get(rnd, 0),
        tokens_total=sum(tot.tokens.values()),
        skipped_online=tot.skipped.get(rnd, 0),
        duplicates={
            **{t.name: tot.rejected.get(t.reason, 0) for t in TIERS},
            rec.ONLINE_TIER: sum(tot.skipped.values()),
        },
        discarded=tot.discarded.get(rnd, 0),
        discarded_total=sum(tot.discarded.values()),
        dedup_tiers=tuple(t.name for t in enabled_tiers(cfg)),
        semantic_clusters=_semantic_clusters(storage, state) if sem_on else (),
        qc_rejected={k: v for k, v in sorted(tot.rejected.items()) if k not in DUPLICATE_REASONS},
        top_duplicates=_top_duplicates(storage, state),
        per_domain=tuple(rec.DomainYield(d, c.rows, c.unique, c.kept) for d, c in sorted(tot.per_domain.items())),
        per_temperature=tuple(
            rec.TemperatureYield(t, c.rows, c.unique, c.kept) for t, c in sorted(tot.per_temperature.items())
        ),
        quarantined=tuple(tot.quarantined),
        quarantined_count=len(tot.quarantined),
        left_domain=tot.left_domain,
        qc_rejected_before_response=tot.early,
        dataset=storage.location(rec.DATASET_PREFIX),
        report=storage.location(f"{rec.merge_prefix(rnd)}/report.md"),
    )


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def render_markdown(r: rec.RoundReport, run: str, missing: list[str] | None = None) -> str:
    """The round report in the problem's style: totals, duplication, top duplicates, QC rejections. Generated =
    unique + the duplicates of every tier + discarded (`records.Accounting`)."""
    a = rec.Accounting.total(r)
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
        f"| Duplicates (all rounds): {' / '.join(a.per_tier)} | {' / '.join(f'{n:,}' for n in a.per_tier.values())} | "
        f"{_pct(a.duplicates, a.generated)} |",
        f"| Discarded (sampled past a shard's quota, or malformed) | {a.discarded:,} | {_pct(a.discarded, a.generated)} |",
        f"| Skipped by the generators this round (online: seen before or in the shard) | {r.skipped_online:,} | |",
        f"| Rejected by QC in the generators before their responses (in unique and QC rejections) | "
        f"{r.qc_rejected_before_response:,} | |",
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
    d = r.duplicates
    lines += ["", f"Exact duplicates: {d['exact']:,}; near-duplicates (MinHash LSH): {d['near']:,}."]
    lines += [
        "",
        "## Yield per domain (rows written, all rounds)",
        "",
        *(
            [f"Domain generated (nearest spec domain); {r.left_domain:,} rows left the domain they were asked for.", ""]
            if r.left_domain
            else []
        ),
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
        lines += ["", f"## Not merged ({r.quarantined_count} quarantined)", ""]
        lines += [f"- quarantined (unreadable or damaged): {k}" for k in r.quarantined]
        lines += [f"- missing (shard failed or not published): {k}" for k in missing or []]
    return "\n".join(lines) + "\n"
