"""Pure builders of the Kubernetes objects a run owns: shard and merge Jobs and the job-spec ConfigMap each Job
mounts.

No API calls here: the handlers create what these return, and tests inspect them (owner references, labels, GPU
resources, Kueue, podFailurePolicy, Pod Security "restricted") without a cluster.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from genrun.contract import errors
from genrun.contract import records as rec
from genrun.contract.api import API_KEY_ENV, API_VERSION, KIND, GenerationRunSpec, RunRef, WorkerSpec
from genrun.operator.planner import CreateMergeJob, CreateShardJob, child_name, job_spec
from genrun.operator.settings import Settings

LABEL_RUN = "genrun.io/run"
LABEL_KIND = "genrun.io/kind"
LABEL_ROUND = "genrun.io/round"
LABEL_SEED = "genrun.io/seed"
LABEL_ATTEMPT = "genrun.io/attempt"
MANAGED_BY = "genrun-operator"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
CONTAINER = "worker"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# The worker image's user (Dockerfile.worker): a fixed, high UID so runAsNonRoot can be checked by the kubelet.
WORKER_UID = 10001
JOB_DIR = "/etc/genrun/job"  # the Job's job-spec ConfigMap, mounted read-only
JOB_FILE = "job.json"
HOME = "/home/genrun"  # an emptyDir: the root filesystem is read-only
CONFIGMAP_MAX_BYTES = 1024 * 1024  # the API server refuses a ConfigMap whose data is larger
_OBJECT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def is_object_name(name: str) -> bool:
    """A DNS-1123 subdomain (what Secret, ConfigMap, Job and namespace names are): no '/', no '..', no spaces."""
    return isinstance(name, str) and len(name) <= 253 and _OBJECT_NAME.fullmatch(name) is not None


def run_errors(spec: GenerationRunSpec, settings: Settings) -> list[str]:
    """What this operator refuses to do for a run, as `spec.<field>: <problem and fix>` (on top of parse_spec)."""
    errors = []
    s3 = spec.output.s3
    secret = s3.credentials_secret if s3 is not None else ""
    if secret and not is_object_name(secret):
        errors.append(
            f"spec.output.s3.credentialsSecret: {secret[:200]!r} is not a Secret name; name a Secret in the run's "
            "own namespace (lowercase letters, digits, '-' and '.', at most 253 characters; no '/' or '..')"
        )
    if spec.output.is_s3 and not secret and not settings.allow_ambient_credentials:
        errors.append(
            "spec.output.s3.credentialsSecret: is required for an s3:// output: create a Secret with "
            f"{' and '.join(CREDENTIAL_KEYS)} in the run's namespace and name it here (this operator does not lend "
            "its own cloud credentials to runs; its administrator can allow that with the chart value "
            "operator.allowAmbientCredentials)"
        )
    return errors


def not_allowed(spec: GenerationRunSpec, settings: Settings) -> list[str]:
    """What the run names outside this operator's allow-lists (GENRUN_ALLOWED_IMAGE_PREFIXES and
    GENRUN_ALLOWED_ENDPOINT_HOSTS): its pods would run that image with the run's Secrets, or send a Secret's value
    (and the operator its S3 credentials) to that host. Refused as Failed/NotAllowed before any Secret is read."""
    errors = []
    image = spec.worker.image
    if not settings.image_allowed(image):
        errors.append(
            f"spec.worker.image: {image[:200]!r} is not under an allowed image prefix "
            f"({', '.join(settings.image_prefixes())}); use such an image, or leave the field empty for the "
            "operator's default, or ask the operator's administrator to add its prefix to the chart value "
            "operator.allowedImagePrefixes (GENRUN_ALLOWED_IMAGE_PREFIXES)"
        )
    s3, ep = spec.output.s3, spec.model.endpoint
    for field, url in (
        ("spec.output.s3.endpoint", s3.endpoint if s3 else ""),
        ("spec.model.endpoint.url", ep.url if ep else ""),
    ):
        if not settings.endpoint_allowed(url):
            errors.append(
                f"{field}: the host of {url[:200]!r} is not an allowed endpoint host "
                f"({', '.join(settings.allowed_endpoint_hosts) or 'none'}); name an in-cluster Service as "
                "name.namespace.svc, or ask the operator's administrator to add the host to the chart value "
                "operator.allowedEndpointHosts (GENRUN_ALLOWED_ENDPOINT_HOSTS)"
            )
    return errors


def labels(ref: RunRef, kind: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "genrun",
        "app.kubernetes.io/component": kind,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_RUN: ref.name,
        LABEL_KIND: kind,
        **extra,
    }


def owner_reference(ref: RunRef) -> dict[str, Any]:
    """Deleting the run deletes its children (the garbage collector follows this)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(ref: RunRef, name: str, lbls: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": ref.namespace, "labels": lbls, "ownerReferences": [owner_reference(ref)]}


def _env(spec: GenerationRunSpec, llm_key: bool) -> list[dict[str, Any]]:
    cache = f"{HOME}/.cache"
    # The root filesystem is read-only: every cache vLLM, Hugging Face, torch and Triton write goes to emptyDirs.
    # With a model PVC, Hugging Face reads the cache pre-filled there (read-only); else it downloads into the pod.
    hf_home = "/models/.hf-cache" if spec.worker.model_volume_claim else f"{cache}/huggingface"
    env: list[dict[str, Any]] = [
        {"name": "GENRUN_LOG_LEVEL", "value": "INFO"},
        {"name": "VLLM_ENABLE_V1_MULTIPROCESSING", "value": "0"},
        {"name": "HOME", "value": HOME},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": cache},
        {"name": "XDG_CONFIG_HOME", "value": f"{HOME}/.config"},
        {"name": "HF_HOME", "value": hf_home},
        {"name": "VLLM_CACHE_ROOT", "value": f"{cache}/vllm"},
        {"name": "VLLM_CONFIG_ROOT", "value": f"{HOME}/.config/vllm"},
        {"name": "TORCH_HOME", "value": f"{cache}/torch"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{cache}/torchinductor"},
        {"name": "TRITON_CACHE_DIR", "value": f"{cache}/triton"},
        {"name": "NUMBA_CACHE_DIR", "value": f"{cache}/numba"},
    ]
    s3 = spec.output.s3
    if s3 is not None and s3.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": s3.endpoint})
    if s3 is not None:
        env.append({"name": "AWS_DEFAULT_REGION", "value": s3.region})
    if s3 is not None and s3.credentials_secret:
        # Credentials reach the pod from the Secret by reference: their values never pass through the operator.
        env += [
            {"name": k, "valueFrom": {"secretKeyRef": {"name": s3.credentials_secret, "key": k}}}
            for k in CREDENTIAL_KEYS
        ]
    ep = spec.model.endpoint
    if llm_key and ep is not None and ep.api_key_secret:
        # The inference server's key, by reference like the S3 credentials; only shard Jobs generate, so only they
        # get it (each Job gets the Secrets it uses).
        env.append(
            {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ep.api_key_secret, "key": API_KEY_ENV}}}
        )
    return env


def _container_security() -> dict[str, Any]:
    """Pod Security "restricted" for a container of the run (a Job's or the engine's): a fresh dict each time."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _place(pod: dict[str, Any], w: WorkerSpec, settings: Settings) -> None:
    """Where a pod of the run may run and as whom (spec.worker, the operator's settings): Jobs and the engine alike."""
    if settings.worker_service_account:
        pod["serviceAccountName"] = settings.worker_service_account
    if w.node_selector:
        pod["nodeSelector"] = dict(w.node_selector)
    if w.tolerations:
        pod["tolerations"] = [dict(t) for t in w.tolerations]
    if w.priority_class_name:
        pod["priorityClassName"] = w.priority_class_name


def _volumes(
    spec: GenerationRunSpec, job_name: str, shm: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    vols: list[dict[str, Any]] = [
        {"name": "job", "configMap": {"name": job_name}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "job", "mountPath": JOB_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "home", "mountPath": HOME},
    ]
    if shm:
        vols.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    w = spec.worker
    if w.model_volume_claim:
        vols.append({"name": "models", "persistentVolumeClaim": {"claimName": w.model_volume_claim, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": "/models", "readOnly": True})
    if w.output_volume_claim and not spec.output.is_s3:
        vols.append({"name": "output", "persistentVolumeClaim": {"claimName": w.output_volume_claim}})
        mounts.append({"name": "output", "mountPath": spec.output.path})
    return vols, mounts


def _job(
    ref: RunRef,
    name: str,
    lbls: dict[str, str],
    spec: GenerationRunSpec,
    settings: Settings,
    args: list[str],
    resources: dict[str, Any],
    shm: str | None,
    llm_key: bool,
) -> dict[str, Any]:
    w = spec.worker
    vols, mounts = _volumes(spec, name, shm)
    if w.queue_name:
        lbls = {**lbls, KUEUE_QUEUE: w.queue_name}
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        # Pod Security "restricted": non-root with a fixed UID/GID (the image's), seccomp, no ServiceAccount token
        # (workers never call the API server).
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "fsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": CONTAINER,
                "image": w.image or settings.worker_image,
                "command": ["genrun"],
                "args": args,
                "env": _env(spec, llm_key),
                "resources": resources,
                "volumeMounts": mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": _container_security(),
            }
        ],
        "volumes": vols,
    }
    _place(pod, w, settings)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(ref, name, lbls),
        "spec": {
            # Retries are the planner's (a new Job per attempt, bounded by spec.budget.maxShardRetries), so a
            # failed attempt stays visible; pod disruptions (preemption, node drain) do not count as failures.
            "backoffLimit": 0,
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            "values": list(errors.NON_RETRIABLE_EXIT_CODES),
                        },
                    },
                ]
            },
            "activeDeadlineSeconds": w.active_deadline_seconds,
            "ttlSecondsAfterFinished": settings.job_ttl_seconds,
            "suspend": bool(w.queue_name),  # Kueue admits (unsuspends) it when the queue has quota
            "template": {"metadata": {"labels": lbls}, "spec": pod},
        },
    }


def shard_job(ref: RunRef, action: CreateShardJob, spec: GenerationRunSpec, settings: Settings) -> dict[str, Any]:
    """A shard's Job. With the run's engine (uses_run_engine) it is a CPU-only client of the engine Service: no GPU,
    no /dev/shm, no model volume (its job spec names the Service: with_run_engine); else it loads vLLM itself."""
    s, w = action.shard, spec.worker
    lbls = labels(
        ref, "shard", **{LABEL_ROUND: str(s.round), LABEL_SEED: str(s.seed), LABEL_ATTEMPT: str(action.attempt)}
    )
    args = ["worker", "generate", "--job", f"{JOB_DIR}/{JOB_FILE}"]
    if uses_run_engine(spec):
        limits = {"cpu": settings.shard_client_cpu, "memory": settings.shard_client_memory}
        resources = {"requests": dict(limits), "limits": limits}
        # The run's own engine asks for no key: the client gets none.
        job = _job(ref, action.name, lbls, spec, settings, args, resources, None, llm_key=False)
        sem = spec.dedup.semantic
        if not (sem.enabled and not sem.model.startswith("embedded:")):
            # The model volume serves the engine; the shard keeps it only for an embedding model of the semantic
            # tier (the generators' online check), which Hugging Face may read from there.
            pod = job["spec"]["template"]["spec"]
            pod["volumes"] = [v for v in pod["volumes"] if v["name"] != "models"]
            for c in pod["containers"]:
                c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "models"]
                for e in c["env"]:
                    if e["name"] == "HF_HOME":
                        e["value"] = f"{HOME}/.cache/huggingface"
        return job
    limits = {"cpu": w.cpu, "memory": w.memory}
    if w.gpus:
        limits["nvidia.com/gpu"] = str(w.gpus)
    resources = {"requests": dict(limits), "limits": limits}
    job = _job(ref, action.name, lbls, spec, settings, args, resources, settings.shm_size if w.gpus else None,
               llm_key=True)  # fmt: skip
    if w.cache_volume_claim:
        _use_compile_cache(job["spec"]["template"]["spec"], w.cache_volume_claim)
    return job


def merge_job(ref: RunRef, action: CreateMergeJob, spec: GenerationRunSpec, settings: Settings) -> dict[str, Any]:
    lbls = labels(ref, "merge", **{LABEL_ROUND: str(action.round), LABEL_ATTEMPT: str(action.attempt)})
    limits = {"cpu": settings.merge_cpu, "memory": settings.merge_memory}
    resources = {"requests": dict(limits), "limits": limits}
    args = ["worker", "merge", "--job", f"{JOB_DIR}/{JOB_FILE}"]
    manifest = _job(ref, action.name, lbls, spec, settings, args, resources, None, llm_key=False)
    parts = spec.dedup.partitions
    if parts > 1:
        # Partitioned dedup: index i maps input partition i, then reduces band partition i; index 0 finalises.
        # The indexes wait for each other's outputs, so all run at once.
        manifest["spec"].update(completionMode="Indexed", completions=parts, parallelism=parts)
    return manifest


# ----------------------------------------------------------------------------------------------------------
# The run's engine (spec.worker.engine: shared): vLLM's OpenAI-compatible server as a Deployment and a Service, both
# owned by the run (deleted with it). The run loop decides how many replicas; these only build what it applies.

ENGINE = "engine"  # the genrun.io/kind label and the container's name
ENGINE_PORT = 8000  # vLLM's own default port
COMPILE_CACHE = f"{HOME}/.cache/compiled"  # where spec.worker.cacheVolumeClaim is mounted
# The caches that the compile cache volume takes over from the pod's emptyDir (vLLM's torch.compile cache lives
# under VLLM_CACHE_ROOT; Inductor and Triton keep their kernels in their own folders).
_COMPILED = {"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton"}
# Of the Jobs' environment, what a vLLM server uses: where to write (the root filesystem is read-only) and where
# Hugging Face finds the model. Not the storage credentials nor the worker's own settings: the server needs neither.
_ENGINE_ENV = frozenset(
    {"HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME", "VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT",
     "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "NUMBA_CACHE_DIR"}
)  # fmt: skip
# A model of 70B parameters or more can take many minutes to download, load and compile on a cold node: the
# startupProbe waits this long before the kubelet restarts the server.
ENGINE_STARTUP_SECONDS = 1800
_PROBE_PERIOD = 10


def uses_run_engine(spec: GenerationRunSpec) -> bool:
    """Whether this run's shard Jobs call a run-owned engine (the Deployment below) rather than load vLLM each, or
    call the user's own server (spec.model.endpoint: then there is no engine Deployment at all)."""
    return spec.worker.engine == "shared" and spec.model.endpoint is None


def engine_name(run: str) -> str:
    """The engine Deployment's and Service's name: <run>-engine. A Service name must start with a letter (DNS-1035),
    so a run whose name starts with a digit gets engine-<hash of the run's name> (distinct runs, distinct names)."""
    name = child_name(run, ENGINE)
    if name[0].isalpha():
        return name
    return f"{ENGINE}-{hashlib.sha256(run.encode()).hexdigest()[:8]}"


def engine_endpoint(ref: RunRef, spec: GenerationRunSpec) -> str:
    """The in-cluster base URL of the run's engine Service, with the API prefix (what spec.model.endpoint.url holds).
    <service>.<namespace>.svc resolves through the pods' DNS search path, whatever the cluster's domain."""
    del spec  # one Service per run, whatever the spec: the argument keeps the signature of the other builders
    return f"http://{engine_name(ref.name)}.{ref.namespace}.svc:{ENGINE_PORT}/v1"


def with_run_engine(ref: RunRef, spec: GenerationRunSpec, raw_spec: dict[str, Any]) -> dict[str, Any]:
    """The raw spec a shard Job's job spec should carry: with the run's engine, spec.model.endpoint names its Service
    (the worker then generates through its OpenAI-compatible engine, unchanged); otherwise raw_spec as it is."""
    if not uses_run_engine(spec):
        return raw_spec
    model = dict(raw_spec.get("model") or {})
    model["endpoint"] = {"url": engine_endpoint(ref, spec), "model": spec.model.name}
    return {**raw_spec, "model": model}


def _use_compile_cache(pod: dict[str, Any], claim: str) -> None:
    """Mount spec.worker.cacheVolumeClaim and point vLLM's, Inductor's and Triton's caches onto it."""
    pod["volumes"].append({"name": "compiled", "persistentVolumeClaim": {"claimName": claim}})
    for c in pod["containers"]:
        c["volumeMounts"].append({"name": "compiled", "mountPath": COMPILE_CACHE})
        for e in c["env"]:
            if e["name"] in _COMPILED:
                e["value"] = f"{COMPILE_CACHE}/{_COMPILED[e['name']]}"


def engine_selector(ref: RunRef) -> dict[str, str]:
    """The labels that pick a run's engine pods (the Deployment's selector, the Service's, the pods listing's)."""
    return {LABEL_RUN: ref.name, LABEL_KIND: ENGINE}


def engine_args(spec: GenerationRunSpec) -> list[str]:
    """`vllm serve` arguments: the spec's engine arguments, served under spec.model.name (the name the shard Jobs
    ask for), with prefix caching. tensorParallelSize GPUs hold one copy of the model; a replica with more GPUs than that runs as many
    copies as fit (data parallel), so every GPU it holds serves."""
    m, gpus = spec.model, spec.worker.gpus
    args = [
        m.name, "--served-model-name", m.name, "--host", "0.0.0.0", "--port", str(ENGINE_PORT),
        "--dtype", m.dtype, "--max-model-len", str(m.max_model_len),
        "--gpu-memory-utilization", str(m.gpu_memory_utilization),
        "--tensor-parallel-size", str(m.tensor_parallel_size), "--load-format", m.load_format,
        "--seed", str(spec.shards.first_seed),
        # Every prompt of a run starts with the same template and few-shot examples: their KV cache is computed once.
        "--enable-prefix-caching",
    ]  # fmt: skip
    if gpus >= 2 * m.tensor_parallel_size:
        args += ["--data-parallel-size", str(gpus // m.tensor_parallel_size)]
    return args


def engine_deployment(ref: RunRef, spec: GenerationRunSpec, settings: Settings, replicas: int = 0) -> dict[str, Any]:
    """The run's vLLM server: the GPUs, node placement, Kueue queue and model volume the shard Jobs had in perShard
    mode, Pod Security "restricted", probes sized for slow loads. `replicas` is the run loop's decision (0 when the
    run is finished or suspended: the Deployment stays, holding nothing)."""
    w = spec.worker
    lbls = labels(ref, ENGINE)
    pod_lbls = dict(lbls)
    if w.queue_name:
        # Kueue's Deployment integration reads the queue from the Deployment and admits each pod as its own workload
        # (pods wait, gated, until admitted); the pod template carries it too for the plain-pod integration.
        lbls = {**lbls, KUEUE_QUEUE: w.queue_name}
        pod_lbls = {**pod_lbls, KUEUE_QUEUE: w.queue_name}
    limits: dict[str, str] = {"cpu": w.cpu, "memory": w.memory}
    if w.gpus:
        limits["nvidia.com/gpu"] = str(w.gpus)
    vols, mounts = _volumes(spec, engine_name(ref.name), settings.shm_size if w.gpus else None)
    # The engine reads no job spec and writes no output: only its scratch, home, shared memory and model volumes.
    keep = {"tmp", "home", "dshm", "models"}
    vols = [v for v in vols if v["name"] in keep]
    mounts = [m for m in mounts if m["name"] in keep]
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": _PROBE_PERIOD, "timeoutSeconds": 5}
    container: dict[str, Any] = {
        "name": ENGINE,
        "image": w.image or settings.worker_image,
        "command": ["vllm", "serve"],
        "args": engine_args(spec),
        "env": [e for e in _env(spec, llm_key=False) if e["name"] in _ENGINE_ENV],
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": mounts,
        # The server answers /health only once the model is loaded; until then only the startupProbe runs.
        "startupProbe": {**probe, "failureThreshold": ENGINE_STARTUP_SECONDS // _PROBE_PERIOD},
        "livenessProbe": {**probe, "failureThreshold": 6},
        # Ready (in the Service) once it lists the model the shard Jobs ask for.
        "readinessProbe": {
            "httpGet": {"path": "/v1/models", "port": "http"}, "periodSeconds": 5, "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(),
    }  # fmt: skip
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the server never calls the API server
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "fsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": vols,
    }
    if w.cache_volume_claim:
        _use_compile_cache(pod, w.cache_volume_claim)
    _place(pod, w, settings)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(ref, engine_name(ref.name), lbls),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": engine_selector(ref)},
            # A new template replaces the old pods before starting new ones: a rolling update would hold twice the
            # GPUs. (spec.model is immutable, so only the pod settings in spec.worker can change a template.)
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 2,
            # Loading is progress too: the Deployment is not reported stalled before the startupProbe gives up.
            "progressDeadlineSeconds": ENGINE_STARTUP_SECONDS + 600,
            "template": {"metadata": {"labels": pod_lbls}, "spec": pod},
        },
    }


def engine_service(ref: RunRef, spec: GenerationRunSpec) -> dict[str, Any]:
    """The ClusterIP Service in front of the engine's ready pods (engine_endpoint is its URL)."""
    del spec
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ref, engine_name(ref.name), labels(ref, ENGINE)),
        "spec": {
            "type": "ClusterIP",
            "selector": engine_selector(ref),
            "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


@dataclass(frozen=True)
class EnginePod:
    """One engine pod as observed: when its server process started, when it became ready, and the seconds
    between (the engine's start-up, None until it is ready)."""

    name: str
    started_at: str | None  # the container's state.running.startedAt (RFC 3339)
    ready_at: str | None  # the Ready condition's lastTransitionTime, while Ready
    startup_seconds: float | None
    restarts: int


@dataclass(frozen=True)
class EngineState:
    replicas: int  # what the Deployment asks for
    ready_replicas: int
    pods: tuple[EnginePod, ...]


def unix_time(value: str | None) -> float | None:
    """An API server's RFC 3339 time as Unix seconds (None when absent or unreadable)."""
    t = _time(value)
    return t.timestamp() if t is not None else None


def _time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=datetime.UTC)


def engine_state(ref: RunRef, deployment: dict[str, Any], pods: list[dict[str, Any]]) -> EngineState:
    """What the run loop needs of its engine, from the Deployment and its pods as the API server returns them."""
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    want = engine_selector(ref)
    out = []
    for p in pods:
        meta = p.get("metadata") or {}
        if any((meta.get("labels") or {}).get(k) != v for k, v in want.items()) or meta.get("deletionTimestamp"):
            continue
        pst = p.get("status") or {}
        cs: dict[str, Any] = next((c for c in pst.get("containerStatuses") or [] if c.get("name") == ENGINE), {})
        started = ((cs.get("state") or {}).get("running") or {}).get("startedAt")
        ready = next(
            (c.get("lastTransitionTime") for c in pst.get("conditions") or []
             if c.get("type") == "Ready" and c.get("status") == "True"),
            None,
        )  # fmt: skip
        t0, t1 = _time(started), _time(ready)
        seconds = (t1 - t0).total_seconds() if t0 is not None and t1 is not None and t1 >= t0 else None
        out.append(EnginePod(str(meta.get("name", "")), started, ready, seconds, int(cs.get("restartCount") or 0)))
    return EngineState(
        int(spec.get("replicas") or 0), int(status.get("readyReplicas") or 0), tuple(sorted(out, key=lambda x: x.name))
    )


class TooLarge(ValueError):
    pass


def job_configmap(ref: RunRef, action: CreateShardJob | CreateMergeJob, raw_spec: dict[str, Any]) -> dict[str, Any]:
    """The job spec a Job mounts at JOB_DIR/JOB_FILE, named like the Job and created just before it.

    A file, not an argument: Linux refuses a single argv string over 128 KiB, and a spec within the CRD's bounds can
    be far larger. A ConfigMap holds at most 1 MiB: a larger job spec is stored gzip-compressed (binaryData; the
    worker reads either), and one still too large raises TooLarge, which fails the run naming the size. (The API
    server itself refuses a whole GenerationRun over ~1.5 MiB, so such a spec could not have been stored anyway.)
    """
    kind = "shard" if isinstance(action, CreateShardJob) else "merge"
    rnd = action.shard.round if isinstance(action, CreateShardJob) else action.round
    text = json.dumps(rec.plain(job_spec(action, ref, raw_spec)), separators=(",", ":"), sort_keys=True,
                      ensure_ascii=False)  # fmt: skip
    raw = text.encode()
    cm: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(ref, action.name, labels(ref, f"{kind}-job-spec", **{LABEL_ROUND: str(rnd)})),
        "immutable": True,
    }
    if len(raw) <= CONFIGMAP_MAX_BYTES - 4096:
        cm["data"] = {JOB_FILE: text}
        return cm
    packed = gzip.compress(raw, compresslevel=9, mtime=0)
    if len(base64.b64encode(packed)) > CONFIGMAP_MAX_BYTES - 4096:
        raise TooLarge(
            f"spec: the job spec of {action.name} is {len(raw):,} bytes ({len(packed):,} compressed), over the "
            f"{CONFIGMAP_MAX_BYTES:,} bytes a ConfigMap holds; shorten spec.prompt.examples or spec.prompt.domains"
        )
    cm["binaryData"] = {JOB_FILE: base64.b64encode(packed).decode()}
    return cm


def job_summary(body: dict[str, Any]) -> dict[str, Any] | None:
    """What the planner needs of a Job (for the index): kind, round, seed, attempt, phase, retriable, message."""
    meta = body.get("metadata", {})
    lbl = meta.get("labels", {}) or {}
    if lbl.get("app.kubernetes.io/managed-by") != MANAGED_BY or lbl.get(LABEL_KIND) not in ("shard", "merge"):
        return None
    status = body.get("status", {}) or {}
    conds = {c.get("type"): c for c in status.get("conditions", []) or [] if c.get("status") == "True"}
    phase, retriable, message = "Running", True, ""
    if "Complete" in conds or "SuccessCriteriaMet" in conds:
        phase = "Succeeded"
    elif "Failed" in conds:
        phase = "Failed"
        retriable = conds["Failed"].get("reason") != "PodFailurePolicy"
        message = f"{conds['Failed'].get('reason', '')}: {conds['Failed'].get('message', '')}".strip(": ")
    elif not status.get("active"):  # no pod yet (suspended, waiting for Kueue, or not scheduled)
        phase = "Pending"
    return {
        "name": meta.get("name"),
        "kind": lbl[LABEL_KIND],
        "round": int(lbl.get(LABEL_ROUND, "0")),
        "seed": int(lbl[LABEL_SEED]) if LABEL_SEED in lbl else None,
        "attempt": int(lbl.get(LABEL_ATTEMPT, "0")),
        "phase": phase,
        "retriable": retriable,
        "message": message,
    }
