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
import os
import struct
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
    repair,
    replan,
)
from genrun.worker.export import CARD_KEY, messages_jsonl_key, messages_key
from genrun.worker.storage import DamagedMarker, LocalStorage, S3Storage, Storage, read_marker

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
        # Markers read and found whole (a published marker never changes): (round, seed, the examples it was asked).
        self._markers: dict[str, tuple[int, int, int]] = {}
        self._engines: dict[str, rec.EngineSession] = {}  # a stopped engine's record never changes again
        self._records: dict[str, dict[str, str]] = {}  # quarantine records read: damaged key -> {key, error, repair}
        self._events: list[Event] = []  # what this loop set aside since the last publish: one Warning Event each
        self._lost = ""  # a damaged round plan that cannot be decided again as it was: the run's failure
        self._status_checked = False
        self._rewrite_status = False  # status.json was damaged: written at the next publish whatever changed

    async def step(self) -> Plan:
        refused = refusal(self.status, self.ref.generation)
        if refused is not None:  # terminal until the spec changes: a refused child is never sent again
            return invalid_plan([refused], c.CHILD_REJECTED)
        jobs = tuple(await self.backend.jobs())
        self.observed = await asyncio.to_thread(self.observe, jobs)
        if self._lost:
            plan = invalid_plan([self._lost], c.ROUND_PLAN_LOST)
        else:  # what a merged round lost is made again before anything new is decided
            plan = repair(self.ref, self.spec, self.observed) or decide(self.ref, self.spec, self.observed)
        damaged = damage_condition(self._records)
        if damaged is not None:
            plan = replace(plan, conditions=(*plan.conditions, damaged))
        events, self._events = self._events, []
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
        """What exists on storage, every file checked as it is first read. A damaged one is set aside under quarantine/
        (a record of the key and the fault; the file goes) and rebuilt: a round plan decided again, a round whose report
        or merge output is damaged merged again, a shard whose marker is damaged generated again. The planner is shown
        the rounds up to the first one whose plan is still missing, never a gap."""
        s = self.storage
        if not self._status_checked:
            self._check_status()
        for key in s.list("rounds/"):
            rnd = round_of(key)
            if rnd and key == rec.round_plan_key(rnd) and rnd not in self._plans:
                try:
                    self._plans[rnd] = checked_plan(s.read_bytes(key), rnd)
                except KeyError:
                    continue
                except ValueError as exc:
                    self._set_aside(key, str(exc), f"round {rnd} is decided again from the rounds before it")
        self._read_reports()
        done: set[tuple[int, int]] = set()
        marker_sizes: dict[int, dict[int, int]] = {}  # round -> seed -> the examples its marker says it was asked
        for key in s.list(rec.SHARDS_PREFIX):
            if not key.endswith(rec.MARKER_SUFFIX):
                continue
            if key not in self._markers:
                marker, why = checked_marker(s, key)
                if marker is None:  # set aside, so the merge never trips on it; counted in the status
                    if not why:
                        continue
                    self._set_aside(key, why, "the shard runs again")
                    continue
                if not self._shard_whole(marker):
                    continue
                self._markers[key] = (marker.round, marker.seed, marker.examples)
            rnd, seed, examples = self._markers[key]
            done.add((rnd, seed))
            marker_sizes.setdefault(rnd, {})[seed] = examples
        self._read_records()
        if self._replan(marker_sizes):
            self._read_reports()  # of the rounds decided again
        shown: dict[int, rec.RoundPlan] = {}
        for rnd in sorted(self._plans):  # up to the first gap
            if rnd != len(shown) + 1:
                break
            shown[rnd] = self._plans[rnd]
        reports = {r: x for r, x in self._reports.items() if r in shown}
        quarantined = quarantined_keys(s, reports)
        self._engines = read_engine_sessions(s, self._engines)
        engines = tuple(self._engines.values())
        return Observed(shown, jobs, frozenset(done), reports, quarantined, engines)

    def _read_reports(self) -> None:
        """The reports of planned rounds not read yet, each checked with its round's merge outputs; the dataset card
        (the latest merge's) with the latest."""
        s = self.storage
        merged = False
        for rnd in sorted(self._plans.keys() - self._reports.keys()):
            key = rec.round_report_key(rnd)
            try:
                report = checked_report(s.read_bytes(key), rnd)
            except KeyError:
                continue  # not merged yet
            except ValueError as exc:
                self._set_aside(key, str(exc), f"round {rnd} is merged again")
                continue
            if self._outputs_whole(rnd):
                self._reports[rnd] = report
                merged = True
        if merged and self._reports:
            last = max(self._reports)
            card = read_ends(s, CARD_KEY)
            why = "" if card is None else text_damage(card, card=True)  # none: a run older than the cards
            if why:
                s.delete(rec.round_report_key(last))
                del self._reports[last]
                self._set_aside(CARD_KEY, why, f"round {last}, the latest merged, is merged again, which rewrites it")

    def _replan(self, marker_sizes: dict[int, dict[int, int]]) -> bool:
        """Decide again each round whose plan is missing while a later round, or shards of it, exist; record it when
        its seeds and sizes are those its shards were made from (every shard of the round on storage is one of its
        seeds, asked for the examples its marker says it was; a marker records no more of its plan, so a spec edited
        to other sampling or domains with the same seeds and sizes goes unseen). True when it recorded one."""
        self._lost = ""
        recorded = False
        top = max((*self._plans, *marker_sizes, *(round_of(k) for k in self._records)), default=0)
        for rnd in range(1, top + 1):
            if rnd in self._plans:
                continue
            seen = {r: p for r, p in self._plans.items() if r < rnd}
            plan = replan(self.ref, self.spec, Observed(seen, reports=self._reports), rnd)
            if plan is None:
                if rnd - 1 in self._plans and rnd - 1 not in self._reports:
                    return recorded  # the previous round's report comes first (it is being merged): decided then
                self._lost = (f"round {rnd}'s plan ({rec.round_plan_key(rnd)}) was damaged or removed, and the spec "
                              f"as it is now decides no round {rnd} from the rounds before it")  # fmt: skip
                return recorded
            differs = _unlike_its_shards(plan, marker_sizes.get(rnd, {}))
            if differs:
                self._lost = (
                    f"round {rnd}'s plan ({rec.round_plan_key(rnd)}) was damaged or removed, and deciding it again "
                    f"gives {differs} (the spec or genrun changed since): restore the file (its fault is recorded "
                    f"under {QUARANTINE}) or run into a new output"
                )
                return recorded
            self.record(plan)
            recorded = True
            self.warn(f"{self.storage.location(rec.round_plan_key(rnd))}: decided again and recorded")
        return recorded

    def _shard_whole(self, marker: rec.ShardManifest) -> bool:
        """A shard of the open round (not merged yet) checked once, when its marker is first read: its data and
        rejected rows must be whole Parquet files, else both are set aside with the marker and the shard runs again
        (the same seed gives the same rows), instead of the merge quarantining it and losing its examples."""
        rnd, seed = marker.round, marker.seed
        if rnd in self._reports or rnd != max(self._plans, default=0):
            return True  # merged already (its rows are in the dataset), or a round closed before this one
        keys = [rec.shard_data_key(rnd, seed)] + ([rec.shard_rejected_key(rnd, seed)] if marker.rejected else [])
        bad = [(k, why) for k in keys if (why := parquet_damage(read_ends(self.storage, k)))]
        if not bad:
            return True
        self.storage.delete(rec.shard_manifest_key(rnd, seed))  # first: whatever happens next, the shard runs again
        for key, why in bad:
            self._set_aside(key, why, "the shard runs again (its round is not merged yet)")
        return False

    def _outputs_whole(self, rnd: int) -> bool:
        """Round `rnd`'s merge outputs checked once (when its report is first read): False, with the damaged ones set
        aside and the report removed so that the round is merged again, when one is damaged or a part is missing."""
        s = self.storage
        bad = [(k, why) for k, kind in merge_outputs(rnd) if (why := output_damage(s, k, kind))]
        if not bad:
            return True
        s.delete(rec.round_report_key(rnd))  # first: whatever happens next, the round is merged again
        for key, why in bad:
            self._set_aside(key, why, f"round {rnd} is merged again, which rewrites it")
        return False

    def _set_aside(self, key: str, why: str, repair: str, keep: bool = False) -> None:
        quarantine(self.storage, key, why, repair, keep=keep)
        self._records[key] = {"key": key, "error": why, "repair": repair}
        self._events.append(
            Event("Warning", damage_reason(key), f"{key}: {why}; set aside under {QUARANTINE}, {repair}")
        )
        self.warn(f"{self.storage.location(key)}: {why}; set aside under {QUARANTINE}, {repair}")

    def _check_status(self) -> None:
        """status.json, once: unreadable, it is recorded as damaged and written again at the next publish."""
        self._status_checked = True
        s = self.storage
        try:
            raw = s.read_bytes(rec.STATUS_KEY)
        except KeyError:
            return
        why = status_damage(raw)
        if why:
            self._rewrite_status = True
            self._set_aside(rec.STATUS_KEY, why, "written again from the run's record", keep=True)

    def _read_records(self) -> None:
        for key in self.storage.list(QUARANTINE):
            damaged = key.removeprefix(QUARANTINE).removesuffix(".json")
            if damaged in self._records:
                continue
            try:
                doc = json.loads(self.storage.read_bytes(key))
                self._records[damaged] = {"key": damaged, "error": str(doc.get("error", "")),
                                          "repair": str(doc.get("repair", ""))}  # fmt: skip
            except (KeyError, ValueError, AttributeError):
                self._records[damaged] = {
                    "key": damaged,
                    "error": "(its quarantine record is unreadable)",
                    "repair": "",
                }

    def record(self, plan: rec.RoundPlan) -> None:
        self.storage.write_bytes(rec.round_plan_key(plan.round), rec.to_json(plan).encode())
        self._plans[plan.round] = plan

    async def publish(self, plan: Plan, events: Sequence[Event] = ()) -> None:
        status, more, changed = publication(self.status, plan, self.ref.generation)
        if changed or self._rewrite_status:
            self._rewrite_status = False
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
        damaged = next((x for x in plan.conditions if x.type == c.DAMAGED), None)
        if damaged is not None:  # which shards, and why
            msg = f"{quarantined} shard(s) quarantined; {damaged.message}"
        events.append(Event("Warning", c.SHARDS_QUARANTINED, msg[:1024]))
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
    quarantine(storage, key, why, "the shard runs again")


def quarantine(storage: Storage, key: str, why: str, repair: str, *, keep: bool = False) -> None:
    """Set a damaged file aside: a record of its key, the fault and what rebuilds it under quarantine/ (the merge
    writes the same record for shard data), then the file goes, so that nothing reads it again (`keep`: it stays
    until it is written again, as status.json, whose absence would say there is no run here)."""
    record = {"key": key, "error": why, "repair": repair}
    storage.write_bytes(f"{QUARANTINE}{key}.json", json.dumps(record).encode())
    if not keep:
        storage.delete(key)


def quarantined_keys(storage: Storage, reports: Mapping[int, rec.RoundReport]) -> frozenset[str]:
    """Every shard file set aside as damaged: markers (here) and shard data (by the merge, also listed in its
    reports); what the status counts as quarantined shards. Other files set aside are rebuilt (`damage_condition`)."""
    keys = {k.removeprefix(QUARANTINE).removesuffix(".json") for k in storage.list(f"{QUARANTINE}shards/")}
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


def round_of(key: str) -> int:
    """The round a key of the output belongs to (rounds/rNNNN/..., merge/rNNNN/..., shards/rNNNN/..., the parts'
    ...-rNNNN.parquet), 0 for none."""
    for part in reversed(key.removesuffix(".json").replace("-", "/").replace(".", "/").split("/")):
        if len(part) >= 5 and part[0] == "r" and part[1:].isdigit():
            return int(part[1:])
    return 0


def damage_reason(key: str) -> str:
    """The Damaged condition's reason (and the Event's) for a file of this key."""
    if key.startswith("rounds/"):
        return c.ROUND_PLAN_DAMAGED
    if key.startswith(rec.SHARDS_PREFIX):
        return c.SHARD_MARKER_DAMAGED if key.endswith(rec.MARKER_SUFFIX) else c.SHARD_DATA_DAMAGED
    if key.startswith(rec.DATASET_PREFIX):
        return c.DATASET_PART_DAMAGED
    if key == rec.STATUS_KEY:
        return c.STATUS_DAMAGED
    if key.startswith("merge/") and key.endswith("/report.json"):
        return c.ROUND_REPORT_DAMAGED
    return c.MERGE_OUTPUT_DAMAGED


def damage_condition(records: Mapping[str, Mapping[str, str]]) -> c.Condition | None:
    """The Damaged condition from the quarantine records (what was set aside stays recorded, so the condition stays
    with the run's record): each file, why, and what rebuilds it. None while nothing was ever found damaged."""
    if not records:
        return None
    reasons = {damage_reason(k) for k in records}
    reason = reasons.pop() if len(reasons) == 1 else c.FILES_DAMAGED
    default = {c.SHARD_DATA_DAMAGED: "not merged; later rounds make up for its examples"}
    parts = [f"{k}: {r.get('error', '')[:200]} ({r.get('repair') or default.get(damage_reason(k), 'set aside')})"
             for k, r in sorted(records.items())]  # fmt: skip
    msg = f"{len(parts)} file(s) under the output found damaged and set aside under {QUARANTINE}: "
    shown: list[str] = []
    for i, part in enumerate(parts):
        more = f"; ... and {len(parts) - i} more" if i < len(parts) else ""
        if len(msg) + len("; ".join([*shown, part])) + len(more) > 2000:
            return c.Condition(c.DAMAGED, "True", reason, msg + "; ".join(shown) + more)
        shown.append(part)
    return c.Condition(c.DAMAGED, "True", reason, msg + "; ".join(shown))


# -- integrity checks: what a file of each kind must look like, read without pyarrow (the operator image has none) --


def checked_plan(raw: bytes, rnd: int) -> rec.RoundPlan:
    """A round plan's bytes -> RoundPlan, or ValueError saying what is wrong."""
    try:
        plan = rec.round_plan_from(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"unreadable ({type(exc).__name__}: {str(exc)[:200]}; {len(raw)} bytes)") from exc
    if plan.round != rnd or not plan.shards:
        raise ValueError(f"describes round {plan.round} with {len(plan.shards)} shard(s), not round {rnd}")
    return plan


def checked_report(raw: bytes, rnd: int) -> rec.RoundReport:
    """A round report's bytes -> RoundReport, or ValueError saying what is wrong."""
    try:
        report = rec.round_report_from(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"unreadable ({type(exc).__name__}: {str(exc)[:200]}; {len(raw)} bytes)") from exc
    if report.round != rnd:
        raise ValueError(f"describes round {report.round}, not round {rnd}")
    return report


def status_damage(raw: bytes) -> str:
    """Why status.json's bytes are not a status document ("" when they are)."""
    try:
        doc = json.loads(raw)
        RunStatus.from_dict(doc["status"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable ({type(exc).__name__}: {str(exc)[:200]}; {len(raw)} bytes)"
    return ""


Ends = tuple[bytes, bytes, int] | None  # (first bytes, last bytes, size) of an object; None when there is none
END_BYTES = 1 << 16


def read_ends(storage: Storage, key: str, n: int = END_BYTES) -> Ends:
    """The first and last `n` bytes of an object and its size, without reading the rest (a dataset part runs to
    gigabytes): a seek on a folder, ranged GETs on S3."""
    if isinstance(storage, LocalStorage):
        try:
            with open(storage.location(key), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(min(n, size))
                f.seek(max(0, size - n))
                return head, f.read(), size
        except FileNotFoundError:
            return None
    if isinstance(storage, S3Storage):
        if not storage.exists(key):
            return None
        k = storage.location(key).removeprefix(f"s3://{storage.bucket}/")
        size = int(storage.client.head_object(Bucket=storage.bucket, Key=k)["ContentLength"])
        if size == 0:
            return b"", b"", 0

        def get(rng: str) -> bytes:
            body: bytes = storage.client.get_object(Bucket=storage.bucket, Key=k, Range=rng)["Body"].read()
            return body

        return get(f"bytes=0-{n - 1}"), get(f"bytes=-{n}"), size
    try:
        data = storage.read_bytes(key)
    except KeyError:
        return None
    return data[:n], data[-n:], len(data)


def parquet_damage(ends: Ends) -> str:
    """Why a Parquet file is damaged ("" when its frame is whole): the magic bytes at both ends and a footer length
    that fits the file (a truncated or overwritten file fails one of them)."""
    if ends is None:
        return "missing"
    head, tail, size = ends
    if size < 12:
        return f"{size} bytes: too short for a Parquet file"
    if head[:4] != b"PAR1" or tail[-4:] != b"PAR1":
        return f"Parquet magic bytes not found at the {'start' if head[:4] != b'PAR1' else 'end'} ({size} bytes; truncated?)"
    footer = int.from_bytes(tail[-8:-4], "little")
    if not 0 < footer <= size - 12:
        return f"Parquet footer length {footer} does not fit a file of {size} bytes"
    return ""


def zip_damage(ends: Ends) -> str:
    """Why an .npz (a zip file) is damaged ("" when its frame is whole): a local header at the start, the
    end-of-central-directory record at the end (numpy writes no comment) and a central directory inside the file."""
    if ends is None:
        return "missing"
    head, tail, size = ends
    if size < 22 or head[:2] != b"PK" or tail[-22:-18] != b"PK\x05\x06":
        return f"no zip end-of-central-directory record at the end ({size} bytes; truncated?)"
    cd_size, cd_offset = struct.unpack("<II", tail[-10:-2])
    if cd_offset != 0xFFFFFFFF and cd_offset + cd_size > size - 22:
        return f"zip central directory ({cd_size} bytes at {cd_offset}) does not fit a file of {size} bytes"
    return ""


def text_damage(ends: Ends, card: bool = False) -> str:
    """Why a text file the merge wrote (Markdown, JSON lines, the dataset card) is damaged: each ends with a newline
    (a truncation mid-line does not); the card opens with its YAML front matter."""
    if ends is None:
        return "missing"
    head, tail, size = ends
    if size and not tail.endswith(b"\n"):
        return f"does not end with a newline ({size} bytes; truncated?)"
    if card and not head.startswith(b"---\n"):
        return "does not open with its YAML front matter ('---')"
    return ""


def json_damage(storage: Storage, key: str) -> str:
    try:
        raw = storage.read_bytes(key)
    except KeyError:
        return "missing"
    try:
        json.loads(raw)
    except ValueError as exc:
        return f"unreadable ({type(exc).__name__}: {str(exc)[:200]}; {len(raw)} bytes)"
    return ""


# (key, kind) of the outputs of round r's merge; kinds ending in "?" may be absent (written by newer merges only, or
# only with a tier on)
def merge_outputs(rnd: int) -> list[tuple[str, str]]:
    m = rec.merge_prefix(rnd)
    return [
        (rec.dataset_part_key(rnd), "parquet"), (rec.rejected_part_key(rnd), "parquet"),
        (messages_key(rnd), "parquet?"), (f"{m}/kept.parquet", "parquet?"), (f"{m}/semantic.parquet", "parquet?"),
        (f"{m}/state.npz", "zip?"), (rec.seen_index_key(rnd), "zip?"), (f"{m}/state.json", "json?"),
        (f"{m}/report.md", "text?"), (f"{m}/alpaca.jsonl", "text?"), (f"{m}/sharegpt.jsonl", "text?"),
        (messages_jsonl_key(rnd), "text?"),
    ]  # fmt: skip


def output_damage(storage: Storage, key: str, kind: str) -> str:
    """Why the merge output `key` of this kind is damaged ("" when whole, or absent and allowed to be)."""
    if kind == "json?":
        why = json_damage(storage, key)
        return "" if why == "missing" else why
    ends = read_ends(storage, key)
    if ends is None:
        return "" if kind.endswith("?") else "missing"
    check = {"parquet": parquet_damage, "zip": zip_damage, "text": text_damage}[kind.rstrip("?")]
    return check(ends)


def read_status_document(storage: Storage) -> dict[str, Any]:
    """status.json as written ({} where there is none, or none readable)."""
    try:
        doc = json.loads(storage.read_bytes(rec.STATUS_KEY))
    except (KeyError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def recorded_status(storage: Storage) -> RunStatus:
    """The status last written to status.json (all defaults for a new run, or where it is damaged: the loop then
    writes it again): a resumed run goes on from it."""
    st = read_status_document(storage).get("status")
    try:
        return RunStatus.from_dict(st) if isinstance(st, Mapping) else RunStatus()
    except (KeyError, TypeError, ValueError, AttributeError):
        return RunStatus()


def read_reports(storage: Storage, damaged: list[str] | None = None) -> dict[int, rec.RoundReport]:
    """Every merged round's readable report (read only: nothing is repaired here; the run's loop sets damaged ones
    aside and merges their rounds again). `damaged` collects a line for each report found unreadable."""
    out = {}
    for key in storage.list("merge/"):
        rnd = round_of(key)
        if not rnd or key != rec.round_report_key(rnd):
            continue
        try:
            out[rnd] = checked_report(storage.read_bytes(key), rnd)
        except KeyError:
            continue
        except ValueError as exc:
            if damaged is not None:
                damaged.append(f"{storage.location(key)}: {exc}")
    return out


def _unlike_its_shards(plan: rec.RoundPlan, sizes: dict[int, int]) -> str:
    """How a round plan decided again differs from the shards of its round on storage (seed -> the examples each
    marker says it was asked; 0: a marker older than that field), or "" when it is their plan."""
    stray = sorted(set(sizes) - set(plan.seeds))
    if stray:
        return f"seeds {list(plan.seeds)}, not those of its shards on storage ({stray} are not among them)"
    asked = {s.seed: s.examples for s in plan.shards}
    resized = {seed: (n, asked[seed]) for seed, n in sorted(sizes.items()) if n and asked[seed] != n}
    if resized:
        told = ", ".join(f"seed {seed}: asked {was} examples, now {now}" for seed, (was, now) in resized.items())
        return f"other sizes than its shards on storage were made to ({told})"
    return ""
