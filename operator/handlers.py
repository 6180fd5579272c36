"""The cluster backend: one Kopf daemon per GenerationRun drives its RunLoop (operator/loop.py), woken by its child
Jobs through the `jobs` index; the Jobs are Kubernetes Jobs and the status is also patched into the custom resource.

Level-based and restart-safe: child Jobs are read through `@kopf.index`, round plans, reports and shard markers
from storage, and every child has a deterministic name, so a restarted operator re-derives the same state and a
create that already happened answers 409 and is skipped. Handlers return None: nothing leaks into
`status.<handler>`; Kopf's own state is set up in kopf_state.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aiohttp
import kopf
from genrun.contract import records as rec
from genrun.contract.api import GROUP, PLURAL, VERSION, GenerationRunSpec, RunRef, SpecError
from genrun.contract.errors import Rejected
from genrun.contract.status import RunStatus
from genrun.operator import conditions as c
from genrun.operator import manifests as mf
from genrun.operator.kopf_state import persistence
from genrun.operator.kube import Kube
from genrun.operator.loop import RunLoop, publish_plan, started
from genrun.operator.metrics import Metrics
from genrun.operator.planner import CreateMergeJob, CreateShardJob, Event, ObservedJob, Plan, budget_used, invalid_plan
from genrun.operator.settings import Settings
from genrun.operator.validate import check_manifest
from genrun.worker.storage import StorageError

log = logging.getLogger("genrun.operator")
RunKey = tuple[str, str]
SECRET_TTL_SECONDS = 60.0
ENGINE_REPLICAS = 1  # one run-owned engine: it batches every shard Job's requests (docs/sizing.md)
SESSION_SECONDS = 30.0  # an engine pod's record is rewritten at least this often: what a lost operator leaves uncounted
START_TIMEOUT_SECONDS = 60.0  # a Job's two creates; past it, TimeoutError (an OSError): the step is tried again


class KubeRun:
    """One GenerationRun on the cluster: the backend of its RunLoop (Jobs, status, Events), and what comes before the
    loop (validation, the Secret's credentials, storage). Lives as long as the run's daemon; holds nothing another
    step could not re-derive."""

    def __init__(
        self, settings: Settings, kube: Kube, metrics: Metrics, body: kopf.Body, index: Any, starts: asyncio.Semaphore
    ) -> None:
        self.settings, self.kube, self.metrics, self.body, self.index = settings, kube, metrics, body, index
        self.starts = starts  # shared by every run: a run's Jobs start together, and runs take turns (FIFO)
        self.key: RunKey = (body.metadata["namespace"], body.metadata["name"])
        self.status = RunStatus.from_dict(body.status or {})  # last published
        self.spec_text = ""  # the spec last validated
        self.loop: RunLoop | None = None  # None while the spec is invalid
        self.created: dict[str, ObservedJob] = {}  # created by this daemon, not in the index yet
        self.storage: tuple[tuple[str, ...], float, Any] = ((), 0.0, None)  # identity, when read, Storage
        self.engine: mf.EngineState | None = None  # the run's engine as read in this step (spec.worker.engine: shared)
        self.engine_read = False
        self.sessions: dict[str, tuple[rec.EngineSession, float]] = {}  # engine pod -> its record, when written

    async def step(self) -> None:
        meta, raw_spec = self.body.metadata, dict(self.body.spec or {})
        ref = RunRef(meta["name"], meta["namespace"], meta.get("uid") or "", int(meta.get("generation") or 1))
        text = json.dumps(raw_spec, sort_keys=True, default=str)
        if text != self.spec_text:  # validated once per distinct spec: the one validation path
            self.loop = None
            doc = {"apiVersion": self.body["apiVersion"], "kind": self.body["kind"], "metadata": dict(meta),
                   "spec": raw_spec}  # fmt: skip
            try:
                spec = check_manifest(doc)[1]
                # Before any request that uses its names or endpoints: no Secret is read for a refused run.
                errors, reason = mf.run_errors(spec, self.settings), c.INVALID_SPEC
                if not errors:
                    errors, reason = mf.not_allowed(spec, self.settings), c.NOT_ALLOWED
            except SpecError as exc:
                errors, reason = exc.errors, c.INVALID_SPEC
            if errors:
                self.status = await publish_plan(self, self.status, invalid_plan(errors, reason), ref.generation)
            else:
                self.loop = RunLoop(ref, raw_spec, spec, await self._storage(spec), self, status=self.status)
            self.spec_text = text
        if self.loop is not None:
            self.loop.storage = await self._storage(self.loop.spec)
            self.engine_read = False
            plan = await self.loop.step()
            self.status = self.loop.status
            if mf.uses_run_engine(self.loop.spec):
                await self._engine_after(plan)

    async def _storage(self, spec: GenerationRunSpec) -> Any:
        """The run's storage with the credentials of its Secret, re-read at most once a minute (rotation)."""
        from genrun.worker.storage import open_storage

        key, read, storage = self.storage
        if key and time.monotonic() - read < SECRET_TTL_SECONDS:
            return storage
        s3, keys = spec.output.s3, {}
        endpoint = self.settings.storage_endpoint or (s3.endpoint if s3 else "")
        if not self.settings.endpoint_allowed(endpoint):
            # step() refuses such a run first (Failed/NotAllowed); this guard keeps the Secret unread regardless.
            raise PermissionError(
                f"spec.output.s3.endpoint: {endpoint[:200]!r} is not covered by GENRUN_ALLOWED_ENDPOINT_HOSTS; "
                "its S3 credentials are not read"
            )
        if s3 is not None and s3.credentials_secret:
            data = await self.kube.secret_data(self.key[0], s3.credentials_secret)
            if data is None:
                raise kopf.TemporaryError(
                    f"spec.output.s3.credentialsSecret: Secret {s3.credentials_secret!r} not found in {self.key[0]}"
                )
            keys = {k: base64.b64decode(data[k]).decode() for k in mf.CREDENTIAL_KEYS if k in data}
        new_key = (spec.output.path, endpoint, json.dumps(keys, sort_keys=True))  # identity only; never logged
        if new_key != key:
            creds = {
                "access_key": keys.get("AWS_ACCESS_KEY_ID", ""),
                "secret_key": keys.get("AWS_SECRET_ACCESS_KEY", ""),
            }
            region = s3.region if s3 else "us-east-1"
            storage = await asyncio.to_thread(
                open_storage, spec.output.path, endpoint, region, **(creds if keys else {})
            )
        self.storage = (new_key, time.monotonic(), storage)
        return storage

    # -- the loop's backend ------------------------------------------------------------------------------------
    def _indexed(self) -> dict[str, ObservedJob]:
        return {s["name"]: ObservedJob(**s) for s in self.index.get(self.key, [])}

    async def jobs(self) -> Sequence[ObservedJob]:
        indexed = self._indexed()
        self.created = {name: job for name, job in self.created.items() if name not in indexed}
        return (*self.created.values(), *indexed.values())

    async def start(self, action: CreateShardJob | CreateMergeJob) -> None:
        assert self.loop is not None  # called by the loop only
        loop, ns = self.loop, self.key[0]
        raw = loop.raw_spec
        if isinstance(action, CreateShardJob) and mf.uses_run_engine(loop.spec):
            engine = await self._engine(ENGINE_REPLICAS)
            if engine is None or engine.ready_replicas < 1:
                return  # not created: the planner asks again at the next step, once the engine answers
            raw = mf.with_run_engine(loop.ref, loop.spec, raw)
        try:
            cm = mf.job_configmap(loop.ref, action, raw)
        except mf.TooLarge as exc:
            raise Rejected(c.INVALID_SPEC, str(exc)) from exc
        if isinstance(action, CreateShardJob):
            job = mf.shard_job(loop.ref, action, loop.spec, self.settings)
        else:
            job = mf.merge_job(loop.ref, action, loop.spec, self.settings)
        # The job spec first (a 409 after a restart is the same spec), then the Job that mounts it.
        async with self.starts, asyncio.timeout(START_TIMEOUT_SECONDS):  # a hung request must not hold a slot
            await self.kube.create("ConfigMap", ns, cm)
            await self.kube.create("Job", ns, job)
        self.created[action.name] = started(action)

    async def _engine(self, replicas: int) -> mf.EngineState | None:
        """The run's engine, created at `replicas` (with its Service) when it has none or scaled when it has fewer:
        read once a step."""
        assert self.loop is not None
        ref, spec, ns = self.loop.ref, self.loop.spec, self.key[0]
        await self._read_engine()
        if self.engine is None and replicas > 0:
            await self.kube.apply("Service", ns, mf.engine_service(ref, spec))
            await self.kube.apply("Deployment", ns, mf.engine_deployment(ref, spec, self.settings, replicas))
            self.engine = mf.EngineState(replicas, 0, ())
        elif self.engine is not None and self.engine.replicas != replicas and (replicas > 0 or self.engine.replicas):
            await self.kube.scale(ns, mf.engine_name(ref.name), replicas)
            self.engine = dataclasses.replace(self.engine, replicas=replicas)
        return self.engine

    async def _read_engine(self) -> None:
        """The run's engine as the API server has it, read once a step."""
        assert self.loop is not None
        if not self.engine_read:
            self.engine, self.engine_read = await self.kube.engine_state(self.loop.ref), True

    async def _engine_after(self, plan: Plan) -> None:
        """Let the engine's GPUs go once no shard needs them (the run finished, failed or is suspended; a resumed run
        scales it up again at its next shard), and record its pods' device time."""
        assert self.loop is not None
        if plan.finished or plan.condition(c.SUSPENDED).status == "True":
            await self._engine(0)
        else:
            await self._read_engine()
        await asyncio.to_thread(self._record_sessions, self.engine)

    def _record_sessions(self, engine: mf.EngineState | None) -> None:
        """Each engine pod is one engine start: its device time runs from its container's start, its start-up to its
        Ready time. Written when it changes and at least every SESSION_SECONDS while it runs; a pod that is gone is
        written stopped, as last seen."""
        assert self.loop is not None
        w, now, storage = self.loop.spec.worker, time.time(), self.loop.storage
        seen = set()
        for pod in engine.pods if engine else ():
            started = mf.unix_time(pod.started_at)
            if started is None:
                continue
            seen.add(pod.name)
            ready = mf.unix_time(pod.ready_at) or 0.0
            old, written = self.sessions.get(pod.name, (None, 0.0))
            session = rec.EngineSession(pod.name, started, ready, now, max(1, w.gpus), "gpu" if w.gpus else "cpu")
            if old is None or old.ready != ready or now - written >= SESSION_SECONDS:
                storage.write_bytes(rec.engine_session_key(pod.name), rec.to_json(session).encode())
                self.sessions[pod.name] = (session, now)
        for name, (old, _) in list(self.sessions.items()):
            if name not in seen:
                stopped = dataclasses.replace(old, stopped=True)
                storage.write_bytes(rec.engine_session_key(name), rec.to_json(stopped).encode())
                del self.sessions[name]

    async def publish(self, status: RunStatus, events: Sequence[Event], changed: bool) -> None:
        if changed:
            await self.kube.patch_run_status(*self.key, status.to_dict())
        for ev in events:
            kopf.event(self.body, type=ev.type, reason=ev.reason, message=ev.message)
        spec = self.loop.spec if self.loop else None
        shards = Counter(j.phase.lower() for j in self._indexed().values() if j.kind == "shard")
        target, budget = (spec.target.unique_examples, budget_used(spec, status)) if spec else (0, 0.0)
        self.metrics.runs.update(*self.key, target, status, shards, budget)


# ------------------------------------------------------------------------------------------------------------------
# Registration: one function, so a test can start an operator with its own registry and settings.


def register(settings: Settings, registry: kopf.OperatorRegistry, kube: Kube, metrics: Metrics) -> None:
    on = {"registry": registry}
    selector = {"app.kubernetes.io/managed-by": mf.MANAGED_BY}
    wakers: dict[RunKey, asyncio.Event] = {}
    # Without a bound, 50 runs starting 20 Jobs each interleave their 2,000 creates and every run's step (and so its
    # next status) waits for all of them; bounded, a run's creates finish together and its step ends early.
    starts = asyncio.Semaphore(settings.start_concurrency)

    @kopf.on.startup(id="configure", **on)  # type: ignore[arg-type]
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        persistence(settings)
        settings.posting.level = logging.WARNING
        settings.batching.idle_timeout = 30

    @kopf.on.login(id="login", **on)  # type: ignore[arg-type]
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return await kube.connection_info()

    # Async handlers run in the event loop (a sync one runs in a thread, where setting an asyncio.Event is unsafe).
    # An index reaches handlers as a keyword argument named by its id.
    @kopf.index("batch", "v1", "jobs", labels=selector, id="jobs", **on)  # type: ignore[arg-type]
    async def jobs(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> Any:
        summary = mf.job_summary(dict(body))
        return {(namespace, labels[mf.LABEL_RUN]): summary} if summary else None

    # Kopf indexes each event before it calls the other handlers: a daemon woken here reads the Job's new phase.
    @kopf.on.event("batch", "v1", "jobs", labels=selector, id="wake", **on)  # type: ignore[arg-type]
    # The run's engine getting ready (or going) lets its shard Jobs start: a step then, not at the timer.
    @kopf.on.event("apps", "v1", "deployments", labels=selector, id="wake-engine", **on)  # type: ignore[arg-type]
    @kopf.on.update(GROUP, VERSION, PLURAL, id="spec-changed", field="spec", **on)  # type: ignore[arg-type]
    async def wake(namespace: str, labels: kopf.Labels, name: str, resource: kopf.Resource, **_: Any) -> None:
        run = name if resource.plural == PLURAL else labels.get(mf.LABEL_RUN, "")
        if (namespace, run) in wakers:
            wakers[(namespace, run)].set()

    @kopf.daemon(GROUP, VERSION, PLURAL, id="loop", cancellation_timeout=1.0, **on)  # type: ignore[arg-type]
    async def drive(body: kopf.Body, stopped: kopf.DaemonStopped, jobs: kopf.Index[Any, Any], **_: Any) -> None:
        """One daemon per GenerationRun drives its loop: a step when a child Job changes, the spec changes, or
        every timer_seconds; an error is logged and the next step tries again (nothing is lost between steps)."""
        run = KubeRun(settings, kube, metrics, body, jobs, starts)
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

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup", **on)  # type: ignore[arg-type]
    async def deleted(namespace: str, name: str, jobs: kopf.Index[Any, Any], **_: Any) -> None:
        """Children go (owner references do this on a real cluster; this also covers API servers without a
        garbage collector), and the run's metrics stop being exported."""
        for s in list(jobs.get((namespace, name), [])):  # a copy: each delete changes the index
            await kube.delete("Job", namespace, s["name"])
            await kube.delete("ConfigMap", namespace, s["name"])  # the Job's job-spec ConfigMap
        metrics.runs.forget(namespace, name)


def build(settings: Settings) -> tuple[kopf.OperatorRegistry, Kube, Metrics]:
    registry, kube, metrics = kopf.OperatorRegistry(), Kube(settings), Metrics()
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
