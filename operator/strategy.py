"""Sampling strategies: what the next round runs (how many shards, which sampling arm and attribute cell each, how
many examples each) from the spec and the evidence of the rounds so far.

A strategy is one small protocol (`Strategy`); the planner (`genrun.operator.planner.decide`) owns the run's
lifecycle (Jobs, merges, the target, the budget's hard bounds, suspension) and asks the spec's strategy for each new
round. Pure like the planner: no I/O, no clock; randomness only from the run's seeded stream (`policy.round_rng`).
Adding a strategy is one class here plus its entry in `STRATEGIES` (and the CRD's enum).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from genrun.contract.api import GenerationRunSpec
from genrun.contract.records import EngineSession, RoundPlan, RoundReport, Sampling
from genrun.operator import conditions as c
from genrun.operator import policy as pol
from genrun.operator.policy import base_sampling, round4


@dataclass(frozen=True)
class Evidence:
    """What a strategy decides from: the recorded round plans, the merged rounds' reports, the engine starts."""

    rounds: Mapping[int, RoundPlan]
    reports: Mapping[int, RoundReport]
    engines: tuple[EngineSession, ...] = ()


@dataclass(frozen=True)
class Room:
    """What the budget leaves for the next round: `shards` by maxShards alone, `fit` by maxShards and the
    generated examples the measured per-shard rate allows (at least 1: the planner stops the run before)."""

    shards: int
    fit: int


@dataclass(frozen=True)
class NextRound:
    """A round to start: `count` shards, each running arms[i] (default: `sampling` for all) and cells[i] (default: none,
    each prompt draws its attribute values), writing sizes[i] rows, or else `examples` each (0:
    spec.shards.examplesPerShard); `why` becomes the round plan's reason, `announce` (a condition reason and a message)
    an Event of its own."""

    count: int
    sampling: Sampling
    why: str
    arms: tuple[Sampling, ...] = ()
    examples: int = 0
    cells: tuple[pol.Cell, ...] = ()
    announce: tuple[str, str] | None = None
    sizes: tuple[int, ...] = ()  # examples of each shard, when they differ (the pilot); else `examples` for all


@dataclass(frozen=True)
class Exhausted:
    """No round fits what the budget leaves (a condition message)."""

    message: str


class Strategy(Protocol):
    def first_round(self, spec: GenerationRunSpec) -> NextRound:
        """Round 1, before anything is measured."""
        ...

    def next_round(self, spec: GenerationRunSpec, ev: Evidence, room: Room) -> NextRound | Exhausted:
        """The round after the latest one, whose report is in `ev` and whose kept total is short of the target."""
        ...


# ----------------------------------------------------------------------------------------------------------
# The ladder: one sampling setting a round, escalated while duplicates dominate, stepped back when QC falls


def next_sampling(
    spec: GenerationRunSpec,
    last: Sampling,
    report: RoundReport,
    history: tuple[tuple[Sampling, RoundReport], ...] = (),
) -> tuple[Sampling, str, str]:
    """Escalate while duplicates dominate and quality holds; step back when QC falls below its floor; never
    escalate again to a level where QC already fell below it (history: (sampling, report) of earlier rounds)."""
    e, base = spec.escalation, base_sampling(spec)
    if report.new_unique and report.qc_pass_rate < e.min_qc_pass_rate:
        t = max(base.temperature, round4(last.temperature - e.temperature_step))
        p = max(base.repetition_penalty, round4(last.repetition_penalty - e.repetition_penalty_step))
        why = (
            f"QC-pass rate {report.qc_pass_rate:.2f} is below the floor {e.min_qc_pass_rate:g}: "
            f"temperature {last.temperature:g}->{t:g}, repetition penalty {last.repetition_penalty:g}->{p:g}"
        )
        return Sampling(t, last.top_p, p, last.min_p, last.max_tokens), c.STEPPED_BACK, why
    if report.unique_ratio < e.escalate_below_unique_ratio:
        return _escalate(spec, last, report, history)
    return last, c.HELD, f"unique ratio {report.unique_ratio:.2f} is high enough: sampling held"


def _escalate(
    spec: GenerationRunSpec, last: Sampling, report: RoundReport, history: tuple[tuple[Sampling, RoundReport], ...]
) -> tuple[Sampling, str, str]:
    e = spec.escalation
    t = min(e.max_temperature, round4(last.temperature + e.temperature_step))
    p = min(e.max_repetition_penalty, round4(last.repetition_penalty + e.repetition_penalty_step))
    failed = [s for s, r in (*history, (last, report)) if r.new_unique and r.qc_pass_rate < e.min_qc_pass_rate]
    if any(t >= s.temperature and p >= s.repetition_penalty for s in failed):
        why = (
            f"unique ratio {report.unique_ratio:.2f} is low, but QC fell below its floor at "
            f"temperature {min(s.temperature for s in failed):g}: sampling held below that level"
        )
        return last, c.HELD, why
    if (t, p) != (last.temperature, last.repetition_penalty):
        why = (
            f"unique ratio {report.unique_ratio:.2f} is below {e.escalate_below_unique_ratio:g} and QC-pass "
            f"rate {report.qc_pass_rate:.2f} holds: temperature {last.temperature:g}->{t:g}, "
            f"repetition penalty {last.repetition_penalty:g}->{p:g}"
        )
        return Sampling(t, last.top_p, p, last.min_p, last.max_tokens), c.ESCALATED, why
    return last, c.HELD, "sampling is at its ceilings"


def expected_yield(sampling: Sampling, report: RoundReport, history: tuple[tuple[Sampling, RoundReport], ...]) -> float:
    """The marginal yield to plan with: measured at the sampling the next round uses, if a round used it (the
    latest such round), else the last round's."""
    same = [r for s, r in history if s == sampling]
    return same[-1].marginal_yield if same else report.marginal_yield


def shards_needed(spec: GenerationRunSpec, report: RoundReport, y: float | None = None) -> tuple[int, str]:
    """Shards for the next round from the measured marginal yield, with the policy's floor and cap."""
    e = spec.escalation
    need = spec.target.unique_examples - report.qc_passed_total
    per_shard = report.generated / report.shards if report.shards else 0.0
    y = report.marginal_yield if y is None else y
    if y <= 0 or per_shard <= 0:
        return e.max_shards_per_round, "the last round added nothing: using the per-round cap"
    est = math.ceil(need * e.headroom / (y * per_shard))
    n = min(e.max_shards_per_round, max(e.min_shards_per_round, est))
    why = (
        f"{need} more needed; marginal yield {y:.3f} per generated example x {per_shard:.0f} per shard "
        f"x headroom {e.headroom:g} -> {est} shard(s)"
    )
    if n != est:
        why += f", bounded to {n} by minShardsPerRound/maxShardsPerRound"
    return n, why


class Ladder:
    """spec.policy.strategy: ladder. Every shard of a round runs one sampling setting (`next_sampling`); the round
    has as many shards as the last measured marginal yield needs to reach the target (`shards_needed`)."""

    def first_round(self, spec: GenerationRunSpec) -> NextRound:
        return NextRound(spec.shards.initial, base_sampling(spec), "first round from spec.shards.initial")

    def next_round(self, spec: GenerationRunSpec, ev: Evidence, room: Room) -> NextRound:
        rnd = max(ev.rounds)
        report, last = ev.reports[rnd], ev.rounds[rnd].sampling
        history = tuple(
            (ev.rounds[r].sampling, ev.reports[r]) for r in sorted(ev.reports) if r in ev.rounds and r < rnd
        )
        sampling, policy, policy_why = next_sampling(spec, last, report, history)
        count, why = shards_needed(spec, report, expected_yield(sampling, report, (*history, (last, report))))
        if count > room.fit:
            count, why = room.fit, why + f"; {room.fit} left in the budget"
        announce = None if policy == c.HELD else (policy, policy_why)
        return NextRound(count, sampling, f"{why}; {policy_why}", announce=announce)


# ----------------------------------------------------------------------------------------------------------
# The bandit: arms drawn per shard by Thompson sampling, each round sized to the target (genrun.operator.policy)


class Bandit:
    """spec.policy.strategy: bandit. A pilot spreads round 1 over the arms; later rounds draw each shard's arm (and
    attribute cell) from the posterior of its reward and are sized so that the target is met with little
    overshoot."""

    def first_round(self, spec: GenerationRunSpec) -> NextRound:
        if spec.policy.pilot_share <= 0:
            return LADDER.first_round(spec)
        picked, sizes, why = pol.pilot(spec)
        cells = pol.pilot_cells(spec, len(picked), pol.round_rng(spec, 1))
        return NextRound(len(picked), picked[0], why, tuple(picked), cells=tuple(cells), sizes=tuple(sizes))

    def next_round(self, spec: GenerationRunSpec, ev: Evidence, room: Room) -> NextRound | Exhausted:
        b, rnd = spec.budget, max(ev.rounds)
        report = ev.reports[rnd]
        planned = sum(s.examples for s in ev.rounds[rnd].shards)
        per_example = report.generated / planned if planned else 1.0
        room_examples = math.floor((b.max_generated_examples - report.generated_total) / max(per_example, 1e-9))
        if room_examples < 1:
            kept, target = report.qc_passed_total, spec.target.unique_examples
            return Exhausted(
                f"{kept}/{target} unique QC-passed examples; no example fits maxGeneratedExamples="
                f"{b.max_generated_examples} ({report.generated_total} generated)"
            )
        need = spec.target.unique_examples - report.qc_passed_total
        return self.sized_round(spec, ev, rnd + 1, need, room_examples, room.shards)

    def sized_round(
        self, spec: GenerationRunSpec, ev: Evidence, rnd: int, need: int, room_examples: int, room_shards: int
    ) -> NextRound:
        """Round `rnd`: arms drawn for a round sized to `need` more kept examples, within `room_examples` examples
        and `room_shards` shards."""
        stats = pol.arm_stats(spec, ev.rounds, ev.reports)
        rng = pol.round_rng(spec, rnd)
        cap = max(1, min(spec.escalation.max_shards_per_round, room_shards))
        last = rnd >= spec.budget.max_rounds
        # The mix a full round would get estimates the yield to size with; the round itself is then drawn at its size.
        y, sd = pol.mix_yield(stats, pol.allocate(stats, cap, spec.policy.exploration, rng))
        measured = max(ev.reports[max(ev.reports)].generated_total, 1)
        rounds_left = spec.budget.max_rounds - rnd + 1
        floor = pol.min_shard_examples(spec, stats, ev.engines)
        size = pol.size_round(spec, need, y, sd, room_examples, room_shards, last, measured, rounds_left, floor)
        picks = pol.allocate(stats, size.shards, spec.policy.exploration, rng)
        per, why = size.examples, size.why
        resize = size.precise and size.shards < cap  # sized to the target: size again for the arms actually drawn

        def per_shard(y: float, sd: float) -> tuple[int, str]:
            n, _, why = pol.examples_for(spec, need, y, sd, last, rounds_left, floor)
            return min(
                pol.shard_examples(spec, math.ceil(n / len(picks)), floor), max(1, room_examples // len(picks))
            ), why

        if resize:
            per, why = per_shard(*pol.mix_yield(stats, picks))
            why += f" -> {len(picks)} shard(s) x {per}"
        retired = [a.id for a in stats if a.retired]
        why += f"; retired (QC-pass rate below the floor): {', '.join(retired)}" if retired else ""
        cells: list[pol.Cell] = []
        if spec.prompt.attributes:
            cstats = pol.cell_stats(spec, ev.rounds, ev.reports)
            cells, quota_why = pol.allocate_cells(spec, cstats, len(picks), per, rng)
            why += f"; {quota_why}" if quota_why else ""
            k = pol.cell_factor(cstats, cells)
            if resize and abs(k - 1) > 0.01:  # the cells drawn change the yield: resize
                y, sd = pol.mix_yield(stats, picks)
                per, _ = per_shard(min(1.0, y * k), sd * k)
                why += f"; the cells drawn scale the yield by {k:.2f} -> {len(picks)} shard(s) x {per}"
        if len(picks) * per > room_examples:  # whatever sized it (growth, rounding, the shard floor): never past
            n = max(1, min(len(picks), room_examples))
            picks, cells, per = picks[:n], cells[:n], max(1, min(per, room_examples // n))
            why += f"; cut to the budget's {room_examples} example(s) -> {n} shard(s) x {per}"
        arms = tuple(a.sampling for a in picks)
        return NextRound(len(arms), arms[0], why, arms, per, tuple(cells))


LADDER, BANDIT = Ladder(), Bandit()
STRATEGIES: dict[str, Strategy] = {"ladder": LADDER, "bandit": BANDIT}  # spec.policy.strategy -> its strategy


def for_spec(spec: GenerationRunSpec) -> Strategy:
    return STRATEGIES[spec.policy.strategy]
