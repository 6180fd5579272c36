"""Pure Job/ConfigMap builders: what the operator creates, inspected without a cluster."""

from __future__ import annotations

import argparse
import base64
import json
import random
from pathlib import Path
from typing import Any

import pytest
from genrun.contract import errors
from genrun.contract import records as rec
from genrun.contract.api import RunRef, parse_spec
from genrun.operator import manifests as mf
from genrun.operator.planner import Observed, RecordRound, decide
from genrun.operator.settings import Settings

REF = RunRef("sft", "data", "uid-1", 2)
RAW = {
    "model": {"name": "Qwen/Qwen2.5-32B"},
    "target": {"uniqueExamples": 6000},
    "output": {"path": "s3://sft-data/run", "s3": {"endpoint": "http://minio:9000", "credentialsSecret": "s3"}},
    "shards": {"initial": 2, "firstSeed": 100},
    "worker": {"gpus": 2, "queueName": "gpu-batch", "nodeSelector": {"gpu": "a100"}, "priorityClassName": "batch",
               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}], "modelVolumeClaim": "models",
               "engine": "perShard"},
}  # fmt: skip


def test_shard_job() -> None:
    spec = parse_spec(RAW)
    plan = decide(REF, spec, Observed())
    action = plan.actions[1]
    job = mf.shard_job(REF, action, spec, Settings())  # type: ignore[arg-type]
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
    assert c["command"] == ["genrun"] and c["args"] == ["worker", "generate", "--job", "/etc/genrun/job/job.json"]
    # The job spec is a file from the Job's own ConfigMap (same name), never an argv string.
    cm = mf.job_configmap(REF, action, RAW)  # type: ignore[arg-type]
    assert cm["metadata"]["name"] == meta["name"] and cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    job_spec = rec.job_spec_from(json.loads(cm["data"]["job.json"]))
    assert job_spec.shard is not None and job_spec.shard.seed == 100 and job_spec.spec == RAW
    vol = next(v for v in pod["volumes"] if v["name"] == "job")
    assert vol["configMap"]["name"] == meta["name"]
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
    job = mf.merge_job(REF, CreateMergeJob("sft-r1-merge", 0, 1, ((1, 100), (1, 101))), spec, Settings())
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and c["args"][1] == "merge"
    single = mf.merge_job(REF, CreateMergeJob("sft-r1-merge", 0, 1, ()), parse_spec(RAW), Settings())
    assert "completionMode" not in single["spec"]


def test_merge_jobs_carry_no_process_tuning() -> None:
    """The operator builds no allocator settings into a Job: the merge process sets its own (worker/runtime.py)."""
    from genrun.operator.planner import CreateMergeJob

    merge = mf.merge_job(REF, CreateMergeJob("sft-r1-merge", 0, 1, ()), parse_spec(RAW), Settings())
    env = {e["name"] for e in merge["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "GLIBC_TUNABLES" not in env


def test_round_plan_round_trips_through_its_storage_record() -> None:
    """Round plans are recorded on storage (rounds/rNNNN/plan.json), read back by every later step."""
    spec = parse_spec(RAW)
    plan = next(a for a in decide(REF, spec, Observed()).actions if isinstance(a, RecordRound)).plan
    assert rec.round_plan_key(plan.round) == "rounds/r0001/plan.json"
    assert rec.round_plan_from(json.loads(rec.to_json(plan))) == plan


def test_job_summary_reads_phase_and_retriability() -> None:
    spec = parse_spec(RAW)
    job = mf.shard_job(REF, decide(REF, spec, Observed()).actions[1], spec, Settings())  # type: ignore[arg-type]
    assert mf.job_summary(job)["phase"] == "Pending"  # suspended, waiting for Kueue
    job["spec"]["suspend"] = False
    assert mf.job_summary(job)["phase"] == "Pending"  # no pod yet
    job["status"] = {"active": 1}
    assert mf.job_summary(job)["phase"] == "Running"
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
    with pytest.raises(SettingsError, match="GENRUN_START_CONCURRENCY: must be >= 1"):
        Settings.from_env({"GENRUN_START_CONCURRENCY": "0"})


# ---------------------------------------------------------------------------------------------------------------
# Any valid spec starts: the job spec is a mounted file, and no argument grows with the spec.


def _sized_spec(alphabet: str, examples: int, domains: int) -> dict[str, Any]:
    """A spec at the CRD's size bounds (maxItems/maxLength of prompt.examples and prompt.domains), non-ASCII."""
    rng = random.Random(7)

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    prompt = {
        "template": "Topic: {domain}. " + text(8000) + "\n{examples}",
        "domains": [f"{i}-{text(190)}" for i in range(domains)],
        "examples": [{"instruction": text(4096), "response": text(8192), "domain": text(200)} for _ in range(examples)],
    }
    return {**RAW, "prompt": prompt}


def _mount(cm: dict[str, Any], folder: Path) -> Path:
    """What the kubelet does with a ConfigMap volume: one file per key (binaryData decoded)."""
    for key, text in (cm.get("data") or {}).items():
        (folder / key).write_text(text, encoding="utf-8")
    for key, b64 in (cm.get("binaryData") or {}).items():
        (folder / key).write_bytes(base64.b64decode(b64))
    return folder / mf.JOB_FILE


@pytest.mark.parametrize(
    ("examples", "domains", "stored_as"),
    [(16, 0, "data"), (64, 512, "binaryData")],  # the issue's 74 KB manifest; the CRD's maxItems x maxLength
)
def test_jobs_for_a_spec_at_the_crd_size_bounds_have_small_arguments_and_the_worker_reads_the_mounted_spec(
    tmp_path: Path, examples: int, domains: int, stored_as: str
) -> None:
    from genrun.operator.planner import CreateMergeJob, CreateShardJob
    from genrun.worker import cli

    raw = _sized_spec("éàüßøñçΩжщ漢字ā ", examples, domains)
    spec = parse_spec(raw)
    shard = next(a for a in decide(REF, spec, Observed()).actions if isinstance(a, CreateShardJob))
    merge = CreateMergeJob("sft-r1-merge", 0, 1, ((1, 100), (1, 101)))
    for action, job in ((shard, mf.shard_job(REF, shard, spec, Settings())),
                        (merge, mf.merge_job(REF, merge, spec, Settings()))):  # fmt: skip
        c = job["spec"]["template"]["spec"]["containers"][0]
        sizes = [len(a.encode()) for a in c["command"] + c["args"]]
        sizes += [len(str(e.get("value", "")).encode()) for e in c["env"]]
        assert max(sizes) < 4096, sizes  # Linux refuses one argument over 128 KiB; nothing here grows with the spec
        cm = mf.job_configmap(REF, action, raw)
        stored = sum(len(v.encode()) for v in (cm.get("data") or {}).values())
        stored += sum(len(base64.b64decode(v)) for v in (cm.get("binaryData") or {}).values())
        assert stored_as in cm and stored < mf.CONFIGMAP_MAX_BYTES  # what the API server counts
        folder = tmp_path / action.name
        folder.mkdir()
        path = _mount(cm, folder)
        kind = "shard" if action is shard else "merge"
        job_spec, parsed = cli._load_job(argparse.Namespace(job=str(path), kind=kind))
        assert job_spec.spec == raw and parsed == spec


def test_a_job_spec_beyond_what_a_configmap_holds_is_refused_naming_its_size() -> None:
    from genrun.operator.planner import CreateShardJob

    # Random text from 20,000 CJK code points barely compresses: ~2.4 MB of job spec, ~1.5 MB gzip-compressed.
    raw = _sized_spec("".join(chr(0x4E00 + i) for i in range(20000)), 64, 512)
    spec = parse_spec(raw)
    shard = next(a for a in decide(REF, spec, Observed()).actions if isinstance(a, CreateShardJob))
    with pytest.raises(mf.TooLarge, match=r"sft-r1-s100 is [\d,]+ bytes \([\d,]+ compressed\), over the 1,048,576"):
        mf.job_configmap(REF, shard, raw)


def test_worker_cli_generates_a_shard_from_the_mounted_job_spec(tmp_path: Path) -> None:
    """The real worker entry point (`genrun worker generate --job FILE`) on the replay engine (recorded SmolLM2
    outputs; no model here)."""
    from genrun.operator.planner import CreateShardJob
    from genrun.worker import cli

    raw = {**RAW, "output": {"path": str(tmp_path / "out")}, "shards": {"initial": 1, "examplesPerShard": 4},
           "target": {"uniqueExamples": 20}, "policy": {"pilotShare": 0},
           "worker": {"gpus": 0}, "prompt": {"domains": ["cooking", "travel"]}}  # fmt: skip
    spec = parse_spec(raw)
    shard = next(a for a in decide(REF, spec, Observed()).actions if isinstance(a, CreateShardJob))
    job = mf.shard_job(REF, shard, spec, Settings())
    folder = tmp_path / "job"
    folder.mkdir()
    path = _mount(mf.job_configmap(REF, shard, raw), folder)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-1] == f"{mf.JOB_DIR}/{mf.JOB_FILE}"
    assert cli.main([*args[1:-1], str(path), "--engine", "replay"]) == 0
    assert (tmp_path / "out" / rec.shard_manifest_key(1, shard.shard.seed)).exists()
    path.write_bytes(b"\x1f\x8b truncated")  # a damaged file: a clear usage error, never a traceback
    assert cli.main([*args[1:-1], str(path), "--engine", "replay"]) == errors.EXIT_USAGE


# ---------------------------------------------------------------------------------------------------------------
# No path escape, no confused deputy.


# The client's side (names checked, paths built by kubernetes_asyncio): tests/unit/test_kube.py.


def test_run_errors_name_the_field_and_the_fix() -> None:
    import dataclasses

    from genrun.contract.api import S3Spec

    # Validation refuses this name first (a DNS-1123 pattern); the builders refuse it again should anything get past.
    good = parse_spec({**RAW, "output": {"path": "s3://b-1/p", "s3": {"credentialsSecret": "creds"}}})
    bad = dataclasses.replace(
        good, output=dataclasses.replace(good.output, s3=S3Spec(credentials_secret="../kube-system/x"))
    )
    (err,) = mf.run_errors(bad, Settings())
    assert err.startswith("spec.output.s3.credentialsSecret: '../kube-system/x' is not a Secret name")
    ambient = parse_spec({**RAW, "output": {"path": "s3://b-1/p", "s3": {"endpoint": "http://evil:9000"}}})
    (err,) = mf.run_errors(ambient, Settings())
    assert "spec.output.s3.credentialsSecret: is required for an s3:// output" in err
    assert "operator.allowAmbientCredentials" in err
    assert mf.run_errors(ambient, Settings(allow_ambient_credentials=True)) == []
    assert Settings.from_env({"GENRUN_ALLOW_AMBIENT_CREDENTIALS": "true"}).allow_ambient_credentials
    assert mf.run_errors(parse_spec(RAW), Settings()) == []
    assert mf.run_errors(parse_spec({**RAW, "output": {"path": "/data/out"}}), Settings()) == []


def test_worker_pods_meet_pod_security_restricted() -> None:
    """The checks of Pod Security "restricted" (and the image's user, Dockerfile.worker, matching runAsUser)."""
    import re

    spec = parse_spec(RAW)
    from genrun.operator.planner import CreateMergeJob

    jobs = [
        mf.shard_job(REF, decide(REF, spec, Observed()).actions[1], spec, Settings()),  # type: ignore[arg-type]
        mf.merge_job(REF, CreateMergeJob("sft-r1-merge", 0, 1, ()), spec, Settings()),
    ]
    docker = (Path(__file__).resolve().parents[2] / "Dockerfile.worker").read_text()
    assert re.search(rf"^USER {mf.WORKER_UID}:{mf.WORKER_UID}$", docker, re.M)
    assert f"--uid {mf.WORKER_UID} " in docker
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == psc["fsGroup"] == mf.WORKER_UID
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        (c,) = pod["containers"]
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert not any(k in pod for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert all("hostPath" not in v for v in pod["volumes"])
        # Every path the engine and its caches write is a writable emptyDir (the root filesystem is read-only).
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        env = {e["name"]: e.get("value", "") for e in c["env"]}
        for var in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCH_HOME",
                    "TORCHINDUCTOR_CACHE_DIR", "NUMBA_CACHE_DIR", "VLLM_CONFIG_ROOT"):  # fmt: skip
            assert any(env[var] == w or env[var].startswith(w + "/") for w in writable), var
        assert env["HF_HOME"] == "/models/.hf-cache"  # read from the model PVC (RAW has modelVolumeClaim)
    no_pvc = parse_spec({**RAW, "worker": {"gpus": 0}})
    job = mf.shard_job(REF, decide(REF, no_pvc, Observed()).actions[1], no_pvc, Settings())  # type: ignore[arg-type]
    env = {e["name"]: e.get("value", "") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_HOME"].startswith(mf.HOME + "/")  # downloads go to the emptyDir


@pytest.mark.parametrize(("retries", "retriable", "said"), [(0, True, "after 0 retries"), (1, True, "after 1 retry"),
                                                            (3, False, "after 0 retries")])  # fmt: skip
def test_shards_failed_message_states_the_retries_really_made(retries: int, retriable: bool, said: str) -> None:
    """The issue: "after 1 retries" was printed from the bound, also when no retry was made (a non-retriable exit)."""
    from genrun.operator import conditions as c
    from genrun.operator.planner import CreateShardJob, ObservedJob

    raw = {**RAW, "budget": {"maxShardRetries": retries, "maxFailedShards": 0}}
    spec = parse_spec(raw)
    plan = decide(REF, spec, Observed())
    rnd = next(a for a in plan.actions if isinstance(a, RecordRound)).plan
    obs, jobs = Observed({1: rnd}), []
    for _ in range(retries + 2):
        plan = decide(REF, spec, obs)
        if plan.finished:
            break
        for a in plan.actions:
            if isinstance(a, CreateShardJob):
                ok = a.shard.seed != 100
                jobs.append(ObservedJob(a.name, "shard", 1, a.shard.seed, a.attempt, "Succeeded" if ok else "Failed",
                                        retriable, "" if ok else "exit code 1"))  # fmt: skip
        obs = Observed({1: rnd}, tuple(jobs))
    failed = plan.condition(c.FAILED)
    assert failed.reason == c.SHARDS_FAILED and f"({said}, spec.budget.maxShardRetries={retries})" in failed.message


def test_lean_diffbase_builds_kopfs_own_essence_for_runs_and_jobs() -> None:
    """The operator's cheaper essence (no deep copy of status and system metadata first) equals Kopf's, for a run
    with a status and Kopf's annotations and for a shard Job, so update handlers see the same diffs."""
    import kopf
    from genrun.operator.kopf_state import LeanDiffBase

    spec = parse_spec(RAW)
    job = mf.shard_job(REF, decide(REF, spec, Observed()).actions[1], spec, Settings())  # type: ignore[arg-type]
    job["status"] = {"active": 1}
    job["metadata"].update(uid="u", resourceVersion="7", managedFields=[{"manager": "kube"}])
    run = {
        "apiVersion": "genrun.io/v1alpha1",
        "kind": "GenerationRun",
        "metadata": {"name": "sft", "namespace": "data", "uid": "uid-1", "generation": 2, "labels": {"team": "a"},
                     "annotations": {"genrun.io/last-handled-configuration": "{}", "genrun.io/loop": "{}",
                                     "note": "kept", "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                     "finalizers": ["genrun.io/finalizer"]},
        "spec": RAW,
        "status": {"totals": {"kept": 5}, "conditions": [{"type": "Ready", "status": "False"}]},
    }  # fmt: skip
    kopfs = kopf.AnnotationsDiffBaseStorage(prefix="genrun.io", key="last-handled-configuration")
    lean = LeanDiffBase(prefix="genrun.io", key="last-handled-configuration")
    for raw in (run, job):
        body = kopf.Body(raw)
        assert lean.build(body=body) == kopfs.build(body=body)
        for fields in (["status.totals"], [("spec",)], ["spec.target"], [("metadata", "uid")]):  # as Kopf passes them
            assert lean.build(body=body, extra_fields=fields) == kopfs.build(body=body, extra_fields=fields)
    essence = lean.build(body=kopf.Body(run))
    assert essence["spec"] == RAW and "status" not in essence and essence["metadata"]["labels"] == {"team": "a"}


def test_kinds_given_an_empty_essence_have_no_handler_that_reads_their_diff() -> None:
    """STATELESS_KINDS skip Kopf's essence (see LeanDiffBase): valid only while nothing but index and event handlers
    watch them. An update, delete or daemon handler added for Jobs must fail here, not silently see no diffs."""
    import kopf
    from genrun.operator.handlers import build
    from genrun.operator.kopf_state import STATELESS_KINDS, LeanDiffBase

    registry = build(Settings())[0]
    plurals = {"Job": "jobs"}

    def names(handlers: Any) -> set[str]:
        return {h.selector.plural or h.selector.any_name for h in handlers if h.selector is not None}

    stateful = names([*registry._changing.get_all_handlers(), *registry._spawning.get_all_handlers()])
    assert "generationruns" in stateful  # the check sees the handlers it guards against
    for kind in STATELESS_KINDS:
        assert plurals[kind] not in stateful and plurals[kind] in names(registry._indexing.get_all_handlers())
    lean = LeanDiffBase(stateless=STATELESS_KINDS, prefix="genrun.io")
    assert lean.build(body=kopf.Body({"kind": "Job", "spec": {"x": 1}})) == {}
    assert lean.build(body=kopf.Body({"kind": "GenerationRun", "spec": {"x": 1}})) == {"spec": {"x": 1}}


def test_runs_take_turns_starting_their_jobs() -> None:
    """KubeRun.start shares one bound (settings.start_concurrency) across runs, first come first served: a run whose
    step began first has all its Jobs created before the next run's, so its step (and its status) ends early instead
    of waiting for every run's creates (bench/operator.py: reaction p99 at 500 x 20 from 24 s to under 1 s)."""
    import asyncio
    from types import SimpleNamespace

    from genrun.operator.handlers import KubeRun

    spec = parse_spec({**RAW, "shards": {"initial": 4, "firstSeed": 100}, "policy": {"pilotShare": 0}})
    actions = [a for a in decide(REF, spec, Observed()).actions if not isinstance(a, RecordRound)]
    order: list[tuple[str, str]] = []

    class Kube:
        async def create(self, kind: str, ns: str, body: dict[str, Any]) -> None:
            await asyncio.sleep(0.001)
            order.append((ns, kind))

    async def main() -> None:
        starts = asyncio.Semaphore(2)
        runs = []
        for ns in ("first", "second"):
            run = KubeRun.__new__(KubeRun)
            run.settings, run.kube, run.starts, run.created = Settings(), Kube(), starts, {}
            run.key, run.loop = (ns, "sft"), SimpleNamespace(ref=REF, raw_spec=RAW, spec=spec)
            runs.append(run)
        await asyncio.gather(*(run.start(a) for run in runs for a in actions))

    asyncio.run(main())
    assert len(actions) == 4 and len(order) == 16
    assert [ns for ns, _ in order] == ["first"] * 8 + ["second"] * 8


def test_a_hung_create_times_out_and_frees_its_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A create that never answers (a half-open connection) must not hold one of the shared start slots forever: it
    times out (TimeoutError, an OSError: the daemon logs it and steps again) and the next run's Jobs start."""
    import asyncio
    from types import SimpleNamespace

    import genrun.operator.handlers as h

    monkeypatch.setattr(h, "START_TIMEOUT_SECONDS", 0.05)
    spec = parse_spec({**RAW, "shards": {"initial": 1, "firstSeed": 100}, "policy": {"pilotShare": 0}})
    action = next(a for a in decide(REF, spec, Observed()).actions if not isinstance(a, RecordRound))
    created: list[str] = []

    class Kube:
        def __init__(self, hang: bool) -> None:
            self.hang = hang

        async def create(self, kind: str, ns: str, body: dict[str, Any]) -> None:
            if self.hang:
                await asyncio.sleep(3600)
            created.append(ns)

    async def main() -> None:
        starts = asyncio.Semaphore(1)
        runs = []
        for ns, hang in (("hung", True), ("next", False)):
            run = h.KubeRun.__new__(h.KubeRun)
            run.settings, run.kube, run.starts, run.created = Settings(), Kube(hang), starts, {}
            run.key, run.loop = (ns, "sft"), SimpleNamespace(ref=REF, raw_spec=RAW, spec=spec)
            runs.append(run)
        hung, nxt = await asyncio.gather(*(r.start(action) for r in runs), return_exceptions=True)
        assert isinstance(hung, TimeoutError) and isinstance(hung, OSError) and nxt is None

    asyncio.run(asyncio.wait_for(main(), 10))
    assert created == ["next", "next"]
