"""Pure Job/ConfigMap builders: what the operator creates, inspected without a cluster."""

from __future__ import annotations

import json

from genrun.operator import manifests as mf
from genrun.operator.api import RunRef, parse_spec
from genrun.operator.planner import Observed, RecordRound, decide
from genrun.operator.settings import Settings
from genrun.worker import records as rec

REF = RunRef("sft", "data", "uid-1", 2)
RAW = {
    "model": {"name": "Qwen/Qwen2.5-32B"},
    "target": {"uniqueExamples": 6000},
    "output": {"path": "s3://sft-data/run", "s3": {"endpoint": "http://minio:9000", "credentialsSecret": "s3"}},
    "shards": {"initial": 2, "firstSeed": 100},
    "worker": {"gpus": 2, "queueName": "gpu-batch", "nodeSelector": {"gpu": "a100"}, "priorityClassName": "batch",
               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}], "modelVolumeClaim": "models"},
}  # fmt: skip


def test_shard_job() -> None:
    spec = parse_spec(RAW)
    plan = decide(REF, spec, Observed())
    action = plan.actions[1]
    job = mf.shard_job(REF, action, spec, RAW, Settings())  # type: ignore[arg-type]
    meta, js = job["metadata"], job["spec"]
    assert meta["name"] == "sft-r1-s100" and meta["namespace"] == "data"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "genrun.io/v1alpha1",
            "kind": "GenerationRun",
            "name": "sft",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-batch" and js["suspend"] is True  # Kueue admits it
    assert meta["labels"]["genrun.io/seed"] == "100"
    assert js["backoffLimit"] == 0 and js["ttlSecondsAfterFinished"] == 604800 and js["activeDeadlineSeconds"] == 86400
    fail = js["podFailurePolicy"]["rules"]
    assert fail[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert fail[1]["action"] == "FailJob" and fail[1]["onExitCodes"]["values"] == [2, 5]
    pod = js["template"]["spec"]
    assert (
        pod["restartPolicy"] == "Never"
        and pod["nodeSelector"] == {"gpu": "a100"}
        and pod["priorityClassName"] == "batch"
    )
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert c["command"] == ["genrun"] and c["args"][:3] == ["worker", "generate", "--job-json"]
    job_spec = rec.job_spec_from(json.loads(c["args"][3]))  # data, never a shell string
    assert job_spec.shard is not None and job_spec.shard.seed == 100 and job_spec.spec == RAW
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio:9000"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/dev/shm", "/models", "/tmp"} <= mounts
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


def test_merge_job_is_indexed_when_partitioned() -> None:
    from genrun.operator.planner import CreateMergeJob

    spec = parse_spec({**RAW, "dedup": {"partitions": 4}})
    job = mf.merge_job(REF, CreateMergeJob("sft-r1-merge", 0, 1, ((1, 100), (1, 101))), spec, RAW, Settings())
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and c["args"][1] == "merge"
    single = mf.merge_job(REF, CreateMergeJob("sft-r1-merge", 0, 1, ()), parse_spec(RAW), RAW, Settings())
    assert "completionMode" not in single["spec"]


def test_round_configmap_round_trips_the_plan() -> None:
    spec = parse_spec(RAW)
    plan = next(a for a in decide(REF, spec, Observed()).actions if isinstance(a, RecordRound)).plan
    cm = mf.round_configmap(REF, plan)
    assert cm["metadata"]["name"] == "sft-r1-plan" and cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert rec.round_plan_from(json.loads(cm["data"]["plan.json"])) == plan


def test_job_summary_reads_phase_and_retriability() -> None:
    spec = parse_spec(RAW)
    job = mf.shard_job(REF, decide(REF, spec, Observed()).actions[1], spec, RAW, Settings())  # type: ignore[arg-type]
    assert mf.job_summary(job)["phase"] == "Pending"  # suspended, waiting for Kueue
    job["status"] = {
        "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit 2"}]
    }
    s = mf.job_summary(job)
    assert (s["phase"], s["retriable"], s["seed"], s["attempt"]) == ("Failed", False, 100, 0)
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    assert mf.job_summary(job)["phase"] == "Succeeded"
    assert mf.job_summary({"metadata": {"labels": {}}}) is None


def test_settings_from_env_validated() -> None:
    s = Settings.from_env({"GENRUN_METRICS_PORT": "9000", "GENRUN_INSECURE": "true", "GENRUN_NAMESPACE": "sft"})
    assert (s.metrics_port, s.insecure, s.namespace) == (9000, True, "sft")
    import pytest
    from genrun.operator.settings import SettingsError

    with pytest.raises(SettingsError, match="GENRUN_METRICS_PORT='x'"):
        Settings.from_env({"GENRUN_METRICS_PORT": "x"})
    with pytest.raises(SettingsError, match="GENRUN_LOG_LEVEL"):
        Settings.from_env({"GENRUN_LOG_LEVEL": "LOUD"})
