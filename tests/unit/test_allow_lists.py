"""No privilege through the operator: the allow-lists of worker images and endpoint hosts (operator settings), the
Failed/NotAllowed refusal of a run outside them, and each Job getting only the Secrets it uses."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest
from genrun.contract.api import API_KEY_ENV, RunRef, parse_spec
from genrun.operator import conditions as c
from genrun.operator import manifests as mf
from genrun.operator.planner import CreateMergeJob, CreateShardJob, Observed, decide, invalid_plan
from genrun.operator.settings import DEFAULT_ENDPOINT_HOSTS, Settings, SettingsError

REF = RunRef("sft", "data", "uid-1", 1)
BASE: dict[str, Any] = {
    "model": {"name": "Qwen/Qwen2.5-0.5B"},
    "target": {"uniqueExamples": 100},
    "output": {"path": "s3://sft-data/run", "s3": {"endpoint": "http://minio.storage.svc:9000",
                                                    "credentialsSecret": "sft-s3"}},
    "shards": {"initial": 1, "firstSeed": 100},
    "policy": {"pilotShare": 0},
}  # fmt: skip
# The confused deputy: any image, a Secret of the namespace, the attacker's endpoint.
ATTACK: dict[str, Any] = {
    **BASE,
    "output": {"path": "s3://sft-data/run", "s3": {"endpoint": "http://collector.attacker.example:9000",
                                                    "credentialsSecret": "prod-backup-s3"}},
    "worker": {"image": "docker.io/attacker/anything"},
}  # fmt: skip
ENDPOINT: dict[str, Any] = {
    **BASE,
    "model": {"name": "m", "endpoint": {"url": "http://vllm.inference.svc:8000/v1", "apiKeySecret": "llm-key"}},
    "worker": {"gpus": 0},
}


# -- settings ------------------------------------------------------------------------------------------------------
def test_lists_parse_from_comma_separated_variables_and_default_safely() -> None:
    s = Settings.from_env({"GENRUN_ALLOWED_IMAGE_PREFIXES": " registry.example:5000/ml/ , ghcr.io/genrun/genrun-worker,",
                           "GENRUN_ALLOWED_ENDPOINT_HOSTS": "minio.storage.svc, *.example.com ,10.0.0.7"})  # fmt: skip
    assert s.allowed_image_prefixes == ("registry.example:5000/ml/", "ghcr.io/genrun/genrun-worker")
    assert s.allowed_endpoint_hosts == ("minio.storage.svc", "*.example.com", "10.0.0.7")
    default = Settings.from_env({})
    assert default.allowed_endpoint_hosts == DEFAULT_ENDPOINT_HOSTS == ("*.svc", "*.svc.cluster.local")
    # No prefix set: the repository of the operator's own worker image, whatever registry it is on.
    assert default.image_prefixes() == ("ghcr.io/genrun/genrun-worker",)
    own = Settings.from_env(
        {"GENRUN_WORKER_IMAGE": "registry.example:5000/team/worker:cuda12-0.1.0@sha256:" + "a" * 64}
    )
    assert own.image_prefixes() == ("registry.example:5000/team/worker",)
    # Set but empty: no endpoint host at all (only runs without endpoints, or with AWS's own S3).
    assert Settings.from_env({"GENRUN_ALLOWED_ENDPOINT_HOSTS": ""}).allowed_endpoint_hosts == ()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"GENRUN_ALLOWED_IMAGE_PREFIXES": "ghcr.io/*"}, "GENRUN_ALLOWED_IMAGE_PREFIXES: 'ghcr.io/*' is not an image"),
        ({"GENRUN_ALLOWED_ENDPOINT_HOSTS": "http://minio:9000"}, "GENRUN_ALLOWED_ENDPOINT_HOSTS: 'http://minio:9000'"),
        ({"GENRUN_ALLOWED_ENDPOINT_HOSTS": "minio.svc:9000"}, "GENRUN_ALLOWED_ENDPOINT_HOSTS: 'minio.svc:9000'"),
        ({"GENRUN_ALLOWED_ENDPOINT_HOSTS": "a.*.svc"}, "GENRUN_ALLOWED_ENDPOINT_HOSTS: 'a.*.svc'"),
        # The operator sends runs' S3 credentials to GENRUN_STORAGE_ENDPOINT: it must be covered too.
        ({"GENRUN_STORAGE_ENDPOINT": "http://minio.storage:9000"}, "GENRUN_STORAGE_ENDPOINT: the host of"),
    ],
)
def test_bad_lists_are_refused_at_start_up_naming_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert str(err.value).startswith(expected)


@pytest.mark.parametrize(
    ("prefixes", "image", "allowed"),
    [
        ((), "", True),  # the operator's own GENRUN_WORKER_IMAGE
        ((), "ghcr.io/genrun/genrun-worker:0.2.0", True),
        ((), "ghcr.io/genrun/genrun-worker@sha256:" + "b" * 64, True),
        ((), "ghcr.io/genrun/genrun-worker-evil:1", False),  # a prefix ends at a component boundary
        ((), "ghcr.io/genrun/genrun-workers", False),
        ((), "docker.io/attacker/anything", False),
        ((), "attacker/anything", False),
        (("ghcr.io/genrun/",), "ghcr.io/genrun/anything:1", True),
        (("ghcr.io/genrun/",), "ghcr.io/genrun-evil/x:1", False),
        (("ghcr.io/genrun",), "ghcr.io/genrun-evil/x:1", False),
        (("ghcr.io/genrun",), "ghcr.io/genrun/x:1", True),
        # Short names resolve to docker.io, and are compared as such (both the image and the prefix).
        (("python",), "python:3.12", True),
        (("python",), "docker.io/library/python:3.12", True),
        (("docker.io/library/python",), "python:3.12", True),
        (("docker.io/library/python",), "pythonista/python:3.12", False),
        (("localhost:5000/w",), "localhost:5000/w:1", True),
        (("*",), "docker.io/attacker/anything", True),
    ],
)
def test_image_prefixes(prefixes: tuple[str, ...], image: str, allowed: bool) -> None:
    assert Settings(allowed_image_prefixes=prefixes).image_allowed(image) is allowed


@pytest.mark.parametrize(
    ("hosts", "url", "allowed"),
    [
        (DEFAULT_ENDPOINT_HOSTS, "", True),  # an empty S3 endpoint: AWS itself, or the operator's configured one
        (DEFAULT_ENDPOINT_HOSTS, "http://minio.storage.svc:9000", True),
        (DEFAULT_ENDPOINT_HOSTS, "https://vllm.inference.svc.cluster.local/v1", True),
        (DEFAULT_ENDPOINT_HOSTS, "http://VLLM.Inference.SVC./v1", True),  # DNS is case-insensitive; root dot
        (DEFAULT_ENDPOINT_HOSTS, "http://collector.attacker.example:9000", False),
        (DEFAULT_ENDPOINT_HOSTS, "http://minio.storage.svc.attacker.example", False),
        (DEFAULT_ENDPOINT_HOSTS, "http://vllm.inference:8000/v1", False),  # name.namespace looks like a domain
        (DEFAULT_ENDPOINT_HOSTS, "http://svc", False),
        (DEFAULT_ENDPOINT_HOSTS, "http://10.0.0.7:9000", False),
        (("*.example.com",), "https://s3.example.com", True),
        (("*.example.com",), "https://example.com", False),
        (("*.example.com",), "https://evilexample.com", False),
        (("s3.example.com",), "https://S3.example.com:443/x", True),
        (("s3.example.com",), "https://a.s3.example.com", False),
        (("10.0.0.7",), "http://10.0.0.7:9000", True),
        (("[::1]",), "http://[::1]:9000", True),
        ((), "http://minio.storage.svc:9000", False),
        (("*",), "http://collector.attacker.example:9000", True),
        # User info, backslashes and escapes: hosts other URL parsers read differently are refused outright.
        (DEFAULT_ENDPOINT_HOSTS, "http://evil.example\\@minio.storage.svc:9000", False),
        (DEFAULT_ENDPOINT_HOSTS, "http://x@minio.storage.svc:9000", False),
        (DEFAULT_ENDPOINT_HOSTS, "http://minio.storage.svc%2eevil.example:9000", False),
        (("*",), "http://x@minio.storage.svc:9000", False),
        (DEFAULT_ENDPOINT_HOSTS, "http://*.svc:9000", False),  # a wildcard is a pattern, never a host
    ],
)
def test_endpoint_hosts(hosts: tuple[str, ...], url: str, allowed: bool) -> None:
    assert Settings(allowed_endpoint_hosts=hosts).endpoint_allowed(url) is allowed


# -- the refusal ---------------------------------------------------------------------------------------------------
def test_the_confused_deputy_run_is_refused_naming_each_field_and_the_setting() -> None:
    errors = mf.not_allowed(parse_spec(ATTACK), Settings())
    assert len(errors) == 2
    image, endpoint = errors
    assert image.startswith("spec.worker.image: 'docker.io/attacker/anything' is not under an allowed image prefix")
    assert "(ghcr.io/genrun/genrun-worker)" in image and "operator.allowedImagePrefixes" in image
    assert endpoint.startswith("spec.output.s3.endpoint: the host of 'http://collector.attacker.example:9000'")
    assert "operator.allowedEndpointHosts (GENRUN_ALLOWED_ENDPOINT_HOSTS)" in endpoint
    llm = {**ENDPOINT, "model": {"name": "m", "endpoint": {"url": "https://api.attacker.example/v1"}}}
    (only,) = mf.not_allowed(parse_spec(llm), Settings())
    assert only.startswith("spec.model.endpoint.url: the host of 'https://api.attacker.example/v1'")
    # The same run passes where the administrator allows that image and host.
    generous = Settings(allowed_image_prefixes=("docker.io/attacker/",), allowed_endpoint_hosts=("*.attacker.example",))
    assert mf.not_allowed(parse_spec(ATTACK), generous) == []
    assert mf.not_allowed(parse_spec(BASE), Settings()) == mf.not_allowed(parse_spec(ENDPOINT), Settings()) == []


def test_the_refusal_is_failed_with_reason_not_allowed() -> None:
    plan = invalid_plan(mf.not_allowed(parse_spec(ATTACK), Settings()), c.NOT_ALLOWED)
    assert plan.actions == ()
    failed = {x.type: x for x in plan.conditions}[c.FAILED]
    assert (failed.status, failed.reason) == ("True", "NotAllowed")
    assert "spec.worker.image: " in failed.message and "spec.output.s3.endpoint: " in failed.message


class RecordingKube:
    """The operator's Kube client as KubeRun uses it, recording what it is asked (no API server)."""

    def __init__(self) -> None:
        self.secret_reads: list[tuple[str, str]] = []
        self.statuses: list[dict[str, Any]] = []

    async def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        self.secret_reads.append((namespace, name))
        return None  # "no such Secret": the step stops there, before any storage request

    async def patch_run_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.statuses.append(status)


def step_once(spec: dict[str, Any], settings: Settings) -> tuple[RecordingKube, list[Any]]:
    """One KubeRun.step of a new run, with Kopf's own Event queue set up as the operator has it."""
    from genrun.operator.handlers import KubeRun
    from genrun.operator.metrics import Metrics
    from kopf._core.engines import posting

    kube = RecordingKube()
    body = kopf.Body({"apiVersion": "genrun.io/v1alpha1", "kind": "GenerationRun",
                      "metadata": {"name": "sft", "namespace": "data", "uid": "u1", "generation": 1}, "spec": spec})  # fmt: skip

    async def main() -> list[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        posting.settings_var.set(kopf.OperatorSettings())
        posting.event_queue_var.set(queue)
        posting.event_queue_loop_var.set(asyncio.get_running_loop())
        run = KubeRun(settings, kube, Metrics(), body, {}, asyncio.Semaphore(1))  # type: ignore[arg-type]
        try:
            await run.step()
        except kopf.TemporaryError as exc:  # an allowed run reads its Secret, which RecordingKube does not have
            assert "spec.output.s3.credentialsSecret: Secret 'prod-backup-s3' not found" in str(exc)
        return [queue.get_nowait() for _ in range(queue.qsize())]

    return kube, asyncio.run(main())


def test_a_refused_run_never_has_its_secret_read_and_fails_not_allowed() -> None:
    kube, events = step_once(ATTACK, Settings())
    assert kube.secret_reads == []
    (status,) = kube.statuses
    failed = next(x for x in status["conditions"] if x["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "NotAllowed")
    assert [(e.type, e.reason) for e in events] == [("Warning", "NotAllowed")]
    # The same run with its endpoint and image allowed: the operator reads the Secret (the check above can fail).
    kube, _ = step_once(ATTACK, Settings(allowed_image_prefixes=("*",), allowed_endpoint_hosts=("*",)))
    assert kube.secret_reads == [("data", "prod-backup-s3")]


# -- each Job gets only the Secrets it uses ------------------------------------------------------------------------
def secret_refs(job: dict[str, Any]) -> dict[str, str]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}


def test_merge_jobs_get_no_llm_api_key_and_shard_jobs_do() -> None:
    spec = parse_spec(ENDPOINT)
    shard = next(a for a in decide(REF, spec, Observed()).actions if isinstance(a, CreateShardJob))
    merge = CreateMergeJob("sft-r1-merge", 0, 1, ((1, 100),))
    s3 = {"AWS_ACCESS_KEY_ID": "sft-s3", "AWS_SECRET_ACCESS_KEY": "sft-s3"}
    assert secret_refs(mf.shard_job(REF, shard, spec, Settings())) == {**s3, API_KEY_ENV: "llm-key"}
    merge_job = mf.merge_job(REF, merge, spec, Settings())
    assert secret_refs(merge_job) == s3
    assert API_KEY_ENV not in str(merge_job) and "llm-key" not in str(merge_job)
    # Partitioned merges build their pods the same way.
    parted = parse_spec({**ENDPOINT, "dedup": {"partitions": 4}})
    assert secret_refs(mf.merge_job(REF, merge, parted, Settings())) == s3
