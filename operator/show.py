"""What `genrun run`, `genrun status` and `genrun report` print. Status and reports are read from the run's record on
storage (status.json, round plans, round reports), the same for a run made on a cluster or on this machine."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from genrun.contract import records as rec
from genrun.contract.errors import EXIT_RUN_FAILED, UserError
from genrun.contract.records import RoundPlan
from genrun.contract.status import RoundEntry, RunStatus, camel_case
from genrun.operator import conditions as c
from genrun.operator import cost
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
    # "unique" depends on the tiers that ran (with semantic on, a paraphrase is a duplicate): the line names them
    if t.dedup_tiers:
        merged = ", ".join(f"{t.duplicates[tier]} {tier}" for tier in rec.MERGE_TIERS)
        print(f"  duplicates: {merged}; unique counts through the {', '.join(t.dedup_tiers)} tiers")
    print(f"  device time: {cost.describe(t.engine_starts, t.engine_seconds, t.startup_seconds, 'device')}; "
          f"{t.tokens:,} tokens")  # fmt: skip
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
    # This round's own figures, then the running total of kept examples in its own column, then the arms run.
    print("  round shards seeds        generated  new unique  new kept  kept in all  yield   arms")
    for r in st.rounds:
        print(f"  {r.round:>5} {r.shards:>6} {r.seeds:<12} {_or_dash(r.generated):>9} {_or_dash(r.new_unique):>11} "
              f"{_or_dash(r.new_qc_passed):>9} {_or_dash(r.qc_passed):>12}  {_or_dash(r.marginal_yield):<7} {round_arms(r)}")  # fmt: skip
    if st.arms:  # each arm's share of the run's figures; the reward is the bandit's (recent rounds weigh more)
        print("  arm                        shards  generated  tokens    kept  reward/1k  QC-pass  retired")
        for a in st.arms:
            print(f"  {a.arm:<26} {a.shards:>6} {a.examples:>10} {a.tokens:>7} {a.kept:>7}  {a.reward_per_1k_tokens:>9.2f}"
                  f"  {a.qc_pass_rate:>7.0%}  {'yes' if a.retired else ''}")  # fmt: skip
    return 0


def round_arms(r: RoundEntry) -> str:
    """The arms a round ran (its one sampling in a status written before rounds listed them)."""
    if r.arms:
        return " ".join(r.arms)
    return f"T={r.temperature:g} rep={r.repetition_penalty:g}"


def _or_dash(v: float | None) -> str:
    return "-" if v is None else str(v)


def camel(obj: Any) -> Any:
    """A record as JSON in the CRD's casing: every dataclass field named as the status names its own (`qc_passed` ->
    `qcPassed`, a per-tier count `exactDuplicates`); the keys of a dict field are data (QC reasons, attribute names)
    and stay as they are."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {camel_case(name): camel(v) for name, v in rec.json_fields(obj)}
    if isinstance(obj, tuple | list):
        return [camel(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): camel(v) for k, v in obj.items()}
    return obj


def report_document(storage: Storage, latest: rec.RoundReport) -> dict[str, Any]:
    """`genrun report --json`: the latest round report, with the planner's per-arm and per-attribute-cell figures
    from the status, in the same camelCase as `genrun status --json` (one casing for every JSON the CLI writes)."""
    doc: dict[str, Any] = camel(latest)
    st = recorded_status(storage)
    doc.update({k: [x.to_dict() for x in v] for k, v in (("arms", st.arms), ("cells", st.cells)) if v is not None})
    return doc


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


def eta_seconds(
    st: RunStatus,
    current: RoundPlan | None,
    merged: bool,
    markers: Mapping[tuple[int, int], rec.ShardManifest],
    concurrency: int,
    overheads: Sequence[float],
) -> float | None:
    """Seconds left to the target, or None (unknown) until the planner projects (after the pilot's merge) and a
    shard marker has measured the throughput.

    st: the status (its projections count from the latest merged round); current: the latest round's plan and
    whether its merge is done; markers: the finished shards' markers (tokens and generation seconds); concurrency:
    the most shards seen generating at once; overheads: the seconds each round seen whole took beyond its
    generation time (engine start-ups, the merge). Tokens still to generate are the projection less what the
    current round's finished shards made, and at least the current round's unfinished shards' share (their planned
    rows at the measured tokens per row); they go at the measured tokens per second of a shard times the
    concurrency, and each round left (the current one's merge included) adds the mean overhead."""
    projected, rounds = st.projected_tokens_to_target, st.projected_rounds
    tokens = sum(m.tokens for m in markers.values())
    seconds = sum(m.seconds for m in markers.values())
    rows = sum(m.rows for m in markers.values())
    if projected is None or rounds is None or tokens <= 0 or seconds <= 0:
        return None
    rate = tokens / seconds * max(1, concurrency)
    done_now = left_now = 0.0
    if current is not None and not merged:
        for s in current.shards:
            m = markers.get((s.round, s.seed))
            if m is not None:
                done_now += m.tokens
            else:
                left_now += s.examples * tokens / max(rows, 1)
    merged_rounds = st.round if merged else st.round - 1
    rounds_left = max(rounds - merged_rounds, 0 if merged else 1)
    overhead = sum(overheads) / len(overheads) if overheads else 0.0
    return max(projected - done_now, left_now) / rate + rounds_left * overhead


class Progress:
    """`genrun run`'s live progress line (nothing when quiet)."""

    def __init__(self, out: TextIO, storage: Storage, target: int, quiet: bool) -> None:
        self.out, self.storage, self.target, self.quiet = out, storage, target, quiet
        self.state: dict[str, Any] = {"t0": time.monotonic(), "kept0": None, "seen": None, "tokens": 0}
        self.markers: dict[tuple[int, int], rec.ShardManifest] = {}  # every finished shard's, read once
        self.concurrency = 1
        self.rounds: dict[int, float] = {}  # when this process saw each round start (rounds started before: none)
        self.overheads: list[float] = []
        self._last_line = ""

    def _measure(self, st: RunStatus, obs: Observed, now: float) -> float | None:
        """Reads the newly finished shards' markers and times the rounds; the ETA from them (None: unknown)."""
        for r, seed in sorted(obs.shards_done - self.markers.keys()):
            with contextlib.suppress(KeyError, ValueError, TypeError, OSError, StorageError):
                self.markers[(r, seed)] = rec.shard_manifest_from(
                    json.loads(self.storage.read_bytes(rec.shard_manifest_key(r, seed)))
                )
        running = sum(j.kind == "shard" and j.phase == "Running" for j in obs.jobs)
        self.concurrency = max(self.concurrency, running)
        rnd = st.round
        cur = obs.rounds.get(rnd)
        started_before = cur is not None and (
            rnd in obs.reports or any((s.round, s.seed) in obs.shards_done for s in cur.shards)
        )
        if self.state["kept0"] is None and started_before:  # a resumed round, some of it done before: not timed
            self.rounds[rnd] = -1.0
        self.rounds.setdefault(rnd, now)
        for r, t in list(self.rounds.items()):
            if t >= 0 and r in obs.reports and r in obs.rounds:  # seen whole: its time beyond generating
                plan = obs.rounds[r]
                ms = [self.markers[k] for k in ((s.round, s.seed) for s in plan.shards) if k in self.markers]
                rate = sum(m.tokens for m in ms) / max(sum(m.seconds for m in ms), 1e-9) * self.concurrency
                gen = sum(m.tokens for m in ms) / rate if ms and rate > 0 else 0.0
                self.overheads.append(max(0.0, now - t - gen))
                self.rounds[r] = -1.0
        return eta_seconds(st, cur, rnd in obs.reports, self.markers, self.concurrency, self.overheads)

    def __call__(self, plan: Plan, obs: Observed) -> None:
        """One live line: the round's shards, kept vs target, duplication, tokens/s, elapsed<ETA, sampling, reason.
        The tokens/s shown count what this process saw finish (a resumed run starts its clocks again); the ETA
        comes from the planner's projections and the measured throughput (eta_seconds); tqdm formats the times."""
        if self.quiet:
            return
        from tqdm import tqdm

        ps = self.state
        st = plan.status or RunStatus()  # a refused child: nothing to show but the reason
        rnd = st.round
        target = self.target
        kept = st.totals.qc_passed
        dup = st.totals.duplication_ratio
        now = time.monotonic()
        eta = self._measure(st, obs, now)
        if ps["kept0"] is None:
            ps["kept0"], ps["seen"] = kept, set(obs.shards_done)  # what existed before this process: not timed
        for key in sorted(obs.shards_done - ps["seen"]):  # shards finished since: their tokens, once
            ps["tokens"] += self.markers[key].tokens if key in self.markers else 0
            ps["seen"].add(key)
        elapsed = now - ps["t0"]
        cur = obs.rounds.get(rnd)
        shards = len(cur.shards) if cur else 0
        done = sum(1 for s in (cur.shards if cur else ()) if (s.round, s.seed) in obs.shards_done)
        width = 20
        bar = "#" * (width * done // shards if shards else 0)
        arms = {s.sampling for s in cur.shards} if cur else set()
        sampling = f"{len(arms)} arms" if len(arms) > 1 else cur.sampling.describe() if cur else ""
        left = "unknown" if eta is None else tqdm.format_interval(eta)
        times = f"{tqdm.format_interval(elapsed)}<{left}"
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
