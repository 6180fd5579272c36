"""The metrics collector: what a scrape shows for a run's last published status (prometheus_client's own text
exposition, parsed back with its own parser)."""

from __future__ import annotations

from genrun.operator.metrics import Metrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

STATUS = {
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
    run = (("name", "sft"), ("namespace", "data"))
    assert got[("genrun_generated_examples_total", run)] == 500
    assert got[("genrun_generated_tokens_total", run)] == 30000
    assert got[("genrun_qc_passed_examples", run)] == 280
    assert got[("genrun_target_examples", run)] == 1000
    assert got[("genrun_duplication_ratio", run)] == 0.36
    assert got[("genrun_budget_used_ratio", run)] == 0.4
    assert got[("genrun_unique_yield_ratio", (*run, ("round", "2")))] == 0.5
    assert abs(got[("genrun_round_duplication_ratio", (*run, ("round", "1")))] - 0.2) < 1e-9
    assert ("genrun_unique_yield_ratio", (*run, ("round", "3"))) not in got
    assert got[("genrun_shard_jobs", (*run, ("state", "running")))] == 2
    assert got[("genrun_shard_jobs", (*run, ("state", "failed")))] == 0
    assert got[("genrun_run_condition", (*run, ("condition", "Progressing")))] == 1
    assert got[("genrun_run_condition", (*run, ("condition", "Succeeded")))] == 0
    assert got[("genrun_projected_tokens_to_target", run)] == 12000
    assert got[("genrun_projected_rounds", run)] == 3
    arm = ("arm", "t0.8-p0.9-r1.2")
    assert got[("genrun_arm_reward_per_1k_tokens", (arm, *run))] == 12.25
    assert got[("genrun_arm_shards_total", (arm, *run))] == 5


def test_forgotten_runs_leave_no_series_and_labels_stay_bounded() -> None:
    m = Metrics()
    m.runs.update("data", "sft", 1000, STATUS, {})
    m.runs.update("data", "other", 10, {"totals": {}}, {})
    m.runs.forget("data", "sft")
    got = scrape(m)
    assert not [k for k in got if ("name", "sft") in k[1]]
    assert got[("genrun_qc_passed_examples", (("name", "other"), ("namespace", "data")))] == 0
    assert not [k for k in got if k[0] == "genrun_projected_rounds"]  # no projection before a round is measured
    # ("le" is the reconcile-duration histogram's bucket bound)
    assert {label for _, labels in got for label, _ in labels} <= {"namespace", "name", "round", "state",
                                                                   "condition", "arm", "version", "le"}  # fmt: skip
