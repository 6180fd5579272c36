"""What `genrun run`, `genrun status` and `genrun report` print. Status and reports are read from the run's record on
storage (status.json, round plans, round reports), the same for a run made on a cluster or on this machine."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from genrun.contract import records as rec
from genrun.contract.errors import EXIT_RUN_FAILED, UserError
from genrun.contract.status import RunStatus
from genrun.operator import conditions as c
from genrun.operator.loop import read_reports, read_status_document, recorded_status
from genrun.operator.planner import Observed, Plan
from genrun.worker.storage import Storage, StorageError, open_storage


def open_run(output: str) -> Storage:
    storage = open_storage(output)
    if not storage.exists(rec.STATUS_KEY):
        raise UserError(f"{output}: no genrun run here (no {rec.STATUS_KEY})")
    return storage


def print_status(output: str, as_json: bool = False) -> int:
    storage = open_run(output)
    doc = read_status_document(storage)
    if not isinstance(doc.get("status"), dict):
        raise UserError(
            f"{storage.location(rec.STATUS_KEY)}: not a status document (damaged: unreadable JSON, or no status); "
            "run the same `genrun run` again (or let the operator reconcile) to write it again"
        )
    if as_json:  # the document as written (an older run's too), not our reading of it
        print(json.dumps(doc["status"], indent=1))
        return 0
    st = recorded_status(storage)
    t = st.totals
    target = ((doc.get("spec") or {}).get("target") or {}).get("uniqueExamples", "?")
    print(f"{(doc.get('metadata') or {}).get('name', '?')}: round {st.round}, kept {t.qc_passed}/{target}, unique {t.unique}, "
          f"generated {t.generated}, duplication {100 * t.duplication_ratio:.1f}%")  # fmt: skip
    if t.dedup_tiers:  # what "unique" means: with semantic, the target counts semantic-unique rows (issue 12)
        d = t.duplicates
        print(f"  duplicates: {d.exact} exact, {d.near} near, {d.semantic} semantic; unique counts through the "
              f"{', '.join(t.dedup_tiers)} tiers")  # fmt: skip
    if t.qc_rejected_before_response:
        print(f"  {t.qc_rejected_before_response} of the unique rejected by QC before any response was paid for "
              "(generation.qcBeforeResponse)")  # fmt: skip
    if t.shards_quarantined or t.shards_failed:
        print(f"  shards: {t.shards_quarantined} quarantined (damaged, set aside under quarantine/), "
              f"{t.shards_failed} failed")  # fmt: skip
    for cond in st.conditions:
        print(f"  {cond.type:<12} {cond.status:<6} {cond.reason:<16} {cond.message[:120]}")
    damaged = st.condition(c.DAMAGED)
    if damaged is not None and damaged.status == "True":  # which files, why, and what rebuilds them: in full
        print(f"  damaged ({damaged.reason}): {damaged.message}")
    print("  round shards seeds        T     rep   generated  new unique  kept  yield")
    for r in st.rounds:
        print(f"  {r.round:>5} {r.shards:>6} {r.seeds:<12} {r.temperature:<5g} {r.repetition_penalty:<5g} "
              f"{_or_dash(r.generated):>9} {_or_dash(r.new_unique):>11} {_or_dash(r.qc_passed):>5} {_or_dash(r.marginal_yield)}")  # fmt: skip
    return 0


def _or_dash(v: float | None) -> str:
    return "-" if v is None else str(v)


def print_report(output: str, html: str | None = None, file: TextIO | None = None) -> int:
    file = sys.stdout if file is None else file  # the stdout of now (a default would keep the one of import time)
    storage = open_run(output)
    damaged: list[str] = []
    reports = read_reports(storage, damaged)
    for line in damaged:  # read only: the run's loop sets it aside and merges its round again
        print(f"warning: {line}; `genrun run` (or the operator) merges its round again", file=sys.stderr)
    if not reports:
        print("no round has been merged yet", file=file)
        return 0
    latest = reports[max(reports)]
    md = f"{rec.merge_prefix(latest.round)}/report.md"
    try:
        print(storage.read_bytes(md).decode(errors="replace"), file=file)
    except KeyError:
        print(f"warning: {storage.location(md)} is missing; `genrun report --json` reads the report", file=sys.stderr)
    if html:
        from genrun.operator.charts import render_html

        doc = read_status_document(storage)
        name = (doc.get("metadata") or {}).get("name", "?")  # status.json may be damaged: the report is still read
        Path(html).write_text(render_html(name, [reports[k] for k in sorted(reports)]))
        print(f"charts: {html}", file=file)
    return 0


def print_outcome(plan: Plan, output: str, url: str, out: TextIO) -> int:
    """`genrun run`'s last words: the report and the verdict; its exit code."""
    out.write("\n")
    if plan.condition(c.SUSPENDED).status == "True":
        out.write(f"suspended (spec.suspend is true): {url}\n")
        return 0
    print_report(output, file=sys.stdout)
    ok = plan.condition(c.SUCCEEDED).status == "True"
    verdict = plan.condition(c.SUCCEEDED if ok else c.FAILED)
    out.write(f"{'Succeeded' if ok else 'Failed'} ({verdict.reason}): {verdict.message}\n")
    if plan.status is not None and plan.status.output is not None:
        out.write(f"dataset: {plan.status.output.dataset}\nreport:  {plan.status.output.report}\n")
    return 0 if ok else EXIT_RUN_FAILED


class Progress:
    """`genrun run`'s live progress line (nothing when quiet)."""

    def __init__(self, out: TextIO, storage: Storage, target: int, quiet: bool) -> None:
        self.out, self.storage, self.target, self.quiet = out, storage, target, quiet
        self.state: dict[str, Any] = {"t0": time.monotonic(), "kept0": None, "seen": None, "tokens": 0}
        self._last_line = ""

    def __call__(self, plan: Plan, obs: Observed) -> None:
        """One live line: the round's shards, kept vs target, duplication, tokens/s, elapsed<ETA, sampling, reason.
        Rates count what this process saw finish (a resumed run starts its clocks again); tqdm formats the times."""
        if self.quiet:
            return
        from tqdm import tqdm

        ps = self.state
        st = plan.status or RunStatus()  # a refused child: nothing to show but the reason
        rnd = st.round
        target = self.target
        kept = st.totals.qc_passed
        dup = st.totals.duplication_ratio
        if ps["kept0"] is None:
            ps["kept0"], ps["seen"] = kept, set(obs.shards_done)  # what existed before this process: not timed
        for r, seed in sorted(obs.shards_done - ps["seen"]):  # shards finished since: their tokens, read once
            with contextlib.suppress(KeyError, ValueError, OSError, StorageError):
                m = rec.shard_manifest_from(json.loads(self.storage.read_bytes(rec.shard_manifest_key(r, seed))))
                ps["tokens"] += m.tokens
            ps["seen"].add((r, seed))
        elapsed = time.monotonic() - ps["t0"]
        cur = obs.rounds.get(rnd)
        shards = len(cur.shards) if cur else 0
        done = sum(1 for s in (cur.shards if cur else ()) if (s.round, s.seed) in obs.shards_done)
        width = 20
        bar = "#" * (width * done // shards if shards else 0)
        sampling = cur.sampling.describe() if cur else ""
        # ETA from the kept examples per second so far (they arrive when a round is merged; '?' before the first).
        times = tqdm.format_meter(
            n=min(kept, target), total=target, elapsed=elapsed, bar_format="{elapsed}<{remaining}", initial=ps["kept0"]
        )
        rate = f"{ps['tokens'] / elapsed:,.0f} tokens/s" if ps["tokens"] and elapsed > 0 else "- tokens/s"
        head = f"round {rnd} [{bar:<{width}}] {done}/{shards} shards | kept {kept}/{target} | dup {100 * dup:.1f}%"
        tail = f"{sampling} | {plan.condition(c.PROGRESSING).reason}"
        line = f"{head} | {rate} | {times} | {tail}"
        tty = self.out.isatty()
        # On a terminal the line is redrawn as the clock runs; in a log, a new line only when something happened.
        key = line if tty else f"{head} | {ps['tokens']} | {tail}"
        if key != self._last_line:
            self.out.write(("\r\033[K" if tty else "") + line + ("" if tty else "\n"))
            self.out.flush()
            self._last_line = key
