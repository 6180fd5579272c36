"""Kopf wiring, kept thin: every handler calls `Reconciler.reconcile`, which observes, asks the planner, and applies.

Level-based and restart-safe: child Jobs and round-plan ConfigMaps are read through `@kopf.index`, reports and shard
markers from storage, and every child has a deterministic name, so a restarted operator re-derives the same state
and a create that already happened answers 409 and is skipped. Handlers return None: nothing leaks into
`status.<handler>`; Kopf's own progress lives in annotations under genrun.io.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import kopf
from genrun.operator import conditions as c
from genrun.operator import local
from genrun.operator import manifests as mf
from genrun.operator.api import GROUP, PLURAL, VERSION, GenerationRunSpec, RunRef, SpecError
from genrun.operator.metrics import Metrics
from genrun.operator.planner import (
    CreateMergeJob,
    CreateShardJob,
    Event,
    Observed,
    ObservedJob,
    Plan,
    RecordRound,
    budget_used,
    decide,
    invalid_plan,
)
from genrun.operator.settings import Settings
from genrun.operator.validate import check_manifest
from genrun.worker import records as rec

log = logging.getLogger("genrun.operator")
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RunKey = tuple[str, str]
SECRET_TTL_SECONDS = 60.0
# What the API server answers when it will never accept this object as written: fail the run, do not retry. 401/403
# (the operator's own identity, RBAC or a quota), 404, 408, 409 and 429 are not about the object: retried.
RETRIABLE_4XX = (401, 403, 404, 408, 409, 429)


class UnsafeName(ValueError):
    """A name that is not a Kubernetes object name: never put into an API path."""


class ChildRejected(Exception):
    """The API server refused a child object for good (422 and the like): the run fails with its message."""

    def __init__(self, kind: str, name: str, status: int, message: str) -> None:
        super().__init__(f"the API server refused {kind} {name!r} ({status}): {message}")


def api_path(group_version: str, namespace: str, plural: str, name: str = "", subresource: str = "") -> str:
    """An API path from checked, quoted segments: a name with '/' or '..' can never address another object."""
    root = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    path = f"{root}/namespaces/{_segment(namespace)}/{plural}"
    if name:
        path += f"/{_segment(name)}"
    return path + (f"/{subresource}" if subresource else "")


def _segment(name: str) -> str:
    if not mf.is_object_name(name):
        raise UnsafeName(f"{name[:200]!r} is not a Kubernetes object name")
    return urllib.parse.quote(name, safe="")


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kube:
    """The few API calls the operator makes, over aiohttp (Kopf's own HTTP stack)."""

    def __init__(self, server: str, *, token: str = "", ca: str | None = None, insecure: bool = False) -> None:
        self.server = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.ssl: ssl.SSLContext | bool = False if insecure else (ssl.create_default_context(cafile=ca) if ca else True)
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # for the benchmark's requests-per-shard figure

    @classmethod
    def from_settings(cls, settings: Settings) -> Kube:
        if settings.server:
            return cls(settings.server, insecure=settings.insecure)
        if (SA_DIR / "token").exists():
            import os

            host = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}"
            return cls(host, token=(SA_DIR / "token").read_text().strip(), ca=str(SA_DIR / "ca.crt"))
        from kubernetes import client, config

        config.load_kube_config()  # type: ignore[no-untyped-call]
        cfg = client.Configuration.get_default_copy()
        token = (cfg.api_key or {}).get("authorization", "").removeprefix("Bearer ").strip()
        return cls(cfg.host, token=token, ca=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl)

    def connection_info(self) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=self.server,
            scheme="Bearer" if self.headers else None,
            token=self.headers.get("Authorization", "").removeprefix("Bearer ") or None,
            insecure=self.ssl is False,
        )

    async def _call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers)
        self.requests += 1
        async with self._session.request(
            method, self.server + path, data=None if body is None else json.dumps(body),
            headers={"Content-Type": content_type}, ssl=self.ssl,
        ) as resp:  # fmt: skip
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text

    async def create(self, path: str, body: Mapping[str, Any]) -> bool:
        """True if created, False if it already existed (409); ChildRejected when the API server will never
        accept it (422, 400, 413, ...); a retry (TemporaryError) on anything else."""
        status, out = await self._call("POST", path, body)
        if status == 409:
            return False
        if 400 <= status < 500 and status not in RETRIABLE_4XX:
            meta = body.get("metadata") or {}
            msg = out.get("message") if isinstance(out, dict) else None
            raise ChildRejected(
                str(body.get("kind", "object")), str(meta.get("name", "")), status, str(msg or out)[:1000]
            )
        if status >= 300:
            raise kopf.TemporaryError(f"POST {path}: {status} {str(out)[:300]}", delay=5)
        return True

    async def get(self, path: str) -> Any:
        status, out = await self._call("GET", path)
        if status == 404:
            return None
        if status >= 300:
            raise kopf.TemporaryError(f"GET {path}: {status} {str(out)[:300]}", delay=5)
        return out

    async def patch_status(self, path: str, status: Mapping[str, Any]) -> None:
        code, out = await self._call("PATCH", path + "/status", {"status": status}, "application/merge-patch+json")
        if code >= 300 and code != 404:
            raise kopf.TemporaryError(f"PATCH {path}/status: {code} {str(out)[:300]}", delay=5)

    async def delete(self, path: str) -> None:
        await self._call("DELETE", path, {"propagationPolicy": "Background"})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def run_path(ns: str, name: str) -> str:
    return api_path(f"{GROUP}/{VERSION}", ns, PLURAL, name)


class Reconciler:
    def __init__(self, settings: Settings, kube: Kube, metrics: Metrics) -> None:
        self.settings, self.kube, self.metrics = settings, kube, metrics
        self.locks: dict[RunKey, asyncio.Lock] = {}
        self.dirty: set[RunKey] = set()
        self.reports: dict[tuple[RunKey, str, int], rec.RoundReport] = {}  # immutable once written: cached
        self.recorded: dict[RunKey, dict[int, rec.RoundPlan]] = {}  # created here, maybe not indexed yet
        self.created_jobs: dict[RunKey, dict[str, ObservedJob]] = {}
        self.storages: dict[tuple[str, str, str], Any] = {}
        self.posted: dict[RunKey, set[tuple[str, str]]] = {}
        self.secrets: dict[tuple[str, str], tuple[float, Any]] = {}
        self.checked: dict[RunKey, tuple[str, GenerationRunSpec | SpecError]] = {}  # spec JSON -> its verdict
        self.markers_ok: set[tuple[str, str]] = set()  # (storage url, key) of markers read and found whole

    # -- observation ---------------------------------------------------------------------------------------------
    async def _storage(self, ref: RunRef, spec: GenerationRunSpec) -> Any:
        from genrun.worker.storage import open_storage

        s3 = spec.output.s3
        secret_version = ""
        keys: dict[str, str] = {}
        if s3 is not None and s3.credentials_secret:
            secret = await self._secret(ref.namespace, s3.credentials_secret)
            if secret is None:
                raise kopf.TemporaryError(
                    f"spec.output.s3.credentialsSecret: Secret {s3.credentials_secret!r} not found in {ref.namespace}",
                    delay=15,
                )
            data = secret.get("data") or {}
            keys = {k: base64.b64decode(data[k]).decode() for k in mf.CREDENTIAL_KEYS if k in data}
            secret_version = json.dumps(keys, sort_keys=True)  # identity only; never logged or stored elsewhere
        cache_key = (spec.output.path, self.settings.storage_endpoint or (s3.endpoint if s3 else ""), secret_version)
        storage = self.storages.get(cache_key)
        if storage is None:
            storage = await asyncio.to_thread(
                open_storage, spec.output.path, cache_key[1], s3.region if s3 else "us-east-1", **_creds(keys)
            )
            self.storages[cache_key] = storage
        return storage

    async def _secret(self, namespace: str, name: str) -> Any:
        """The Secret, re-read at most once a minute: a reconcile per Job event must not cost a GET each."""
        key = (namespace, name)
        hit = self.secrets.get(key)
        if hit is not None and time.monotonic() - hit[0] < SECRET_TTL_SECONDS:
            return hit[1]
        secret = await self.kube.get(api_path("v1", namespace, "secrets", name))
        if secret is not None:
            self.secrets[key] = (time.monotonic(), secret)
        return secret

    def _read_reports(
        self, key: RunKey, storage: Any, rounds: Mapping[int, rec.RoundPlan]
    ) -> tuple[dict[int, rec.RoundReport], frozenset[tuple[int, int]], frozenset[str]]:
        reports: dict[int, rec.RoundReport] = {}
        for rnd in rounds:
            ck = (key, storage.url, rnd)
            if ck in self.reports:
                reports[rnd] = self.reports[ck]
                continue
            with contextlib.suppress(KeyError):
                reports[rnd] = self.reports[ck] = rec.round_report_from(
                    json.loads(storage.read_bytes(rec.round_report_key(rnd)))
                )
        done: set[tuple[int, int]] = set()
        if rounds:
            cur = max(rounds)
            if cur not in reports:  # markers matter only while the round is open (Jobs may be gone by TTL)
                for k in storage.list(f"shards/r{cur:04d}/"):
                    if not k.endswith(".done.json"):
                        continue
                    if (storage.url, k) not in self.markers_ok:  # read once: a published marker never changes
                        marker, why = local.read_marker(storage, k)
                        if marker is None:  # set aside, so the merge never trips on it; counted in the status
                            log.warning("%s/%s: %s; quarantined", key[0], key[1], why)
                            local.quarantine_marker(storage, k, why)
                            continue
                        self.markers_ok.add((storage.url, k))
                    seed = int(k.rsplit("/s", 1)[1].split(".")[0])
                    done.add((cur, seed))
        return reports, frozenset(done), local.quarantined_keys(storage, reports)

    # -- reconcile -------------------------------------------------------------------------------------------------
    async def reconcile(self, body: Mapping[str, Any], jobs: Any, plans: Any) -> None:
        meta = body["metadata"]
        key: RunKey = (meta["namespace"], meta["name"])
        lock = self.locks.setdefault(key, asyncio.Lock())
        if lock.locked():
            self.dirty.add(key)  # coalesce: the running reconcile goes round once more
            return
        async with lock:
            while True:
                self.dirty.discard(key)
                t0 = time.monotonic()
                await self._reconcile_once(body, jobs, plans)
                self.metrics.reconcile.observe(time.monotonic() - t0)
                if key not in self.dirty:
                    break

    async def _reconcile_once(self, body: Mapping[str, Any], jobs_idx: Any, plans_idx: Any) -> None:
        meta = body["metadata"]
        key: RunKey = (meta["namespace"], meta["name"])
        ref = RunRef(meta["name"], meta["namespace"], meta.get("uid", ""), int(meta.get("generation") or 1))
        raw_spec = dict(body.get("spec") or {})
        old_status = dict(body.get("status") or {})
        path = run_path(*key)
        if _rejected(old_status, ref.generation):
            return  # a child was refused for this generation: terminal until the spec changes
        try:
            spec = self._check(key, body, raw_spec)
        except SpecError as exc:
            await self._publish(body, path, invalid_plan(ref, exc.errors), old_status, ref, 0, {})
            return
        errors = mf.run_errors(spec, self.settings)
        if errors:  # before any request that uses the spec's names or endpoints
            await self._publish(body, path, invalid_plan(ref, errors), old_status, ref, 0, {})
            return
        try:
            await self._apply(body, key, ref, raw_spec, spec, old_status, jobs_idx, plans_idx)
        except (ChildRejected, mf.TooLarge) as exc:
            reason = c.CHILD_REJECTED if isinstance(exc, ChildRejected) else c.INVALID_SPEC
            await self._publish(body, path, invalid_plan(ref, [str(exc)], reason), old_status, ref, 0, {})

    def _check(self, key: RunKey, body: Mapping[str, Any], raw_spec: dict[str, Any]) -> GenerationRunSpec:
        """The one validation path (validate.check_manifest: schema, CEL, semantics, children's names), run once per
        distinct spec of a run: a reconcile per Job event must not re-validate an unchanged spec."""

        text = json.dumps(raw_spec, sort_keys=True, default=str)
        hit = self.checked.get(key)
        if hit is None or hit[0] != text:
            try:
                hit = (text, check_manifest(body)[1])
            except SpecError as exc:
                hit = (text, exc)
            self.checked[key] = hit
        if isinstance(hit[1], SpecError):
            raise hit[1]
        return hit[1]

    async def _apply(
        self,
        body: Mapping[str, Any],
        key: RunKey,
        ref: RunRef,
        raw_spec: dict[str, Any],
        spec: GenerationRunSpec,
        old_status: dict[str, Any],
        jobs_idx: Any,
        plans_idx: Any,
    ) -> None:
        path = run_path(*key)

        rounds: dict[int, rec.RoundPlan] = {p.round: p for p in _values(plans_idx, key)}
        rounds.update({r: p for r, p in self.recorded.get(key, {}).items() if r not in rounds})
        indexed = {
            j.name: j
            for j in (ObservedJob(**{k: v for k, v in s.items() if k != "active"}) for s in _values(jobs_idx, key))
        }
        overlay = self.created_jobs.setdefault(key, {})
        for name in list(overlay):
            if name in indexed:
                del overlay[name]
        jobs = tuple({**overlay, **indexed}.values())
        storage = await self._storage(ref, spec)
        reports, done, quarantined = await asyncio.to_thread(self._read_reports, key, storage, rounds)
        obs = Observed(rounds, jobs, done, reports, quarantined)
        plan = decide(ref, spec, obs)

        events: list[Event] = []
        for _ in range(2):
            new_round = next((a.plan for a in plan.actions if isinstance(a, RecordRound)), None)
            if new_round is None:
                break
            cm = mf.round_configmap(ref, new_round)
            if await self.kube.create(api_path("v1", ref.namespace, "configmaps"), cm):
                events += plan.events  # the round really starts now: announce it once
            else:
                existing = await self.kube.get(api_path("v1", ref.namespace, "configmaps", cm["metadata"]["name"]))
                new_round = rec.round_plan_from(json.loads(existing["data"]["plan.json"]))
            self.recorded.setdefault(key, {})[new_round.round] = new_round
            # Decide again on the recorded plan: Jobs always come from what was recorded, never from a re-plan.
            obs = Observed({**rounds, new_round.round: new_round}, jobs, done, reports, quarantined)
            plan = decide(ref, spec, obs)

        creates = []
        for a in plan.actions:
            if isinstance(a, CreateShardJob):
                manifest = mf.shard_job(ref, a, spec, self.settings)
                job = ObservedJob(a.name, "shard", a.shard.round, a.shard.seed, a.attempt, "Pending")
            elif isinstance(a, CreateMergeJob):
                manifest = mf.merge_job(ref, a, spec, self.settings)
                job = ObservedJob(a.name, "merge", a.round, None, a.attempt, "Pending")
            else:
                continue
            creates.append(self._create_job(ref, mf.job_configmap(ref, a, raw_spec), manifest, job, overlay))
        await asyncio.gather(*creates)  # each Job after its own ConfigMap; Jobs side by side
        states = _shard_states(_values(jobs_idx, key))
        await self._publish(
            body,
            path,
            plan,
            old_status,
            ref,
            spec.target.unique_examples,
            states,
            events,
            budget_used(spec, plan.status),
        )

    async def _create_job(
        self, ref: RunRef, cm: dict[str, Any], job: dict[str, Any], seen: ObservedJob, overlay: dict[str, ObservedJob]
    ) -> None:
        # The job spec first (a 409 after a restart is the same spec), then the Job that mounts it.
        await self.kube.create(api_path("v1", ref.namespace, "configmaps"), cm)
        await self.kube.create(api_path("batch/v1", ref.namespace, "jobs"), job)
        overlay[seen.name] = seen

    async def _publish(
        self,
        body: Mapping[str, Any],
        path: str,
        plan: Plan,
        old: dict[str, Any],
        ref: RunRef,
        target: int,
        states: dict[str, int],
        events: list[Event] | None = None,
        budget: float = 0.0,
    ) -> None:
        conds = c.merge_conditions(old.get("conditions"), plan.conditions, ref.generation, _now())
        status = {**plan.status, "conditions": conds}
        if _strip_times(status) != _strip_times({k: old.get(k) for k in status}):
            await self.kube.patch_status(path, status)
        for ev in [*(events or []), *_quarantine_events(old, status)]:
            kopf.event(body, type=ev.type, reason=ev.reason, message=ev.message)  # type: ignore[arg-type]
        posted = self.posted.setdefault((ref.namespace, ref.name), set())
        for t in c.transitions(old.get("conditions"), plan.conditions):
            # Terminal and suspended states are announced once, when they begin (the body may be a stale snapshot).
            if (
                t.status == "True"
                and t.type in (c.SUCCEEDED, c.FAILED, c.SUSPENDED)
                and (t.type, t.reason) not in posted
            ):
                posted.add((t.type, t.reason))
                kopf.event(body, type="Warning" if t.type == c.FAILED else "Normal", reason=t.reason, message=t.message)  # type: ignore[arg-type]
        self.metrics.runs.update(ref.namespace, ref.name, target, status, states, budget)

    async def cleanup(self, ns: str, name: str, jobs_idx: Any, plans_idx: Any) -> None:
        """On delete: children go (owner references do this on a real cluster; this also covers API servers
        without a garbage collector), and the run's metrics stop being exported."""
        for s in _values(jobs_idx, (ns, name)):
            await self.kube.delete(api_path("batch/v1", ns, "jobs", s["name"]))
            await self.kube.delete(api_path("v1", ns, "configmaps", s["name"]))  # the Job's job-spec ConfigMap
        for p in _values(plans_idx, (ns, name)):
            await self.kube.delete(api_path("v1", ns, "configmaps", f"{name}-r{p.round}-plan"))
        self.metrics.runs.forget(ns, name)
        for store in (self.recorded, self.created_jobs, self.posted, self.checked):
            store.pop((ns, name), None)


def _rejected(status: Mapping[str, Any], generation: int) -> bool:
    """Whether this generation already failed because the API server refused a child (never retried)."""
    return any(
        isinstance(cnd, dict)
        and cnd.get("type") == c.FAILED
        and cnd.get("status") == "True"
        and cnd.get("reason") == c.CHILD_REJECTED
        and cnd.get("observedGeneration") == generation
        for cnd in status.get("conditions") or []
    )


def _quarantine_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """A Warning when more shards were set aside as unreadable than the last status said."""
    before = int(((old.get("totals") or {}).get("shardsQuarantined")) or 0)
    now = int((new.get("totals") or {}).get("shardsQuarantined", 0) or 0)
    if now <= before:
        return []
    msg = (
        f"{now} shard(s) quarantined as unreadable (set aside under quarantine/ in the output, not merged); "
        "see the round's report.md"
    )
    return [Event("Warning", c.SHARDS_QUARANTINED, msg)]


def _creds(keys: Mapping[str, str]) -> dict[str, str]:
    if not keys:
        return {}
    return {"access_key": keys.get("AWS_ACCESS_KEY_ID", ""), "secret_key": keys.get("AWS_SECRET_ACCESS_KEY", "")}


def _values(index: Any, key: RunKey) -> list[Any]:
    try:
        return list(index.get(key, []))
    except AttributeError:
        return list(index[key]) if key in index else []


def _shard_states(summaries: list[Any]) -> dict[str, int]:
    out = {"pending": 0, "running": 0, "succeeded": 0, "failed": 0}
    for s in summaries:
        if s["kind"] != "shard":
            continue
        phase = s["phase"]
        if phase == "Running" and not s.get("active"):
            phase = "Pending"
        out[phase.lower()] += 1
    return out


def _strip_times(status: Mapping[str, Any]) -> Any:
    out = dict(status)
    if isinstance(out.get("conditions"), list):
        out["conditions"] = [{k: v for k, v in cnd.items() if k != "lastTransitionTime"} for cnd in out["conditions"]]
    return out


# ------------------------------------------------------------------------------------------------------------------
# Registration: one function, so a test can start an operator with its own registry and settings.


def register(settings: Settings, registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    on = {"registry": registry}
    selector = {"app.kubernetes.io/managed-by": mf.MANAGED_BY}

    @kopf.on.startup(id="configure", **on)  # type: ignore[arg-type]
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = f"{GROUP}/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING
        settings.batching.idle_timeout = 30

    @kopf.on.login(id="login", **on)  # type: ignore[arg-type]
    def login(**_: Any) -> kopf.ConnectionInfo:
        return reconciler.kube.connection_info()

    # Explicit ids: an index reaches handlers as a keyword argument named by its id.
    @kopf.index("batch", "v1", "jobs", labels=selector, id="jobs", **on)  # type: ignore[arg-type]
    def jobs(body: kopf.Body, namespace: str, **_: Any) -> Any:
        summary = mf.job_summary(dict(body))
        return {(namespace, body["metadata"]["labels"][mf.LABEL_RUN]): summary} if summary else None

    @kopf.index("", "v1", "configmaps", labels={**selector, mf.LABEL_KIND: "round-plan"}, id="plans", **on)  # type: ignore[arg-type]
    def plans(body: kopf.Body, namespace: str, **_: Any) -> Any:
        try:
            plan = rec.round_plan_from(json.loads(body.get("data", {})["plan.json"]))
        except (KeyError, ValueError, TypeError):
            return None
        return {(namespace, body["metadata"]["labels"][mf.LABEL_RUN]): plan}

    @kopf.index(GROUP, VERSION, PLURAL, id="runs", **on)  # type: ignore[arg-type]
    def runs(body: kopf.Body, namespace: str, name: str, **_: Any) -> Any:
        snapshot = {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body.metadata)}
        return {(namespace, name): {**snapshot, "spec": dict(body.spec), "status": dict(body.status)}}

    async def reconcile(body: kopf.Body, jobs: kopf.Index[Any, Any], plans: kopf.Index[Any, Any], **_: Any) -> None:
        await reconciler.reconcile(body, jobs, plans)

    for decorator in (kopf.on.create, kopf.on.resume, kopf.on.update):
        decorator(GROUP, VERSION, PLURAL, id="reconcile", **on)(reconcile)  # type: ignore[arg-type]
    kopf.timer(GROUP, VERSION, PLURAL, interval=settings.timer_seconds, id="periodic", **on)(reconcile)  # type: ignore[arg-type]

    @kopf.on.event("batch", "v1", "jobs", labels=selector, id="child-changed", **on)  # type: ignore[arg-type]
    async def child_changed(body: kopf.Body, namespace: str, runs: kopf.Index[Any, Any], jobs: kopf.Index[Any, Any],
                            plans: kopf.Index[Any, Any], **_: Any) -> None:  # fmt: skip
        # React to a Job's completion at once, instead of waiting for the timer.
        owner = body.get("metadata", {}).get("labels", {}).get(mf.LABEL_RUN)
        for run in _values(runs, (namespace, owner)):
            await reconciler.reconcile(run, jobs, plans)

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup", **on)  # type: ignore[arg-type]
    async def deleted(
        namespace: str, name: str, jobs: kopf.Index[Any, Any], plans: kopf.Index[Any, Any], **_: Any
    ) -> None:
        await reconciler.cleanup(namespace, name, jobs, plans)


def build(settings: Settings) -> tuple[kopf.OperatorRegistry, Reconciler]:
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(settings, Kube.from_settings(settings), Metrics())
    register(settings, registry, reconciler)
    return registry, reconciler


async def operator_main(settings: Settings, stop_flag: Any = None, ready_flag: Any = None) -> Reconciler:
    registry, reconciler = build(settings)
    reconciler.metrics.serve(settings.metrics_port)
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=not settings.namespace,
            namespaces=[settings.namespace] if settings.namespace else (),
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            standalone=True,
        )
    finally:
        with contextlib.suppress(Exception):
            await reconciler.kube.close()
    return reconciler


def run_operator() -> int:
    from genrun.operator.settings import SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        from genrun.operator.cli import UserError

        raise UserError(f"operator settings: {exc}") from exc
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(operator_main(settings))
    return 0
