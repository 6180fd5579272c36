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
from genrun.operator.planner import CreateMergeJob, CreateShardJob, Event, ObservedJob, invalid_plan
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
