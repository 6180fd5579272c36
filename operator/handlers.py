"""The cluster backend: one Kopf daemon per GenerationRun drives its RunLoop (operator/loop.py), woken by its child
Jobs through the `jobs` index; the Jobs are Kubernetes Jobs and the status is also patched into the custom resource.

Level-based and restart-safe: child Jobs are read through `@kopf.index`, round plans, reports and shard markers
from storage, and every child has a deterministic name, so a restarted operator re-derives the same state and a
create that already happened answers 409 and is skipped. Handlers return None: nothing leaks into
`status.<handler>`; Kopf's own progress lives in annotations under genrun.io.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import kopf
from genrun.contract.api import GROUP, PLURAL, VERSION, GenerationRunSpec, RunRef, SpecError
from genrun.contract.errors import Rejected, UserError
from genrun.operator import conditions as c
from genrun.operator import manifests as mf
from genrun.operator.kube import Kube, api_path, run_path
from genrun.operator.loop import RunLoop, publication
from genrun.operator.metrics import Metrics
from genrun.operator.planner import CreateMergeJob, CreateShardJob, Event, ObservedJob, budget_used, invalid_plan
from genrun.operator.settings import Settings, SettingsError
from genrun.operator.validate import check_manifest
from genrun.worker.storage import StorageError

log = logging.getLogger("genrun.operator")
RunKey = tuple[str, str]
SECRET_TTL_SECONDS = 60.0


class KubeRun:
    """One GenerationRun on the cluster: the backend of its RunLoop (Jobs, status, Events), and the steps that come
    before the loop (validation, credentials, storage). Lives as long as the run's daemon; holds nothing another
    step could not re-derive."""

    def __init__(self, settings: Settings, kube: Kube, metrics: Metrics, body: kopf.Body, index: Any) -> None:
        self.settings, self.kube, self.metrics, self.body, self.index = settings, kube, metrics, body, index
        self.key: RunKey = (body.metadata["namespace"], body.metadata["name"])
        self.status: dict[str, Any] = dict(body.status or {})  # last published
        self.spec_text = ""
        self.spec: GenerationRunSpec | None = None  # None while the spec is invalid
        self.loop: RunLoop | None = None
        self.created: dict[str, ObservedJob] = {}  # created by this daemon, not in the index yet
        self.storage: Any = None
        self.storage_key: tuple[str, ...] = ()
        self.storage_read = 0.0

    async def step(self) -> None:
        meta = self.body.metadata
        ref = RunRef(meta["name"], meta["namespace"], meta.get("uid") or "", int(meta.get("generation") or 1))
        raw_spec = dict(self.body.spec or {})
        if _rejected(self.status, ref.generation):
            return  # a child was refused for this generation: terminal until the spec changes
        text = json.dumps(raw_spec, sort_keys=True, default=str)
        if text != self.spec_text:  # validated once per distinct spec: the one validation path
            self.loop, self.spec = None, None
            doc = {"apiVersion": self.body["apiVersion"], "kind": self.body["kind"], "metadata": dict(meta),
                   "spec": raw_spec}  # fmt: skip
            try:
                spec = check_manifest(doc)[1]
                errors = mf.run_errors(spec, self.settings)  # before any request that uses its names or endpoints
            except SpecError as exc:
                errors = exc.errors
            if errors:
                status, events, changed = publication(self.status, invalid_plan(ref, errors), ref.generation)
                await self.publish(status, events, changed)
                self.status = status
            else:
                self.spec = spec
            self.spec_text = text
        if self.spec is None:
            return
        storage = await self._storage(self.spec)
        if self.loop is None:
            self.loop = RunLoop(ref, raw_spec, self.spec, storage, self, status=self.status)
        self.loop.storage = storage
        await self.loop.step()
        self.status = self.loop.status

    async def _storage(self, spec: GenerationRunSpec) -> Any:
        """The run's storage with the credentials of its Secret, re-read at most once a minute (rotation)."""
        from genrun.worker.storage import open_storage

        if self.storage_key and time.monotonic() - self.storage_read < SECRET_TTL_SECONDS:
            return self.storage
        s3, keys = spec.output.s3, {}
        if s3 is not None and s3.credentials_secret:
            secret = await self.kube.get(api_path("v1", self.key[0], "secrets", s3.credentials_secret))
            if secret is None:
                raise kopf.TemporaryError(
                    f"spec.output.s3.credentialsSecret: Secret {s3.credentials_secret!r} not found in {self.key[0]}"
                )
            data = secret.get("data") or {}
            keys = {k: base64.b64decode(data[k]).decode() for k in mf.CREDENTIAL_KEYS if k in data}
        endpoint = self.settings.storage_endpoint or (s3.endpoint if s3 else "")
        key = (spec.output.path, endpoint, json.dumps(keys, sort_keys=True))  # identity only; never logged
        if key != self.storage_key:
            region = s3.region if s3 else "us-east-1"
            self.storage = await asyncio.to_thread(open_storage, key[0], endpoint, region, **_creds(keys))
            self.storage_key = key
        self.storage_read = time.monotonic()
        return self.storage

    # -- the loop's backend ------------------------------------------------------------------------------------
    async def jobs(self) -> Sequence[ObservedJob]:
        indexed = {s["name"]: ObservedJob(**{k: v for k, v in s.items() if k != "active"}) for s in self._summaries()}
        for name in self.created.keys() & indexed.keys():
            del self.created[name]
        return tuple({**self.created, **indexed}.values())

    async def start(self, action: CreateShardJob | CreateMergeJob) -> None:
        assert self.loop is not None and self.spec is not None  # called by the loop only
        ref, ns, spec = self.loop.ref, self.key[0], self.spec
        try:
            cm = mf.job_configmap(ref, action, self.loop.raw_spec)
        except mf.TooLarge as exc:
            raise Rejected(c.INVALID_SPEC, str(exc)) from exc
        if isinstance(action, CreateShardJob):
            job = mf.shard_job(ref, action, spec, self.settings)
            seen = ObservedJob(action.name, "shard", action.shard.round, action.shard.seed, action.attempt, "Pending")
        else:
            job = mf.merge_job(ref, action, spec, self.settings)
            seen = ObservedJob(action.name, "merge", action.round, None, action.attempt, "Pending")
        # The job spec first (a 409 after a restart is the same spec), then the Job that mounts it.
        await self.kube.create(api_path("v1", ns, "configmaps"), cm)
        await self.kube.create(api_path("batch/v1", ns, "jobs"), job)
        self.created[action.name] = seen

    async def publish(self, status: dict[str, Any], events: Sequence[Event], changed: bool) -> None:
        if changed:
            await self.kube.patch_status(run_path(*self.key), status)
        for ev in events:
            kopf.event(self.body, type=ev.type, reason=ev.reason, message=ev.message)
        spec = self.spec
        target, budget = (spec.target.unique_examples, budget_used(spec, status)) if spec else (0, 0.0)
        self.metrics.runs.update(*self.key, target, status, _shard_states(self._summaries()), budget)

    def _summaries(self) -> list[Any]:
        return _values(self.index, self.key)


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


# ------------------------------------------------------------------------------------------------------------------
# Registration: one function, so a test can start an operator with its own registry and settings.


def register(settings: Settings, registry: kopf.OperatorRegistry, kube: Kube, metrics: Metrics) -> None:
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
        return kube.connection_info()

    wakers: dict[RunKey, asyncio.Event] = {}

    # An index reaches handlers as a keyword argument named by its id. A Job's change wakes its run's daemon.
    @kopf.index("batch", "v1", "jobs", labels=selector, id="jobs", **on)  # type: ignore[arg-type]
    def jobs(body: kopf.Body, namespace: str, **_: Any) -> Any:
        summary = mf.job_summary(dict(body))
        if not summary:
            return None
        key = (namespace, body["metadata"]["labels"][mf.LABEL_RUN])
        if key in wakers:
            wakers[key].set()
        return {key: summary}

    @kopf.daemon(GROUP, VERSION, PLURAL, id="loop", cancellation_timeout=1.0, **on)  # type: ignore[arg-type]
    async def drive(body: kopf.Body, stopped: kopf.DaemonStopped, jobs: kopf.Index[Any, Any], **_: Any) -> None:
        """One daemon per GenerationRun drives its loop: a step when a child Job changes, the spec changes, or
        every timer_seconds; an error is logged and the next step tries again (nothing is lost between steps)."""
        run = KubeRun(settings, kube, metrics, body, jobs)
        wake = wakers[run.key] = asyncio.Event()
        try:
            while not stopped:
                wake.clear()
                t0 = time.monotonic()
                try:
                    await run.step()
                except (kopf.TemporaryError, OSError, StorageError, aiohttp.ClientError) as exc:
                    log.warning("%s/%s: %s; trying again", *run.key, exc)
                except Exception:  # a bug: its traceback in the log, and the run goes on being driven
                    log.exception("%s/%s: step failed", *run.key)
                metrics.reconcile.observe(time.monotonic() - t0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), settings.timer_seconds)
        finally:
            if wakers.get(run.key) is wake:
                del wakers[run.key]

    @kopf.on.update(GROUP, VERSION, PLURAL, id="spec-changed", field="spec", **on)  # type: ignore[arg-type]
    def spec_changed(namespace: str, name: str, **_: Any) -> None:
        if (namespace, name) in wakers:
            wakers[(namespace, name)].set()

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup", **on)  # type: ignore[arg-type]
    async def deleted(namespace: str, name: str, jobs: kopf.Index[Any, Any], **_: Any) -> None:
        """Children go (owner references do this on a real cluster; this also covers API servers without a
        garbage collector), and the run's metrics stop being exported."""
        for s in _values(jobs, (namespace, name)):
            await kube.delete(api_path("batch/v1", namespace, "jobs", s["name"]))
            await kube.delete(api_path("v1", namespace, "configmaps", s["name"]))  # the Job's job-spec ConfigMap
        metrics.runs.forget(namespace, name)


def build(settings: Settings) -> tuple[kopf.OperatorRegistry, Kube, Metrics]:
    registry, kube, metrics = kopf.OperatorRegistry(), Kube.from_settings(settings), Metrics()
    register(settings, registry, kube, metrics)
    return registry, kube, metrics


async def operator_main(settings: Settings, stop_flag: Any = None, ready_flag: Any = None) -> None:
    registry, kube, metrics = build(settings)
    metrics.serve(settings.metrics_port)
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
            await kube.close()


def run_operator() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise UserError(f"operator settings: {exc}") from exc
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(operator_main(settings))
    return 0
