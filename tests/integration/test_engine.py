"""The run's engine on a cluster: operator/kube.py's engine calls against kmock (an emulated API server: it stores and
merges objects, but does not validate, default, filter by label or run a Deployment controller: the test writes the
pods and statuses a controller and kubelet would), the builders' output against the real Kubernetes 1.31 schemas
(kubernetes-validate), and the chart's RBAC and NetworkPolicies as helm renders them."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from genrun.contract.api import RunRef, parse_spec
from genrun.operator import kube as k
from genrun.operator import manifests as mf
from genrun.operator.planner import Observed, decide
from genrun.operator.settings import Settings

from tests.integration.harness import Cluster
from tests.integration.test_chart import render, tool

pytestmark = pytest.mark.integration
NS = "data"
REF = RunRef("sft", NS, "uid-1", 1)
RAW: dict[str, Any] = {
    "model": {"name": "Qwen/Qwen2.5-32B", "tensorParallelSize": 2, "loadFormat": "runai_streamer"},
    "target": {"uniqueExamples": 6000},
    "output": {"path": "s3://sft-data/run", "s3": {"credentialsSecret": "s3"}},
    "worker": {"gpus": 2, "queueName": "gpu-batch", "modelVolumeClaim": "models", "cacheVolumeClaim": "vllm-cache",
               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}  # fmt: skip
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
SERVICES = f"/api/v1/namespaces/{NS}/services"
PODS = f"/api/v1/namespaces/{NS}/pods"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        c.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        yield c


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def engine_pod(name: str, run_name: str, started: str, ready: str | None) -> dict[str, Any]:
    """A pod as the Deployment controller and the kubelet would leave it."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {mf.LABEL_RUN: run_name, mf.LABEL_KIND: mf.ENGINE}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False",
                            "lastTransitionTime": ready or started}],
            "containerStatuses": [{"name": mf.ENGINE, "restartCount": 0, "state": {"running": {"startedAt": started}}}],
        },
    }  # fmt: skip


def test_engine_is_created_then_patched_scaled_observed_and_deleted(cluster: Cluster) -> None:
    spec = parse_spec(RAW)
    name = mf.engine_name(REF.name)

    async def go() -> None:
        kube = k.Kube(Settings(server=cluster.url))
        try:
            assert await kube.engine_state(REF) is None  # no engine yet
            assert await kube.scale(NS, name, 1) is False
            assert await kube.apply("Deployment", NS, mf.engine_deployment(REF, spec, Settings(), replicas=1)) is True
            assert await kube.apply("Service", NS, mf.engine_service(REF, spec)) is True
            # Applying again brings the object to the new desired state instead of failing on the existing one.
            changed = mf.engine_deployment(REF, spec, Settings(worker_image="registry.example.com/w:2"), replicas=2)
            assert await kube.apply("Deployment", NS, changed) is False
            assert await kube.apply("Service", NS, mf.engine_service(REF, spec)) is False
            dep = cluster.get(f"{DEPLOYMENTS}/{name}")
            assert dep["spec"]["replicas"] == 2
            assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/w:2"
            assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
            assert cluster.get(f"{SERVICES}/{name}")["spec"]["selector"] == mf.engine_selector(REF)

            # The Deployment controller and kubelet's part: one pod ready after 95 s, one still loading, and a
            # pod of another run that a real label selector would not return.
            cluster.create(PODS, engine_pod(f"{name}-1", "sft", "2026-12-07T03:00:00Z", "2026-12-07T03:01:35Z"))
            cluster.create(PODS, engine_pod(f"{name}-2", "sft", "2026-12-07T03:00:30Z", None))
            cluster.create(PODS, engine_pod("other-engine-1", "other", "2026-12-07T03:00:00Z", "2026-12-07T03:00:05Z"))
            cluster.patch(f"{DEPLOYMENTS}/{name}", {"status": {"replicas": 2, "readyReplicas": 1}})
            state = await kube.engine_state(REF)
            assert state is not None and (state.replicas, state.ready_replicas) == (2, 1)
            assert [(p.name, p.startup_seconds) for p in state.pods] == [(f"{name}-1", 95.0), (f"{name}-2", None)]

            # The run ends or is suspended: its GPUs go, the Deployment and Service stay for the next round.
            assert await kube.scale(NS, name, 0) is True
            assert cluster.get(f"{DEPLOYMENTS}/{name}")["spec"]["replicas"] == 0
            await kube.delete("Deployment", NS, name)
            await kube.delete("Service", NS, name)
            assert cluster.get(f"{DEPLOYMENTS}/{name}") is None and cluster.get(f"{SERVICES}/{name}") is None
            assert await kube.engine_state(REF) is None
        finally:
            await kube.close()

    run(go())


def test_an_engine_the_api_server_refuses_fails_for_good_and_a_busy_one_retries(cluster: Cluster) -> None:
    spec = parse_spec(RAW)
    verdict: dict[str, tuple[int, str]] = {}
    cluster.emulator.reject = lambda method, path, body: verdict.get(method) if "/deployments" in path else None

    async def go() -> None:
        kube = k.Kube(Settings(server=cluster.url))
        try:
            body = mf.engine_deployment(REF, spec, Settings())
            verdict["POST"] = (422, "spec.template.spec.containers[0].resources: GPUs must be whole")
            with pytest.raises(k.ChildRejected, match="GPUs must be whole"):
                await kube.apply("Deployment", NS, body)
            verdict["POST"] = (429, "slow down")
            with pytest.raises(kopf.TemporaryError):
                await kube.apply("Deployment", NS, body)
            verdict.clear()
            assert await kube.apply("Deployment", NS, body) is True
            verdict["PATCH"] = (500, "etcd is down")
            with pytest.raises(kopf.TemporaryError):
                await kube.scale(NS, mf.engine_name(REF.name), 3)
        finally:
            await kube.close()

    run(go())


def test_engine_names_never_reach_the_server_unchecked(cluster: Cluster) -> None:
    seen: list[str] = []
    cluster.emulator.reject = lambda method, path, body: seen.append(f"{method} {path}")

    async def go() -> None:
        kube = k.Kube(Settings(server=cluster.url))
        try:
            calls = (
                kube.scale(NS, "../x", 1), kube.scale("a/b", "x", 1), kube.delete("Service", NS, ".."),
                kube.engine_state(RunRef("../../kube-system/x", NS)), kube.engine_state(RunRef("sft", "a/b")),
                kube.apply("Service", "a/b", {"metadata": {"name": "x"}}),
            )  # fmt: skip
            for call in calls:
                with pytest.raises(k.UnsafeName):
                    await call
        finally:
            await kube.close()

    run(go())
    assert seen == []  # refused before any request left the process


def test_the_engine_and_its_client_jobs_are_valid_kubernetes_objects(tmp_path: Path) -> None:
    """kubernetes-validate --strict against the 1.31 schemas: the Deployment, the Service, and the pods of a shard Job
    of the shared engine and of one of a per-shard engine with the compile cache (as Pods: what changed is the pod;
    the Job around it is test_manifests' business)."""
    import subprocess

    spec = parse_spec(RAW)
    per_shard = copy.deepcopy(RAW)
    per_shard["worker"]["engine"] = "perShard"
    action = decide(REF, spec, Observed()).actions[1]
    docs = [mf.engine_deployment(REF, spec, Settings(), replicas=1), mf.engine_service(REF, spec)]
    for s in (spec, parse_spec(per_shard)):
        tmpl = mf.shard_job(REF, action, s, Settings())["spec"]["template"]  # type: ignore[arg-type]
        docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **tmpl["metadata"]},
                     "spec": tmpl["spec"]})  # fmt: skip
    for i, doc in enumerate(docs):
        path = tmp_path / f"{i}.yaml"
        path.write_text(yaml.safe_dump(json.loads(json.dumps(doc))))
        res = subprocess.run(
            [tool("kubernetes-validate"), "--strict", "-k", "1.31.0", str(path)], capture_output=True, text=True
        )
        assert res.returncode == 0, f"{doc['kind']}: {res.stdout}{res.stderr}"


def _rules(role: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    return {(g, r): rule["verbs"] for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}


@pytest.mark.parametrize(("cluster_wide", "kind"), [(False, "Role"), (True, "ClusterRole")])
def test_the_operator_may_run_engines_and_read_their_pods_only(cluster_wide: bool, kind: str) -> None:
    docs = render(None, "--set", f"rbac.clusterWide={str(cluster_wide).lower()}")
    (role,) = [d for d in docs if d["kind"] == kind and not d["metadata"]["name"].endswith("-discovery")]
    rules = _rules(role)
    assert set(rules[("apps", "deployments")]) == {"get", "list", "watch", "create", "patch", "delete"}
    assert set(rules[("", "services")]) == {"get", "create", "patch", "delete"}
    assert set(rules[("", "pods")]) == {"get", "list", "watch"}  # read only: never exec, never delete


def test_network_policies_let_shard_pods_and_only_them_reach_the_engine() -> None:
    docs = render(
        None, "--set", "networkPolicy.enabled=true", "--set", "networkPolicy.egress[0].to[0].ipBlock.cidr=10.0.0.0/8"
    )
    pols = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    engine = next(p for n, p in pols.items() if n.endswith("-engine"))
    assert engine["spec"]["podSelector"]["matchLabels"][mf.LABEL_KIND] == mf.ENGINE
    (rule,) = engine["spec"]["ingress"]
    assert rule["ports"] == [{"port": mf.ENGINE_PORT, "protocol": "TCP"}]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/managed-by": mf.MANAGED_BY,
                                                             mf.LABEL_KIND: "shard"}}}]  # fmt: skip
    clients = next(p for n, p in pols.items() if n.endswith("-engine-clients"))
    assert clients["spec"]["egress"][0]["ports"] == [{"port": mf.ENGINE_PORT, "protocol": "TCP"}]
    # Without an egress restriction there is nothing to open.
    plain = render(None, "--set", "networkPolicy.enabled=true")
    assert not any(d["metadata"]["name"].endswith("-engine-clients") for d in plain if d["kind"] == "NetworkPolicy")
    # The labels the policies select are the ones the builders write.
    spec = parse_spec(RAW)
    pod_labels = mf.engine_deployment(REF, spec, Settings())["spec"]["template"]["metadata"]["labels"]
    assert engine["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    job_labels = mf.shard_job(REF, decide(REF, spec, Observed()).actions[1], spec, Settings())["spec"]["template"][  # type: ignore[arg-type]
        "metadata"
    ]["labels"]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= job_labels.items()
