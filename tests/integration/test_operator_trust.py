"""No privilege through the operator, end to end: the real operator process against kmock (an API-server emulator).
A run naming an image and an endpoint outside the operator's allow-lists fails NotAllowed; the operator never reads
its Secret, creates no Job, and never connects to the endpoint (a listening socket here stands for the attacker's
collector)."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.harness import JOBS, RUNS, Cluster, OperatorProcess, _Emulator, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NS = "data"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        c.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                 yaml.safe_load((ROOT / "crds" / "generationrun.yaml").read_text()))  # fmt: skip
        c.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        c.create(f"/api/v1/namespaces/{NS}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "prod-backup-s3", "namespace": NS},
            "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"prod").decode(),
                     "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"prod-secret-value").decode()},
        })  # fmt: skip
        yield c


@pytest.fixture
def collector() -> Iterator[socket.socket]:
    """A TCP listener that nothing should ever connect to (non-blocking: accept() raises unless someone did)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def connected(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return False
    return True


def test_a_run_outside_the_allow_lists_fails_not_allowed_and_its_secret_is_never_read(
    cluster: Cluster, collector: socket.socket
) -> None:
    port = collector.getsockname()[1]
    run: dict[str, Any] = {
        "apiVersion": "genrun.io/v1alpha1", "kind": "GenerationRun", "metadata": {"name": "deputy", "namespace": NS},
        "spec": {"model": {"name": "embedded:smollm2-135m"}, "target": {"uniqueExamples": 30},
                 # "localhost" is not in the allow-list (the harness allows 127.0.0.1, the address, only).
                 "output": {"path": "s3://loot/x", "s3": {"endpoint": f"http://localhost:{port}",
                                                          "credentialsSecret": "prod-backup-s3"}},
                 "worker": {"image": "docker.io/attacker/anything", "gpus": 0}},
    }  # fmt: skip
    first = len(_Emulator.log)
    with OperatorProcess(cluster, NS) as op:
        cluster.create(RUNS.format(ns=NS), run)

        def failed() -> dict[str, Any] | None:
            cond = cluster.condition(NS, "deputy", "Failed")
            return cond if cond and cond["status"] == "True" else None

        cond = wait_for(failed, 60, "Failed")
        assert cond["reason"] == "NotAllowed"
        assert (
            "spec.worker.image: 'docker.io/attacker/anything' is not under an allowed image prefix" in cond["message"]
        )
        assert f"spec.output.s3.endpoint: the host of 'http://localhost:{port}'" in cond["message"]
        assert "GENRUN_ALLOWED_ENDPOINT_HOSTS" in cond["message"]
        assert "Traceback" not in op.log()
    paths = [entry[2] for entry in _Emulator.log[first:]]
    assert not [p for p in paths if "/secrets" in p]  # not one request for any Secret
    assert not cluster.items(JOBS.format(ns=NS))
    assert not connected(collector)
