"""Pure builders of the Kubernetes objects a run owns: round-plan ConfigMaps, shard Jobs and merge Jobs.

No API calls here: the handlers create what these return, and tests inspect them (owner references, labels, GPU
resources, Kueue, podFailurePolicy) without a cluster.
"""

from __future__ import annotations

import json
from typing import Any

from genrun.operator.api import API_VERSION, KIND, GenerationRunSpec, RunRef
from genrun.operator.planner import CreateMergeJob, CreateShardJob, job_spec
from genrun.operator.settings import Settings
from genrun.worker import records as rec

LABEL_RUN = "genrun.io/run"
LABEL_KIND = "genrun.io/kind"
LABEL_ROUND = "genrun.io/round"
LABEL_SEED = "genrun.io/seed"
LABEL_ATTEMPT = "genrun.io/attempt"
MANAGED_BY = "genrun-operator"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
CONTAINER = "worker"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


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


def round_configmap(ref: RunRef, plan: rec.RoundPlan) -> dict[str, Any]:
    """A round's plan, recorded before its Jobs so later decisions read it back."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(
            ref, f"{ref.name}-r{plan.round}-plan", labels(ref, "round-plan", **{LABEL_ROUND: str(plan.round)})
        ),
        "data": {"plan.json": rec.to_json(plan)},
    }


def _env(spec: GenerationRunSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "GENRUN_LOG_LEVEL", "value": "INFO"},
        {"name": "VLLM_ENABLE_V1_MULTIPROCESSING", "value": "0"},
        {"name": "HF_HOME", "value": "/models/.hf-cache"},
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
    return env


def _volumes(spec: GenerationRunSpec, shm: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    vols: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
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
) -> dict[str, Any]:
    w = spec.worker
    vols, mounts = _volumes(spec, shm)
    if w.queue_name:
        lbls = {**lbls, KUEUE_QUEUE: w.queue_name}
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": CONTAINER,
                "image": w.image or settings.worker_image,
                "command": ["genrun"],
                "args": args,
                "env": _env(spec),
                "resources": resources,
                "volumeMounts": mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
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
                            "values": list(rec.NON_RETRIABLE_EXIT_CODES),
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


def shard_job(
    ref: RunRef, action: CreateShardJob, spec: GenerationRunSpec, raw_spec: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    s, w = action.shard, spec.worker
    lbls = labels(
        ref, "shard", **{LABEL_ROUND: str(s.round), LABEL_SEED: str(s.seed), LABEL_ATTEMPT: str(action.attempt)}
    )
    job = json.dumps(rec.plain(job_spec(action, ref, raw_spec)), separators=(",", ":"), sort_keys=True)
    limits: dict[str, str] = {"cpu": w.cpu, "memory": w.memory}
    if w.gpus:
        limits["nvidia.com/gpu"] = str(w.gpus)
    resources = {"requests": dict(limits), "limits": limits}
    args = ["worker", "generate", "--job-json", job]
    return _job(ref, action.name, lbls, spec, settings, args, resources, settings.shm_size if w.gpus else None)


def merge_job(
    ref: RunRef, action: CreateMergeJob, spec: GenerationRunSpec, raw_spec: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    lbls = labels(ref, "merge", **{LABEL_ROUND: str(action.round), LABEL_ATTEMPT: str(action.attempt)})
    job = json.dumps(rec.plain(job_spec(action, ref, raw_spec)), separators=(",", ":"), sort_keys=True)
    limits = {"cpu": settings.merge_cpu, "memory": settings.merge_memory}
    resources = {"requests": dict(limits), "limits": limits}
    args = ["worker", "merge", "--job-json", job]
    manifest = _job(ref, action.name, lbls, spec, settings, args, resources, None)
    parts = spec.dedup.partitions
    if parts > 1:
        # Partitioned dedup: index i maps input partition i, then reduces band partition i; index 0 finalises.
        # The indexes wait for each other's outputs, so all run at once.
        manifest["spec"].update(completionMode="Indexed", completions=parts, parallelism=parts)
    return manifest


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
    elif not status.get("active") and (body.get("spec", {}) or {}).get("suspend"):
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
        "active": int(status.get("active", 0) or 0),
    }
