"""Drive the pure planner against a simulated world in which every Job finishes at once: what the offline yield
simulator (bench/yield_sim.py) and the policy's tests share. The world only answers one question, "what does the
merge of this round report?"; everything else is `decide()` and the recorded round plans, as in a real run."""

from __future__ import annotations

from collections.abc import Callable

from genrun.contract.api import GenerationRunSpec, RunRef
from genrun.contract.records import RoundPlan, RoundReport
from genrun.operator.planner import CreateMergeJob, CreateShardJob, Observed, ObservedJob, Plan, RecordRound, decide

# (the round's plan, the previous round's report) -> this round's report
MergeFn = Callable[[RoundPlan, RoundReport | None], RoundReport]


def run_instantly(
    ref: RunRef, spec: GenerationRunSpec, merge: MergeFn, max_steps: int = 500
) -> tuple[Observed, list[Plan]]:
    """Decide, record, 'run' every Job to success, merge with `merge`, until the plan is finished."""
    obs, plans = Observed(), []
    for _ in range(max_steps):
        plan = decide(ref, spec, obs)
        plans.append(plan)
        if plan.finished:
            return obs, plans
        rounds, jobs, reports = dict(obs.rounds), list(obs.jobs), dict(obs.reports)
        for a in plan.actions:
            if isinstance(a, RecordRound):
                rounds[a.plan.round] = a.plan
            elif isinstance(a, CreateShardJob):
                jobs.append(ObservedJob(a.name, "shard", a.shard.round, a.shard.seed, a.attempt, "Succeeded"))
            elif isinstance(a, CreateMergeJob):
                jobs.append(ObservedJob(a.name, "merge", a.round, None, a.attempt, "Succeeded"))
                reports[a.round] = merge(rounds[a.round], reports.get(a.round - 1))
        obs = Observed(rounds, tuple(jobs), frozenset(), reports)
    raise RuntimeError(f"the planner did not finish in {max_steps} steps")
