"""A self-contained HTML page (inline SVG, no scripts, no network) for people who would rather look than read:
unique vs generated across rounds, duplication rate per round, yield per temperature and per domain."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from genrun.worker import records as rec
from genrun.worker.records import RoundReport
from genrun.worker.storage import Storage

W, H, PAD = 560, 220, 40


def _bars(
    title: str, labels: Sequence[str], series: Sequence[tuple[str, str, Sequence[float]]], fmt: str = "{:,.0f}"
) -> str:
    n, k = max(1, len(labels)), max(1, len(series))
    top = max([v for _, _, vals in series for v in vals] + [1e-9])
    slot = (W - 2 * PAD) / n
    bw = slot * 0.8 / k
    out = [f'<svg viewBox="0 0 {W} {H + 40}" width="{W}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
           f'<line x1="{PAD}" y1="{H}" x2="{W - PAD}" y2="{H}" stroke="#888"/>']  # fmt: skip
    for i, label in enumerate(labels):
        x0 = PAD + i * slot + slot * 0.1
        for j, (_, color, vals) in enumerate(series):
            v = vals[i]
            h = (H - 30) * v / top
            x = x0 + j * bw
            out.append(
                f'<rect x="{x:.1f}" y="{H - h:.1f}" width="{bw:.1f}" height="{h:.1f}" fill="{color}"><title>{html.escape(fmt.format(v))}</title></rect>'
            )
            out.append(
                f'<text x="{x + bw / 2:.1f}" y="{H - h - 3:.1f}" font-size="9" text-anchor="middle">{html.escape(fmt.format(v))}</text>'
            )
        short = label if len(label) <= 11 else label[:10] + "\u2026"
        out.append(
            f'<text x="{x0 + slot * 0.4:.1f}" y="{H + 14}" font-size="9" text-anchor="middle">'
            f"<title>{html.escape(label)}</title>{html.escape(short)}</text>"
        )
    for j, (name, color, _) in enumerate(series):
        out.append(f'<rect x="{PAD + j * 150}" y="{H + 24}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{PAD + j * 150 + 14}" y="{H + 33}" font-size="11">{html.escape(name)}</text>')  # fmt: skip
    out.append("</svg>")
    return "".join(out)


def render_html(run: str, reports: Sequence[RoundReport]) -> str:
    rounds = [f"round {r.round}" for r in reports]
    last = reports[-1]
    charts = [
        _bars("Unique vs generated (cumulative)", rounds, [
            ("generated", "#9aa5b1", [r.generated_total for r in reports]),
            ("unique", "#3b82f6", [r.unique_total for r in reports]),
            ("kept (unique + QC)", "#16a34a", [r.qc_passed_total for r in reports]),
        ]),
        _bars("Duplication rate per round", rounds, [
            ("duplicates / generated", "#dc2626", [1 - r.unique_ratio if r.generated else 0 for r in reports]),
        ], fmt="{:.0%}"),
        _bars("Marginal yield per round (new kept / generated)", rounds, [
            ("marginal yield", "#7c3aed", [r.marginal_yield for r in reports]),
        ], fmt="{:.2f}"),
        _bars("Yield per temperature (rows written, all rounds)", [f"T={t.temperature:g}" for t in last.per_temperature], [
            ("unique / rows", "#3b82f6", [t.new_unique / t.generated if t.generated else 0 for t in last.per_temperature]),
            ("kept / rows", "#16a34a", [t.new_qc_passed / t.generated if t.generated else 0 for t in last.per_temperature]),
        ], fmt="{:.0%}"),
        _bars("Yield per domain (rows written, all rounds)", [d.domain or "(none)" for d in last.per_domain], [
            ("unique / rows", "#3b82f6", [d.new_unique / d.generated if d.generated else 0 for d in last.per_domain]),
            ("kept / rows", "#16a34a", [d.new_qc_passed / d.generated if d.generated else 0 for d in last.per_domain]),
        ], fmt="{:.0%}"),
    ]  # fmt: skip
    head = (f"{last.qc_passed_total:,} kept of {last.generated_total:,} generated; "
            f"{last.unique_total:,} unique; duplication {last.duplication_ratio:.1%}")  # fmt: skip
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>genrun: {html.escape(run)}</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}svg{margin:1em;border:1px solid #eee}</style>"
        f"</head><body><h1>genrun: {html.escape(run)}</h1><p>{html.escape(head)}</p>"
        + "".join(charts)
        + "</body></html>\n"
    )


def write_report_html(storage: Storage, reports: Sequence[RoundReport], path: Path) -> None:
    doc = json.loads(storage.read_bytes(rec.STATUS_KEY))
    path.write_text(render_html(doc["metadata"]["name"], reports))
