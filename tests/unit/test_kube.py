"""The operator's Kubernetes client (operator/kube.py over kubernetes_asyncio) against a real local HTTP server that
records what arrives: the paths the library builds, names that never leave the process, answers mapped to retry or
refusal, the in-cluster token re-read as it rotates, and kubeconfig client certificates handed to Kopf."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from aiohttp import web
from genrun.operator import kube as k
from genrun.operator.settings import Settings

Seen = list[tuple[str, str, str, str, str]]  # method, raw path, content type, authorization, body


@asynccontextmanager
async def server(answer: Callable[[str, str, str], tuple[int, Any]] | None = None) -> AsyncIterator[tuple[str, Seen]]:
    seen: Seen = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.text()
        seen.append(
            (request.method, request.raw_path, request.content_type, request.headers.get("Authorization", ""), body)
        )
        code, out = answer(request.method, request.path, body) if answer else (200, {})
        return web.json_response(out, status=code)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def self_signed(folder: Path) -> None:
    """cert.pem and key.pem: a real certificate, as the library's TLS context loads it."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-subj", "/CN=genrun-test", "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


@pytest.mark.parametrize(
    "name", ["../../kube-system/secrets/aws-creds", "a/b", "..", ".", "a..b", "A", "x%2Fy", "", "a" * 254, "a b"]
)
def test_a_name_that_is_not_an_object_name_never_reaches_the_server(name: str) -> None:
    async def go() -> None:
        async with server() as (url, seen):
            kube = k.Kube(Settings(server=url))
            calls = [
                kube.secret_data("data", name), kube.secret_data(name, "ok"), kube.patch_run_status("data", name, {}),
                kube.delete("Job", "data", name), kube.delete("ConfigMap", name, "ok"), kube.create("Job", name, {}),
            ]  # fmt: skip
            for call in calls:
                with pytest.raises(k.UnsafeName):
                    await call
            await kube.close()
            assert seen == []

    run(go)


def test_the_library_builds_each_path_and_the_answers_map_to_retry_or_refusal() -> None:
    answers = {"ok-job": (201, {}), "exists": (409, {}), "bad": (422, {"message": "spec.x: Invalid value"}),
               "busy": (500, "etcd timeout"), "forbidden": (403, {"message": "quota"})}  # fmt: skip

    def answer(method: str, path: str, body: str) -> tuple[int, Any]:
        if method == "POST":
            return answers[json.loads(body)["metadata"]["name"]]
        if path.endswith("/secrets/missing"):
            return 404, {"kind": "Status"}
        return 200, {"data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"id").decode()}}

    async def go() -> None:
        async with server(answer) as (url, seen):
            kube = k.Kube(Settings(server=url, insecure=True))
            assert await kube.create("Job", "data", {"kind": "Job", "metadata": {"name": "ok-job"}})
            assert await kube.create("ConfigMap", "data", {"kind": "ConfigMap", "metadata": {"name": "ok-job"}})
            assert await kube.secret_data("data", "s3.creds-1") == {"AWS_ACCESS_KEY_ID": "aWQ="}
            assert await kube.secret_data("data", "missing") is None
            await kube.patch_run_status("data", "sft", {"round": 2})
            await kube.delete("Job", "data", "sft-r1-s100")
            assert not await kube.create("Job", "data", {"kind": "Job", "metadata": {"name": "exists"}})  # 409: done
            with pytest.raises(k.ChildRejected, match=r"refused Job 'bad' \(422\): spec.x: Invalid value"):
                await kube.create("Job", "data", {"kind": "Job", "metadata": {"name": "bad"}})
            for retried in ("busy", "forbidden"):  # not about the object: tried again, never a failed run
                with pytest.raises(kopf.TemporaryError):
                    await kube.create("Job", "data", {"kind": "Job", "metadata": {"name": retried}})
            await kube.close()
        assert [(m, p) for m, p, *_ in seen[:6]] == [
            ("POST", "/apis/batch/v1/namespaces/data/jobs"),
            ("POST", "/api/v1/namespaces/data/configmaps"),
            ("GET", "/api/v1/namespaces/data/secrets/s3.creds-1"),
            ("GET", "/api/v1/namespaces/data/secrets/missing"),
            ("PATCH", "/apis/genrun.io/v1alpha1/namespaces/data/generationruns/sft/status"),
            ("DELETE", "/apis/batch/v1/namespaces/data/jobs/sft-r1-s100"),
        ]
        patch = seen[4]
        assert patch[2] == "application/merge-patch+json" and json.loads(patch[4]) == {"status": {"round": 2}}
        assert json.loads(seen[5][4])["propagationPolicy"] == "Background"

    run(go)


def test_in_cluster_the_bound_token_is_re_read_as_it_rotates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's in-cluster loader (not ours) reads the ServiceAccount token and re-reads it when its refresh
    period has passed (set to zero here): both Kopf's login and the operator's own requests get the new token."""
    from kubernetes_asyncio.config import incluster_config

    (tmp_path / "token").write_text("first")
    self_signed(tmp_path)
    (tmp_path / "ca.crt").write_bytes((tmp_path / "cert.pem").read_bytes())
    monkeypatch.setattr(k, "SA_DIR", str(tmp_path))
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", dt.timedelta(0))

    async def go() -> None:
        async with server() as (url, seen):
            host, port = url.removeprefix("http://").split(":")
            monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
            monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
            kube = k.Kube(Settings())
            info = await kube.connection_info()
            assert (info.scheme, info.token, info.server) == ("Bearer", "first", f"https://{host}:{port}")
            (tmp_path / "token").write_text("second")
            assert (await kube.connection_info()).token == "second"
            kube.conf.host = url  # the loader says https; this test server speaks plain HTTP
            await kube.patch_run_status("data", "sft", {})
            await kube.close()
            assert seen[0][3] == "Bearer second"

    run(go)


def test_kubeconfig_client_certificates_are_the_librarys_and_reach_kopf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kind/minikube-style kubeconfig (client certificate and key, no token): the library loads them and Kopf gets
    the same files."""
    self_signed(tmp_path)
    b64 = lambda p: base64.b64encode((tmp_path / p).read_bytes()).decode()  # noqa: E731
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "kind",
        "clusters": [{"name": "kind", "cluster": {"server": "https://127.0.0.1:6443", "certificate-authority-data": b64("cert.pem")}}],
        "users": [{"name": "admin", "user": {"client-certificate-data": b64("cert.pem"), "client-key-data": b64("key.pem")}}],
        "contexts": [{"name": "kind", "context": {"cluster": "kind", "user": "admin"}}],
    }  # fmt: skip
    (tmp_path / "config").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    async def go() -> None:
        kube = k.Kube(Settings())
        info = await kube.connection_info()
        await kube.close()
        assert info.server == "https://127.0.0.1:6443" and info.token is None and not info.insecure
        assert (
            info.certificate_path
            and Path(str(info.certificate_path)).read_bytes() == (tmp_path / "cert.pem").read_bytes()
        )
        assert (
            info.private_key_path
            and Path(str(info.private_key_path)).read_bytes() == (tmp_path / "key.pem").read_bytes()
        )

    run(go)
