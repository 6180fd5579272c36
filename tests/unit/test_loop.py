"""The run loop's step over a recording backend and a real local folder: what it records on storage, what it starts,
what it publishes, and how a refused child ends the run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

from genrun.contract import records as rec
from genrun.contract.api import RunRef, parse_spec
from genrun.contract.errors import Rejected
from genrun.contract.status import RunStatus, Totals
from genrun.operator import conditions as c
from genrun.operator.loop import RunLoop, publication
from genrun.operator.planner import CreateMergeJob, CreateShardJob, Event, Observed, ObservedJob, invalid_plan, replan
from genrun.worker.storage import LocalStorage

RAW = {"model": {"name": "m"}, "target": {"uniqueExamples": 100}, "shards": {"initial": 3}, "output": {"path": "x"}}


class Recorder:
    def __init__(self, refuse: bool = False) -> None:
        self.started: list[str] = []
        self.published: list[tuple[RunStatus, list[Event], bool]] = []
        self.refuse = refuse
        self.attempts = 0

    async def jobs(self) -> Sequence[ObservedJob]:
        return [ObservedJob(n, "shard", 1, int(n.rsplit("s", 1)[1]), 0, "Running") for n in self.started]

    async def start(self, action: CreateShardJob | CreateMergeJob) -> None:
        self.attempts += 1
        if self.refuse:
            raise Rejected(c.CHILD_REJECTED, f"refused {action.name}")
        self.started.append(action.name)

    async def publish(self, status: RunStatus, events: Sequence[Event], changed: bool) -> None:
        self.published.append((status, list(events), changed))


def test_step_records_the_round_before_its_jobs_and_publishes_to_storage(tmp_path: Path) -> None:
    storage, backend = LocalStorage(tmp_path), Recorder()
    loop = RunLoop(RunRef("r", "ns", "u"), RAW, parse_spec(RAW), storage, backend)
    plan = asyncio.run(loop.step())
    recorded = rec.round_plan_from(json.loads(storage.read_bytes(rec.round_plan_key(1))))
    assert [s.seed for s in recorded.shards] == [int(n.rsplit("s", 1)[1]) for n in backend.started]
    doc = json.loads(storage.read_bytes(rec.STATUS_KEY))
    assert doc["kind"] == "GenerationRun" and doc["metadata"] == {"name": "r", "namespace": "ns"}
    assert doc["status"]["round"] == 1 and doc["status"] == backend.published[0][0].to_dict()
    assert [e.reason for e in backend.published[0][1]] == [c.ROUND_STARTED] and backend.published[0][2]
    assert plan.condition(c.PROGRESSING).status == "True"

    # The Jobs are seen running: nothing is started twice; once nothing changes, the status is not rewritten.
    first = list(backend.started)
    asyncio.run(loop.step())
    assert backend.published[1][0].totals.shards_running == len(first) and backend.published[1][2]
    (tmp_path / rec.STATUS_KEY).unlink()
    asyncio.run(loop.step())
    assert backend.started == first and not (tmp_path / rec.STATUS_KEY).exists()
    assert backend.published[2][1:] == ([], False)

    # A new loop (a restart) reads the recorded round back instead of planning one.
    again = RunLoop(RunRef("r", "ns", "u"), RAW, parse_spec(RAW), storage, Recorder())
    asyncio.run(again.step())
    assert again.observed.rounds == {1: recorded}


def test_a_refused_child_fails_the_run_once(tmp_path: Path) -> None:
    backend = Recorder(refuse=True)
    loop = RunLoop(RunRef("r"), RAW, parse_spec(RAW), LocalStorage(tmp_path), backend)
    plan = asyncio.run(loop.step())
    assert plan.condition(c.FAILED).reason == c.CHILD_REJECTED and "refused r-r1-s" in plan.condition(c.FAILED).message
    status, events, _ = backend.published[-1]
    assert [(e.type, e.reason) for e in events if e.reason == c.CHILD_REJECTED] == [("Warning", c.CHILD_REJECTED)]
    assert json.loads((tmp_path / rec.STATUS_KEY).read_text())["status"] == status.to_dict()
    # The figures are what was observed when it was refused (the round just recorded), not zeros or nothing.
    assert status.round == 1 and status.totals.rounds_planned == 1 and status.rounds[0].shards > 0

    # Terminal for this generation: later steps (a timer, a restart from the published status) never ask again.
    tried = backend.attempts
    again = RunLoop(RunRef("r"), RAW, parse_spec(RAW), LocalStorage(tmp_path), backend, status=status)
    for step in (loop, again):
        assert asyncio.run(step.step()).condition(c.FAILED).reason == c.CHILD_REJECTED
    assert backend.attempts == tried and len(backend.published) == 1
    # A new generation (the spec was changed) is tried afresh.
    asyncio.run(
        RunLoop(RunRef("r", generation=2), RAW, parse_spec(RAW), LocalStorage(tmp_path), backend, status=status).step()
    )
    assert backend.attempts > tried


def test_an_invalid_plan_keeps_the_figures_last_published() -> None:
    """A plan with no figures (an invalid spec: nothing was observed) changes the conditions, not the totals; the
    custom resource keeps them (a merge patch) and so do status.json and the metrics."""
    old = RunStatus(observed_generation=1, round=3, totals=Totals(generated=900, qc_passed=400))
    status, events, changed = publication(old, invalid_plan(["spec.x: bad"]), 2)
    assert changed and status.totals == old.totals and status.round == 3 and status.observed_generation == 2
    failed = status.condition(c.FAILED)
    assert failed and (failed.status, failed.reason, failed.observed_generation) == ("True", c.INVALID_SPEC, 2)
    assert [e.reason for e in events] == [c.INVALID_SPEC]


def test_a_damaged_marker_is_quarantined_and_counted(tmp_path: Path) -> None:
    storage, warnings = LocalStorage(tmp_path), []
    loop = RunLoop(RunRef("r"), RAW, parse_spec(RAW), storage, Recorder(), warn=warnings.append)
    asyncio.run(loop.step())
    storage.write_bytes(rec.shard_manifest_key(1, 100), b'{"round": 1, "se')
    asyncio.run(loop.step())
    assert not storage.exists(rec.shard_manifest_key(1, 100)) and "set aside under quarantine/" in warnings[0]
    assert loop.status.totals.shards_quarantined == 1


# -- damaged files (issue 25): set aside, reported, rebuilt -------------------------------------------------------


class Listed(Recorder):
    """A backend whose Jobs are listed as given (a cluster keeps finished Jobs listed until their TTL)."""

    def __init__(self, listed: Sequence[ObservedJob] = ()) -> None:
        super().__init__()
        self.listed = list(listed)

    async def jobs(self) -> Sequence[ObservedJob]:
        return self.listed

    async def start(self, action: CreateShardJob | CreateMergeJob) -> None:
        self.started.append(action.name)


def _parquet_bytes() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"instruction": ["a", "b"]}), buf)
    return buf.getvalue()


def _merged_round_one(tmp_path: Path) -> tuple[LocalStorage, rec.RoundPlan, list[ObservedJob]]:
    """Round 1 planned, its shards done and merged (report and parts written), as the Jobs left it."""
    storage = LocalStorage(tmp_path)
    asyncio.run(RunLoop(RunRef("r"), RAW, parse_spec(RAW), storage, Recorder()).step())
    plan = rec.round_plan_from(json.loads(storage.read_bytes(rec.round_plan_key(1))))
    jobs = []
    for s in plan.shards:
        marker = rec.ShardManifest(
            1, s.seed, 10, 10, 0, 0, 0, 500, 1.0, rec.shard_data_key(1, s.seed), examples=s.examples
        )
        storage.write_bytes(rec.shard_data_key(1, s.seed), _parquet_bytes())
        storage.write_bytes(rec.shard_manifest_key(1, s.seed), rec.to_json(marker).encode())
        jobs.append(ObservedJob(f"r-r1-s{s.seed}", "shard", 1, s.seed, 0, "Succeeded"))
    jobs.append(ObservedJob("r-r1-merge", "merge", 1, None, 0, "Succeeded"))
    n = 10 * len(plan.shards)
    report = rec.RoundReport(1, len(plan.shards), n, n // 2, n // 4, n, n // 2, n // 4, tokens=500 * len(plan.shards))
    storage.write_bytes(rec.round_report_key(1), rec.to_json(report).encode())
    for key in (rec.dataset_part_key(1), rec.rejected_part_key(1)):
        storage.write_bytes(key, _parquet_bytes())
    return storage, plan, jobs


def _damaged(status: RunStatus, key: str) -> str:
    cond = status.condition(c.DAMAGED)
    assert cond is not None and cond.status == "True" and key in cond.message, cond
    return cond.reason


def test_a_damaged_round_plan_is_decided_again_with_the_same_bytes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    asyncio.run(RunLoop(RunRef("r"), RAW, parse_spec(RAW), storage, Recorder()).step())
    key = rec.round_plan_key(1)
    whole = storage.read_bytes(key)
    storage.write_bytes(key, whole[: len(whole) // 2])
    backend, warnings = Recorder(), []
    loop = RunLoop(RunRef("r"), RAW, parse_spec(RAW), storage, backend, warn=warnings.append)  # a restart
    asyncio.run(loop.step())
    assert storage.read_bytes(key) == whole
    record = json.loads((tmp_path / "quarantine" / f"{key}.json").read_text())
    assert record["key"] == key and "JSONDecodeError" in record["error"]
    assert _damaged(loop.status, key) == c.ROUND_PLAN_DAMAGED
    status, events, _ = backend.published[-1]
    assert [(e.type, e.reason) for e in events if e.reason == c.ROUND_PLAN_DAMAGED] == [
        ("Warning", c.ROUND_PLAN_DAMAGED)
    ]
    assert json.loads(storage.read_bytes(rec.STATUS_KEY))["status"] == status.to_dict()
    assert loop.status.totals.shards_quarantined == 0  # a plan is not a shard
    assert any("set aside under quarantine/" in w for w in warnings)


def test_a_damaged_report_of_a_succeeded_merge_is_merged_again_not_awaited(tmp_path: Path) -> None:
    """The cluster case: the merge Job stays listed as Succeeded; its report, damaged, is set aside and the round's
    merge runs again as a new attempt (the planner used to wait for the report for ever)."""
    storage, _, jobs = _merged_round_one(tmp_path)
    key = rec.round_report_key(1)
    storage.write_bytes(key, storage.read_bytes(key)[:40])
    backend = Listed(jobs)
    loop = RunLoop(RunRef("r"), RAW, parse_spec(RAW), storage, backend)
    plan = asyncio.run(loop.step())
    assert backend.started == ["r-r1-merge-a1"] and not storage.exists(key)
    assert plan.condition(c.PROGRESSING).reason == c.REPAIRING
    assert _damaged(loop.status, key) == c.ROUND_REPORT_DAMAGED


def test_a_damaged_dataset_part_is_set_aside_and_its_round_merged_again(tmp_path: Path) -> None:
    storage, _, jobs = _merged_round_one(tmp_path)
    part = rec.dataset_part_key(1)
    storage.write_bytes(part, storage.read_bytes(part)[:-9])
    backend = Listed(jobs)
    loop = RunLoop(RunRef("r"), RAW, parse_spec(RAW), storage, backend)
    asyncio.run(loop.step())
    # The report goes too (the merge redoes a round only without it); the new attempt rewrites both.
    assert not storage.exists(part) and not storage.exists(rec.round_report_key(1))
    assert backend.started == ["r-r1-merge-a1"]
    record = json.loads((tmp_path / "quarantine" / f"{part}.json").read_text())
    assert "Parquet magic bytes" in record["error"] and "merged again" in record["repair"]
    assert _damaged(loop.status, part) == c.DATASET_PART_DAMAGED
    # Whole, the same output is left alone: the next round is planned from the report.
    storage2, _, jobs2 = _merged_round_one(tmp_path / "whole")
    backend2 = Listed(jobs2)
    asyncio.run(RunLoop(RunRef("r"), RAW, parse_spec(RAW), storage2, backend2).step())
    assert storage2.exists(rec.round_plan_key(2)) and not (tmp_path / "whole" / "quarantine").exists()


def test_a_damaged_status_document_is_written_again_and_reported(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    asyncio.run(RunLoop(RunRef("r"), RAW, parse_spec(RAW), storage, Recorder()).step())
    whole = json.loads(storage.read_bytes(rec.STATUS_KEY))
    storage.write_bytes(rec.STATUS_KEY, b'{"apiVersion": "genrun.io/v1alpha1", "status": {"rou')
    backend = Recorder()
    status = RunStatus.from_dict(whole["status"])  # the operator's copy (the custom resource) is whole
    loop = RunLoop(RunRef("r"), RAW, parse_spec(RAW), storage, backend, status=status)
    asyncio.run(loop.step())
    doc = json.loads(storage.read_bytes(rec.STATUS_KEY))
    assert doc["status"]["round"] == 1 and _damaged(loop.status, rec.STATUS_KEY) == c.STATUS_DAMAGED


def test_a_damaged_plan_of_a_merged_round_is_decided_again_and_the_run_goes_on(tmp_path: Path) -> None:
    """Decided again with its report read in the same step: the run goes on to round 2 (no merge of round 1 again)."""
    storage, _, jobs = _merged_round_one(tmp_path)
    key = rec.round_plan_key(1)
    whole = storage.read_bytes(key)
    storage.write_bytes(key, b"")
    backend = Listed([j for j in jobs if j.kind == "shard"])  # a local rerun: the merge Job is not listed
    asyncio.run(RunLoop(RunRef("r"), RAW, parse_spec(RAW), storage, backend).step())
    assert storage.read_bytes(key) == whole and storage.exists(rec.round_plan_key(2))
    assert backend.started and all(name.startswith("r-r2-s") for name in backend.started)


def test_a_plan_that_cannot_be_decided_again_as_it_was_fails_the_run_with_the_reason(tmp_path: Path) -> None:
    storage, _, jobs = _merged_round_one(tmp_path)
    storage.write_bytes(rec.round_plan_key(1), b"{")
    other = {**RAW, "shards": {"initial": 3, "firstSeed": 500}}  # another spec decides other seeds
    backend = Listed(jobs)
    loop = RunLoop(RunRef("r"), other, parse_spec(other), storage, backend)
    result = asyncio.run(loop.step())
    failed = result.condition(c.FAILED)
    assert (failed.status, failed.reason) == ("True", c.ROUND_PLAN_LOST) and "restore the file" in failed.message
    assert backend.started == [] and not storage.exists(rec.round_plan_key(1))


def test_a_plan_decided_again_with_the_same_seeds_but_other_sizes_fails_the_run_with_both(tmp_path: Path) -> None:
    """A spec edited mid-run (`examplesPerShard` here; the budget's bounds do it to round 1 too) can change the
    examples a round's shards are asked for while its seeds stay: the plan decided again would misstate what its
    shards were asked, so it is not recorded."""
    storage, plan, jobs = _merged_round_one(tmp_path)
    storage.write_bytes(rec.round_plan_key(1), b"{")
    other = {**RAW, "shards": {**RAW["shards"], "examplesPerShard": 7}}
    again = replan(RunRef("r"), parse_spec(other), Observed({}), 1)
    assert again is not None and again.seeds == plan.seeds and again.shards[0].examples != plan.shards[0].examples
    backend = Listed(jobs)
    result = asyncio.run(RunLoop(RunRef("r"), other, parse_spec(other), storage, backend).step())
    failed = result.condition(c.FAILED)
    assert (failed.status, failed.reason) == ("True", c.ROUND_PLAN_LOST)
    first = plan.shards[0]
    assert (
        f"seed {first.seed}: asked {first.examples} examples, now 7" in failed.message
        and "restore the file" in failed.message
    )
    assert backend.started == [] and not storage.exists(rec.round_plan_key(1))
    # The spec as it was decides the very plan again, and the run goes on.
    asyncio.run(RunLoop(RunRef("r"), RAW, parse_spec(RAW), storage, Listed(jobs)).step())
    assert rec.round_plan_from(json.loads(storage.read_bytes(rec.round_plan_key(1)))) == plan


def test_markers_older_than_their_sizes_are_checked_by_seed_only(tmp_path: Path) -> None:
    """A marker written before markers recorded `examples` (the key absent) reads as 0: a plan decided again over
    such markers is recorded when its seeds are theirs, whatever its sizes."""
    storage, plan, jobs = _merged_round_one(tmp_path)
    for s in plan.shards:
        key = rec.shard_manifest_key(1, s.seed)
        old = json.loads(storage.read_bytes(key))
        del old["examples"]
        storage.write_bytes(key, json.dumps(old).encode())
        assert rec.parse_marker(storage.read_bytes(key)).examples == 0
    storage.write_bytes(rec.round_plan_key(1), b"{")
    other = {**RAW, "shards": {**RAW["shards"], "examplesPerShard": 7}}
    result = asyncio.run(RunLoop(RunRef("r"), other, parse_spec(other), storage, Listed(jobs)).step())
    assert result.condition(c.FAILED) is None or result.condition(c.FAILED).status != "True"
    again = rec.round_plan_from(json.loads(storage.read_bytes(rec.round_plan_key(1))))
    assert again.seeds == plan.seeds and again.shards[0].examples == 7 != plan.shards[0].examples
