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
from typing import Any, Protocol

from genrun.contract.api import API_VERSION, GenerationRunSpec, RunRef
from genrun.contract.errors import Rejected
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
from genrun.worker import records as rec
from genrun.worker.storage import DamagedMarker, Storage, read_marker

log = logging.getLogger("genrun.operator")
QUARANTINE = "quarantine/"  # damaged files are recorded here (as merge.py does for shard data), never deleted silently


class Backend(Protocol):
    async def jobs(self) -> Sequence[ObservedJob]:
        """This run's Jobs (every attempt still known) with their phases."""

    async def start(self, action: CreateShardJob | CreateMergeJob) -> None:
        """Start a Job (a no-op if it exists); raises Rejected if it can never start as written."""

    async def publish(self, status: dict[str, Any], events: Sequence[Event], changed: bool) -> None:
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
        status: Mapping[str, Any] | None = None,
        warn: Callable[[str], None] = log.warning,
    ) -> None:
        self.ref, self.raw_spec, self.spec, self.storage, self.backend = ref, dict(raw_spec), spec, storage, backend
        self.status: dict[str, Any] = dict(status or {})
        self.warn = warn
        self.observed = Observed()
        self._plans: dict[int, rec.RoundPlan] = {}
        self._reports: dict[int, rec.RoundReport] = {}
        self._markers: dict[str, tuple[int, int]] = {}  # read and found whole: a published marker never changes

    async def step(self) -> Plan:
        refused = refusal(self.status, self.ref.generation)
        if refused is not None:  # terminal until the spec changes: a refused child is never sent again
            return invalid_plan(self.ref, [refused], c.CHILD_REJECTED)
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
        except Rejected as exc:
            plan = invalid_plan(self.ref, [str(exc)], exc.reason)
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
        return Observed(dict(self._plans), jobs, frozenset(done), dict(self._reports), quarantined)

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


def refusal(status: Mapping[str, Any], generation: int) -> str | None:
    """The message of this generation's ChildRejected failure, if the API server refused one of its children."""
    for cnd in status.get("conditions") or []:
        if (
            isinstance(cnd, dict)
            and (cnd.get("type"), cnd.get("status"), cnd.get("reason")) == (c.FAILED, "True", c.CHILD_REJECTED)
            and cnd.get("observedGeneration") == generation
        ):
            return str(cnd.get("message", ""))
    return None


async def publish_plan(backend: Backend, old: Mapping[str, Any], plan: Plan, generation: int) -> dict[str, Any]:
    """Publish a plan that never reaches the loop (an invalid spec): the status and Events, nothing on storage."""
    status, events, changed = publication(old, plan, generation)
    await backend.publish(status, events, changed)
    return status


def status_document(ref: RunRef, raw_spec: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """status.json: the custom resource's shape, so one reader serves runs made anywhere."""
    meta = {"name": ref.name, "namespace": ref.namespace}
    return {"apiVersion": API_VERSION, "kind": "GenerationRun", "metadata": meta, "spec": dict(raw_spec),
            "status": dict(status)}  # fmt: skip


def publication(old: Mapping[str, Any], plan: Plan, generation: int) -> tuple[dict[str, Any], list[Event], bool]:
    """The status to show after `old`, the Events its changes deserve, and whether it changed (clocks aside).
    Terminal and suspended states are announced once, when they begin; so are newly quarantined shards."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conds = c.merge_conditions(old.get("conditions"), plan.conditions, generation, now)
    status = {**plan.status, "conditions": conds}
    changed = _strip_times(status) != _strip_times({k: old.get(k) for k in status})
    events = [
        Event("Warning" if t.type == c.FAILED else "Normal", t.reason, t.message)
        for t in c.transitions(old.get("conditions"), plan.conditions)
        if t.status == "True" and t.type in (c.SUCCEEDED, c.FAILED, c.SUSPENDED)
    ]
    before = int(((old.get("totals") or {}).get("shardsQuarantined")) or 0)
    quarantined = int((status.get("totals") or {}).get("shardsQuarantined", 0) or 0)
    if quarantined > before:
        msg = (f"{quarantined} shard(s) quarantined as unreadable (set aside under quarantine/ in the output, not "
               "merged); see the round's report.md")  # fmt: skip
        events.append(Event("Warning", c.SHARDS_QUARANTINED, msg))
    return status, events, changed


def _strip_times(status: Mapping[str, Any]) -> Any:
    out = dict(status)
    if isinstance(out.get("conditions"), list):
        out["conditions"] = [{k: v for k, v in cnd.items() if k != "lastTransitionTime"} for cnd in out["conditions"]]
    return out


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


def recorded_status(storage: Storage) -> dict[str, Any]:
    """The status last written to status.json ({} for a new run): a resumed run goes on from it."""
    try:
        return dict(json.loads(storage.read_bytes(rec.STATUS_KEY))["status"])
    except (KeyError, ValueError, TypeError):
        return {}


def read_reports(storage: Storage) -> dict[int, rec.RoundReport]:
    """Every merged round's report (read only: nothing is repaired)."""
    out = {}
    for key in storage.list("rounds/"):
        rnd = int(key.split("/")[-2][1:]) if key.endswith("/plan.json") else 0
        if rnd and storage.exists(rec.round_report_key(rnd)):
            out[rnd] = rec.round_report_from(json.loads(storage.read_bytes(rec.round_report_key(rnd))))
    return out
