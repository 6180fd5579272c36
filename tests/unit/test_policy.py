"""The bandit policy (operator/policy.py) and the planner's bandit strategy: pure, so every test is (spec, observed)
-> plan, with worlds where each arm has a known yield."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable

import numpy as np
import pytest
from genrun.contract.api import RunRef, parse_spec
from genrun.contract.records import RoundPlan, RoundReport, Sampling, ShardPlan, ShardYield
from genrun.contract.status import CellEntry
from genrun.operator import conditions as c
from genrun.operator import policy as pol
from genrun.operator.planner import CreateShardJob, Observed, Plan, RecordRound, decide
from genrun.operator.simulate import run_instantly
from hypothesis import given, settings
from hypothesis import strategies as st

REF = RunRef(name="sft", namespace="data", uid="6f1c", generation=1)
BASE = {
    "model": {"name": "Qwen/Qwen2.5-32B"},
    "target": {"uniqueExamples": 6000},
    "output": {"path": "s3://sft-data/stage1"},
    "sampling": {"temperature": 0.7, "topP": 0.9, "repetitionPenalty": 1.1},
    "shards": {"initial": 10, "firstSeed": 100, "examplesPerShard": 400},
    "escalation": {"maxShardsPerRound": 64},
    "budget": {"maxRounds": 12, "maxShards": 1000},
}
TOKENS_PER_EXAMPLE = 60


def spec_of(**over: dict) -> object:
    raw = copy.deepcopy(BASE)
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return parse_spec(raw)


def binom_tail(n: int, y: float, k: int) -> float:
    """P(Binomial(n, y) >= k), exactly (log-space terms)."""
    lg = math.lgamma
    return sum(
        math.exp(lg(n + 1) - lg(i + 1) - lg(n - i + 1) + i * math.log(y) + (n - i) * math.log1p(-y))
        for i in range(k, n + 1)
    )


QC_PASS = 0.9


def instant_merge(kept_of_shard: Callable[[ShardPlan], int]) -> Callable[[RoundPlan, RoundReport | None], RoundReport]:
    """A merge for run_instantly: each shard keeps kept_of_shard(shard) rows (new, QC-passed), reported per shard as
    the real merge does; the totals accumulate over rounds."""

    def merge(plan: RoundPlan, prev: RoundReport | None) -> RoundReport:
        kept = [kept_of_shard(s) for s in plan.shards]
        per = tuple(
            ShardYield(s.seed, s.examples, s.examples * TOKENS_PER_EXAMPLE, min(s.examples, round(k / QC_PASS)), k)
            for s, k in zip(plan.shards, kept, strict=True)
        )
        gen, uniq, total = sum(y.rows for y in per), sum(y.new_unique for y in per), sum(kept)
        return RoundReport(
            round=plan.round,
            shards=len(per),
            generated=gen,
            new_unique=uniq,
            new_qc_passed=total,
            generated_total=gen + (prev.generated_total if prev else 0),
            unique_total=uniq + (prev.unique_total if prev else 0),
            qc_passed_total=total + (prev.qc_passed_total if prev else 0),
            tokens=gen * TOKENS_PER_EXAMPLE,
            per_shard=per,
        )

    return merge


def run_world(
    spec, yields: dict[float, float], max_steps: int = 200, noise: random.Random | None = None
) -> tuple[Observed, list]:
    """Drive decide() to the end. A shard of the arm at temperature t writes its examples; a share yields[t] of
    them is new and passes QC (per-shard figures, as the merge reports them); Jobs finish at once. With `noise`,
    each example is kept with probability yields[t] (a binomial world), else exactly floor(examples * yield)."""

    def kept_of(examples: int, y: float) -> int:
        return sum(noise.random() < y for _ in range(examples)) if noise else math.floor(examples * y)

    merge = instant_merge(lambda s: kept_of(s.examples, yields[s.sampling.temperature]))

    return run_instantly(REF, spec, merge, max_steps)


def test_arms_default_to_the_escalation_ladder_and_explicit_arms_replace_it() -> None:
    ladder = pol.arms(spec_of())
    assert [(a.temperature, a.repetition_penalty) for a in ladder] == [(0.7, 1.1), (0.8, 1.2), (0.9, 1.3), (1.0, 1.3)]
    explicit = pol.arms(spec_of(policy={"arms": [{"temperature": 0.5}, {"temperature": 1.1, "minP": 0.05}]}))
    assert [(a.temperature, a.min_p, a.top_p) for a in explicit] == [(0.5, 0.0, 0.9), (1.1, 0.05, 0.9)]
    assert pol.arm_id(explicit[1]) == "t1.1-p0.9-r1-m0.05"


def test_pilot_samples_a_share_of_the_target_over_every_arm() -> None:
    spec = spec_of()
    plan = decide(REF, spec, Observed())
    shards = [a.shard for a in plan.actions if isinstance(a, CreateShardJob)]
    assert {s.sampling for s in shards} == set(pol.arms(spec))  # every arm measured in round 1
    probes = [s for s in shards if s.sampling != pol.base_sampling(spec)]
    assert sum(s.examples for s in probes) <= 0.05 * 6000 + len(shards)  # the other arms: probes
    assert len({s.seed for s in shards}) == len(shards)
    # A small target still gets one shard per arm: a probe just large enough to retire an arm that passes no QC.
    small = [
        a.shard
        for a in decide(REF, spec_of(target={"uniqueExamples": 50}), Observed()).actions
        if isinstance(a, CreateShardJob)
    ]
    assert len(small) == 4 and all(s.examples == pol.probe_examples(spec) for s in small[1:])


@pytest.mark.parametrize(
    ("target", "per_shard", "base_examples", "probe"),
    [
        (6000, 400, 400, 75),  # examplesPerShard (4x the pilot's 4 x 75 examples would be 1,200)
        (100, 40, 32, 2),  # 4x the pilot's 4 x 2 examples
        (20, 40, 19, 2),  # the prior's approach round, (20 + 10%) / 0.87 = 25, less the other shards' 6
        (100, 10, 10, 2),  # examplesPerShard
    ],
)
def test_the_pilot_gives_the_users_own_sampling_a_real_shard_bounded_by_the_probes(
    target: int, per_shard: int, base_examples: int, probe: int
) -> None:
    """Round 1 probes the other arms and gives the shard at spec.sampling up to GROWTH x the pilot's examples (at most
    examplesPerShard, and what the prior's approach round would commit): real work on the arm the user chose, and a
    round-2 estimate from more than a handful of examples; what it commits blind stays a bounded multiple of the
    exploration. With explicit arms that leave spec.sampling out, every shard is a probe."""
    spec = spec_of(target={"uniqueExamples": target}, shards={"examplesPerShard": per_shard})
    plan = decide(REF, spec, Observed())
    shards = [a.shard for a in plan.actions if isinstance(a, CreateShardJob)]
    assert [s.sampling for s in shards] == list(pol.arms(spec))
    assert [s.examples for s in shards] == [base_examples] + [probe] * 3  # the probes: pilotShare, or the least
    assert "the shard at spec.sampling (t0.7-p0.9-r1.1) writes" in plan.events[0].message
    # Never past the budget: the whole round fits maxGeneratedExamples, probes included.
    tight = spec_of(target={"uniqueExamples": 20}, budget={"maxGeneratedExamples": 20})
    shards = [a.shard for a in decide(REF, tight, Observed()).actions if isinstance(a, CreateShardJob)]
    assert [s.examples for s in shards] == [14, 2, 2, 2]
    other = spec_of(policy={"arms": [{"temperature": 0.5}, {"temperature": 0.9}]})
    shards = [a.shard for a in decide(REF, other, Observed()).actions if isinstance(a, CreateShardJob)]
    assert len({s.examples for s in shards}) == 1


@pytest.mark.parametrize(("floor", "conf", "probe"), [(0.7, 0.9, 2), (0.7, 0.95, 3), (0.5, 0.95, 5), (0.9, 0.98, 2)])
def test_probe_is_the_fewest_examples_whose_failure_retires_an_arm(floor: float, conf: float, probe: int) -> None:
    spec = spec_of(escalation={"minQcPassRate": floor}, policy={"retireConfidence": conf})
    assert pol.probe_examples(spec) == probe
    assert pol.qc_upper_bound(0, probe, conf) < floor <= pol.qc_upper_bound(0, probe - 1, conf)


@pytest.mark.parametrize(("passed", "n", "conf"), [(0, 3, 0.9), (1, 8, 0.95), (30, 40, 0.9), (700, 1000, 0.99)])
def test_qc_upper_bound_is_the_exact_clopper_pearson_bound(passed: int, n: int, conf: float) -> None:
    """At the bound, seeing `passed` or fewer has probability 1 - confidence; the Wilson bound above 2,000 rows is
    close to the exact one."""
    u = pol.qc_upper_bound(passed, n, conf)
    assert 1 - binom_tail(n, u, passed + 1) == pytest.approx(1 - conf, abs=1e-6)
    big = pol.qc_upper_bound(passed * 3, n * 3, conf)
    assert pol.qc_upper_bound(passed * 3, n * 3 + pol.EXACT_BOUND_MAX, conf) < big


def test_pinned_first_round_uses_shards_initial() -> None:
    plan = decide(REF, spec_of(policy={"pilotShare": 0}), Observed())
    shards = [a.shard for a in plan.actions if isinstance(a, CreateShardJob)]
    assert len(shards) == 10 and all(s.examples == 400 and s.sampling.temperature == 0.7 for s in shards)


@pytest.mark.parametrize(
    ("need", "y", "conf"), [(100, 0.3, 0.9), (1000, 0.05, 0.95), (37, 0.8, 0.9), (5000, 0.5, 0.99)]
)
def test_examples_needed_meets_the_confidence_and_is_near_minimal(need: int, y: float, conf: float) -> None:
    n = pol.examples_needed(need, y, conf)
    assert binom_tail(n, y, need) >= conf - 0.01
    assert binom_tail(math.floor(n * 0.97), y, need) < conf


@pytest.mark.parametrize(
    ("need", "a", "b", "conf"), [(70, 31.0, 3.0, 0.9), (300, 60.0, 40.0, 0.9), (50, 8.0, 4.0, 0.95)]
)
def test_examples_needed_with_the_yields_spread_reaches_the_target_as_often_as_it_says(
    need: int, a: float, b: float, conf: float
) -> None:
    """The yield is an estimate, Beta(a, b): sized on its mean alone (the binomial's spread only) the round falls
    short far more often than `conf` says; sized with the estimate's spread too, it falls short about as often as
    it should (kept ~ Binomial(n, y) with y drawn from the posterior, 20,000 draws)."""
    y, sd = a / (a + b), math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    rng = np.random.default_rng(7)
    ys = rng.beta(a, b, 20_000)

    def reach(n: int) -> float:
        return float((rng.binomial(n, ys) >= need).mean())

    n_mean, n_spread = pol.examples_needed(need, y, conf), pol.examples_needed(need, y, conf, sd)
    assert n_spread > n_mean and reach(n_mean) < conf - 0.05
    assert reach(n_spread) >= conf - 0.03
    assert pol.examples_needed(need, y, conf, 0.0) == n_mean


def test_a_round_that_would_approach_finishes_when_the_round_after_it_would_cost_more() -> None:
    """Approaching the target leaves a round that buys at least a shard's floor of examples: when finishing now
    needs no more than the approach plus that floor, the round finishes now (precise), and says why."""
    spec = spec_of(target={"uniqueExamples": 100})
    need, y, sd = 66, 0.9, 0.1
    approach, precise, _ = pol.examples_for(spec, need, y, sd, False, rounds_left=5, floor=0)
    finish, precise2, why = pol.examples_for(spec, need, y, sd, False, rounds_left=5, floor=16)
    assert not precise and precise2 and approach < finish <= approach + 16
    assert finish == pol.examples_needed(need, y, 0.9, sd) and "would leave a round of at least 16" in why
    big = spec_of(target={"uniqueExamples": 3000})  # the overshoot cap is far from the finish: approaching pays
    assert not pol.examples_for(big, 2000, 0.4, 0.1, False, rounds_left=5, floor=16)[1]


def _stats(spec, evidence: dict[float, tuple[int, int]]) -> list[pol.ArmStats]:
    out = []
    for s in pol.arms(spec):
        a = pol.ArmStats(s)
        if s.temperature in evidence:
            examples, kept = evidence[s.temperature]
            a.add(1.0, 1, examples, examples * TOKENS_PER_EXAMPLE, examples, kept)
        out.append(a)
    return out


def test_thompson_gives_most_shards_to_the_best_arm_and_caps_exploration() -> None:
    spec = spec_of()
    stats = _stats(spec, {0.7: (800, 120), 0.8: (800, 400), 0.9: (800, 200), 1.0: (800, 100)})
    picks = pol.allocate(stats, 20, 0.25, random.Random(1))
    best = [p for p in picks if p.sampling.temperature == 0.8]
    assert len(best) >= 15 and len(picks) - len(best) <= 5
    assert pol.allocate(stats, 20, 0.25, random.Random(1)) == picks  # same stream, same allocation
    assert all(p.sampling.temperature == 0.8 for p in pol.allocate(stats, 20, 0.0, random.Random(2)))


def test_arms_below_the_qc_floor_are_retired() -> None:
    from genrun.operator.planner import make_round

    spec = spec_of()
    cool, hot = pol.arms(spec)[0], pol.arms(spec)[1]
    plan = make_round(spec, 1, 2, cool, {}, "test", arms=[cool, hot], examples=100)
    per = (ShardYield(100, 100, 6000, 25, 20), ShardYield(101, 100, 6000, 100, 50))  # hot: QC-pass 0.5 < 0.7
    rep = RoundReport(1, 2, 200, 125, 70, 200, 125, 70, tokens=12000, per_shard=per)
    stats = pol.arm_stats(spec, {1: plan}, {1: rep})
    by_t = {a.sampling.temperature: a for a in stats}
    assert by_t[0.8].retired and not by_t[0.7].retired and not by_t[0.9].retired  # untried arms stay
    assert all(not p.retired for p in pol.allocate(stats, 30, 1.0, random.Random(3)))
    # A rate below the floor on a few rows is not yet evidence: 2 of 4 could be a 0.7 arm's bad luck.
    few = (ShardYield(100, 4, 240, 4, 4), ShardYield(101, 4, 240, 4, 2))
    stats = pol.arm_stats(spec, {1: plan}, {1: RoundReport(1, 2, 8, 8, 6, 8, 8, 6, tokens=480, per_shard=few)})
    assert not any(a.retired for a in stats)


def test_bandit_moves_the_budget_to_the_best_arm_and_stops_precisely() -> None:
    spec = spec_of()
    yields = {0.7: 0.15, 0.8: 0.45, 0.9: 0.3, 1.0: 0.1}
    obs, plans = run_world(spec, yields)
    assert plans[-1].condition(c.SUCCEEDED).status == "True"
    kept = max(obs.reports.values(), key=lambda r: r.round).qc_passed_total
    assert 6000 <= kept <= 6000 * 1.1  # overshoot within 10%
    after_pilot = [s for r, p in obs.rounds.items() if r > 1 for s in p.shards]
    best = sum(s.examples for s in after_pilot if s.sampling.temperature == 0.8)
    assert best >= 0.7 * sum(s.examples for s in after_pilot)
    status = plans[-1].status
    assert status is not None and status.projected_tokens_to_target == 0 and status.projected_rounds == len(obs.rounds)
    assert {a.temperature for a in status.arms or ()} == {0.7, 0.8, 0.9, 1.0}


def test_status_projects_tokens_and_rounds_after_the_pilot() -> None:
    spec = spec_of()
    obs, plans = run_world(spec, {0.7: 0.2, 0.8: 0.2, 0.9: 0.2, 1.0: 0.2}, max_steps=200)
    first = next(p.status for p in plans if p.status and p.status.projected_tokens_to_target is not None)
    need = 6000 - obs.reports[1].qc_passed_total
    # At a 0.2 yield and 60 tokens an example: ~need/0.2 examples, and a full round holds 64 x 400.
    assert first.projected_tokens_to_target == pytest.approx(need / 0.2 * TOKENS_PER_EXAMPLE, rel=0.08)
    assert first.projected_rounds == 1 + math.ceil(need / 0.2 / (64 * 400) * 1.02)


@pytest.mark.parametrize(
    ("yields", "target"),
    [
        ((0.5, 0.25, 0.5, 0.5), 300),
        ((0.15, 0.45, 0.3, 0.1), 1500),
        ((0.05, 0.08, 0.1, 0.6), 6000),
        ((0.3, 0.3, 0.3, 0.3), 20000),
    ],
)
def test_bandit_overshoot_in_a_binomial_world(yields: tuple[float, ...], target: int) -> None:
    """Each example is kept at random (a binomial world, 40 fixed seeds): the target is always met, the median
    overshoot stays within spec.policy.maxOvershoot (10%) and even the 90th percentile within 20%."""
    spec = spec_of(target={"uniqueExamples": target}, budget={"maxRounds": 30, "maxShards": 5000})
    temps = [a.temperature for a in pol.arms(spec)]
    over = []
    for seed in range(40):
        obs, plans = run_world(spec, dict(zip(temps, yields, strict=True)), noise=random.Random(seed))
        assert plans[-1].condition(c.SUCCEEDED).status == "True"
        seeds = [s.seed for p in obs.rounds.values() for s in p.shards]
        assert len(seeds) == len(set(seeds))
        over.append(max(obs.reports.values(), key=lambda r: r.round).qc_passed_total / target - 1)
    over.sort()
    assert over[len(over) // 2] <= 0.10 and over[int(0.9 * len(over))] <= 0.20, over


def test_round_rng_is_derived_from_the_run_seed_and_round() -> None:
    spec = spec_of()
    a = pol.round_rng(spec, 2).random()
    assert a == pol.round_rng(spec, 2).random()
    assert a != pol.round_rng(spec, 3).random()
    assert a != pol.round_rng(spec_of(shards={"firstSeed": 7}), 2).random()


def test_two_runs_of_one_spec_plan_the_same_rounds_whatever_their_names() -> None:
    """A reference run under another name (or in another namespace) is comparable shard for shard with a rerun."""
    spec = spec_of(prompt=CELL_PROMPT, target={"uniqueExamples": 3000})
    yields = {0.7: 0.3, 0.8: 0.35, 0.9: 0.2, 1.0: 0.05}
    one, _ = run_world(spec, yields, noise=random.Random(5))
    other = RunRef(name="reference", namespace="elsewhere", uid="9a9a")
    plans = [
        next(a.plan for a in decide(r, spec, Observed()).actions if isinstance(a, RecordRound)) for r in (other, REF)
    ]
    assert plans[0] == plans[1]  # Job names differ (they carry the run's name); the plans do not
    after_pilot = Observed(rounds={1: one.rounds[1]}, reports={1: one.reports[1]})
    record = next(a for a in decide(other, spec, after_pilot).actions if isinstance(a, RecordRound))
    assert record.plan == one.rounds[2]


def test_sampling_of_mixed_round_is_its_most_used_arm() -> None:
    from genrun.operator.planner import make_round

    spec = spec_of()
    arms = [Sampling(0.7, 0.9, 1.1, 0, 512), Sampling(0.8, 0.9, 1.2, 0, 512), Sampling(0.8, 0.9, 1.2, 0, 512)]
    plan = make_round(spec, 1, 3, arms[0], {}, "test", arms=arms, examples=50)
    assert plan.sampling == arms[1] and [s.examples for s in plan.shards] == [50, 50, 50]
    assert [s.arm for s in plan.shards] == ["t0.7-p0.9-r1.1", "t0.8-p0.9-r1.2", "t0.8-p0.9-r1.2"]


def test_each_round_grows_at_most_growth_times_the_evidence_before_it() -> None:
    """The pilot's few examples never commit the whole need: round r plans at most GROWTH x the examples generated
    in rounds 1..r-1 (one shard's rounding aside), and the run still finishes with a small overshoot."""
    spec = spec_of(target={"uniqueExamples": 3000})
    obs, plans = run_world(spec, {0.7: 0.5, 0.8: 0.6, 0.9: 0.3, 1.0: 0.0})
    assert plans[-1].condition(c.SUCCEEDED).status == "True"
    for r in sorted(obs.rounds)[1:]:
        planned = sum(s.examples for s in obs.rounds[r].shards)
        assert planned <= pol.GROWTH * obs.reports[r - 1].generated_total + 400, r
    assert len(obs.rounds) >= 3  # grown into, not committed after the pilot
    kept = max(obs.reports.values(), key=lambda r: r.round).qc_passed_total
    assert 3000 <= kept <= 3000 * 1.1


# ----------------------------------------------------------------------------------------------------------
# Attribute cells

CELL_PROMPT = {
    "attributes": [
        {"name": "task", "values": ["explain", "howto"]},
        {"name": "level", "values": ["easy", "hard"]},
    ]
}
CELL_YIELD = {  # hard how-tos collapse (say, the model repeats itself); the rest yield alike
    (("task", "explain"), ("level", "easy")): 0.5,
    (("task", "explain"), ("level", "hard")): 0.5,
    (("task", "howto"), ("level", "easy")): 0.5,
    (("task", "howto"), ("level", "hard")): 0.05,
}


def cells_of(plan: Plan) -> tuple[CellEntry, ...]:
    assert plan.status is not None and plan.status.cells is not None
    return plan.status.cells


def run_cells(spec, cell_yield: dict) -> tuple[Observed, list]:
    """A world whose yield depends on the shard's attribute cell only (every sampling arm alike)."""

    merge = instant_merge(lambda s: math.floor(s.examples * cell_yield[s.cell]))

    return run_instantly(REF, spec, merge, 200)


def test_cells_whose_yield_collapses_get_fewer_shards_and_the_status_shows_yield_per_cell() -> None:
    spec = spec_of(prompt=CELL_PROMPT, target={"uniqueExamples": 20000}, budget={"maxRounds": 30, "maxShards": 5000})
    obs, plans = run_cells(spec, CELL_YIELD)
    assert plans[-1].condition(c.SUCCEEDED).status == "True"
    shards = [s for p in obs.rounds.values() for s in p.shards]
    assert {s.cell for s in obs.rounds[1].shards} <= set(pol.cells(spec)) and all(s.cell for s in shards)
    later = [s for r, p in obs.rounds.items() if r > 2 for s in p.shards]
    collapsed = sum(s.examples for s in later if s.cell == (("task", "howto"), ("level", "hard")))
    assert collapsed <= 0.12 * sum(s.examples for s in later)  # a fair share would be 25%
    cells = {x.cell: x for x in cells_of(plans[-1])}
    assert cells["task=howto,level=hard"].yield_ < 0.1 < cells["task=explain,level=easy"].yield_
    assert sum(x.shards for x in cells.values()) == len(shards)


def test_a_quota_gives_a_low_yield_cell_its_share_of_the_kept_rows() -> None:
    quota = {**CELL_PROMPT, "quotas": [{"match": {"task": "howto", "level": "hard"}, "minShare": 0.05}]}
    spec = spec_of(prompt=quota, target={"uniqueExamples": 20000}, budget={"maxRounds": 30, "maxShards": 5000})
    obs, plans = run_cells(spec, CELL_YIELD)
    assert plans[-1].condition(c.SUCCEEDED).status == "True"
    cells = {x.cell: x for x in cells_of(plans[-1])}
    kept = sum(x.kept for x in cells.values())
    assert cells["task=howto,level=hard"].kept >= 0.045 * kept  # without the quota it starves (test above)
    assert any("quota task=howto,level=hard" in p.reason for p in obs.rounds.values())


def test_without_attributes_shards_have_no_cell_and_the_plan_is_unchanged() -> None:
    obs, plans = run_world(spec_of(), {0.7: 0.3, 0.8: 0.4, 0.9: 0.2, 1.0: 0.1})
    assert all(s.cell == () for p in obs.rounds.values() for s in p.shards)
    assert plans[-1].status is not None and plans[-1].status.cells is None


@settings(max_examples=100, deadline=None)
@given(
    evidence=st.lists(st.tuples(st.integers(0, 500), st.floats(0, 1)), min_size=4, max_size=4),
    n=st.integers(1, 64),
    exploration=st.floats(0, 1),
    seed=st.integers(0, 2**32),
)
def test_property_allocation_is_replayable_bounded_and_skips_retired_arms(evidence, n, exploration, seed) -> None:
    spec = spec_of()
    temps = [a.temperature for a in pol.arms(spec)]
    stats = _stats(spec, {t: (ex, math.floor(ex * y)) for t, (ex, y) in zip(temps, evidence, strict=True)})
    for a in stats:  # _stats counts every example as unique: judge them as the planner does
        a.retired = a.unique > 0 and pol.qc_upper_bound(a.kept, a.unique, 0.9) < 0.7
    picks = pol.allocate(stats, n, exploration, random.Random(seed))
    assert picks == pol.allocate(stats, n, exploration, random.Random(seed))  # same stream, same allocation
    assert len(picks) == n
    top = pol.best(stats)
    assert sum(p is not top for p in picks) <= math.ceil(exploration * n)
    assert all(not p.retired for p in picks) or all(a.retired for a in stats)


def test_the_html_report_has_a_table_of_attribute_cells() -> None:
    from genrun.operator.charts import render_html

    spec = spec_of(prompt=CELL_PROMPT, target={"uniqueExamples": 3000})
    obs, plans = run_cells(spec, CELL_YIELD)
    reports = [obs.reports[r] for r in sorted(obs.reports)]
    page = render_html("sft", reports, 3000, status=plans[-1].status)
    assert "Attribute cells" in page and "task=howto,level=hard" in page
    assert "no attributes in the spec" in render_html("sft", reports, 3000, status=None)


def test_few_rounds_left_commit_to_finishing_and_the_last_round_sizes_pessimistically() -> None:
    """Approaching the target (the overshoot cap) and growing from the evidence both spend rounds: with fewer than
    3 (4) rounds left the round is sized to finish, and the budget's last round, which nothing can correct, at the
    low end of the yield estimate."""
    spec = spec_of()
    need, y, sd = 3000, 0.4, 0.1
    approach, precise, _ = pol.examples_for(spec, need, y, sd, False, rounds_left=5)
    finish, precise2, _ = pol.examples_for(spec, need, y, sd, False, rounds_left=2)
    last, _, _ = pol.examples_for(spec, need, y, sd, True, rounds_left=1)
    assert not precise and precise2 and approach < finish == pol.examples_needed(need, y, 0.9, sd) < last
    grown = pol.size_round(spec, need, y, 0.01, 10**6, 100, False, measured=500, rounds_left=4)
    assert not grown.precise and grown.shards * grown.examples <= pol.GROWTH * 500 + 400
    committed = pol.size_round(spec, need, y, 0.01, 10**6, 100, False, measured=500, rounds_left=3)
    assert committed.precise and committed.shards * committed.examples >= pol.examples_needed(need, y, 0.9)


def test_every_strategy_the_api_and_both_crds_name_is_registered() -> None:
    """spec.policy.strategy names a registered Strategy (genrun.operator.strategy.STRATEGIES), and each registered one
    starts a run: round 1 is recorded with its shard Jobs."""
    import typing
    from pathlib import Path

    import yaml
    from genrun.contract.api import PolicySpec
    from genrun.operator.strategy import STRATEGIES

    names = typing.get_args(typing.get_type_hints(PolicySpec)["strategy"])
    assert set(names) == set(STRATEGIES)
    root = Path(__file__).resolve().parents[2]
    for crd_path in (root / "crds" / "generationrun.yaml", root / "charts" / "genrun" / "crds" / "generationrun.yaml"):
        crd = yaml.safe_load(crd_path.read_text())
        props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        assert set(props["policy"]["properties"]["strategy"]["enum"]) == set(STRATEGIES), crd_path
    for name in STRATEGIES:
        plan = decide(REF, spec_of(policy={"strategy": name}), Observed())
        assert [type(a) for a in plan.actions][:2] == [RecordRound, CreateShardJob], name
