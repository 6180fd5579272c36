"""The progress line's ETA (show.eta_seconds): the planner's projected tokens at the measured throughput, plus the
measured per-round overheads; unknown until the pilot has been merged and a shard has measured its throughput."""

from __future__ import annotations

import itertools

import pytest
from genrun.contract.records import RoundPlan, Sampling, ShardManifest, ShardPlan
from genrun.contract.status import RunStatus
from genrun.operator.show import eta_seconds

S = Sampling(0.7, 0.9, 1.1, 0.0, 128)


def round_plan(rnd: int, seeds: range, examples: int = 50) -> RoundPlan:
    return RoundPlan(rnd, tuple(ShardPlan(rnd, s, s, examples, S) for s in seeds), S)


def marker(rnd: int, seed: int, tokens: int, seconds: float, rows: int = 100) -> ShardManifest:
    return ShardManifest(rnd, seed, rows, rows, 0, 0, 0, tokens, seconds, "")


def status(rnd: int, tokens: int | None, rounds: int | None) -> RunStatus:
    return RunStatus(round=rnd, projected_tokens_to_target=tokens, projected_rounds=rounds)


def test_unknown_before_the_pilot_is_merged_or_any_shard_measured() -> None:
    pilot = round_plan(1, range(4))
    done = {(1, 0): marker(1, 0, 1000, 10)}
    assert eta_seconds(status(1, None, None), pilot, False, done, 2, []) is None  # no projection yet
    assert eta_seconds(status(1, 5000, 3), pilot, True, {}, 2, []) is None  # no throughput measured
    assert eta_seconds(status(1, 5000, 3), pilot, True, {(1, 0): marker(1, 0, 0, 0)}, 2, []) is None


def test_after_a_merge_projected_tokens_at_the_measured_rate_plus_each_rounds_overhead() -> None:
    pilot = round_plan(1, range(2))
    done = {(1, 0): marker(1, 0, 1000, 10), (1, 1): marker(1, 1, 1000, 10)}  # 100 tokens/s a shard
    # 10,000 tokens at 2 shards at once (200 tokens/s), and 2 more rounds at 5 s of overhead each
    assert eta_seconds(status(1, 10_000, 3), pilot, True, done, 2, [4.0, 6.0]) == pytest.approx(50 + 2 * 5)
    # one shard at a time: half the rate
    assert eta_seconds(status(1, 10_000, 3), pilot, True, done, 1, [4.0, 6.0]) == pytest.approx(100 + 2 * 5)
    # the target met: nothing left
    assert eta_seconds(status(1, 0, 1), pilot, True, done, 2, [5.0]) == 0


def test_mid_round_the_finished_shards_count_and_the_rest_of_the_round_is_a_floor() -> None:
    earlier = {(1, 0): marker(1, 0, 1000, 10)}  # 10 tokens a row, 100 tokens/s
    cur = round_plan(2, range(10, 14), examples=50)  # 4 shards of 50 rows: 2,000 tokens
    st = status(2, 3000, 2)  # projected from round 1's report: round 2 is what is left
    start = eta_seconds(st, cur, False, earlier, 1, [])
    assert start == pytest.approx(30)  # 3,000 tokens at 100/s (more than the round's 2,000)
    one = {**earlier, (2, 10): marker(2, 10, 1000, 10)}
    assert eta_seconds(st, cur, False, one, 1, []) == pytest.approx(20)  # 2,000 still to go
    three = {**one, (2, 11): marker(2, 11, 1000, 10), (2, 12): marker(2, 12, 1000, 10)}
    # the projection is used up, but one shard (500 tokens) is still running: the round's rest is the floor
    assert eta_seconds(st, cur, False, three, 1, []) == pytest.approx(5)
    # the round's merge still to come adds one round's overhead
    assert eta_seconds(st, cur, False, three, 1, [7.0]) == pytest.approx(12)


def test_the_eta_falls_as_a_round_progresses_whatever_few_rows_the_pilot_kept() -> None:
    """The old ETA extrapolated kept examples per second from the pilot's 2 kept, and rose through round 2. This one
    reads no kept count: as shards finish at a steady rate, it only falls."""
    cur = round_plan(2, range(10, 18), examples=100)
    done = {(1, 0): marker(1, 0, 2000, 20, rows=100)}
    st = status(2, 16_000, 3)
    etas = []
    for k in range(8):
        etas.append(eta_seconds(st, cur, False, done, 2, [30.0]))
        done[(2, 10 + k)] = marker(2, 10 + k, 2000, 20, rows=100)
    assert all(a is not None and b is not None and b < a for a, b in itertools.pairwise(etas))
