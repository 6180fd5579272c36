"""The status's round and arm tables (operator/figures.py) over round plans and reports: two shards of one round
that both write the same new row are each credited with it by the bandit's measure, but the arm table counts the
rows the dataset kept, so it adds up to the run's; a report from before the per-shard kept counts leaves the
bandit's figures as they were. (The same on real runs: tests/integration/test_figures.py.)"""

from __future__ import annotations

from genrun.contract.records import RoundPlan, RoundReport, Sampling, ShardPlan, ShardYield
from genrun.contract.status import ArmEntry
from genrun.operator.figures import arm_totals, round_entry, with_arm_totals
from genrun.operator.policy import arm_id

COOL, HOT = Sampling(0.7, 0.9, 1.1, 0.0, 128), Sampling(0.9, 0.9, 1.3, 0.0, 128)


def plan(rnd: int, arms: list[Sampling], seed0: int) -> RoundPlan:
    shards = tuple(ShardPlan(rnd, seed0 + i, seed0 + i, 10, s, arm=arm_id(s)) for i, s in enumerate(arms))
    return RoundPlan(rnd, shards, COOL)


def report(rnd: int, per_shard: tuple[ShardYield, ...], kept_total: int) -> RoundReport:
    gen = sum(y.generated or 0 for y in per_shard)
    kept = sum(y.kept or 0 for y in per_shard)
    return RoundReport(rnd, len(per_shard), gen, kept, kept, gen, kept_total, kept_total, per_shard=per_shard)


def test_two_shards_sharing_a_new_row_count_it_once_in_the_arm_table() -> None:
    rounds = {1: plan(1, [COOL, HOT], 0), 2: plan(2, [COOL, COOL], 2)}
    reports = {
        # seed 1 (HOT) wrote a row seed 0 (COOL) had first: new against earlier rounds for both, kept once
        1: report(
            1,
            (ShardYield(0, 10, 100, 8, 6, generated=12, kept=6), ShardYield(1, 10, 90, 8, 5, generated=11, kept=4)),
            10,
        ),
        2: report(
            2,
            (ShardYield(2, 10, 80, 5, 3, generated=10, kept=3), ShardYield(3, 10, 70, 4, 2, generated=10, kept=2)),
            15,
        ),
    }
    totals = arm_totals(rounds, reports)
    assert totals is not None
    cool, hot = totals[arm_id(COOL)], totals[arm_id(HOT)]
    assert (cool.shards, cool.generated, cool.tokens, cool.kept) == (3, 32, 250, 11)
    assert (hot.shards, hot.generated, hot.tokens, hot.kept) == (1, 11, 90, 4)
    assert cool.kept + hot.kept == reports[2].qc_passed_total  # the bandit's measure would say 6 + 5 + 3 + 2 = 16
    entries = (ArmEntry(arm_id(COOL), kept=11 + 5), ArmEntry(arm_id(HOT), kept=5))
    assert [e.kept for e in with_arm_totals(entries, totals)] == [11, 4]


def test_a_report_without_per_shard_kept_counts_leaves_the_bandits_figures() -> None:
    rounds = {1: plan(1, [COOL, HOT], 0)}
    old = {1: report(1, (ShardYield(0, 10, 100, 8, 6), ShardYield(1, 10, 90, 8, 5)), 10)}
    assert arm_totals(rounds, old) is None
    entries = (ArmEntry(arm_id(COOL), kept=6, examples=10),)
    assert with_arm_totals(entries, None) == entries


def test_a_round_entry_lists_the_arms_run_and_its_own_figures_beside_the_totals() -> None:
    p = plan(1, [COOL, HOT, COOL, HOT], 0)
    before = round_entry(p, None)
    assert before.arms == (arm_id(COOL), arm_id(HOT)) and before.generated is None and before.new_qc_passed is None
    r = RoundReport(1, 4, 40, 30, 20, 140, 110, 90)  # this round: 40 / 30 / 20; all rounds: 140 / 110 / 90
    e = round_entry(p, r)
    assert (e.generated, e.new_unique, e.new_qc_passed, e.unique, e.qc_passed) == (40, 30, 20, 110, 90)
