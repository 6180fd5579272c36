"""The accounting identity on a real local run: `genrun run examples/quickstart.yaml` with the replay engine (recorded
real SmolLM2-135M outputs standing in for the model), per round and in total, in every place a user reads it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from genrun.contract import records as rec

ROOT = Path(__file__).resolve().parents[2]
GENRUN = [sys.executable, "-P", "-m", "genrun.operator.cli"]


def test_quickstart_counts_every_generated_instruction_once(tmp_path: Path) -> None:
    """generated = unique + exact + near + semantic + online + discarded and unique = kept + QC rejected, for each
    round (from consecutive reports) and for the run; status, the markdown report and the HTML page show the same
    figures. The quickstart's generators skip rows online, so the online tier is not empty."""
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    doc["spec"]["output"]["path"] = str(tmp_path / "out")
    manifest = tmp_path / "quickstart.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    res = subprocess.run([*GENRUN, "run", str(manifest), "--engine", "replay", "--quiet"], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    reports = [rec.round_report_from(json.loads(p.read_text())) for p in sorted(out.glob("merge/r*/report.json"))]
    assert len(reports) >= 2
    before = None
    for r in reports:
        acc = rec.Accounting.of_round(r, before)
        assert acc.problems() == [], f"round {r.round}"
        assert (
            acc.generated == r.generated and acc.unique == r.new_unique and acc.per_tier["online"] == r.skipped_online
        )
        before = r
    total = rec.Accounting.total(reports[-1])
    assert total.problems() == [] and total.per_tier["online"] > 0
    st = json.loads((out / "status.json").read_text())["status"]["totals"]
    d = st["duplicates"]
    assert (st["generated"], st["unique"], st["qcPassed"]) == (total.generated, total.unique, total.kept)
    assert d == total.per_tier and list(d) == ["exact", "near", "semantic", "online"]  # every tier, in this order
    assert st["generated"] == st["unique"] + sum(d.values()) + st["discarded"]
    assert st["dedupTiers"] == ["exact", "near", "semantic"]  # the quickstart as shipped: unique means unique
    assert st["duplicationPercent"] == f"{total.duplicates / total.generated:.1%}"
    md = (out / "merge" / f"r{reports[-1].round:04d}" / "report.md").read_text()
    exact, near, semantic, online = total.per_tier.values()
    assert f"(all rounds): exact / near / semantic / online | {exact:,} / {near:,} / {semantic:,} / {online:,} |" in md
    html = tmp_path / "report.html"
    r = subprocess.run([*GENRUN, "report", str(out), "--html", str(html)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (f"({total.duplicates:,} rows dropped as duplicates: {exact:,} exact, {near:,} near, {semantic:,} semantic, "
            f"{online:,} online; {total.discarded:,} discarded") in html.read_text()  # fmt: skip
