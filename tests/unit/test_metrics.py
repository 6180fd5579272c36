"""The metrics collector: what a scrape shows for a run's last published status (prometheus_client's own text
exposition, parsed back with its own parser)."""

from __future__ import annotations

from genrun.contract.status import RunStatus
from genrun.operator.metrics import Metrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

RAW = {
    "round": 2,
    "totals": {"generated": 500, "tokens": 30000, "unique": 320, "qcPassed": 280, "duplicationRatio": 0.36},
    "rounds": [
        {"round": 1, "generated": 100, "newUnique": 80, "marginalYield": 0.7},
        {"round": 2, "generated": 400, "newUnique": 240, "marginalYield": 0.5},
        {"round": 3, "generated": 0},  # planned, not merged: no yield yet
    ],
    "conditions": [{"type": "Progressing", "status": "True"}, {"type": "Succeeded", "status": "False"}],
    "projectedTokensToTarget": 12000,
    "projectedRounds": 3,
    "arms": [
        {"arm": "t0.7-p0.9-r1.1", "shards": 3, "rewardPer1kTokens": 9.5},
        {"arm": "t0.8-p0.9-r1.2", "shards": 5, "rewardPer1kTokens": 12.25},
    ],
}


STATUS = RunStatus.from_dict(RAW)


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted({"namespace": "data", "name": "sft", **labels}.items()))


def scrape(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_run_status_becomes_its_series() -> None:
    m = Metrics()
    m.runs.update("data", "sft", 1000, STATUS, {"running": 2, "succeeded": 6}, budget_used=0.4)
    got = scrape(m)
    assert got[key("genrun_generated_examples_total")] == 500
    assert got[key("genrun_generated_tokens_total")] == 30000
    assert got[key("genrun_qc_passed_examples")] == 280
    assert got[key("genrun_target_examples")] == 1000
    assert got[key("genrun_duplication_ratio")] == 0.36
    assert got[key("genrun_budget_used_ratio")] == 0.4
    assert got[key("genrun_unique_yield_ratio", round="2")] == 0.5
    assert abs(got[key("genrun_round_duplication_ratio", round="1")] - 0.2) < 1e-9
    assert key("genrun_unique_yield_ratio", round="3") not in got
    assert got[key("genrun_shard_jobs", state="running")] == 2
    assert got[key("genrun_shard_jobs", state="failed")] == 0
    assert got[key("genrun_run_condition", condition="Progressing")] == 1
    assert got[key("genrun_run_condition", condition="Succeeded")] == 0
    assert got[key("genrun_projected_tokens_to_target")] == 12000
    assert got[key("genrun_projected_rounds")] == 3
    assert got[key("genrun_arm_reward_per_1k_tokens", arm="t0.8-p0.9-r1.2")] == 12.25
    assert got[key("genrun_arm_shards_total", arm="t0.8-p0.9-r1.2")] == 5


def test_forgotten_runs_leave_no_series_and_labels_stay_bounded() -> None:
    m = Metrics()
    m.runs.update("data", "sft", 1000, STATUS, {})
    m.runs.update("data", "other", 10, RunStatus.from_dict({"totals": {}}), {})
    m.runs.forget("data", "sft")
    got = scrape(m)
    assert not [k for k in got if ("name", "sft") in k[1]]
    assert got[("genrun_qc_passed_examples", (("name", "other"), ("namespace", "data")))] == 0
    assert not [k for k in got if k[0] == "genrun_projected_rounds"]  # no projection before a round is measured
    # ("le" is the reconcile-duration histogram's bucket bound)
    assert {label for _, labels in got for label, _ in labels} <= {"namespace", "name", "round", "state",
                                                                   "condition", "arm", "version", "le"}  # fmt: skip


def test_duplicates_per_tier_are_one_counter_with_a_tier_label() -> None:
    """One counter, its tier label from the contract's tiers (records.DUPLICATE_TIERS; another name in the status is
    not exported), and a gauge saying the unique count is semantic-unique."""
    m = Metrics()
    totals = {**RAW["totals"], "duplicates": {"exact": 150, "near": 20, "semantic": 10, "bogus": 1},
              "dedupTiers": ["exact", "near", "semantic"]}  # fmt: skip
    m.runs.update("data", "sft", 1000, RunStatus.from_dict({**RAW, "totals": totals}), {})
    got = scrape(m)
    assert got[key("genrun_duplicates_total", tier="exact")] == 150
    assert got[key("genrun_duplicates_total", tier="near")] == 20
    assert got[key("genrun_duplicates_total", tier="semantic")] == 10
    assert key("genrun_duplicates_total", tier="bogus") not in got
    assert got[key("genrun_semantic_dedup_enabled")] == 1
    m.runs.update("data", "sft", 1000, STATUS, {})
    got = scrape(m)
    assert got[key("genrun_semantic_dedup_enabled")] == 0 and key("genrun_duplicates_total", tier="exact") not in got


def test_qc_rejections_before_responses_are_a_counter() -> None:
    m = Metrics()
    m.runs.update("data", "sft", 1000, RunStatus.from_dict({**RAW, "totals": {**RAW["totals"],
                                                                             "qcRejectedBeforeResponse": 42}}), {})  # fmt: skip
    got = scrape(m)
    assert got[key("genrun_qc_rejected_before_response_total")] == 42
    m.runs.update("data", "sft", 1000, STATUS, {})  # a status from before the field: 0
    assert scrape(m)[key("genrun_qc_rejected_before_response_total")] == 0
