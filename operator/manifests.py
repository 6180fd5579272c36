"""Pure builders of the Kubernetes objects a run owns: shard and merge Jobs and the job-spec ConfigMap each Job
mounts.

No API calls here: the handlers create what these return, and tests inspect them (owner references, labels, GPU
resources, Kueue, podFailurePolicy, Pod Security "restricted") without a cluster.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from typing import Any

from genrun.contract import errors
from genrun.contract import records as rec
from genrun.contract.api import API_KEY_ENV, API_VERSION, KIND, GenerationRunSpec, RunRef
from genrun.operator.planner import CreateMergeJob, CreateShardJob, job_spec
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
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": vols,
    }
    if settings.worker_service_account:
        pod["serviceAccountName"] = settings.worker_service_account
    if w.node_selector:
        pod["nodeSelector"] = dict(w.node_selector)
    if w.tolerations:
        pod["tolerations"] = [dict(t) for t in w.tolerations]
    if w.priority_class_name:
        pod["priorityClassName"] = w.priority_class_name
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
    s, w = action.shard, spec.worker
    lbls = labels(
        ref, "shard", **{LABEL_ROUND: str(s.round), LABEL_SEED: str(s.seed), LABEL_ATTEMPT: str(action.attempt)}
    )
    limits: dict[str, str] = {"cpu": w.cpu, "memory": w.memory}
    if w.gpus:
        limits["nvidia.com/gpu"] = str(w.gpus)
    resources = {"requests": dict(limits), "limits": limits}
    args = ["worker", "generate", "--job", f"{JOB_DIR}/{JOB_FILE}"]
    shm = settings.shm_size if w.gpus else None
    return _job(ref, action.name, lbls, spec, settings, args, resources, shm, llm_key=True)


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
