"""Damaged files under a run's output (issue 25), the pure parts: a damaged round plan is decided again as it was
recorded, a merged round without its report is merged again (never a wait that never ends), the integrity checks the
operator makes without pyarrow, and what the status and Events say."""

from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from genrun.contract import records as rec
from genrun.contract.api import RunRef
from genrun.contract.status import RunStatus
from genrun.operator import conditions as c
from genrun.operator.loop import (
    damage_condition,
    parquet_damage,
    publication,
    quarantine,
    round_of,
    text_damage,
    zip_damage,
)
from genrun.operator.planner import CreateMergeJob, CreateShardJob, Observed, ObservedJob, decide, repair, replan
from genrun.operator.simulate import run_instantly
from genrun.worker.merge_state import save_npz
from genrun.worker.storage import LocalStorage
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_policy import instant_merge
from tests.unit.test_policy import spec_of as bandit_spec

REF = RunRef("sft", "data")


def finished_world(spec: object) -> Observed:
    merge = instant_merge(lambda s: s.examples * (1 + s.seed % 4) // 20)  # yields differ by shard: the bandit learns
    obs, plans = run_instantly(REF, spec, merge)  # type: ignore[arg-type]
    assert plans[-1].finished and len(obs.rounds) >= 3
    return obs


@pytest.mark.parametrize("strategy", ["bandit", "ladder"])
def test_every_recorded_round_is_decided_again_as_it_was(strategy: str) -> None:
    """The planner is pure and its randomness seeded by the run and the round: deciding round r again from the plans
    and reports of the rounds before it gives the plan recorded, whatever else exists (later rounds, Jobs, markers)."""
    spec = bandit_spec(policy={"strategy": strategy})
    obs = finished_world(spec)
    for rnd, plan in obs.rounds.items():
        assert replan(REF, spec, obs, rnd) == plan
        assert rec.to_json(replan(REF, spec, obs, rnd)) == rec.to_json(plan)  # the very bytes
    # Suspended since: the plan is still the one recorded (a suspension stops Jobs, it does not change plans).
    suspended = dataclasses.replace(spec, suspend=True)
    assert all(replan(REF, suspended, obs, r) == p for r, p in obs.rounds.items())  # type: ignore[arg-type]
    # Its inputs missing (the previous round's report is itself being merged again): not decided yet.
    last = max(obs.rounds)
    assert replan(REF, spec, dataclasses.replace(obs, reports={}), last) is None


def _merged_obs(spec: object) -> tuple[Observed, int]:
    obs = finished_world(spec)
    return obs, max(obs.rounds)


def test_a_merged_round_without_its_report_is_merged_again_first() -> None:
    spec = bandit_spec()
    obs, last = _merged_obs(spec)
    mid = last - 1
    gone = dataclasses.replace(obs, reports={r: x for r, x in obs.reports.items() if r != mid}, jobs=())
    plan = repair(REF, spec, gone)  # type: ignore[arg-type]
    assert plan is not None and plan.condition(c.PROGRESSING).reason == c.REPAIRING
    (merge,) = plan.actions
    assert isinstance(merge, CreateMergeJob) and (merge.round, merge.attempt, merge.name) == (
        mid,
        0,
        f"sft-r{mid}-merge",
    )
    assert merge.shards == tuple(
        (s.round, s.seed) for r in sorted(obs.rounds) if r <= mid for s in obs.rounds[r].shards
    )
    # The status keeps the figures of the latest report meanwhile.
    assert plan.status is not None and plan.status.totals.qc_passed == obs.reports[last].qc_passed_total
    # Running: nothing more is started; it succeeded but the report is still missing: a new attempt, then a failure.
    job = ObservedJob(merge.name, "merge", mid, None, 0, "Running")
    assert repair(REF, spec, dataclasses.replace(gone, jobs=(job,))).actions == ()  # type: ignore[arg-type, union-attr]
    for attempt in range(3):
        done = dataclasses.replace(job, attempt=attempt, phase="Succeeded")
        again = repair(REF, spec, dataclasses.replace(gone, jobs=(done,)))  # type: ignore[arg-type]
        assert again is not None and [a.attempt for a in again.actions] == [attempt + 1]  # type: ignore[union-attr]
    done = dataclasses.replace(job, attempt=3, phase="Succeeded")
    failed = repair(REF, spec, dataclasses.replace(gone, jobs=(done,)))  # type: ignore[arg-type]
    assert failed is not None and failed.condition(c.FAILED).reason == c.MERGE_FAILED and not failed.actions


def test_the_latest_round_merged_before_is_merged_again_never_awaited() -> None:
    """On a cluster the latest round's merge Job stays listed as Succeeded: without its report (damaged and set
    aside) the planner used to wait for the report forever."""
    spec = bandit_spec()
    obs, last = _merged_obs(spec)
    gone = dataclasses.replace(obs, reports={r: x for r, x in obs.reports.items() if r != last})
    plan = repair(REF, spec, gone)  # type: ignore[arg-type]
    assert plan is not None and [(type(a), a.round, a.attempt) for a in plan.actions] == [(CreateMergeJob, last, 1)]  # type: ignore[union-attr]
    # Never merged yet (a local rerun lists no Jobs): `decide` merges it as usual.
    fresh = dataclasses.replace(
        gone, jobs=(), shards_done=frozenset((s.round, s.seed) for s in obs.rounds[last].shards)
    )
    assert repair(REF, spec, fresh) is None  # type: ignore[arg-type]
    assert [type(a) for a in decide(REF, spec, fresh).actions] == [CreateMergeJob]  # type: ignore[arg-type]
    assert repair(REF, spec, obs) is None  # type: ignore[arg-type]


# -- integrity checks without pyarrow ------------------------------------------------------------------------------


def _ends(data: bytes, n: int = 1 << 16) -> tuple[bytes, bytes, int]:
    return data[:n], data[-n:], len(data)


@functools.cache
def _parquet() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"instruction": [f"row {i}" for i in range(500)], "n": list(range(500))}), buf)
    return buf.getvalue()


def _npz(tmp: Path) -> bytes:
    save_npz(tmp / "x.npz", keys_hash=np.arange(300, dtype=np.uint64), keys_owner=np.arange(300, dtype=np.int64))
    return (tmp / "x.npz").read_bytes()


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 0.9999))
def test_a_truncated_parquet_file_is_damaged_and_a_whole_one_is_not(share: float) -> None:
    data = _parquet()
    assert parquet_damage(_ends(data)) == ""
    cut = data[: int(len(data) * share)]
    assert parquet_damage(_ends(cut)) != ""
    assert parquet_damage(_ends(data, 8)) == "" and parquet_damage(None) == "missing"


def test_a_truncated_npz_is_damaged_and_a_whole_one_is_not(tmp_path: Path) -> None:
    data = _npz(tmp_path)
    assert zip_damage(_ends(data)) == ""
    for cut in range(0, len(data), max(1, len(data) // 97)):
        assert zip_damage(_ends(data[:cut])) != "", cut
    assert zip_damage(_ends(b"PK" + data[2:-30] + data[-22:])) != ""  # the directory points past the end


def test_text_outputs_end_with_a_newline_and_the_card_opens_with_front_matter() -> None:
    assert text_damage(_ends(b"")) == "" and text_damage(_ends(b'{"a": 1}\n')) == ""
    assert "newline" in text_damage(_ends(b'{"a": 1}\n{"a"'))
    assert text_damage(_ends(b"---\nx: 1\n---\n# card\n"), card=True) == ""
    assert "front matter" in text_damage(_ends(b"# card\n"), card=True)


# -- what the status and Events say --------------------------------------------------------------------------------


def test_round_of_reads_every_kind_of_key() -> None:
    keys = {
        rec.round_plan_key(3): 3, rec.round_report_key(12): 12, rec.shard_manifest_key(2, 104): 2,
        rec.dataset_part_key(7): 7, rec.rejected_part_key(5): 5, "dataset/messages/train-r0004.parquet": 4,
        "merge/r0002/seen-index.npz": 2, rec.STATUS_KEY: 0, "dataset/README.md": 0,
    }  # fmt: skip
    assert {k: round_of(k) for k in keys} == keys


def test_a_quarantined_shard_is_named_with_its_fault_in_the_status_and_its_event(tmp_path: Path) -> None:
    """The merge sets aside a shard it cannot read; the status condition and the Warning Event name it and why."""
    storage = LocalStorage(tmp_path)
    key = rec.shard_data_key(2, 105)
    storage.write_bytes(
        f"quarantine/{key}.json", b'{"key": "%s", "error": "Parquet magic bytes not found"}' % key.encode()
    )
    records = {key: {"key": key, "error": "Parquet magic bytes not found", "repair": ""}}
    cond = damage_condition(records)
    assert cond is not None and (cond.type, cond.status, cond.reason) == (c.DAMAGED, "True", c.SHARD_DATA_DAMAGED)
    assert key in cond.message and "Parquet magic bytes not found" in cond.message
    spec = bandit_spec()
    plan = decide(REF, spec, dataclasses.replace(Observed(), quarantined=frozenset({key})))  # type: ignore[arg-type]
    plan = dataclasses.replace(plan, conditions=(*plan.conditions, cond))
    status, events, _ = publication(RunStatus(), plan, 1)
    assert status.totals.shards_quarantined == 1 and status.condition(c.DAMAGED) is not None
    (warn,) = [e for e in events if e.reason == c.SHARDS_QUARANTINED]
    assert warn.type == "Warning" and key in warn.message and "Parquet magic bytes" in warn.message
    assert damage_condition({}) is None


def test_many_damaged_files_fit_the_condition_message() -> None:
    records = {rec.round_plan_key(r): {"error": "x" * 300, "repair": "decided again"} for r in range(1, 60)}
    records[rec.STATUS_KEY] = {"error": "unreadable", "repair": "written again"}
    cond = damage_condition(records)
    assert cond is not None and cond.reason == c.FILES_DAMAGED and len(cond.message) <= 2048
    assert cond.message.startswith("60 file(s)") and "more" in cond.message


def test_quarantine_records_the_fault_and_removes_the_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write_bytes(rec.round_plan_key(1), b'{"round": 1, "sh')
    quarantine(storage, rec.round_plan_key(1), "unreadable", "decided again")
    assert not storage.exists(rec.round_plan_key(1))
    assert (tmp_path / "quarantine" / "rounds" / "r0001" / "plan.json.json").read_text() == (
        '{"key": "rounds/r0001/plan.json", "error": "unreadable", "repair": "decided again"}'
    )


def test_a_merged_shard_whose_marker_was_set_aside_is_generated_again() -> None:
    """Its rows are merged already, but a later full re-merge reads every shard: the same seed makes it again, before
    anything else is decided. A shard that failed (never done, nothing set aside) is left as it was."""
    spec = bandit_spec()
    obs = finished_world(spec)
    shard = obs.rounds[1].shards[1]
    done = frozenset((s.round, s.seed) for p in obs.rounds.values() for s in p.shards) - {(1, shard.seed)}
    lost = dataclasses.replace(
        obs, jobs=(), shards_done=done, quarantined=frozenset({rec.shard_manifest_key(1, shard.seed)})
    )
    plan = repair(REF, spec, lost)  # type: ignore[arg-type]
    assert plan is not None and plan.condition(c.PROGRESSING).reason == c.REPAIRING
    assert [(type(a), a.shard, a.attempt) for a in plan.actions] == [(CreateShardJob, shard, 0)]  # type: ignore[union-attr]
    listed = ObservedJob(f"sft-r1-s{shard.seed}", "shard", 1, shard.seed, 0, "Succeeded")  # still listed: attempt 1
    again = repair(REF, spec, dataclasses.replace(lost, jobs=(listed,)))  # type: ignore[arg-type]
    assert again is not None and [a.attempt for a in again.actions] == [1]  # type: ignore[union-attr]
    assert repair(REF, spec, dataclasses.replace(lost, quarantined=frozenset())) is None  # type: ignore[arg-type]
