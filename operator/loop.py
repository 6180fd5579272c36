"""One run loop for both backends: `RunLoop.step()` = observe -> decide -> record -> start -> publish.

Storage is the one record of a run, on a cluster as on one machine: round plans under rounds/rNNNN/plan.json (written
before their Jobs, so every later step and any restart reads them back instead of planning again), shard markers and
round reports written by the workers, and status.json in the custom resource's shape, so `genrun status` and
`genrun report` read the output of any run. A backend only lists Jobs with their phases, starts Jobs, and publishes
the status and Events where its users look (the custom resource; nothing more for the local runner).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from genrun.contract import records as rec
from genrun.contract.api import API_VERSION, GenerationRunSpec, RunRef
from genrun.contract.errors import Rejected
from genrun.contract.status import RunStatus
from genrun.operator import conditions as c
from genrun.operator.planner import (
    CreateMergeJob,
    CreateShardJob,
    Event,
    Observed,
    ObservedJob,
    Plan,
    RecordRound,
    decide,
    invalid_plan,
)
from genrun.worker.storage import DamagedMarker, Storage, read_marker

log = logging.getLogger("genrun.operator")
QUARANTINE = "quarantine/"  # damaged files are recorded here (as merge.py does for shard data), never deleted silently


class Backend(Protocol):
    async def jobs(self) -> Sequence[ObservedJob]:
        """This run's Jobs (every attempt still known) with their phases."""

    async def start(self, action: CreateShardJob | CreateMergeJob) -> None:
        """Start a Job (a no-op if it exists); raises Rejected if it can never start as written."""

    async def publish(self, status: RunStatus, events: Sequence[Event], changed: bool) -> None:
        """Show the status (changed: it differs from the last one, clocks aside) and post the Events."""


class RunLoop:
    """The state of one run between steps: what was already read from storage (immutable once written) and the
    status last published. Everything else is observed again at each step, so a new RunLoop resumes any run."""

    def __init__(
        self,
        ref: RunRef,
        raw_spec: Mapping[str, Any],
        spec: GenerationRunSpec,
        storage: Storage,
        backend: Backend,
        *,
        status: RunStatus | None = None,
        warn: Callable[[str], None] = log.warning,
    ) -> None:
        self.ref, self.raw_spec, self.spec, self.storage, self.backend = ref, dict(raw_spec), spec, storage, backend
        self.status = RunStatus() if status is None else status
        self.warn = warn
        self.observed = Observed()
        self._plans: dict[int, rec.RoundPlan] = {}
        self._reports: dict[int, rec.RoundReport] = {}
        self._markers: dict[str, tuple[int, int]] = {}  # read and found whole: a published marker never changes
        self._engines: dict[str, rec.EngineSession] = {}  # a stopped engine's record never changes again

    async def step(self) -> Plan:
        refused = refusal(self.status, self.ref.generation)
        if refused is not None:  # terminal until the spec changes: a refused child is never sent again
            return invalid_plan([refused], c.CHILD_REJECTED)
        jobs = tuple(await self.backend.jobs())
        self.observed = await asyncio.to_thread(self.observe, jobs)
        plan = decide(self.ref, self.spec, self.observed)
        events: list[Event] = []
        try:
            for a in plan.actions:
                if isinstance(a, RecordRound):  # before its Jobs: they always come from what was recorded
                    await asyncio.to_thread(self.record, a.plan)
                    events += plan.events  # the round really starts now: announced once
            await asyncio.gather(*(self.backend.start(a) for a in plan.actions if not isinstance(a, RecordRound)))
        except Rejected as exc:  # the run fails; the status keeps what was observed (the round just recorded)
            plan = replace(invalid_plan([str(exc)], exc.reason), status=plan.status)
        await self.publish(plan, events)
        return plan

    def observe(self, jobs: tuple[ObservedJob, ...]) -> Observed:
        s = self.storage
        for key in s.list("rounds/"):
            if key.endswith("/plan.json") and int(key.split("/")[-2][1:]) not in self._plans:
                p = rec.round_plan_from(json.loads(s.read_bytes(key)))
                self._plans[p.round] = p
        for rnd in self._plans.keys() - self._reports.keys():
            try:
                self._reports[rnd] = rec.round_report_from(json.loads(s.read_bytes(rec.round_report_key(rnd))))
            except KeyError:
                continue  # not merged yet
        done = set()
        for key in s.list("shards/"):
            if not key.endswith(".done.json"):
                continue
            if key not in self._markers:
                marker, why = checked_marker(s, key)
                if marker is None:  # set aside, so the merge never trips on it; counted in the status
                    if not why:
                        continue
                    quarantine_marker(s, key, why)
                    self.warn(f"{s.location(key)}: {why}; set aside under {QUARANTINE}, the shard runs again")
                    continue
                self._markers[key] = (marker.round, marker.seed)
            done.add(self._markers[key])
        quarantined = quarantined_keys(s, self._reports)
        self._engines = read_engine_sessions(s, self._engines)
        engines = tuple(self._engines.values())
        return Observed(dict(self._plans), jobs, frozenset(done), dict(self._reports), quarantined, engines)

    def record(self, plan: rec.RoundPlan) -> None:
        self.storage.write_bytes(rec.round_plan_key(plan.round), rec.to_json(plan).encode())
        self._plans[plan.round] = plan

    async def publish(self, plan: Plan, events: Sequence[Event] = ()) -> None:
        status, more, changed = publication(self.status, plan, self.ref.generation)
        if changed:
            doc = status_document(self.ref, self.raw_spec, status)
            await asyncio.to_thread(self.storage.write_bytes, rec.STATUS_KEY, json.dumps(doc, indent=1).encode())
        await self.backend.publish(status, [*events, *more], changed)
        self.status = status


def started(action: CreateShardJob | CreateMergeJob) -> ObservedJob:
    """The Job an action starts, as the planner observes it until the backend lists it."""
    if isinstance(action, CreateShardJob):
        return ObservedJob(action.name, "shard", action.shard.round, action.shard.seed, action.attempt, "Pending")
    return ObservedJob(action.name, "merge", action.round, None, action.attempt, "Pending")


def refusal(status: RunStatus, generation: int) -> str | None:
    """The message of this generation's ChildRejected failure, if the API server refused one of its children."""
    cnd = status.condition(c.FAILED)
    if cnd and (cnd.status, cnd.reason, cnd.observed_generation) == ("True", c.CHILD_REJECTED, generation):
        return cnd.message
    return None


async def publish_plan(backend: Backend, old: RunStatus, plan: Plan, generation: int) -> RunStatus:
    """Publish a plan that never reaches the loop (an invalid spec): the status and Events, nothing on storage."""
    status, events, changed = publication(old, plan, generation)
    await backend.publish(status, events, changed)
    return status


def status_document(ref: RunRef, raw_spec: Mapping[str, Any], status: RunStatus) -> dict[str, Any]:
    """status.json: the custom resource's shape, so one reader serves runs made anywhere."""
    meta = {"name": ref.name, "namespace": ref.namespace}
    return {"apiVersion": API_VERSION, "kind": "GenerationRun", "metadata": meta, "spec": dict(raw_spec),
            "status": status.to_dict()}  # fmt: skip


def publication(old: RunStatus, plan: Plan, generation: int) -> tuple[RunStatus, list[Event], bool]:
    """The status to show after `old`, the Events its changes deserve, and whether it changed (clocks aside).
    Terminal and suspended states are announced once, when they begin; so are newly quarantined shards.
    A plan without figures (an invalid spec, a refused child) keeps the figures of `old`."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conds = c.merge_conditions(old.conditions, plan.conditions, generation, now)
    status = replace(old if plan.status is None else plan.status, observed_generation=generation, conditions=conds)
    changed = _strip_times(status) != _strip_times(old)
    events = [
        Event("Warning" if t.type == c.FAILED else "Normal", t.reason, t.message)
        for t in c.transitions(old.conditions, plan.conditions)
        if t.status == "True" and t.type in (c.SUCCEEDED, c.FAILED, c.SUSPENDED)
    ]
    quarantined = status.totals.shards_quarantined
    if quarantined > old.totals.shards_quarantined:
        msg = (f"{quarantined} shard(s) quarantined as unreadable (set aside under quarantine/ in the output, not "
               "merged); see the round's report.md")  # fmt: skip
        events.append(Event("Warning", c.SHARDS_QUARANTINED, msg))
    return status, events, changed


def _strip_times(status: RunStatus) -> RunStatus:
    return replace(status, conditions=tuple(replace(x, last_transition_time="") for x in status.conditions))


# -- the record on storage, shared with the readers (`genrun status`, `genrun report`) ---------------------------


def checked_marker(storage: Storage, key: str) -> tuple[rec.ShardManifest | None, str]:
    """A shard's completion marker through the one parser (storage.read_marker); (None, why) when it is damaged or
    not its shard's; (None, "") when it is gone (never there: nothing to set aside)."""
    try:
        m = read_marker(storage, key)
    except DamagedMarker as exc:
        return None, f"unreadable ({type(exc.__cause__ or exc).__name__}: {str(exc)[:300]})"
    if m is None:
        return None, ""
    if key != rec.shard_manifest_key(m.round, m.seed) or not m.data:
        return None, f"describes round {m.round} seed {m.seed} (data {m.data!r}), not the shard of its name"
    return m, ""


def quarantine_marker(storage: Storage, key: str, why: str) -> None:
    """Set a damaged marker aside: its shard then counts as not done and is generated again."""
    storage.write_bytes(f"{QUARANTINE}{key}.json", json.dumps({"key": key, "error": why}).encode())
    storage.delete(key)


def quarantined_keys(storage: Storage, reports: Mapping[int, rec.RoundReport]) -> frozenset[str]:
    """Every file set aside as damaged: markers (here) and shard data (by the merge, listed in its reports)."""
    keys = {k.removeprefix(QUARANTINE).removesuffix(".json") for k in storage.list(QUARANTINE)}
    return frozenset(keys.union(*(r.quarantined for r in reports.values())))


def read_engine_sessions(
    storage: Storage, known: Mapping[str, rec.EngineSession] | None = None
) -> dict[str, rec.EngineSession]:
    """Every engine session record of the run by key, re-reading only those not known to have stopped. An unreadable
    record (a host killed mid-write cannot leave one: writes are atomic) is left out of the figures, not fatal."""
    known = known or {}
    out: dict[str, rec.EngineSession] = {}
    for key in storage.list(rec.ENGINES_PREFIX):
        if not key.endswith(".json"):
            continue
        old = known.get(key)
        if old is not None and old.stopped:
            out[key] = old
            continue
        try:
            out[key] = rec.engine_session_from(json.loads(storage.read_bytes(key)))
        except (KeyError, ValueError, TypeError):
            if old is not None:
                out[key] = old
    return out


def read_status_document(storage: Storage) -> dict[str, Any]:
    """status.json as written ({} where there is none, or none readable)."""
    try:
        doc = json.loads(storage.read_bytes(rec.STATUS_KEY))
    except (KeyError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def recorded_status(storage: Storage) -> RunStatus:
    """The status last written to status.json (all defaults for a new run): a resumed run goes on from it."""
    st = read_status_document(storage).get("status")
    return RunStatus.from_dict(st) if isinstance(st, Mapping) else RunStatus()


def read_reports(storage: Storage) -> dict[int, rec.RoundReport]:
    """Every merged round's report (read only: nothing is repaired)."""
    out = {}
    for key in storage.list("rounds/"):
        rnd = int(key.split("/")[-2][1:]) if key.endswith("/plan.json") else 0
        if rnd and storage.exists(rec.round_report_key(rnd)):
            out[rnd] = rec.round_report_from(json.loads(storage.read_bytes(rec.round_report_key(rnd))))
    return out
