"""The run's engine (spec.worker.engine: shared) as pure builders: the vLLM Deployment and Service a run owns, the
shard Jobs that call it, what the engine's pods say about its start-up, and the spec fields that choose all this."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from genrun.contract import records as rec
from genrun.contract.api import RunRef, SpecError, parse_spec
from genrun.operator import manifests as mf
from genrun.operator.planner import Observed, decide
from genrun.operator.settings import Settings
from genrun.operator.validate import check_manifest

REF = RunRef("sft", "data", "uid-1", 2)
RAW: dict[str, Any] = {
    "model": {"name": "Qwen/Qwen2.5-32B", "tensorParallelSize": 2, "maxModelLen": 4096, "dtype": "bfloat16",
              "loadFormat": "runai_streamer"},
    "target": {"uniqueExamples": 6000},
    "output": {"path": "s3://sft-data/run", "s3": {"endpoint": "http://minio:9000", "credentialsSecret": "s3"}},
    "shards": {"initial": 2, "firstSeed": 100},
    "worker": {"gpus": 2, "queueName": "gpu-batch", "nodeSelector": {"gpu": "h100"}, "priorityClassName": "batch",
               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}], "modelVolumeClaim": "models",
               "cacheVolumeClaim": "vllm-cache"},
}  # fmt: skip
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def spec_with(**worker: Any) -> Any:
    raw = copy.deepcopy(RAW)
    raw["worker"].update(worker)
    return parse_spec(raw)


def args_of(container: dict[str, Any]) -> dict[str, str]:
    """`--flag value` pairs of a command line (the model is the one positional argument; a flag without a value
    maps to "")."""
    args, out, i = container["args"], {}, 1
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]], i = args[i + 1], i + 2
        else:
            out[args[i]], i = "", i + 1
    return out


def first_shard(spec: Any) -> Any:
    return decide(REF, spec, Observed()).actions[1]


# ----------------------------------------------------------------------------------------------------------
# The spec


def test_the_shared_engine_is_the_default_and_the_new_fields_parse() -> None:
    spec = parse_spec({"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/out"}})
    assert (spec.worker.engine, spec.worker.cache_volume_claim, spec.model.load_format) == ("shared", "", "auto")
    assert mf.uses_run_engine(spec)
    spec = parse_spec(RAW)
    assert (spec.model.load_format, spec.worker.cache_volume_claim) == ("runai_streamer", "vllm-cache")


@pytest.mark.parametrize(
    ("section", "field", "value", "named"),
    [
        ("worker", "engine", "both", "spec.worker.engine"),
        ("worker", "engine", "PerShard", "spec.worker.engine"),
        ("model", "loadFormat", "dummy", "spec.model.loadFormat"),
        ("model", "loadFormat", "tensorizer", "spec.model.loadFormat"),
        ("worker", "cacheVolumeClaim", "Cache/../x", "spec.worker.cacheVolumeClaim"),
        ("worker", "cacheVolumeClaim", "c" * 254, "spec.worker.cacheVolumeClaim"),
    ],
)
def test_a_bad_engine_field_is_refused_naming_it(section: str, field: str, value: str, named: str) -> None:
    doc = {"apiVersion": "genrun.io/v1alpha1", "kind": "GenerationRun", "metadata": {"name": "r1"},
           "spec": copy.deepcopy(RAW)}  # fmt: skip
    doc["spec"][section][field] = value
    with pytest.raises(SpecError) as exc:
        check_manifest(doc)
    assert any(e.startswith(named + ":") for e in exc.value.errors), exc.value.errors


# ----------------------------------------------------------------------------------------------------------
# The engine Deployment and Service


def test_engine_deployment_holds_the_gpus_placement_and_model_the_shard_jobs_had() -> None:
    spec = parse_spec(RAW)
    dep = mf.engine_deployment(REF, spec, Settings(), replicas=1)
    meta, ds = dep["metadata"], dep["spec"]
    assert (dep["apiVersion"], dep["kind"], meta["name"], meta["namespace"]) == ("apps/v1", "Deployment",
                                                                                 "sft-engine", "data")  # fmt: skip
    assert meta["ownerReferences"] == [mf.owner_reference(REF)] and meta["ownerReferences"][0]["uid"] == "uid-1"
    assert ds["replicas"] == 1 and ds["strategy"] == {"type": "Recreate"}
    tmpl_labels = ds["template"]["metadata"]["labels"]
    assert ds["selector"]["matchLabels"].items() <= tmpl_labels.items()
    # Kueue: the queue on the Deployment (its Deployment integration) and on the pods (the plain-pod integration).
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == tmpl_labels["kueue.x-k8s.io/queue-name"] == "gpu-batch"
    pod = ds["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "batch"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"
    }
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["limits"] == c["resources"]["requests"] == {"cpu": "4", "memory": "32Gi",
                                                                      "nvidia.com/gpu": "2"}  # fmt: skip
    assert c["command"] == ["vllm", "serve"] and c["args"][0] == "Qwen/Qwen2.5-32B"
    a = args_of(c)
    assert a["--tensor-parallel-size"] == "2" and "--data-parallel-size" not in a
    assert a["--load-format"] == "runai_streamer" and a["--served-model-name"] == "Qwen/Qwen2.5-32B"
    assert (a["--dtype"], a["--max-model-len"], a["--seed"], a["--gpu-memory-utilization"]) == (
        "bfloat16",
        "4096",
        "100",
        "0.9",
    )
    assert a["--port"] == str(mf.ENGINE_PORT) == str(c["ports"][0]["containerPort"])
    assert a["--enable-prefix-caching"] == ""  # the template and few-shot examples open every prompt
    # Probes: /health once loaded, the Service's endpoints once the model is listed; a slow load is not a failure.
    start = c["startupProbe"]
    assert start["httpGet"]["path"] == "/health" and start["periodSeconds"] * start["failureThreshold"] >= 1800
    assert c["readinessProbe"]["httpGet"] == {"path": "/v1/models", "port": "http"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert vols["models"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert mounts["models"]["readOnly"] is True and vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "job" not in vols and "output" not in vols  # no job spec and no dataset in the server
    # The compiled-artefact caches live on the claim named in the spec, so the next start reuses them.
    assert vols["compiled"]["persistentVolumeClaim"] == {"claimName": "vllm-cache"}
    env = {e["name"]: e.get("value") for e in c["env"]}
    for var in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[var].startswith(mounts["compiled"]["mountPath"] + "/"), var
    assert env["HF_HOME"] == "/models/.hf-cache"
    # Storage credentials are the shard and merge Jobs' business, never the server's.
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "VLLM_ENABLE_V1_MULTIPROCESSING"} & set(env)


def test_a_replica_with_more_gpus_than_one_copy_needs_runs_several_copies() -> None:
    dep = mf.engine_deployment(REF, spec_with(gpus=4), Settings())
    a = args_of(dep["spec"]["template"]["spec"]["containers"][0])
    assert (a["--tensor-parallel-size"], a["--data-parallel-size"]) == ("2", "2")
    assert dep["spec"]["replicas"] == 0  # nothing held until the run loop asks


def test_without_a_queue_cache_or_model_volume_the_engine_names_none() -> None:
    raw = copy.deepcopy(RAW)
    for key in ("queueName", "cacheVolumeClaim", "modelVolumeClaim", "nodeSelector", "tolerations"):
        del raw["worker"][key]
    dep = mf.engine_deployment(REF, parse_spec(raw), Settings())
    pod = dep["spec"]["template"]["spec"]
    assert "kueue.x-k8s.io/queue-name" not in dep["metadata"]["labels"]
    assert {v["name"] for v in pod["volumes"]} == {"tmp", "home", "dshm"}
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["VLLM_CACHE_ROOT"].startswith(mf.HOME + "/.cache/vllm")  # the pod's own emptyDir


def test_the_service_fronts_the_engine_pods_and_the_endpoint_is_its_url() -> None:
    spec = parse_spec(RAW)
    svc, dep = mf.engine_service(REF, spec), mf.engine_deployment(REF, spec, Settings())
    assert (svc["kind"], svc["metadata"]["name"]) == ("Service", dep["metadata"]["name"])
    assert svc["metadata"]["ownerReferences"] == [mf.owner_reference(REF)]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    url = mf.engine_endpoint(REF, spec)
    assert url == f"http://sft-engine.data.svc:{port['port']}/v1"


@pytest.mark.parametrize("run", ["sft", "7b-run", "0", "a" * 63, "9" + "x" * 62])
def test_engine_names_are_service_names(run: str) -> None:
    name = mf.engine_name(run)
    assert len(name) <= 63 and DNS_1035.fullmatch(name), name
    assert mf.is_object_name(name)


def test_distinct_runs_get_distinct_engines() -> None:
    runs = ["1a", "1b", "e1a", "engine", "a" * 63, "a" * 62 + "b", "9" * 63, "9" * 62 + "8"]
    assert len({mf.engine_name(r) for r in runs}) == len(runs)


# ----------------------------------------------------------------------------------------------------------
# Shard Jobs


def test_a_shard_job_of_the_shared_engine_holds_no_gpu_and_calls_the_service() -> None:
    spec = parse_spec(RAW)
    action = first_shard(spec)
    settings = Settings(shard_client_cpu="1", shard_client_memory="3Gi")
    job = mf.shard_job(REF, action, spec, settings)
    assert job["metadata"]["name"] == "sft-r1-s100"  # the same names and markers as before
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"] == c["resources"]["requests"] == {"cpu": "1", "memory": "3Gi"}
    assert {v["name"] for v in pod["volumes"]} == {"job", "tmp", "home"}  # no /dev/shm, no model, no cache
    assert {m["mountPath"] for m in c["volumeMounts"]} == {mf.JOB_DIR, "/tmp", mf.HOME}
    # Kueue and placement still apply: the Job waits in the same queue as the engine.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-batch" and job["spec"]["suspend"] is True
    # The job spec the Job mounts names the run's Service as its OpenAI-compatible endpoint: the worker's endpoint
    # engine is what generates, and the CRD accepts the spec it reads.
    cm = mf.job_configmap(REF, action, mf.with_run_engine(REF, spec, RAW))
    job_spec = rec.job_spec_from(json.loads(cm["data"]["job.json"]))
    assert job_spec.spec["model"]["endpoint"] == {"url": mf.engine_endpoint(REF, spec), "model": "Qwen/Qwen2.5-32B"}
    doc = {"apiVersion": "genrun.io/v1alpha1", "kind": "GenerationRun", "metadata": {"name": "sft"},
           "spec": job_spec.spec}  # fmt: skip
    _, seen = check_manifest(doc)
    assert seen.model.endpoint is not None and seen.model.endpoint.url == "http://sft-engine.data.svc:8000/v1"
    assert RAW["model"].get("endpoint") is None  # the run's own spec is not changed


def test_a_shard_job_of_the_shared_engine_keeps_the_model_volume_only_for_a_semantic_model_on_it() -> None:
    def models_of(raw: dict[str, Any]) -> tuple[bool, str]:
        spec = parse_spec(raw)
        c = mf.shard_job(REF, first_shard(spec), spec, Settings())["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        return any(m["mountPath"] == "/models" for m in c["volumeMounts"]), env["HF_HOME"]

    assert models_of(RAW) == (False, mf.HOME + "/.cache/huggingface")  # no Hugging Face cache on a missing mount
    raw = copy.deepcopy(RAW)
    raw["dedup"] = {"semantic": {"enabled": True}}  # the packaged embedder: no volume either
    assert models_of(raw) == (False, mf.HOME + "/.cache/huggingface")
    raw["dedup"]["semantic"]["model"] = "BAAI/bge-small-en-v1.5"  # from the Hub cache on the volume
    assert models_of(raw) == (True, "/models/.hf-cache")


def test_a_per_shard_engine_job_keeps_its_gpus_and_gets_the_compile_cache() -> None:
    spec = spec_with(engine="perShard")
    assert not mf.uses_run_engine(spec)
    job = mf.shard_job(REF, first_shard(spec), spec, Settings())
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert {"dshm", "models"} <= set(vols) and vols["compiled"]["persistentVolumeClaim"]["claimName"] == "vllm-cache"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["VLLM_CACHE_ROOT"] == mf.COMPILE_CACHE + "/vllm"
    assert mf.with_run_engine(REF, spec, RAW) is RAW


def test_a_users_own_endpoint_means_no_run_engine() -> None:
    raw = copy.deepcopy(RAW)
    raw["model"]["endpoint"] = {"url": "http://vllm.inference:8000/v1"}
    raw["worker"]["gpus"] = 0
    raw["model"]["tensorParallelSize"] = 1
    spec = parse_spec(raw)
    assert spec.worker.engine == "shared" and not mf.uses_run_engine(spec)
    assert mf.with_run_engine(REF, spec, raw) is raw
    job = mf.shard_job(REF, first_shard(spec), spec, Settings())
    assert "nvidia.com/gpu" not in job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


# ----------------------------------------------------------------------------------------------------------
# What the engine's pods say


def engine_pod(name: str, started: str | None, ready: str | None, run: str = "sft", **meta: Any) -> dict[str, Any]:
    running = {"running": {"startedAt": started}} if started else {"waiting": {"reason": "ContainerCreating"}}
    conds = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-07T03:00:00Z"}]
    conds.append({"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": ready or started})
    return {
        "metadata": {"name": name, "labels": {mf.LABEL_RUN: run, mf.LABEL_KIND: mf.ENGINE}, **meta},
        "status": {"conditions": conds, "containerStatuses": [{"name": "engine", "restartCount": 1, "state": running}]},
    }


def test_engine_state_gives_each_pods_start_up_seconds() -> None:
    dep = {"spec": {"replicas": 3}, "status": {"readyReplicas": 1, "replicas": 3}}
    pods = [
        engine_pod("sft-engine-b", "2026-12-07T03:01:00Z", None),  # loading
        engine_pod("sft-engine-a", "2026-12-07T03:01:00Z", "2026-12-07T03:03:05.5Z"),
        engine_pod("sft-engine-c", None, None),  # not started
        engine_pod("other-engine-a", "2026-12-07T03:01:00Z", "2026-12-07T03:01:10Z", run="other"),
        engine_pod("sft-engine-d", "2026-12-07T03:01:00Z", "2026-12-07T03:01:10Z",
                   deletionTimestamp="2026-12-07T03:05:00Z"),
    ]  # fmt: skip
    state = mf.engine_state(REF, dep, pods)
    assert (state.replicas, state.ready_replicas) == (3, 1)
    assert [p.name for p in state.pods] == ["sft-engine-a", "sft-engine-b", "sft-engine-c"]
    a, b, c = state.pods
    assert a.startup_seconds == 125.5 and a.ready_at == "2026-12-07T03:03:05.5Z" and a.restarts == 1
    assert b.startup_seconds is None and b.started_at == "2026-12-07T03:01:00Z" and b.ready_at is None
    assert c.started_at is None and c.startup_seconds is None


def test_an_empty_deployment_is_zero_replicas() -> None:
    assert mf.engine_state(REF, {"metadata": {"name": "sft-engine"}}, []) == mf.EngineState(0, 0, ())
