"""The status's round and arm tables from the recorded round plans and round reports (pure).

A round's entry holds that round's own figures (generated, new unique, new kept) beside the running total of kept
examples, and the arms its shards actually ran. An arm's totals are what the run's counts hold of its shards (the
instructions they sampled and their rows kept in the dataset), so the arms' figures add up to the run's; the bandit's
reward keeps its own measure (each shard judged against what existed before its round), see policy.arm_stats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from genrun.contract.records import RoundPlan, RoundReport
from genrun.contract.status import ArmEntry, RoundEntry
from genrun.operator.policy import MAX_ARMS, arm_id, shard_yields


def seed_range(seeds: tuple[int, ...]) -> str:
    if not seeds:
        return ""
    lo, hi = min(seeds), max(seeds)
    return f"{lo}-{hi}" if hi - lo + 1 == len(seeds) else f"{lo}-{hi} ({len(seeds)})"


def round_arms(plan: RoundPlan) -> tuple[str, ...]:
    """The arms the round's shards ran, each once, in shard order."""
    return tuple(dict.fromkeys(s.arm or arm_id(s.sampling) for s in plan.shards))[:MAX_ARMS]


def round_entry(plan: RoundPlan, report: RoundReport | None) -> RoundEntry:
    """One row of status.rounds: the plan, and once merged the round's own figures and the running totals."""
    r = report
    return RoundEntry(
        round=plan.round,
        shards=len(plan.shards),
        seeds=seed_range(plan.seeds),
        temperature=plan.sampling.temperature,
        top_p=plan.sampling.top_p,
        repetition_penalty=plan.sampling.repetition_penalty,
        arms=round_arms(plan),
        generated=r.generated if r else None,
        new_unique=r.new_unique if r else None,
        new_qc_passed=r.new_qc_passed if r else None,
        unique=r.unique_total if r else None,
        qc_passed=r.qc_passed_total if r else None,
        marginal_yield=round(r.marginal_yield, 4) if r else None,
        qc_pass_rate=round(r.qc_pass_rate, 4) if r else None,
    )


@dataclass
class ArmTotals:
    shards: int = 0
    generated: int = 0
    tokens: int = 0
    kept: int = 0


def arm_totals(rounds: Mapping[int, RoundPlan], reports: Mapping[int, RoundReport]) -> dict[str, ArmTotals] | None:
    """Per arm id, what the run's counts hold of its shards, from the reports' per-shard figures; None when a
    merged round's report predates them (an older run: the arm table then shows the bandit's own counts)."""
    if any(rep.shards and not rep.per_shard for rnd, rep in reports.items() if rnd in rounds):
        return None
    out: dict[str, ArmTotals] = {}
    for _, shard, y in shard_yields(rounds, reports):
        if y.generated is None or y.kept is None:
            return None
        t = out.setdefault(shard.arm or arm_id(shard.sampling), ArmTotals())
        t.shards += 1
        t.generated += y.generated
        t.tokens += y.tokens
        t.kept += y.kept
    return out


def with_arm_totals(entries: Sequence[ArmEntry], totals: Mapping[str, ArmTotals] | None) -> tuple[ArmEntry, ...]:
    """The arm entries with the totals that add up to the run's (unchanged where there are none)."""
    if totals is None:
        return tuple(entries)
    out = []
    for e in entries:
        t = totals.get(e.arm, ArmTotals())
        out.append(dataclasses.replace(e, shards=t.shards, examples=t.generated, tokens=t.tokens, kept=t.kept))
    return tuple(out)
