"""The HTML report's charts and tables, rendered from round reports (pure: no storage)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

from genrun.contract.records import DomainYield, RoundReport, SemanticCluster, TemperatureYield
from genrun.contract.status import RunStatus
from genrun.operator.charts import TOP, H, Series, bar_chart, render_html


def report(rnd: int, generated: int, new_unique: int, new_kept: int, totals: tuple[int, int, int]) -> RoundReport:
    return RoundReport(
        round=rnd, shards=2, generated=generated, new_unique=new_unique, new_qc_passed=new_kept,
        generated_total=totals[0], unique_total=totals[1], qc_passed_total=totals[2], tokens_total=1000 * rnd,
        duplicates={"exact": 17, "near": 3}, qc_rejected={"truncated": 9, "refusal": 2},
        top_duplicates=(("What is the capital city of France?", 12), ("Tell me a <joke>", 4)),
        per_domain=(DomainYield("cooking", 60, 50, 40), DomainYield("travel", 40, 33, 20)),
        per_temperature=(TemperatureYield(0.7, 100, 83, 60),),
    )  # fmt: skip


REPORTS = [report(1, 100, 83, 60, (100, 83, 60)), report(2, 100, 90, 70, (200, 173, 130))]


def _svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(m) for m in re.findall(r"<svg.*?</svg>", page, re.S)]


def _texts(svg: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in svg.iter("text")]


def test_charts_have_value_axes_and_the_target_line() -> None:
    page = render_html("demo", REPORTS, target=150)
    svgs = _svgs(page)  # every chart is well-formed SVG
    assert len(svgs) == 6 and "<script" not in page
    kept = _texts(svgs[0])
    assert [t for t in kept if re.fullmatch(r"[\d,]+", t)][:6] == ["0", "40", "80", "120", "160", "200"]
    assert "target 150" in kept and "examples" in kept and "round" in kept
    dashed = [e for e in svgs[0].iter("line") if e.get("stroke-dasharray")]
    assert dashed, "no target line"
    for svg in svgs[1:]:  # ratios on a 0-100% axis, but for the per-tier duplicate counts
        if "Duplicates per tier (cumulative)" in _texts(svg):
            continue
        ticks = [t for t in _texts(svg) if t.endswith("%") and "." not in t]
        assert ticks[:6] == ["0%", "20%", "40%", "60%", "80%", "100%"]


def test_a_small_ratio_does_not_fill_the_chart() -> None:
    """17% duplication is drawn as 17% of the axis, not as the full height."""
    svg = ET.fromstring(bar_chart("dup", ["1"], [Series("dup", "#f00", [0.17])], ratio=True))
    bar = next(e for e in svg.iter("rect") if e.find("title") is not None)
    plot_height = H - TOP - 64
    assert abs(float(bar.get("height", 0)) - 0.17 * plot_height) < 0.5


def test_tables_name_duplicates_rejection_reasons_and_sample_rows() -> None:
    samples = [{"round": 1, "seed": 100, "domain": "cooking", "temperature": 0.7, "instruction": "Boil an <egg>?",
                "response": "x" * 1000}]  # fmt: skip
    page = render_html("demo", REPORTS, target=150, samples=samples, verdict="Succeeded (TargetMet): done")
    assert "What is the capital city of France?" in page and "Tell me a &lt;joke&gt;" in page
    for reason, rows in (("exact duplicate", "17"), ("near duplicate", "3"), ("truncated", "9"), ("refusal", "2")):
        assert re.search(rf"<td>{reason}</td><td>{rows}</td>", page), reason
    assert "Boil an &lt;egg&gt;?" in page and "x" * 279 + "\u2026" in page and "x" * 281 not in page
    assert "Sample rows (1 of 130 kept)" in page and "Succeeded (TargetMet): done" in page


def test_arms_table_and_projection_come_from_the_status() -> None:
    status = {
        "projectedTokensToTarget": 12345,
        "projectedRounds": 4,
        "arms": [
            {"arm": "t0.7-p0.9-r1.1", "shards": 3, "examples": 120, "tokens": 7000, "kept": 50,
             "rewardPer1kTokens": 7.1428, "qcPassRate": 0.81, "retired": False},
            {"arm": "t1-p0.9-r1.3", "shards": 1, "examples": 40, "tokens": 3000, "kept": 2,
             "rewardPer1kTokens": 0.6667, "qcPassRate": 0.1, "retired": True},
        ],
    }  # fmt: skip
    page = render_html("demo", REPORTS, target=150, status=RunStatus.from_dict(status))
    assert re.search(r"<td>t0\.7-p0\.9-r1\.1</td><td>3</td><td>120</td><td>7,000</td><td>50</td><td>7\.14</td>"
                     r"<td>81%</td><td></td>", page)  # fmt: skip
    assert re.search(r"<td>t1-p0\.9-r1\.3</td>.*<td>0\.67</td><td>10%</td><td>yes</td>", page)
    assert "Projected: 12,345 more tokens, 4 round(s) in all." in page
    assert "no arm measured yet" in render_html("demo", REPORTS, target=150)


def test_per_tier_counts_semantic_clusters_and_what_unique_means() -> None:
    """With the semantic tier on: the per-tier chart and rejection rows, the largest clusters with their members, and
    the sentence saying the target counts semantic-unique rows; without it, the table says the tier is off."""
    cluster = SemanticCluster(
        "What is the capital city of France?",
        (("Which city is the capital of France?", 0.95), ("Name France's <capital>", 0.91)),
        5,
    )
    sem = [replace(r, duplicates={**r.duplicates, "semantic": 4 * r.round}, dedup_tiers=("exact", "near", "semantic"),
                   semantic_clusters=(cluster,), left_domain=7) for r in REPORTS]  # fmt: skip
    page = render_html("demo", sem, target=150)
    tiers = next(s for s in _svgs(page) if "Duplicates per tier (cumulative)" in _texts(s))
    assert {"exact", "near (MinHash)", "semantic"} <= set(_texts(tiers))
    assert re.search(r"<td>semantic duplicate</td><td>8</td>", page)
    assert "28 rows dropped as duplicates: 17 exact, 3 near, 8 semantic" in page
    assert "Unique means semantic-unique: the target counts rows kept by the exact, near and semantic tiers." in page
    assert "Which city is the capital of France? (0.95)" in page and "Name France&#x27;s &lt;capital&gt; (0.91)" in page
    assert "7 rows left the domain they were asked for" in page
    off = render_html("demo", REPORTS, target=150)
    assert "semantic tier off" in off and "Unique means kept by the exact and near tiers." in off


def test_the_page_of_a_run_on_storage_takes_target_verdict_and_arms_from_its_status_json(tmp_path: Path) -> None:
    """write_report_html reads status.json (as the loop writes it) through the typed status."""
    from genrun.contract import records as rec
    from genrun.contract.api import RunRef
    from genrun.contract.status import ArmEntry
    from genrun.operator import conditions as c
    from genrun.operator.charts import write_report_html
    from genrun.operator.loop import status_document
    from genrun.worker.storage import LocalStorage

    done = c.merge_conditions(
        (), (c.Condition(c.SUCCEEDED, "True", c.TARGET_MET, "130 >= 120"),), 1, "2026-11-25T10:00:00Z"
    )
    status = RunStatus(round=2, arms=(ArmEntry(arm="t0.7-p0.9-r1.1", shards=4, kept=130),), conditions=done)
    raw = {"target": {"uniqueExamples": 120}}
    (tmp_path / rec.STATUS_KEY).write_text(json.dumps(status_document(RunRef("demo"), raw, status)))
    write_report_html(LocalStorage(tmp_path), REPORTS, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "<h1>genrun: demo</h1>" in page and "(target 120)" in page and "Succeeded (TargetMet): 130 &gt;= 120" in page
    assert re.search(r"<td>t0\.7-p0\.9-r1\.1</td><td>4</td>", page)
