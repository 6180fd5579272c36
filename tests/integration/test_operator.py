"""The Kopf operator end to end against kmock (an API-server emulator), a test-side Job runner, and a real SeaweedFS.

The Job runner executes each Job's real container command (`genrun worker ...`) as a local process. Workers use the
replay engine (recorded real SmolLM2 outputs; GENRUN_ENGINE=replay) so these tests need no model; the real model
runs end to end in tests/e2e.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tests.integration.harness import (
    JOBS,
    RUNS,
    Cluster,
    JobRunner,
    OperatorProcess,
    SeaweedFS,
    _Emulator,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NS = "data"
SECRET_VALUE = "s3cr3t-value-never-shown"


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedFS]:
    with SeaweedFS() as weed:
        weed.client().create_bucket(Bucket="genrun-test")
        yield weed


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        crd = yaml.safe_load((ROOT / "crds" / "generationrun.yaml").read_text())
        c.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        c.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        c.create(f"/api/v1/namespaces/{NS}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds", "namespace": NS},
            "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"test").decode(),
                     "AWS_SECRET_ACCESS_KEY": base64.b64encode(SECRET_VALUE.encode()).decode()},
        })  # fmt: skip
        yield c


def manifest(name: str, s3: SeaweedFS, **spec_over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"name": "embedded:smollm2-135m"},
        "prompt": {"domains": ["cooking", "travel", "programming", "history"]},
        "sampling": {"maxTokens": 128},
        "shards": {"initial": 2, "firstSeed": 100, "examplesPerShard": 12},
        "target": {"uniqueExamples": 30},
        "escalation": {"maxShardsPerRound": 4},
        "budget": {"maxRounds": 5, "maxShards": 20, "maxShardRetries": 1},
        "output": {
            "path": f"s3://genrun-test/{name}",
            "s3": {"endpoint": s3.endpoint, "credentialsSecret": "s3-creds"},
        },
        "worker": {"gpus": 0},
        # The semantic tier (on by default) would load an embedding model in every Job: what these tests check of the
        # operator does not depend on it, and test_merge_semantic and test_accounting cover the tier.
        "dedup": {"semantic": {"enabled": False}},
    }
    for k, v in spec_over.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    return {
        "apiVersion": "genrun.io/v1alpha1",
        "kind": "GenerationRun",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def succeeded(cluster: Cluster, name: str) -> bool:
    cond = cluster.condition(NS, name, "Succeeded")
    failed = cluster.condition(NS, name, "Failed")
    if failed and failed["status"] == "True":
        raise AssertionError(f"run failed: {failed}")
    return bool(cond and cond["status"] == "True")


def dataset_rows(s3: SeaweedFS, run: dict[str, Any]) -> list[dict[str, Any]]:
    """The dataset is a folder of parts (one per round): all of them, in key order."""
    prefix = run["status"]["output"]["dataset"].removeprefix("s3://genrun-test/")
    listing = s3.client().list_objects_v2(Bucket="genrun-test", Prefix=prefix).get("Contents", [])
    rows: list[dict[str, Any]] = []
    for key in sorted(o["Key"] for o in listing):
        body = s3.client().get_object(Bucket="genrun-test", Key=key)["Body"].read()
        rows += pq.read_table(io.BytesIO(body)).to_pylist()
    return rows


def events_with(cluster: Cluster, *reasons: str, timeout: float = 30) -> list[dict[str, Any]]:
    """The namespace's Events once those reasons are among them: Kopf posts Events from a queue of its own, so they
    may reach the API server after the status patch a test waited for (seen failing CI)."""

    def ready() -> list[dict[str, Any]] | None:
        events: list[dict[str, Any]] = cluster.items(f"/api/v1/namespaces/{NS}/events")
        return events if set(reasons) <= {e.get("reason") for e in events} else None

    got: list[dict[str, Any]] = wait_for(ready, timeout, f"Events {', '.join(reasons)}")
    return got


def test_run_reaches_target_in_rounds_with_metrics_events_and_no_secret_leak(cluster: Cluster, s3: SeaweedFS) -> None:
    with JobRunner(cluster, NS, {"GENRUN_ENGINE": "replay"}) as runner, OperatorProcess(cluster, NS) as op:
        cluster.create(RUNS.format(ns=NS), manifest("two-rounds", s3))
        wait_for(lambda: succeeded(cluster, "two-rounds"), 240, "Succeeded")
        run = cluster.run(NS, "two-rounds")
        st = run["status"]
        assert st["round"] >= 2 and len(st["rounds"]) == st["round"]
        assert st["totals"]["qcPassed"] >= 30
        assert st["observedGeneration"] == run["metadata"].get("generation", 1)
        assert {c["type"]: c["status"] for c in st["conditions"]} == {
            "Succeeded": "True", "Failed": "False", "Progressing": "False", "Suspended": "False",
            "Ready": "True", "Reconciling": "False", "Stalled": "False",
        }  # fmt: skip
        assert not [k for k in st if k in ("reconcile", "periodic")]  # handlers return nothing into status

        jobs = cluster.items(JOBS.format(ns=NS))
        names = [j["metadata"]["name"] for j in jobs]
        assert len(names) == len(set(names))
        assert "two-rounds-r1-s100" in names and "two-rounds-r1-merge" in names
        job = next(j for j in jobs if j["metadata"]["name"] == "two-rounds-r1-s100")
        assert job["metadata"]["ownerReferences"][0]["name"] == "two-rounds"
        assert len(dataset_rows(s3, run)) == st["totals"]["qcPassed"]

        # The run's engine (shared, the default): one Deployment started for all rounds, its Service named in each
        # shard's job spec, scaled to zero once the run finished; its pod's device time is in the status.
        deps = cluster.items(f"/apis/apps/v1/namespaces/{NS}/deployments")
        assert [d["metadata"]["name"] for d in deps] == ["two-rounds-engine"]
        assert deps[0]["metadata"]["ownerReferences"][0]["name"] == "two-rounds"
        wait_for(lambda: cluster.items(f"/apis/apps/v1/namespaces/{NS}/deployments")[0]["spec"]["replicas"] == 0,
                 30, "the engine scaled to zero")  # fmt: skip
        cm = cluster.get(f"/api/v1/namespaces/{NS}/configmaps/two-rounds-r1-s100")
        assert "two-rounds-engine.data.svc:8000" in json.dumps(cm)
        assert "nvidia.com/gpu" not in json.dumps(job["spec"]["template"]["spec"]["containers"][0]["resources"])
        assert st["totals"]["engineStarts"] == 1 and st["totals"]["engineSeconds"] > 0

        # Metrics over HTTP agree with the status (which comes from the merge report).
        def metric(text: str, name: str) -> float:
            m = re.search(rf'^{name}\{{name="two-rounds",namespace="{NS}"\}} (\S+)$', text, re.M)
            return float(m.group(1)) if m else -1.0

        def scraped() -> str | None:
            t = op.scrape()
            return t if metric(t, "genrun_qc_passed_examples") == st["totals"]["qcPassed"] else None

        text = wait_for(scraped, 20, "metrics to match")
        assert metric(text, "genrun_generated_examples_total") == st["totals"]["generated"]
        assert metric(text, "genrun_unique_examples") == st["totals"]["unique"]
        assert metric(text, "genrun_target_examples") == 30
        assert metric(text, "genrun_duplication_ratio") == pytest.approx(st["totals"]["duplicationRatio"])
        assert 'genrun_run_condition{condition="Succeeded",name="two-rounds",namespace="data"} 1.0' in text
        assert 'genrun_unique_yield_ratio{name="two-rounds",namespace="data",round="1"}' in text
        assert "genrun_build_info" in text and "genrun_reconcile_duration_seconds_bucket" in text

        events = events_with(cluster, "RoundStarted", "RoundFinished", "TargetMet")

        # No Secret value in status, events, the operator's log, metrics, or Job manifests.
        everything = str(run) + str(events) + op.log() + text + str(jobs)
        assert SECRET_VALUE not in everything
        assert base64.b64encode(SECRET_VALUE.encode()).decode() not in everything

        # Deleting the run removes its Jobs (owner references on a real cluster; the delete handler here).
        cluster.delete(RUNS.format(ns=NS) + "/two-rounds")
        wait_for(lambda: not cluster.items(JOBS.format(ns=NS), ("genrun.io/run", "two-rounds")), 30, "Jobs deleted")
        wait_for(lambda: cluster.run(NS, "two-rounds") is None, 30, "run deleted")
        assert runner.procs == {}


def test_a_run_is_driven_by_its_jobs_and_its_spec_not_by_the_timer(cluster: Cluster, s3: SeaweedFS) -> None:
    """With the periodic step 10 minutes away, a suspended run resumes when its spec changes and goes through its
    rounds on its Jobs' events alone (the wake-ups; the race that once lost some of them showed only at scale, in
    bench/operator.py, where runs slept until the timer)."""
    with JobRunner(cluster, NS, {"GENRUN_ENGINE": "replay"}), OperatorProcess(cluster, NS, GENRUN_TIMER_SECONDS="600"):
        cluster.create(RUNS.format(ns=NS), manifest("evented", s3, suspend=True))
        wait_for(
            lambda: (c := cluster.condition(NS, "evented", "Suspended")) and c["status"] == "True", 60, "Suspended"
        )
        cluster.patch(RUNS.format(ns=NS) + "/evented", {"spec": {"suspend": False}})
        wait_for(lambda: succeeded(cluster, "evented"), 180, "Succeeded without the timer")
        assert cluster.run(NS, "evented")["status"]["round"] >= 2


def test_shard_that_keeps_failing_fails_the_run(cluster: Cluster, s3: SeaweedFS) -> None:
    def fail_seed_101(job: dict[str, Any]) -> int | None:
        return 1 if job["metadata"]["labels"].get("genrun.io/seed") == "101" else None

    with JobRunner(cluster, NS, {"GENRUN_ENGINE": "replay"}, fail=fail_seed_101), OperatorProcess(cluster, NS):
        cluster.create(RUNS.format(ns=NS), manifest("failing", s3))
        cond = wait_for(
            lambda: c if (c := cluster.condition(NS, "failing", "Failed")) and c["status"] == "True" else None,
            120,
            "Failed",
        )
        assert cond["reason"] == "ShardsFailed"
        assert "failing-r1-s101-a1" in cond["message"]
        names = {j["metadata"]["name"] for j in cluster.items(JOBS.format(ns=NS))}
        assert {"failing-r1-s101", "failing-r1-s101-a1"} <= names and "failing-r1-s101-a2" not in names
        assert "failing-r1-merge" not in names


def test_operator_killed_mid_round_restarts_without_duplicates_and_same_dataset(
    cluster: Cluster, s3: SeaweedFS
) -> None:
    with JobRunner(cluster, NS, {"GENRUN_ENGINE": "replay"}):
        op = OperatorProcess(cluster, NS).start()
        cluster.create(RUNS.format(ns=NS), manifest("killed", s3))
        wait_for(
            lambda: any(j["metadata"]["name"].startswith("killed-r1-s") for j in cluster.items(JOBS.format(ns=NS))),
            60,
            "first Jobs",
        )
        op.kill()
        time.sleep(2)
        op2 = OperatorProcess(cluster, NS).start()
        try:
            wait_for(
                lambda: (
                    cluster.condition(NS, "killed", "Progressing")
                    and cluster.run(NS, "killed")["status"].get("round", 0) >= 2
                ),
                120,
                "round 2",
            )
            op2.kill()  # and once more, mid-way through round 2
            op3 = OperatorProcess(cluster, NS).start()
            wait_for(lambda: succeeded(cluster, "killed"), 240, "Succeeded")
            op3.stop()
        finally:
            op2.kill()
        cluster.create(RUNS.format(ns=NS), manifest("reference", s3))
        with OperatorProcess(cluster, NS):
            wait_for(lambda: succeeded(cluster, "reference"), 240, "reference Succeeded")
        killed, ref = cluster.run(NS, "killed"), cluster.run(NS, "reference")
        names = [j["metadata"]["name"] for j in cluster.items(JOBS.format(ns=NS), ("genrun.io/run", "killed"))]
        assert len(names) == len(set(names))
        assert not [n for n in names if re.search(r"-a\d+$", n)]  # nothing was re-run as a retry
        strip = lambda rows: [{k: v for k, v in r.items() if k != "model"} for r in rows]  # noqa: E731
        assert strip(dataset_rows(s3, killed)) == strip(dataset_rows(s3, ref))
        # The same figures, but for device time: an interrupted run's engine is another start and holds longer.
        engine = {"engineStarts", "engineSeconds", "startupSeconds", "startupShare", "gpuHours"}
        figures = [{k: v for k, v in r["status"]["totals"].items() if k not in engine} for r in (killed, ref)]
        assert figures[0] == figures[1]


def test_suspend_and_resume(cluster: Cluster, s3: SeaweedFS) -> None:
    with JobRunner(cluster, NS, {"GENRUN_ENGINE": "replay"}), OperatorProcess(cluster, NS):
        cluster.create(RUNS.format(ns=NS), manifest("paused", s3, suspend=True))
        wait_for(lambda: (c := cluster.condition(NS, "paused", "Suspended")) and c["status"] == "True", 60, "Suspended")
        time.sleep(3)
        assert cluster.items(JOBS.format(ns=NS), ("genrun.io/run", "paused")) == []
        cluster.patch(RUNS.format(ns=NS) + "/paused", {"spec": {"suspend": False}})
        wait_for(lambda: succeeded(cluster, "paused"), 240, "Succeeded after resume")
        assert cluster.condition(NS, "paused", "Suspended")["status"] == "False"


def test_s3_down_for_30s_mid_round_loses_nothing(cluster: Cluster, s3: SeaweedFS) -> None:
    with JobRunner(cluster, NS, {"GENRUN_ENGINE": "replay"}) as runner, OperatorProcess(cluster, NS):
        cluster.create(RUNS.format(ns=NS), manifest("outage", s3, shards={"examplesPerShard": 40}))
        wait_for(lambda: runner.procs, 60, "a running shard")
        s3.stop()
        time.sleep(30)
        s3.start()
        wait_for(lambda: succeeded(cluster, "outage"), 300, "Succeeded after the outage")
        run = cluster.run(NS, "outage")
        assert len(dataset_rows(s3, run)) == run["status"]["totals"]["qcPassed"] >= 30
        listing = s3.client().list_objects_v2(Bucket="genrun-test", Prefix="outage/shards/")
        keys = [o["Key"] for o in listing.get("Contents", [])]
        seeds = {int(k.split("/s")[-1].split(".")[0]) for k in keys if k.endswith(".done.json")}
        planned = sum(r["shards"] for r in run["status"]["rounds"])
        assert len(seeds) == planned  # every shard published exactly once; none lost


def test_invalid_spec_is_reported_not_crashed(cluster: Cluster, s3: SeaweedFS) -> None:
    bad = manifest("bad", s3)
    bad["spec"]["sampling"]["temperature"] = 3.5
    health = free_port()
    with OperatorProcess(cluster, NS, GENRUN_HEALTH_PORT=str(health)) as op:
        cluster.create(RUNS.format(ns=NS), copy.deepcopy(bad))
        cond = wait_for(
            lambda: c if (c := cluster.condition(NS, "bad", "Failed")) and c["status"] == "True" else None, 60, "Failed"
        )
        assert cond["reason"] == "InvalidSpec"
        assert "spec.sampling.temperature: must be in (0, 2], got 3.5" in cond["message"]
        assert "Traceback" not in op.log()

        # The liveness endpoint the chart probes.
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        assert wait_for(healthy, 30, "/healthz")


def _failed(cluster: Cluster, name: str) -> dict[str, Any] | None:
    c = cluster.condition(NS, name, "Failed")
    return c if c and c["status"] == "True" else None


def test_secret_name_with_a_path_never_reads_another_namespace(cluster: Cluster, s3: SeaweedFS) -> None:
    """The issue's escape: `credentialsSecret: ../../kube-system/secrets/aws-creds` made the operator GET
    /api/v1/namespaces/data/secrets/../../kube-system/secrets/aws-creds, which the HTTP stack normalised."""
    cluster.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}})
    cluster.create("/api/v1/namespaces/kube-system/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "aws-creds", "namespace": "kube-system"},
        "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"admin").decode(),
                 "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"cluster-admin-key").decode()},
    })  # fmt: skip
    names = {
        "escape-dots": "../../kube-system/secrets/aws-creds",
        "escape-slash": "kube-system/aws-creds",
        "escape-encoded": "..%2F..%2Fkube-system%2Fsecrets%2Faws-creds",
        "escape-dot": "..",
    }
    first = len(_Emulator.log)
    with OperatorProcess(cluster, NS) as op:
        for run, secret in names.items():
            m = manifest(run, s3)
            m["spec"]["output"]["s3"]["credentialsSecret"] = secret
            cluster.create(RUNS.format(ns=NS), m)
        for run, secret in names.items():
            cond = wait_for(lambda run=run: _failed(cluster, run), 60, f"{run} Failed")
            assert cond["reason"] == "InvalidSpec"
            # Refused by the one validation path (validate.check_manifest) before any request; were it to let one
            # through, manifests.run_errors and api_path refuse it again (tests/unit/test_manifests.py).
            assert cond["message"].startswith("spec.output.s3.credentialsSecret: ") and repr(secret) in cond["message"]
        assert "Traceback" not in op.log()
    paths = [e[2] for e in _Emulator.log[first:]]
    assert not [p for p in paths if "secrets" in p or "kube-system" in p]  # not one request for any Secret
    assert not [j for j in cluster.items(JOBS.format(ns=NS)) if j["metadata"]["name"].startswith("escape-")]


def test_s3_output_without_a_secret_uses_no_operator_credentials_unless_allowed(
    cluster: Cluster, s3: SeaweedFS
) -> None:
    ambient = manifest("ambient", s3)
    del ambient["spec"]["output"]["s3"]["credentialsSecret"]
    with OperatorProcess(cluster, NS, AWS_ACCESS_KEY_ID="operator", AWS_SECRET_ACCESS_KEY="operator-key"):
        cluster.create(RUNS.format(ns=NS), copy.deepcopy(ambient))
        cond = wait_for(lambda: _failed(cluster, "ambient"), 60, "Failed")
        assert cond["reason"] == "InvalidSpec"
        assert cond["message"].startswith("spec.output.s3.credentialsSecret: is required for an s3:// output")
        assert "operator.allowAmbientCredentials" in cond["message"]
        assert not s3.client().list_objects_v2(Bucket="genrun-test", Prefix="ambient/").get("Contents")
    # An administrator who allows it: the same run starts (the operator reads the bucket with its own keys). No Job
    # runner here: shard Jobs that load their own engine are created without waiting for a run engine to get ready.
    ambient["metadata"]["name"] = "ambient-ok"
    ambient["spec"]["worker"]["engine"] = "perShard"
    with OperatorProcess(cluster, NS, GENRUN_ALLOW_AMBIENT_CREDENTIALS="true", AWS_ACCESS_KEY_ID="operator",
                         AWS_SECRET_ACCESS_KEY="operator-key"):  # fmt: skip
        cluster.create(RUNS.format(ns=NS), ambient)
        wait_for(lambda: cluster.items(JOBS.format(ns=NS), ("genrun.io/run", "ambient-ok")), 60, "Jobs")
        assert _failed(cluster, "ambient-ok") is None


def test_a_child_the_api_server_refuses_fails_the_run_once_not_forever(cluster: Cluster, s3: SeaweedFS) -> None:
    message = 'Job.batch "refused-r1-s100" is invalid: metadata.labels: Invalid value: must be 63 characters or less'

    def refuse(method: str, path: str, body: Any) -> tuple[int, str] | None:
        name = (body or {}).get("metadata", {}).get("name", "") if isinstance(body, dict) else ""
        return (422, message) if method == "POST" and path.endswith("/jobs") and name.startswith("refused-") else None

    cluster.emulator.reject = refuse
    with OperatorProcess(cluster, NS) as op:
        # perShard: no Job runner here, so no run engine gets ready; the shard Jobs are sent (and refused) at once.
        cluster.create(RUNS.format(ns=NS), manifest("refused", s3, worker={"engine": "perShard"}))
        cond = wait_for(lambda: _failed(cluster, "refused"), 60, "Failed")
        assert cond["reason"] == "ChildRejected"
        assert "(422)" in cond["message"] and message in cond["message"]
        events = events_with(cluster, "ChildRejected")
        assert [e for e in events if e.get("reason") == "ChildRejected" and e.get("type") == "Warning"]

        def job_posts() -> int:
            return sum(1 for e in _Emulator.log if e[1] == "POST" and e[2].endswith(f"/namespaces/{NS}/jobs"))

        before = job_posts()
        time.sleep(7)  # the timer reconciles every 2 s here: a retry loop would POST again
        assert job_posts() == before
        assert "Traceback" not in op.log()


def test_damaged_shard_marker_is_quarantined_counted_and_announced(cluster: Cluster, s3: SeaweedFS) -> None:
    """A truncated `*.done.json` (what the issue saw end a run MergeFailed naming no file): set aside, counted in
    status.totals.shardsQuarantined with a Warning Event, and the run goes on."""
    key = "damaged/shards/r0001/s0000000101.done.json"

    def damage_seed_101(job: dict[str, Any]) -> int | None:
        if job["metadata"]["labels"].get("genrun.io/seed") != "101":
            return None
        s3.client().put_object(Bucket="genrun-test", Key=key, Body=b'{"round": 1, "seed": 101, "ro')  # truncated
        return 0  # the pod "succeeded" but left a damaged marker

    with JobRunner(cluster, NS, {"GENRUN_ENGINE": "replay"}, fail=damage_seed_101), OperatorProcess(cluster, NS) as op:
        cluster.create(RUNS.format(ns=NS), manifest("damaged", s3))
        wait_for(lambda: succeeded(cluster, "damaged"), 240, "Succeeded")
        st = cluster.run(NS, "damaged")["status"]
        assert st["totals"]["shardsQuarantined"] == 1
        record = s3.client().get_object(
            Bucket="genrun-test", Key=f"damaged/quarantine/{key.removeprefix('damaged/')}.json"
        )
        assert "unreadable" in json.loads(record["Body"].read())["error"]
        events = [e for e in events_with(cluster, "ShardsQuarantined") if e.get("reason") == "ShardsQuarantined"]
        assert events and events[0]["type"] == "Warning" and "1 shard(s) quarantined" in events[0]["message"]
        assert "Traceback" not in op.log()
