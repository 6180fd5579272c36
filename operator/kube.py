"""The few Kubernetes API calls the operator makes, over aiohttp (Kopf's own HTTP stack), with every path built from
checked, quoted segments."""

from __future__ import annotations

import json
import os
import ssl
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import kopf
from genrun.contract.api import GROUP, PLURAL, VERSION
from genrun.contract.errors import Rejected
from genrun.operator import conditions as c
from genrun.operator import manifests as mf
from genrun.operator.settings import Settings

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# What the API server answers when it will never accept this object as written: fail the run, do not retry. 401/403
# (the operator's own identity, RBAC or a quota), 404, 408, 409 and 429 are not about the object: retried.
RETRIABLE_4XX = (401, 403, 404, 408, 409, 429)


class UnsafeName(ValueError):
    """A name that is not a Kubernetes object name: never put into an API path."""


class ChildRejected(Rejected):
    """The API server refused a child object for good (422 and the like): the run fails with its message."""

    def __init__(self, kind: str, name: str, status: int, message: str) -> None:
        super().__init__(c.CHILD_REJECTED, f"the API server refused {kind} {name!r} ({status}): {message}")


def api_path(group_version: str, namespace: str, plural: str, name: str = "", subresource: str = "") -> str:
    """An API path from checked, quoted segments: a name with '/' or '..' can never address another object."""
    root = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    path = f"{root}/namespaces/{_segment(namespace)}/{plural}"
    if name:
        path += f"/{_segment(name)}"
    return path + (f"/{subresource}" if subresource else "")


def _segment(name: str) -> str:
    if not mf.is_object_name(name):
        raise UnsafeName(f"{name[:200]!r} is not a Kubernetes object name")
    return urllib.parse.quote(name, safe="")


class Kube:
    """The few API calls the operator makes, over aiohttp (Kopf's own HTTP stack)."""

    def __init__(self, server: str, *, token: str = "", ca: str | None = None, insecure: bool = False) -> None:
        self.server = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.ssl: ssl.SSLContext | bool = False if insecure else (ssl.create_default_context(cafile=ca) if ca else True)
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # for the benchmark's requests-per-shard figure

    @classmethod
    def from_settings(cls, settings: Settings) -> Kube:
        if settings.server:
            return cls(settings.server, insecure=settings.insecure)
        if (SA_DIR / "token").exists():
            host = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}"
            return cls(host, token=(SA_DIR / "token").read_text().strip(), ca=str(SA_DIR / "ca.crt"))
        from kubernetes import client, config

        config.load_kube_config()  # type: ignore[no-untyped-call]
        cfg = client.Configuration.get_default_copy()
        token = (cfg.api_key or {}).get("authorization", "").removeprefix("Bearer ").strip()
        return cls(cfg.host, token=token, ca=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl)

    def connection_info(self) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=self.server,
            scheme="Bearer" if self.headers else None,
            token=self.headers.get("Authorization", "").removeprefix("Bearer ") or None,
            insecure=self.ssl is False,
        )

    async def _call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers)
        self.requests += 1
        async with self._session.request(
            method, self.server + path, data=None if body is None else json.dumps(body),
            headers={"Content-Type": content_type}, ssl=self.ssl,
        ) as resp:  # fmt: skip
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text

    async def create(self, path: str, body: Mapping[str, Any]) -> bool:
        """True if created, False if it already existed (409); ChildRejected when the API server will never
        accept it (422, 400, 413, ...); a retry (TemporaryError) on anything else."""
        status, out = await self._call("POST", path, body)
        if status == 409:
            return False
        if 400 <= status < 500 and status not in RETRIABLE_4XX:
            meta = body.get("metadata") or {}
            msg = out.get("message") if isinstance(out, dict) else None
            raise ChildRejected(
                str(body.get("kind", "object")), str(meta.get("name", "")), status, str(msg or out)[:1000]
            )
        if status >= 300:
            raise kopf.TemporaryError(f"POST {path}: {status} {str(out)[:300]}", delay=5)
        return True

    async def get(self, path: str) -> Any:
        status, out = await self._call("GET", path)
        if status == 404:
            return None
        if status >= 300:
            raise kopf.TemporaryError(f"GET {path}: {status} {str(out)[:300]}", delay=5)
        return out

    async def patch_status(self, path: str, status: Mapping[str, Any]) -> None:
        code, out = await self._call("PATCH", path + "/status", {"status": status}, "application/merge-patch+json")
        if code >= 300 and code != 404:
            raise kopf.TemporaryError(f"PATCH {path}/status: {code} {str(out)[:300]}", delay=5)

    async def delete(self, path: str) -> None:
        await self._call("DELETE", path, {"propagationPolicy": "Background"})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def run_path(ns: str, name: str) -> str:
    return api_path(f"{GROUP}/{VERSION}", ns, PLURAL, name)
