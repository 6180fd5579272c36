"""What `genrun status` and `genrun report` print: read from the run's record on storage (status.json, round
plans, round reports), the same for a run made on a cluster or on this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from genrun.operator.errors import UserError
from genrun.operator.loop import read_reports
from genrun.worker import records as rec
from genrun.worker.storage import Storage, open_storage


def open_run(output: str) -> Storage:
    storage = open_storage(output)
    if not storage.exists(rec.STATUS_KEY):
        raise UserError(f"{output}: no genrun run here (no {rec.STATUS_KEY})")
    return storage


def print_status(output: str, as_json: bool = False) -> int:
    storage = open_run(output)
    doc = json.loads(storage.read_bytes(rec.STATUS_KEY))
    st = doc["status"]
    if as_json:
        print(json.dumps(st, indent=1))
        return 0
    t = st.get("totals", {})
    target = doc["spec"]["target"]["uniqueExamples"]
    print(f"{doc['metadata']['name']}: round {st.get('round', 0)}, kept {t.get('qcPassed', 0)}/{target}, unique "
          f"{t.get('unique', 0)}, generated {t.get('generated', 0)}, duplication {100 * t.get('duplicationRatio', 0):.1f}%")  # fmt: skip
    if t.get("shardsQuarantined") or t.get("shardsFailed"):
        print(f"  shards: {t.get('shardsQuarantined', 0)} quarantined (damaged, set aside under quarantine/), "
              f"{t.get('shardsFailed', 0)} failed")  # fmt: skip
    for cond in st.get("conditions", []):
        print(f"  {cond['type']:<12} {cond['status']:<6} {cond['reason']:<16} {cond.get('message', '')[:120]}")
    print("  round shards seeds        T     rep   generated  new unique  kept  yield")
    for r in st.get("rounds", []):
        print(f"  {r['round']:>5} {r['shards']:>6} {r['seeds']:<12} {r['temperature']:<5g} {r['repetitionPenalty']:<5g} "
              f"{r.get('generated', '-'):>9} {r.get('newUnique', '-'):>11} {r.get('qcPassed', '-'):>5} {r.get('marginalYield', '-')}")  # fmt: skip
    return 0


def print_report(output: str, html: str | None = None, file: TextIO = sys.stdout) -> int:
    storage = open_run(output)
    reports = read_reports(storage)
    if not reports:
        print("no round has been merged yet", file=file)
        return 0
    latest = reports[max(reports)]
    print(storage.read_bytes(f"{rec.merge_prefix(latest.round)}/report.md").decode(), file=file)
    if html:
        from genrun.operator.charts import render_html

        doc = json.loads(storage.read_bytes(rec.STATUS_KEY))
        Path(html).write_text(render_html(doc["metadata"]["name"], [reports[k] for k in sorted(reports)]))
        print(f"charts: {html}", file=file)
    return 0
