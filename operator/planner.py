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

from genrun.contract.api import GenerationRunSpec, RunRef, SpecError, parse_spec
from genrun.contract.records import (
    EngineSession,
    JobSpec,
    RoundPlan,
    RoundReport,
    Sampling,
    ShardPlan,
    shard_manifest_key,
)
from genrun.contract.status import Duplicates, Output, RunStatus, TopDuplicate, Totals
from genrun.operator import conditions as c
from genrun.operator import cost
from genrun.operator import figures as fig
from genrun.operator import policy as pol
from genrun.operator.policy import base_sampling, round4

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
# Sampling policy and round sizing (pure arithmetic, unit-tested on the problem's numbers)


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
        t = min(e.max_temperature, round4(last.temperature + e.temperature_step))
        p = min(e.max_repetition_penalty, round4(last.repetition_penalty + e.repetition_penalty_step))
        failed = [s for s, r in (*history, (last, report)) if r.new_unique and r.qc_pass_rate < e.min_qc_pass_rate]
        if any(t >= s.temperature and p >= s.repetition_penalty for s in failed):
            return (
                last,
                c.HELD,
                (
                    f"unique ratio {report.unique_ratio:.2f} is low, but QC fell below its floor at "
                    f"temperature {min(s.temperature for s in failed):g}: sampling held below that level"
                ),
            )
        if (t, p) != (last.temperature, last.repetition_penalty):
            why = (
                f"unique ratio {report.unique_ratio:.2f} is below {e.escalate_below_unique_ratio:g} and QC-pass "
                f"rate {report.qc_pass_rate:.2f} holds: temperature {last.temperature:g}->{t:g}, "
                f"repetition penalty {last.repetition_penalty:g}->{p:g}"
            )
            return Sampling(t, last.top_p, p, last.min_p, last.max_tokens), c.ESCALATED, why
        return last, c.HELD, "sampling is at its ceilings"
    return last, c.HELD, f"unique ratio {report.unique_ratio:.2f} is high enough: sampling held"


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


def shard_domains(spec: GenerationRunSpec, ordinal: int) -> tuple[str, ...]:
    """Rotate the domain list by the shard's run-wide position, so shards start from different topics."""
    d = spec.prompt.domains
    if not d or not spec.escalation.rotate_domains:
        return tuple(d)
    k = ordinal % len(d)
    return tuple(d[k:] + d[:k])


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
) -> RoundPlan:
    """A round of `count` shards with fresh seeds; each shard runs arms[i] (default: `sampling` for all) and
    cells[i] (default: none, each prompt draws its attribute values) and writes `examples` rows (default:
    spec.shards.examplesPerShard). The round's `sampling` is its most used arm."""
    used = [s for p in rounds.values() for s in p.shards]
    seed0 = max((s.seed for s in used), default=spec.shards.first_seed - 1) + 1
    ordinal0 = len(used)
    per_shard = list(arms) or [sampling] * count
    shards = tuple(
        ShardPlan(
            round=rnd,
            seed=seed0 + i,
            ordinal=ordinal0 + i,
            examples=examples or spec.shards.examples_per_shard,
            sampling=per_shard[i],
            domains=shard_domains(spec, ordinal0 + i),
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
    # All rounds and shards planned (status.rounds lists the last 100 only); a status from before these totals
    # existed counts its listed rounds.
    rounds = t.rounds_planned or len(status.rounds)
    shards = t.shards_planned or sum(r.shards for r in status.rounds)
    return float(round(max(rounds / b.max_rounds, shards / b.max_shards, t.generated / b.max_generated_examples), 4))


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
        # Rows dropped per dedup tier, and the tiers "unique" (and the target) count through (sem, issue 12).
        duplicates=Duplicates(
            exact=rep.exact_duplicates if rep else 0,
            near=rep.near_duplicates if rep else 0,
            semantic=rep.semantic_duplicates if rep else 0,
            online=rep.online_duplicates if rep else 0,
        ),
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


def plan_for_manifest(ref: RunRef, spec: Mapping[str, Any], observed: Observed) -> Plan:
    """Parse the spec and decide; a bad spec becomes Failed/InvalidSpec, never an exception."""
    try:
        parsed = parse_spec(dict(spec))
    except SpecError as exc:
        return invalid_plan(exc.errors)
    return decide(ref, parsed, observed)


def decide(ref: RunRef, spec: GenerationRunSpec, obs: Observed) -> Plan:
    suspended = spec.suspend
    b = spec.budget
    states = {rnd: _shard_states(spec, p, obs) for rnd, p in obs.rounds.items()}

    def finish(conds: tuple[c.Condition, ...]) -> Plan:
        # No events: a finished or waiting run is decided again and again; its Events come from condition
        # transitions (conditions.transitions), so each is posted once.
        return Plan((), conds, _status(ref, spec, obs, states))

    def new_round(
        rnd: int,
        count: int,
        sampling: Sampling,
        why: str,
        events: list[Event],
        arms: Sequence[Sampling] = (),
        examples: int = 0,
        cells: Sequence[pol.Cell] = (),
    ) -> Plan:
        plan = make_round(spec, rnd, count, sampling, obs.rounds, why, arms=arms, examples=examples, cells=cells)
        states[rnd] = [_ShardState(s, "create") for s in plan.shards]
        actions: list[Action] = [RecordRound(plan)]
        actions += _shard_creates(spec, ref, states[rnd], active=0)
        msg = f"round {rnd}: {count} shard(s), seeds {fig.seed_range(plan.seeds)}, {_arms_summary(plan)}; {why}"
        events.append(Event("Normal", c.ROUND_STARTED, msg))
        status = _status(ref, spec, _with_round(obs, plan), states)
        return Plan(tuple(actions), _running(c.ROUND_STARTED, msg, False), status, tuple(events))

    if not obs.rounds:
        if suspended:
            return finish(_running(c.SUSPENDED_BY_SPEC, "no round started yet", True))
        if spec.policy.strategy == "bandit" and spec.policy.pilot_share > 0:
            picked, per, why = pol.pilot(spec)
            cells = pol.pilot_cells(spec, len(picked), pol.round_rng(spec, 1))
            return new_round(1, len(picked), picked[0], why, [], arms=picked, examples=per, cells=cells)
        return new_round(1, spec.shards.initial, base_sampling(spec), "first round from spec.shards.initial", [])

    rnd = max(obs.rounds)
    cur = states[rnd]
    failed_total = sum(s.phase == "failed" for ss in states.values() for s in ss)
    if failed_total > b.max_failed_shards:
        first = next(s for ss in states.values() for s in ss if s.phase == "failed")
        msg = (
            f"{failed_total} shard(s) failed, more than spec.budget.maxFailedShards={b.max_failed_shards}; first: "
            f"{first.message} ({_retries(first.attempt, b.max_shard_retries)})"
        )
        return finish(_failed(c.SHARDS_FAILED, msg))

    report = obs.reports.get(rnd)
    if report is None:
        pending = [s for s in cur if s.phase in ("active", "create")]
        if pending:
            active = sum(s.phase == "active" for s in cur)
            done = sum(s.phase == "done" for s in cur)
            msg = f"round {rnd}: {done}/{len(cur)} shard(s) done, {active} running"
            actions = () if suspended else tuple(_shard_creates(spec, ref, cur, active))
            status = _status(ref, spec, obs, states)
            return Plan(actions, _running(c.SHARDS_RUNNING, msg, suspended), status)
        if not any(s.phase == "done" for s in cur):
            msg = f"round {rnd}: every shard failed"
            return finish(_failed(c.SHARDS_FAILED, msg))
        phase, attempt, why = _job_state(_attempts(obs.jobs, "merge", rnd, None), b.max_shard_retries)
        if phase == "failed":
            msg = f"round {rnd}: the merge/dedup/QC Job failed ({_retries(attempt, b.max_shard_retries)}): {why}"
            return finish(_failed(c.MERGE_FAILED, msg))
        msg = f"round {rnd}: merging, deduplicating and checking {sum(s.phase == 'done' for s in cur)} shard(s)"
        if phase == "done":
            msg += " (the merge Job succeeded; waiting for its report to be readable)"
        actions = ()
        if phase == "create" and not suspended:
            shard_ids = tuple((s.round, s.seed) for r in sorted(obs.rounds) if r <= rnd for s in obs.rounds[r].shards)
            actions = (CreateMergeJob(merge_job_name(ref.name, rnd, attempt), attempt, rnd, shard_ids),)
        return Plan(actions, _running(c.MERGING, msg, suspended), _status(ref, spec, obs, states))

    kept = report.qc_passed_total
    target = spec.target.unique_examples
    if kept >= target:
        msg = (
            f"{kept} unique QC-passed examples >= target {target} after {rnd} round(s); "
            f"{report.generated_total} generated, duplication ratio {report.duplication_ratio:.3f}"
        )
        return finish(_succeeded(msg))

    # Budget: rounds and shards are hard bounds; generated examples are estimated from the measured per-shard rate.
    used_shards = sum(len(p.shards) for p in obs.rounds.values())
    per_shard = report.generated / report.shards if report.shards else float(spec.shards.examples_per_shard)
    left_by_generated = (
        math.floor((b.max_generated_examples - report.generated_total) / per_shard) if per_shard > 0 else 0
    )
    room = min(b.max_shards - used_shards, left_by_generated)
    exhausted = ""
    if rnd >= b.max_rounds:
        exhausted = f"spec.budget.maxRounds={b.max_rounds} reached"
    elif room < 1:
        exhausted = (
            f"no shard fits the budget (maxShards={b.max_shards}, {used_shards} used; "
            f"maxGeneratedExamples={b.max_generated_examples}, {report.generated_total} generated)"
        )
    if exhausted:
        msg = f"{kept}/{target} unique QC-passed examples; {exhausted}"
        return finish(_failed(c.BUDGET_EXHAUSTED, msg))
    if suspended:
        return finish(_running(c.SUSPENDED_BY_SPEC, f"{kept}/{target} after round {rnd}", True))

    finished = (
        f"round {rnd}: {report.generated} generated, {report.new_unique} new unique, {report.new_qc_passed} new kept "
        f"(marginal yield {report.marginal_yield:.3f}); {kept}/{target} kept in all"
    )
    events = [Event("Normal", c.ROUND_FINISHED, finished)]
    if spec.policy.strategy == "bandit":
        planned = sum(s.examples for s in obs.rounds[rnd].shards)
        per_example = report.generated / planned if planned else 1.0
        room_examples = math.floor((b.max_generated_examples - report.generated_total) / max(per_example, 1e-9))
        if room_examples < 1:
            msg = f"{kept}/{target} unique QC-passed examples; no example fits maxGeneratedExamples"
            return finish(
                _failed(c.BUDGET_EXHAUSTED, f"{msg}={b.max_generated_examples} ({report.generated_total} generated)")
            )
        arms, per, why, cells = _bandit_round(
            spec, ref, obs, rnd + 1, target - kept, room_examples, b.max_shards - used_shards
        )
        return new_round(rnd + 1, len(arms), arms[0], why, events, arms=arms, examples=per, cells=cells)

    history = tuple(
        (obs.rounds[r].sampling, obs.reports[r]) for r in sorted(obs.reports) if r in obs.rounds and r < rnd
    )
    sampling, policy, policy_why = next_sampling(spec, obs.rounds[rnd].sampling, report, history)
    count, why = shards_needed(
        spec, report, expected_yield(sampling, report, (*history, (obs.rounds[rnd].sampling, report)))
    )
    if count > room:
        count, why = room, why + f"; {room} left in the budget"
    events += [] if policy == c.HELD else [Event("Normal", policy, f"round {rnd + 1}: {policy_why}")]
    return new_round(rnd + 1, count, sampling, f"{why}; {policy_why}", events)


def _bandit_round(
    spec: GenerationRunSpec, ref: RunRef, obs: Observed, rnd: int, need: int, room_examples: int, room_shards: int
) -> tuple[list[Sampling], int, str, list[pol.Cell]]:
    """The next round under the bandit: (arm per shard, examples per shard, why, attribute cell per shard)."""
    stats = pol.arm_stats(spec, obs.rounds, obs.reports)
    rng = pol.round_rng(spec, rnd)
    cap = max(1, min(spec.escalation.max_shards_per_round, room_shards))
    last = rnd >= spec.budget.max_rounds
    # The mix a full round would get estimates the yield to size with; the round itself is then drawn at its size.
    y, sd = pol.mix_yield(stats, pol.allocate(stats, cap, spec.policy.exploration, rng))
    measured = max(obs.reports[max(obs.reports)].generated_total, 1)
    rounds_left = spec.budget.max_rounds - rnd + 1
    floor = pol.min_shard_examples(spec, stats, obs.engines)
    size = pol.size_round(spec, need, y, sd, room_examples, room_shards, last, measured, rounds_left, floor)
    picks = pol.allocate(stats, size.shards, spec.policy.exploration, rng)
    per, why = size.examples, size.why
    if size.precise and size.shards < cap:  # sized to the target: size again for the arms actually drawn
        y, sd = pol.mix_yield(stats, picks)
        n, _, why = pol.examples_for(spec, need, y, sd, last, rounds_left)
        per = min(pol.shard_examples(spec, math.ceil(n / len(picks)), floor), max(1, room_examples // len(picks)))
        why += f" -> {len(picks)} shard(s) x {per}"
    retired = [a.id for a in stats if a.retired]
    why += f"; retired (QC-pass rate below the floor): {', '.join(retired)}" if retired else ""
    cells: list[pol.Cell] = []
    if spec.prompt.attributes:
        cstats = pol.cell_stats(spec, obs.rounds, obs.reports)
        cells, quota_why = pol.allocate_cells(spec, cstats, len(picks), per, rng)
        why += f"; {quota_why}" if quota_why else ""
        k = pol.cell_factor(cstats, cells)
        if size.precise and size.shards < cap and abs(k - 1) > 0.01:  # the cells drawn change the yield: resize
            y, sd = pol.mix_yield(stats, picks)
            n, _, _ = pol.examples_for(spec, need, min(1.0, y * k), sd * k, last, rounds_left)
            per = min(pol.shard_examples(spec, math.ceil(n / len(picks)), floor), max(1, room_examples // len(picks)))
            why += f"; the cells drawn scale the yield by {k:.2f} -> {len(picks)} shard(s) x {per}"
    if len(picks) * per > room_examples:  # whatever sized it (growth, rounding, the 16-example floor): never past
        n = max(1, min(len(picks), room_examples))
        picks, cells, per = picks[:n], cells[:n], max(1, min(per, room_examples // n))
        why += f"; cut to the budget's {room_examples} example(s) -> {n} shard(s) x {per}"
    return [a.sampling for a in picks], per, why, cells


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
        shard_ids = tuple((s.round, s.seed) for r in sorted(obs.rounds) if r <= rnd for s in obs.rounds[r].shards)
        merge = CreateMergeJob(merge_job_name(ref.name, rnd, attempt), attempt, rnd, shard_ids)
        return Plan(() if spec.suspend else (merge,), _running(c.REPAIRING, msg, spec.suspend), status)
    return None
