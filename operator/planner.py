"""The planner: a pure function from (spec, observed state) to a plan of actions and a status.

No I/O, no clock, no randomness: the Kopf handlers and the local runner observe the world, call `decide`, and apply
the actions. Everything is derived from what exists (recorded round plans, Jobs, shard markers, round reports), so
calling it again after a restart plans nothing that is already done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from genrun.contract.api import GenerationRunSpec, RunRef
from genrun.contract.records import (
    EngineSession,
    JobSpec,
    RoundPlan,
    RoundReport,
    Sampling,
    ShardPlan,
    shard_manifest_key,
)
from genrun.contract.status import Output, RunStatus, TopDuplicate, Totals
from genrun.operator import conditions as c
from genrun.operator import cost, strategy
from genrun.operator import figures as fig
from genrun.operator import policy as pol

JobPhase = Literal["Pending", "Running", "Succeeded", "Failed"]
ACTIVE_PHASES = ("Pending", "Running")
MAX_NAME = 63  # Job names become label values


# ----------------------------------------------------------------------------------------------------------
# Observed state


@dataclass(frozen=True)
class ObservedJob:
    name: str
    kind: Literal["shard", "merge"]
    round: int
    seed: int | None  # None for a merge Job
    attempt: int
    phase: JobPhase
    retriable: bool = True  # False when the Job failed with a non-retriable exit code (bad input)
    message: str = ""


@dataclass(frozen=True)
class Observed:
    rounds: Mapping[int, RoundPlan] = field(default_factory=dict)
    jobs: tuple[ObservedJob, ...] = ()
    shards_done: frozenset[tuple[int, int]] = frozenset()  # (round, seed) with a completion marker on storage
    reports: Mapping[int, RoundReport] = field(default_factory=dict)
    quarantined: frozenset[str] = frozenset()  # storage keys set aside as damaged (markers, shard data)
    engines: tuple[EngineSession, ...] = ()  # every engine start of the run so far (its device time)


# ----------------------------------------------------------------------------------------------------------
# Actions and the plan


@dataclass(frozen=True)
class RecordRound:
    """Persist a round's plan before its Jobs: later decisions read it back instead of recomputing it."""

    plan: RoundPlan


@dataclass(frozen=True)
class CreateShardJob:
    name: str
    attempt: int
    shard: ShardPlan


@dataclass(frozen=True)
class CreateMergeJob:
    name: str
    attempt: int
    round: int
    shards: tuple[tuple[int, int], ...]  # every (round, seed) planned in rounds 1..round; the merge skips failed ones


Action = RecordRound | CreateShardJob | CreateMergeJob


def job_spec(action: CreateShardJob | CreateMergeJob, ref: RunRef, spec: Mapping[str, Any]) -> JobSpec:
    """What a shard or merge Job is handed, the same for a local process and a Kubernetes Job."""
    if isinstance(action, CreateShardJob):
        return JobSpec("shard", ref.name, ref.namespace, dict(spec), action.shard.round, shard=action.shard)
    return JobSpec("merge", ref.name, ref.namespace, dict(spec), action.round, shards=action.shards)


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    conditions: tuple[c.Condition, ...]
    # Everything in .status but the conditions (the loop adds them with their times). None for an invalid spec or a
    # refused child: nothing was observed, so the figures last published stand.
    status: RunStatus | None
    events: tuple[Event, ...] = ()

    @property
    def finished(self) -> bool:
        return any(x.type in (c.SUCCEEDED, c.FAILED) and x.status == "True" for x in self.conditions)

    def condition(self, type_: str) -> c.Condition:
        return next(x for x in self.conditions if x.type == type_)


# ----------------------------------------------------------------------------------------------------------
# Names


def child_name(run: str, *parts: str) -> str:
    """Deterministic, DNS-1123 child name; hashed if too long so that distinct children never collide."""
    name = "-".join((run, *parts))
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    suffix = "-".join(parts)
    return f"{run[: MAX_NAME - len(suffix) - 10]}-{digest}-{suffix}"


def shard_job_name(run: str, rnd: int, seed: int, attempt: int) -> str:
    parts = [f"r{rnd}", f"s{seed}"] + ([f"a{attempt}"] if attempt else [])
    return child_name(run, *parts)


def merge_job_name(run: str, rnd: int, attempt: int) -> str:
    parts = [f"r{rnd}", "merge"] + ([f"a{attempt}"] if attempt else [])
    return child_name(run, *parts)


# ----------------------------------------------------------------------------------------------------------
# Rounds: a strategy's choice (genrun.operator.strategy) as a round plan with fresh seeds


def shard_domains(spec: GenerationRunSpec, position: int, count: int, offset: int) -> tuple[str, ...]:
    """The domains of the shard at `position` among the `count` shards of a round: the domain list rotated by
    `offset` and dealt round-robin to the shards, so that each domain is written in one shard of the round only and a
    model that repeats itself within a domain repeats inside that shard, where the online in-shard skip drops the
    repeat before its response is paid. With more shards than domains each shard gets one domain, shards sharing.

    The offset (the round's index) turns from round to round, so a position (and the arm and cell the policy gives
    it) meets other domains, and the domains that land in the larger subsets of an uneven deal (fewer rows each)
    change. A shard keeps the dealt (rotated) order, so a round of one shard still starts on another topic each round.
    `escalation.rotateDomains: false`: every shard the whole list in spec order (the problem's process). Only new
    rounds are dealt: a recorded round plan keeps the domains it was recorded with."""
    d = spec.prompt.domains
    if not d or not spec.escalation.rotate_domains:
        return tuple(d)
    k = offset % len(d)
    rotated = d[k:] + d[:k]
    if count > len(rotated):
        return (rotated[position % len(rotated)],)
    return tuple(rotated[position::count])


def make_round(
    spec: GenerationRunSpec,
    rnd: int,
    count: int,
    sampling: Sampling,
    rounds: Mapping[int, RoundPlan],
    reason: str,
    *,
    arms: Sequence[Sampling] = (),
    examples: int = 0,
    cells: Sequence[pol.Cell] = (),
    sizes: Sequence[int] = (),
) -> RoundPlan:
    """A round of `count` shards with fresh seeds; each shard runs arms[i] (default: `sampling` for all) and
    cells[i] (default: none, each prompt draws its attribute values), writes sizes[i] rows (default: `examples`, or
    spec.shards.examplesPerShard) and gets its share of the domains (`shard_domains`, turned by the round's index).
    The round's `sampling` is its most used arm."""
    used = [s for p in rounds.values() for s in p.shards]
    seed0 = max((s.seed for s in used), default=spec.shards.first_seed - 1) + 1
    ordinal0 = len(used)
    per_shard = list(arms) or [sampling] * count
    shards = tuple(
        ShardPlan(
            round=rnd,
            seed=seed0 + i,
            ordinal=ordinal0 + i,
            examples=sizes[i] if sizes else (examples or spec.shards.examples_per_shard),
            sampling=per_shard[i],
            domains=shard_domains(spec, i, count, rnd - 1),
            arm=pol.arm_id(per_shard[i]),
            cell=tuple(cells[i]) if cells else (),
        )
        for i in range(count)
    )
    if arms:
        sampling = max(per_shard, key=per_shard.count)
    return RoundPlan(round=rnd, shards=shards, sampling=sampling, reason=reason)


# ----------------------------------------------------------------------------------------------------------
# Decide


@dataclass
class _ShardState:
    shard: ShardPlan
    phase: Literal["done", "active", "create", "failed"]
    attempt: int = 0  # the attempt to create, or the last one seen
    message: str = ""


def _attempts(jobs: tuple[ObservedJob, ...], kind: str, rnd: int, seed: int | None) -> list[ObservedJob]:
    return sorted((j for j in jobs if j.kind == kind and j.round == rnd and j.seed == seed), key=lambda j: j.attempt)


def _job_state(attempts: list[ObservedJob], retries: int) -> tuple[str, int, str]:
    """(done|active|create|failed, attempt, message) of one shard or merge from its Jobs."""
    if any(j.phase == "Succeeded" for j in attempts):
        return "done", attempts[-1].attempt, ""
    if not attempts:
        return "create", 0, ""
    last = attempts[-1]
    if last.phase in ACTIVE_PHASES:
        return "active", last.attempt, ""
    if last.retriable and last.attempt < retries:
        return "create", last.attempt + 1, last.message
    why = last.message or "failed"
    if not last.retriable:
        why += " (not retriable)"
    return "failed", last.attempt, f"{last.name}: {why}"


def _shard_states(spec: GenerationRunSpec, plan: RoundPlan, obs: Observed) -> list[_ShardState]:
    out = []
    for s in plan.shards:
        if (s.round, s.seed) in obs.shards_done:
            out.append(_ShardState(s, "done"))
            continue
        phase, attempt, msg = _job_state(_attempts(obs.jobs, "shard", s.round, s.seed), spec.budget.max_shard_retries)
        out.append(_ShardState(s, phase, attempt, msg))  # type: ignore[arg-type]
    return out


def budget_used(spec: GenerationRunSpec, status: RunStatus) -> float:
    """The largest used share of the budget (rounds, shards, generated examples), for alerts."""
    b = spec.budget
    t = status.totals
    # All rounds and shards planned (status.rounds lists the last 100 only).
    used = (t.rounds_planned / b.max_rounds, t.shards_planned / b.max_shards, t.generated / b.max_generated_examples)
    return float(round(max(used), 4))


def _status(ref: RunRef, spec: GenerationRunSpec, obs: Observed, states: Mapping[int, list[_ShardState]]) -> RunStatus:
    latest = max(obs.reports) if obs.reports else 0
    rep = obs.reports.get(latest)
    all_states = [s for ss in states.values() for s in ss]
    tiers = rep.dedup_tiers if rep else ("exact", "near", *(("semantic",) if spec.dedup.semantic.enabled else ()))
    totals = Totals(
        generated=rep.generated_total if rep else 0,
        unique=rep.unique_total if rep else 0,
        qc_passed=rep.qc_passed_total if rep else 0,
        duplication_ratio=round(rep.duplication_ratio, 4) if rep else 0.0,
        duplication_percent=f"{rep.duplication_ratio:.1%}" if rep else "0.0%",
        tokens=rep.tokens_total if rep else 0,
        qc_rejected_before_response=rep.qc_rejected_before_response if rep else 0,
        shards_succeeded=sum(s.phase == "done" for s in all_states),
        shards_failed=sum(s.phase == "failed" for s in all_states),
        shards_running=sum(s.phase == "active" for s in all_states),
        shards_quarantined=len(obs.quarantined.union(*(r.quarantined for r in obs.reports.values()))),
        rounds_planned=len(obs.rounds),
        shards_planned=sum(len(p.shards) for p in obs.rounds.values()),
        # Rows dropped per dedup tier, and the tiers "unique" (and the target) count through.
        duplicates=dict(rep.duplicates) if rep else {},
        discarded=rep.discarded_total if rep else 0,
        dedup_tiers=tuple(tiers),
        **_engine_totals(obs.engines),
    )
    rounds = [fig.round_entry(obs.rounds[r], obs.reports.get(r)) for r in sorted(obs.rounds)[-100:]]  # maxItems
    status = RunStatus(
        observed_generation=ref.generation,
        round=max(obs.rounds) if obs.rounds else 0,
        totals=totals,
        rounds=tuple(rounds),
        top_duplicates=tuple(TopDuplicate(t[:256], n) for t, n in (rep.top_duplicates[:10] if rep else ())),
    )
    if rep is None:
        return status
    stats = pol.arm_stats(spec, obs.rounds, obs.reports)
    tokens, rounds_total = pol.projections(spec, stats, spec.target.unique_examples - rep.qc_passed_total, latest)
    projected = tokens is not None and rounds_total is not None
    return dataclasses.replace(
        status,
        output=Output(rep.dataset, rep.report),
        projected_tokens_to_target=tokens if projected else None,
        projected_rounds=rounds_total if projected else None,
        arms=fig.with_arm_totals(
            pol.arm_status([a for a in stats if a.shards]), fig.arm_totals(obs.rounds, obs.reports)
        ),
        cells=pol.cell_status(pol.cell_stats(spec, obs.rounds, obs.reports)) if spec.prompt.attributes else None,
    )


def _engine_totals(sessions: tuple[EngineSession, ...]) -> dict[str, Any]:
    u = cost.usage(sessions)
    return {
        "engine_starts": u.starts,
        "engine_seconds": round(u.device_seconds, 1),
        "startup_seconds": round(u.startup_device_seconds, 1),
        "startup_share": round(u.startup_share, 4),
        "gpu_hours": round(u.device_seconds / 3600, 4),
    }


def _conds(
    *,
    succeeded: tuple[str, str, str],
    failed: tuple[str, str, str],
    progressing: tuple[str, str, str],
    suspended: tuple[str, str, str],
) -> tuple[c.Condition, ...]:
    done, stalled, busy = succeeded[0] == "True", failed[0] == "True", progressing[0] == "True"
    if done:
        ready = ("True", *succeeded[1:])
    elif stalled:
        ready = ("False", *failed[1:])
    else:
        ready = ("False", c.NOT_DONE, progressing[2] or suspended[2])
    return (
        c.Condition(c.SUCCEEDED, *succeeded),
        c.Condition(c.FAILED, *failed),
        c.Condition(c.PROGRESSING, *progressing),
        c.Condition(c.SUSPENDED, *suspended),
        c.Condition(c.READY, *ready),
        c.Condition(c.RECONCILING, *(progressing if busy else ("False", progressing[1], ""))),
        c.Condition(c.STALLED, *(failed if stalled else ("False", c.NO_FAILURE, ""))),
    )


def _running(reason: str, msg: str, suspended: bool) -> tuple[c.Condition, ...]:
    if suspended:
        return _conds(
            succeeded=("False", c.TARGET_NOT_MET, "the run is suspended"),
            failed=("False", c.NO_FAILURE, ""),
            progressing=("False", c.SUSPENDED_BY_SPEC, f"suspended; {msg}"),
            suspended=("True", c.SUSPENDED_BY_SPEC, "spec.suspend is true: no new Jobs are started"),
        )
    return _conds(
        succeeded=("False", c.TARGET_NOT_MET, msg),
        failed=("False", c.NO_FAILURE, ""),
        progressing=("True", reason, msg),
        suspended=("False", c.NOT_SUSPENDED, ""),
    )


def _failed(reason: str, msg: str) -> tuple[c.Condition, ...]:
    return _conds(
        succeeded=("False", reason, msg),
        failed=("True", reason, msg),
        progressing=("False", c.RUN_FINISHED, msg),
        suspended=("False", c.NOT_SUSPENDED, ""),
    )


def _succeeded(msg: str) -> tuple[c.Condition, ...]:
    return _conds(
        succeeded=("True", c.TARGET_MET, msg),
        failed=("False", c.NO_FAILURE, ""),
        progressing=("False", c.RUN_FINISHED, msg),
        suspended=("False", c.NOT_SUSPENDED, ""),
    )


def invalid_plan(errors: list[str], reason: str = c.INVALID_SPEC) -> Plan:
    msg = "; ".join(errors)
    return Plan(actions=(), conditions=_failed(reason, msg), status=None)


@dataclass
class _Decision:
    """One call of `decide`: its inputs, the shard states derived from them, and the plans it can end in."""

    ref: RunRef
    spec: GenerationRunSpec
    obs: Observed
    states: dict[int, list[_ShardState]]

    def status(self) -> RunStatus:
        return _status(self.ref, self.spec, self.obs, self.states)

    def finish(self, conds: tuple[c.Condition, ...]) -> Plan:
        # No events: a finished or waiting run is decided again and again; its Events come from condition
        # transitions (conditions.transitions), so each is posted once.
        return Plan((), conds, self.status())

    def start(self, rnd: int, nxt: strategy.NextRound, events: list[Event]) -> Plan:
        """Record round `rnd` as the strategy chose it and create its first shard Jobs."""
        spec, obs = self.spec, self.obs
        plan = make_round(
            spec,
            rnd,
            nxt.count,
            nxt.sampling,
            obs.rounds,
            nxt.why,
            arms=nxt.arms,
            examples=nxt.examples,
            cells=nxt.cells,
            sizes=nxt.sizes,
        )
        self.states[rnd] = [_ShardState(s, "create") for s in plan.shards]
        actions: list[Action] = [RecordRound(plan), *_shard_creates(spec, self.ref, self.states[rnd], active=0)]
        msg = f"round {rnd}: {nxt.count} shard(s), seeds {fig.seed_range(plan.seeds)}, {_arms_summary(plan)}; {nxt.why}"
        events.append(Event("Normal", c.ROUND_STARTED, msg))
        status = _status(self.ref, spec, _with_round(obs, plan), self.states)
        return Plan(tuple(actions), _running(c.ROUND_STARTED, msg, False), status, tuple(events))


def decide(ref: RunRef, spec: GenerationRunSpec, obs: Observed) -> Plan:
    """The run's lifecycle: start round 1, run each round's shard Jobs and then its merge Job, and once its report is
    read, stop (target met, budget spent, too many failures) or start the round the spec's sampling strategy chooses
    (genrun.operator.strategy)."""
    d = _Decision(ref, spec, obs, {rnd: _shard_states(spec, p, obs) for rnd, p in obs.rounds.items()})
    if not obs.rounds:
        if spec.suspend:
            return d.finish(_running(c.SUSPENDED_BY_SPEC, "no round started yet", True))
        return d.start(1, strategy.for_spec(spec).first_round(spec), [])
    rnd = max(obs.rounds)
    failed = _too_many_failed(d)
    if failed is not None:
        return failed
    report = obs.reports.get(rnd)
    if report is None:
        return _run_round(d, rnd)
    return _after_round(d, rnd, report)


def _too_many_failed(d: _Decision) -> Plan | None:
    b = d.spec.budget
    failed = [s for ss in d.states.values() for s in ss if s.phase == "failed"]
    if len(failed) <= b.max_failed_shards:
        return None
    msg = (
        f"{len(failed)} shard(s) failed, more than spec.budget.maxFailedShards={b.max_failed_shards}; first: "
        f"{failed[0].message} ({_retries(failed[0].attempt, b.max_shard_retries)})"
    )
    return d.finish(_failed(c.SHARDS_FAILED, msg))


def _run_round(d: _Decision, rnd: int) -> Plan:
    """Round `rnd` has no report yet: its shard Jobs run, then its merge Job."""
    spec, obs, cur, suspended = d.spec, d.obs, d.states[rnd], d.spec.suspend
    retries = spec.budget.max_shard_retries
    if any(s.phase in ("active", "create") for s in cur):
        active = sum(s.phase == "active" for s in cur)
        done = sum(s.phase == "done" for s in cur)
        msg = f"round {rnd}: {done}/{len(cur)} shard(s) done, {active} running"
        actions = () if suspended else tuple(_shard_creates(spec, d.ref, cur, active))
        return Plan(actions, _running(c.SHARDS_RUNNING, msg, suspended), d.status())
    if not any(s.phase == "done" for s in cur):
        return d.finish(_failed(c.SHARDS_FAILED, f"round {rnd}: every shard failed"))
    phase, attempt, why = _job_state(_attempts(obs.jobs, "merge", rnd, None), retries)
    if phase == "failed":
        msg = f"round {rnd}: the merge/dedup/QC Job failed ({_retries(attempt, retries)}): {why}"
        return d.finish(_failed(c.MERGE_FAILED, msg))
    msg = f"round {rnd}: merging, deduplicating and checking {sum(s.phase == 'done' for s in cur)} shard(s)"
    if phase == "done":
        msg += " (the merge Job succeeded; waiting for its report to be readable)"
    merges: tuple[Action, ...] = ()
    if phase == "create" and not suspended:
        merges = (CreateMergeJob(merge_job_name(d.ref.name, rnd, attempt), attempt, rnd, _shards_to(obs, rnd)),)
    return Plan(merges, _running(c.MERGING, msg, suspended), d.status())


def _shards_to(obs: Observed, rnd: int) -> tuple[tuple[int, int], ...]:
    """Every (round, seed) planned in rounds 1..rnd: what a merge of round `rnd` reads."""
    return tuple((s.round, s.seed) for r in sorted(obs.rounds) if r <= rnd for s in obs.rounds[r].shards)


def _after_round(d: _Decision, rnd: int, report: RoundReport) -> Plan:
    """Round `rnd` is merged: stop, or start the next round."""
    spec, obs = d.spec, d.obs
    kept, target = report.qc_passed_total, spec.target.unique_examples
    if kept >= target:
        msg = (
            f"{kept} unique QC-passed examples >= target {target} after {rnd} round(s); "
            f"{report.generated_total} generated, duplication ratio {report.duplication_ratio:.3f}"
        )
        return d.finish(_succeeded(msg))
    exhausted, room = _budget_left(spec, obs, rnd, report)
    if exhausted:
        return d.finish(_failed(c.BUDGET_EXHAUSTED, f"{kept}/{target} unique QC-passed examples; {exhausted}"))
    if spec.suspend:
        return d.finish(_running(c.SUSPENDED_BY_SPEC, f"{kept}/{target} after round {rnd}", True))
    finished = (
        f"round {rnd}: {report.generated} generated, {report.new_unique} new unique, {report.new_qc_passed} new kept "
        f"(marginal yield {report.marginal_yield:.3f}); {kept}/{target} kept in all"
    )
    events = [Event("Normal", c.ROUND_FINISHED, finished)]
    nxt = strategy.for_spec(spec).next_round(spec, strategy.Evidence(obs.rounds, obs.reports, obs.engines), room)
    if isinstance(nxt, strategy.Exhausted):
        return d.finish(_failed(c.BUDGET_EXHAUSTED, nxt.message))
    if nxt.announce is not None:
        events.append(Event("Normal", nxt.announce[0], f"round {rnd + 1}: {nxt.announce[1]}"))
    return d.start(rnd + 1, nxt, events)


def _budget_left(spec: GenerationRunSpec, obs: Observed, rnd: int, report: RoundReport) -> tuple[str, strategy.Room]:
    """Why no round fits the budget ("" when one does), and the room it leaves. Rounds and shards are hard bounds;
    generated examples are estimated from the measured per-shard rate."""
    b = spec.budget
    used_shards = sum(len(p.shards) for p in obs.rounds.values())
    per_shard = report.generated / report.shards if report.shards else float(spec.shards.examples_per_shard)
    left_by_generated = (
        math.floor((b.max_generated_examples - report.generated_total) / per_shard) if per_shard > 0 else 0
    )
    room = strategy.Room(b.max_shards - used_shards, min(b.max_shards - used_shards, left_by_generated))
    if rnd >= b.max_rounds:
        return f"spec.budget.maxRounds={b.max_rounds} reached", room
    if room.fit < 1:
        return (
            f"no shard fits the budget (maxShards={b.max_shards}, {used_shards} used; "
            f"maxGeneratedExamples={b.max_generated_examples}, {report.generated_total} generated)"
        ), room
    return "", room


def _arms_summary(plan: RoundPlan) -> str:
    counts: dict[str, int] = {}
    for s in plan.shards:
        counts[s.sampling.describe()] = counts.get(s.sampling.describe(), 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{n}x {d}" for d, n in counts.items())


def _retries(attempt: int, bound: int) -> str:
    """The retries really made (attempt N is retry N), against the bound."""
    return f"after {attempt} {'retry' if attempt == 1 else 'retries'}, spec.budget.maxShardRetries={bound}"


def _with_round(obs: Observed, plan: RoundPlan) -> Observed:
    return dataclasses.replace(obs, rounds={**obs.rounds, plan.round: plan})


def _shard_creates(spec: GenerationRunSpec, ref: RunRef, states: list[_ShardState], active: int) -> list[Action]:
    limit = spec.worker.parallelism or len(states)
    out: list[Action] = []
    for s in states:
        if s.phase != "create":
            continue
        if active + len(out) >= limit:
            break
        out.append(CreateShardJob(shard_job_name(ref.name, s.shard.round, s.shard.seed, s.attempt), s.attempt, s.shard))
    return out


# ----------------------------------------------------------------------------------------------------------
# Rebuilding what was found damaged (the loop sets damaged files aside; these decide what replaces them)


def replan(ref: RunRef, spec: GenerationRunSpec, obs: Observed, rnd: int) -> RoundPlan | None:
    """Round `rnd`'s plan decided again from what it was decided from: the plans and reports of the rounds before it
    (nothing else of `obs` reaches a new round's decision; the random stream is seeded by the run and the round). So a
    plan set aside as damaged comes back as it was recorded (tested). None while those inputs are not all there (an
    earlier plan or the previous round's report is itself being rebuilt), or when the spec as it is now plans no such
    round (a budget lowered since)."""
    before = Observed(
        {r: p for r, p in obs.rounds.items() if r < rnd}, reports={r: x for r, x in obs.reports.items() if r < rnd}
    )
    if set(before.rounds) != set(range(1, rnd)) or (rnd > 1 and rnd - 1 not in before.reports):
        return None
    plan = decide(ref, dataclasses.replace(spec, suspend=False), before)
    return next((a.plan for a in plan.actions if isinstance(a, RecordRound) and a.plan.round == rnd), None)


def _again(attempts: list[ObservedJob], retries: int) -> tuple[str, int]:
    """A Job to run again although an attempt may have succeeded (what it made was set aside since): ("active",
    attempt) while one runs, ("create", the next attempt), or ("failed", the last) once the attempts are spent."""
    last = attempts[-1] if attempts else None
    if last is None:
        return "create", 0
    if last.phase in ACTIVE_PHASES:
        return "active", last.attempt
    spent = (last.phase == "Failed" and (not last.retriable or last.attempt >= retries)) or last.attempt > retries
    return ("failed", last.attempt) if spent else ("create", last.attempt + 1)


def repair(ref: RunRef, spec: GenerationRunSpec, obs: Observed) -> Plan | None:
    """The plan while something of a merged round is missing, before anything else is decided (a round decided
    without a report would not be the round an undamaged run decides); None when nothing is.

    First the shards of merged rounds whose markers were set aside as damaged: generated again (the same seed and the
    same seen-index give the same rows), so a later full re-merge, which reads every shard, loses none. Then each
    merged round without its report (set aside as damaged, or removed because an output of its merge was): merged
    again, lowest first, rewriting the same outputs from the same shards and the state of the rounds before. Every
    round before the latest was merged (a round is planned once the previous report exists); the latest was when its
    merge Job succeeded (on a cluster it stays listed: without this, the report would be awaited forever). A Job that
    succeeded before runs as a new attempt; once the attempts are spent, a shard is left set aside (its rows are
    merged already) and a merge fails the run."""
    latest = max(obs.rounds, default=0)
    retries = spec.budget.max_shard_retries
    states = {r: _shard_states(spec, p, obs) for r, p in obs.rounds.items()}
    creates: list[Action] = []
    running = 0
    for rnd in sorted(r for r in obs.rounds if r in obs.reports or r < latest):
        for s in obs.rounds[rnd].shards:
            if (rnd, s.seed) in obs.shards_done or shard_manifest_key(rnd, s.seed) not in obs.quarantined:
                continue
            phase, attempt = _again(_attempts(obs.jobs, "shard", rnd, s.seed), retries)
            running += phase == "active"
            if phase == "create":
                creates.append(CreateShardJob(shard_job_name(ref.name, rnd, s.seed, attempt), attempt, s))
    if creates or running:
        msg = f"{len(creates) + running} shard(s) of merged rounds generated again (their markers were damaged)"
        actions = () if spec.suspend else tuple(creates)
        return Plan(actions, _running(c.REPAIRING, msg, spec.suspend), _status(ref, spec, obs, states))
    for rnd in sorted(r for r in obs.rounds if r not in obs.reports):
        attempts = _attempts(obs.jobs, "merge", rnd, None)
        if rnd == latest and not any(j.phase == "Succeeded" for j in attempts):
            return None  # never merged: `decide` merges it when its shards are done
        msg = f"round {rnd}: merging it again (its report or an output of its merge was damaged and set aside)"
        status = _status(ref, spec, obs, states)
        phase, attempt = _again(attempts, retries)
        if phase == "active":
            return Plan((), _running(c.REPAIRING, msg, spec.suspend), status)
        if phase == "failed":
            last = attempts[-1]
            why = f"round {rnd}: merging it again failed ({_retries(attempt, retries)}): {last.message or last.phase}"
            return Plan((), _failed(c.MERGE_FAILED, why), status)
        merge = CreateMergeJob(merge_job_name(ref.name, rnd, attempt), attempt, rnd, _shards_to(obs, rnd))
        return Plan(() if spec.suspend else (merge,), _running(c.REPAIRING, msg, spec.suspend), status)
    return None
