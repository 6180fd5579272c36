"""A self-contained HTML page (inline SVG, no scripts, no network) for people who would rather look than read:
kept vs target and generated across rounds, duplication and yield per round, yield per temperature and per domain,
then the top duplicates, the QC rejections by reason and a few sample rows.

Every chart has a labelled value axis with gridlines; ratios are drawn on a fixed 0-100% axis (so 17% duplication
looks like 17%), counts on an axis from 0 to a round number above the largest value and the target."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genrun.contract import records as rec
from genrun.contract.records import Accounting, RoundReport
from genrun.contract.status import RunStatus
from genrun.operator import cost
from genrun.operator.conditions import FAILED, SUCCEEDED
from genrun.operator.loop import read_status_document
from genrun.worker.storage import Storage, local_copy

W, H = 600, 300  # one chart
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 42, 64  # plot margins: value axis labels, title, category labels and legend
SAMPLE_ROWS = 5

# How the page draws and words a dedup tier's count: (legend, colour, rejection reason). A tier not listed here (a new
# one) still shows, under its own name ("prefix", "prefix duplicate") in the colour _OTHER_TIER.
_TIER_STYLE: dict[str, tuple[str, str, str]] = {
    "exact": ("exact", "#dc2626", "exact duplicate"),
    "near": ("near (MinHash)", "#f97316", "near duplicate"),
    "semantic": ("semantic", "#a855f7", "semantic duplicate"),
    "online": ("online (generators)", "#64748b", "online duplicate (skipped by the generators)"),
}
_OTHER_TIER = "#0d9488"


def _tier_style(tier: str) -> tuple[str, str, str]:
    return _TIER_STYLE.get(tier, (tier, _OTHER_TIER, f"{tier} duplicate"))


@dataclass(frozen=True)
class Series:
    name: str
    color: str
    values: Sequence[float]


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _nice_max(v: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above v: an axis top with round ticks."""
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= v:
            return float(m * exp)
    return float(10 * exp)


def bar_chart(
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    *,
    ratio: bool = False,
    axis_title: str = "",
    x_title: str = "",
    target: float | None = None,
) -> str:
    """Grouped bars with a value axis (5 ticks and gridlines), category labels, a legend and an optional dashed
    target line. `ratio`: values are 0-1, drawn on a 0-100% axis."""
    n, k = max(1, len(labels)), max(1, len(series))
    top = 1.0 if ratio else _nice_max(max([v for s in series for v in s.values] + [target or 0.0, 1.0]))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    y0 = TOP + ph

    def y(v: float) -> float:
        return y0 - ph * max(0.0, min(v, top)) / top

    def fmt(v: float) -> str:
        return f"{v:.0%}" if ratio else f"{v:,.0f}"

    out = [
        f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{_esc(title)}">',
        f'<text x="{W / 2}" y="18" text-anchor="middle" font-weight="bold" font-size="14">{_esc(title)}</text>',
    ]
    for i in range(6):  # value axis: ticks, labels, gridlines
        v = top * i / 5
        out.append(f'<line x1="{LEFT}" y1="{y(v):.1f}" x2="{LEFT + pw}" y2="{y(v):.1f}" stroke="#e5e7eb"/>'
                   f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">{fmt(v)}</text>')  # fmt: skip
    out.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{y0}" stroke="#374151"/>'
               f'<line x1="{LEFT}" y1="{y0}" x2="{LEFT + pw}" y2="{y0}" stroke="#374151"/>')  # fmt: skip
    if axis_title:
        out.append(f'<text transform="translate(14 {TOP + ph / 2}) rotate(-90)" text-anchor="middle" font-size="11">'
                   f"{_esc(axis_title)}</text>")  # fmt: skip
    slot = pw / n
    bw = min(slot * 0.8 / k, 70.0)  # one category: bars of a sensible width, centred
    chars = max(4, int(slot / 7.5))  # category labels clipped to their slot
    for i, label in enumerate(labels):
        x0 = LEFT + i * slot + (slot - bw * k) / 2
        for j, s in enumerate(series):
            v = s.values[i]
            x, h = x0 + j * bw, y0 - y(v)
            out.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bw:.1f}" height="{h:.1f}" fill="{s.color}">'
                       f"<title>{_esc(s.name)}, {_esc(label)}: {_esc(fmt(v))}</title></rect>")  # fmt: skip
            if n * k <= 24:  # values on the bars while they fit
                out.append(f'<text x="{x + bw / 2:.1f}" y="{y(v) - 3:.1f}" font-size="10" text-anchor="middle">'
                           f"{_esc(f'{v:.1%}' if ratio else f'{v:,.0f}')}</text>")  # fmt: skip
        short = label if len(label) <= chars else label[: chars - 1] + "\u2026"
        out.append(f'<text x="{x0 + bw * k / 2:.1f}" y="{y0 + 15}" font-size="11" text-anchor="middle">'
                   f"<title>{_esc(label)}</title>{_esc(short)}</text>")  # fmt: skip
    if x_title:
        out.append(
            f'<text x="{LEFT + pw / 2}" y="{y0 + 31}" font-size="11" text-anchor="middle">{_esc(x_title)}</text>'
        )
    lx = LEFT
    if target is not None:  # the line across the plot; its label in the legend, where no bar can hide it
        ty = y(target)
        out.append(f'<line x1="{LEFT}" y1="{ty:.1f}" x2="{LEFT + pw}" y2="{ty:.1f}" stroke="#111827" '
                   f'stroke-width="1.5" stroke-dasharray="6 4"><title>target {_esc(fmt(target))}</title></line>'
                   f'<line x1="{lx}" y1="{H - 11}" x2="{lx + 18}" y2="{H - 11}" stroke="#111827" stroke-width="1.5" '
                   f'stroke-dasharray="6 4"/><text x="{lx + 22}" y="{H - 7}" font-size="11">target {_esc(fmt(target))}</text>')  # fmt: skip
        lx += 40 + 7 * len(f"target {fmt(target)}")
    for s in series:
        out.append(f'<rect x="{lx}" y="{H - 16}" width="10" height="10" fill="{s.color}"/>'
                   f'<text x="{lx + 14}" y="{H - 7}" font-size="11">{_esc(s.name)}</text>')  # fmt: skip
        lx += 24 + 7 * len(s.name)
    out.append("</svg>")
    return "".join(out)


def _table(caption: str, head: Sequence[str], rows: Sequence[Sequence[object]], empty: str) -> str:
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    if not rows:
        body = f'<tr><td colspan="{len(head)}">{_esc(empty)}</td></tr>'
    return (f"<table><caption>{_esc(caption)}</caption><thead><tr>"
            + "".join(f"<th>{_esc(h)}</th>" for h in head) + f"</tr></thead><tbody>{body}</tbody></table>")  # fmt: skip


def _clip(text: str, n: int = 280) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def tiers_sentence(tiers: Sequence[str]) -> str:
    """What "unique" means for this run: the tiers the target counts through."""
    if "semantic" in tiers:
        return "Unique means semantic-unique: the target counts rows kept by the exact, near and semantic tiers."
    return f"Unique means kept by the {' and '.join(tiers)} tiers."


def render_html(
    run: str,
    reports: Sequence[RoundReport],
    target: int | None = None,
    samples: Sequence[dict[str, Any]] = (),
    verdict: str = "",
    status: RunStatus | None = None,
    arm_samples: Sequence[tuple[str, Sequence[str], Sequence[tuple[str, str]]]] = (),
) -> str:
    """The page. `arm_samples`: per arm, a few kept instructions and a few thrown away with the reason
    (`arm_samples_of` reads them from a run's storage)."""
    st = status or RunStatus()
    rounds = [str(r.round) for r in reports]
    last = reports[-1]
    pt, pd = last.per_temperature, last.per_domain
    charts = [
        bar_chart("Kept vs target, unique and generated (cumulative)", rounds, [
            Series("generated", "#9ca3af", [r.generated_total for r in reports]),
            Series("unique", "#3b82f6", [r.unique_total for r in reports]),
            Series("kept (unique + QC)", "#16a34a", [r.qc_passed_total for r in reports]),
        ], axis_title="examples", x_title="round", target=target),
        bar_chart("Duplication rate per round", rounds, [
            Series("duplicates / generated", "#dc2626", [1 - r.unique_ratio if r.generated else 0 for r in reports]),
        ], ratio=True, axis_title="share of the round's generated", x_title="round"),
        bar_chart("Duplicates per tier (cumulative)", rounds, [
            Series(*_tier_style(tier)[:2], [r.duplicates[tier] for r in reports]) for tier in rec.DUPLICATE_TIERS
        ], axis_title="rows dropped", x_title="round"),
        bar_chart("Marginal yield per round", rounds, [
            Series("new kept / generated", "#7c3aed", [r.marginal_yield for r in reports]),
        ], ratio=True, axis_title="new kept per generated", x_title="round"),
        bar_chart("Yield per temperature (all rounds)", [f"T={t.temperature:g}" for t in pt], [
            Series("unique / generated", "#3b82f6", [t.new_unique / t.generated if t.generated else 0 for t in pt]),
            Series("kept / generated", "#16a34a", [t.new_qc_passed / t.generated if t.generated else 0 for t in pt]),
        ], ratio=True, axis_title="share of rows", x_title="sampling temperature"),
        bar_chart("Yield per domain (all rounds)", [d.domain or "(none)" for d in pd], [
            Series("unique / generated", "#3b82f6", [d.new_unique / d.generated if d.generated else 0 for d in pd]),
            Series("kept / generated", "#16a34a", [d.new_qc_passed / d.generated if d.generated else 0 for d in pd]),
        ], ratio=True, axis_title="share of rows", x_title="domain"),
    ]  # fmt: skip
    acc = Accounting.total(last)
    rejections = [(_tier_style(tier)[2], n) for tier, n in acc.per_tier.items()]
    rejections += sorted(last.qc_rejected.items(), key=lambda x: (-x[1], x[0]))
    tables = [
        _table("Most duplicated instructions (times generated)", ["times", "instruction"],
               [(c, _clip(t)) for t, c in last.top_duplicates], "no duplicates"),
        _table("Largest semantic clusters (first instruction kept; the later ones dropped, with their cosine)",
               ["rows", "kept", "dropped (cosine)"],
               [(f"{c.size:,}", _clip(c.first), "; ".join(f"{_clip(m, 120)} ({cos:.2f})" for m, cos in c.members))
                for c in last.semantic_clusters],
               "semantic tier off" if "semantic" not in last.dedup_tiers else "no semantic duplicates"),
        _table("Rejected rows by reason (all rounds" + (
                   f"; {last.qc_rejected_before_response:,} of the QC rejections made by the generators before any "
                   "response was paid for)" if last.qc_rejected_before_response else ")"),
               ["reason", "rows", "share of generated"],
               [(k, f"{v:,}", f"{v / last.generated_total:.1%}" if last.generated_total else "-")
                for k, v in rejections if v], "nothing rejected"),
        _table("Sampling arms (reward: new unique QC-passed examples per 1k tokens, recent rounds weigh more)",
               ["arm", "shards", "examples", "tokens", "kept", "reward / 1k tokens", "QC-pass", "retired"],
               [(a.arm, a.shards, f"{a.examples:,}", f"{a.tokens:,}", f"{a.kept:,}", f"{a.reward_per_1k_tokens:.2f}",
                 f"{a.qc_pass_rate:.0%}", "yes" if a.retired else "") for a in st.arms or ()],
               "no arm measured yet"),
        _table("Attribute cells (yield: new unique QC-passed per example; reward per 1k tokens, recent rounds weigh more)",
               ["cell", "shards", "examples", "kept", "yield", "reward / 1k tokens", "QC-pass", "retired"],
               [(c.cell, c.shards, f"{c.examples:,}", f"{c.kept:,}", f"{c.yield_:.2f}", f"{c.reward_per_1k_tokens:.2f}",
                 f"{c.qc_pass_rate:.0%}", "yes" if c.retired else "") for c in st.cells or ()],
               "no attributes in the spec"),
        _table("Kept and rejected rows per arm (a sample; rejected: by the parser, QC before responses, or the "
               "merge's QC; duplicates left out)", ["arm", "kept", "rejected (reason)"],
               [(arm, " | ".join(_clip(k, 160) for k in kept),
                 " | ".join(f"{_clip(t, 160)} ({why})" for t, why in bad)) for arm, kept, bad in arm_samples],
               "no arm samples (the page was rendered without the run's storage)"),
        _table(f"Sample rows ({len(samples)} of {last.qc_passed_total:,} kept)",
               ["round", "seed", "domain", "T", "instruction", "response"],
               [(s.get("round"), s.get("seed"), s.get("domain"), f"{s.get('temperature', 0):g}",
                 _clip(str(s.get("instruction", ""))), _clip(str(s.get("response", "")))) for s in samples],
               "no rows to show"),
    ]  # fmt: skip
    target_txt = f" (target {target:,})" if target is not None else ""
    per_tier = ", ".join(f"{n:,} {tier}" for tier, n in acc.per_tier.items())
    head = (f"{last.qc_passed_total:,} kept{target_txt} of {last.generated_total:,} generated after {last.round} "
            f"round(s); {acc.unique:,} unique; duplication {last.duplication_ratio:.1%} "
            f"({acc.duplicates:,} rows dropped as duplicates: {per_tier}; {acc.discarded:,} discarded: sampled past a "
            f"shard's quota or malformed); {last.tokens_total:,} tokens.")  # fmt: skip
    head += f" {tiers_sentence(last.dedup_tiers)}"
    if last.left_domain:
        head += f" {last.left_domain:,} rows left the domain they were asked for (the domain table counts the generated one)."
    if st.totals.engine_starts:
        t = st.totals
        head += f" Device time: {cost.describe(t.engine_starts, t.engine_seconds, t.startup_seconds, 'device')}."
    if st.projected_tokens_to_target:
        rounds_txt = "?" if st.projected_rounds is None else st.projected_rounds
        head += f" Projected: {st.projected_tokens_to_target:,} more tokens, {rounds_txt} round(s) in all."
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1260px;margin:2em auto;color:#111827}"
        ".charts{display:flex;flex-wrap:wrap;gap:12px}svg{border:1px solid #e5e7eb;background:#fff}"
        "table{border-collapse:collapse;margin:1.5em 0;width:100%;font-size:13px}caption{text-align:left;"
        "font-weight:bold;font-size:15px;margin-bottom:.4em}td,th{border:1px solid #e5e7eb;padding:4px 8px;"
        "text-align:left;vertical-align:top}th{background:#f3f4f6}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>genrun: {_esc(run)}</title><style>{style}</style></head><body>"
        f"<h1>genrun: {_esc(run)}</h1>"
        + (f"<p><b>{_esc(verdict)}</b></p>" if verdict else "")
        + f"<p>{_esc(head)}</p><div class='charts'>"
        + "".join(charts)
        + "</div>"
        + "".join(tables)
        + "</body></html>\n"
    )


def _samples(storage: Storage, report: RoundReport, n: int) -> list[dict[str, Any]]:
    """The first rows of the dataset: the per-round parts (dataset/data/) or, before them, the round's file."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # the operator image has no pyarrow: the page has no sample rows then
        return []
    parts = [k for k in storage.list(rec.DATASET_PREFIX) if k.endswith(".parquet")]
    keys = parts or [f"{rec.merge_prefix(report.round)}/dataset.parquet"]
    rows: list[dict[str, Any]] = []
    for key in keys:
        if len(rows) >= n or not storage.exists(key):
            continue
        with local_copy(storage, key) as path:
            cols = ["round", "seed", "domain", "temperature", "instruction", "response"]
            rows += pq.ParquetFile(path).read_row_group(0, columns=cols).slice(0, n - len(rows)).to_pylist()
    return rows


ARM_SAMPLE_ROWS = 3  # kept and rejected rows shown per arm


def arm_samples_of(
    storage: Storage, last_round: int, n: int = ARM_SAMPLE_ROWS
) -> list[tuple[str, list[str], list[tuple[str, str]]]]:
    """Per arm of the run's plans (a shard's seed names its arm), its first `n` kept instructions and its first `n`
    rows thrown away, with the reason: the generators' rejects (unparseable completions, QC before responses) and
    the merge's QC rejections. Duplicates are left out: they are good rows seen before. [] without pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # the operator image has no pyarrow
        return []
    arm_of: dict[int, str] = {}
    shards: list[tuple[int, int]] = []
    for r in range(1, last_round + 1):
        key = rec.round_plan_key(r)
        if not storage.exists(key):
            continue
        try:
            plan = rec.round_plan_from(json.loads(storage.read_bytes(key)))
        except (ValueError, KeyError, TypeError):  # damaged: the report says so elsewhere; the run's loop repairs it
            continue
        for s in plan.shards:
            arm_of[s.seed] = s.arm or f"T={s.sampling.temperature:g}"
            shards.append((r, s.seed))
    kept: dict[str, list[str]] = {a: [] for a in arm_of.values()}
    bad: dict[str, list[tuple[str, str]]] = {a: [] for a in arm_of.values()}

    def read(key: str, cols: list[str]) -> list[dict[str, Any]]:
        if not storage.exists(key):
            return []
        with local_copy(storage, key) as path:
            try:
                return list(pq.read_table(path, columns=cols).to_pylist())
            except (OSError, ValueError):  # a damaged part (pyarrow's errors are both): these samples are extras
                return []

    for key in [k for k in storage.list(rec.DATASET_PREFIX) if k.endswith(".parquet")]:
        for row in read(key, ["seed", "instruction"]):
            got = kept.get(arm_of.get(int(row["seed"]), ""))
            if got is not None and len(got) < n:
                got.append(str(row["instruction"]))
    for rnd, seed in shards:
        for row in read(rec.shard_rejected_key(rnd, seed), ["reason", "text"]):
            if "duplicate" not in str(row["reason"]) and len(bad[arm_of[seed]]) < n:
                bad[arm_of[seed]].append((str(row["text"]).strip(), str(row["reason"])))
    for r in range(1, last_round + 1):
        for row in read(rec.rejected_part_key(r), ["seed", "instruction", "reject_reason"]):
            got_bad = bad.get(arm_of.get(int(row["seed"]), ""))
            if got_bad is not None and "duplicate" not in str(row["reject_reason"]) and len(got_bad) < n:
                got_bad.append((str(row["instruction"]), str(row["reject_reason"])))
    return [(a, kept[a], bad[a]) for a in sorted(kept)]


def write_report_html(storage: Storage, reports: Sequence[RoundReport], path: Path) -> None:
    doc = read_status_document(storage)
    target = ((doc.get("spec") or {}).get("target") or {}).get("uniqueExamples")
    raw = doc.get("status")
    status = RunStatus.from_dict(raw) if isinstance(raw, dict) else RunStatus()
    end = [x for x in status.conditions if x.type in (SUCCEEDED, FAILED) and x.status == "True"]
    verdict = f"{end[0].type} ({end[0].reason}): {end[0].message}" if end else ""
    samples = _samples(storage, reports[-1], SAMPLE_ROWS)
    name = (doc.get("metadata") or {}).get("name", "")
    arms = arm_samples_of(storage, reports[-1].round)
    path.write_text(render_html(name, reports, target, samples, verdict, status, arms))
