"""The operator's own Kubernetes API calls, through kubernetes_asyncio (the maintained asyncio client, on Kopf's HTTP
stack): the library builds and quotes every path, reads in-cluster credentials and refreshes the bound
ServiceAccount token, and handles kubeconfig auth (client certificates, exec plugins, OIDC). Kopf's watches log in
from the same configuration. Names are checked before they reach the library too: quoting keeps a '/' inside its
segment, but a bare '..' segment would still be normalised away by the HTTP stack."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Mapping
from typing import Any, Literal, cast

import kopf
from genrun.contract.api import GROUP, PLURAL, VERSION, RunRef
from genrun.contract.errors import Rejected
from genrun.operator import conditions as c
from genrun.operator import manifests as mf
from genrun.operator.settings import Settings
from kubernetes_asyncio import client, config

# What the API server answers when it will never accept this object as written: fail the run, do not retry. 401/403
# (the operator's own identity, RBAC or a quota), 404, 408, 409 and 429 are not about the object: retried.
RETRIABLE_4XX = (401, 403, 404, 408, 409, 429)
ChildKind = Literal["Job", "ConfigMap"]
EngineKind = Literal["Deployment", "Service"]  # a run's engine (manifests.engine_deployment, engine_service)
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # the in-cluster token and CA (a module value: tests move it)


class UnsafeName(ValueError):
    """A name that is not a Kubernetes object name: never handed to the client."""


class ChildRejected(Rejected):
    """The API server refused a child object for good (422 and the like): the run fails with its message."""

    def __init__(self, kind: str, name: str, status: int, message: str) -> None:
        super().__init__(c.CHILD_REJECTED, f"the API server refused {kind} {name!r} ({status}): {message}")


def checked(name: str) -> str:
    if not mf.is_object_name(name):
        raise UnsafeName(f"{name[:200]!r} is not a Kubernetes object name")
    return name


class _ApiClient(client.ApiClient):
    """The library's client, given our manifests as they are: they are plain JSON already (dicts of str, numbers,
    lists), and the library's recursive copy of each was the operator's largest cost after Kopf's own at 500 runs."""

    def sanitize_for_serialization(self, obj: Any) -> Any:
        return obj if isinstance(obj, dict) else super().sanitize_for_serialization(obj)


class Kube:
    """The API calls the operator makes. Connects on first use (Kopf's login or a daemon's first call), so building
    an operator needs no event loop and no cluster."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conf = client.Configuration()
        self._api: Any = None
        self._connecting: asyncio.Lock | None = None
        self._refresh: asyncio.Task[None] | None = None

    async def api(self) -> Any:
        if self._api is None:
            self._connecting = self._connecting or asyncio.Lock()
            async with self._connecting:
                if self._api is None:
                    await self._configure()
                    self._api = _ApiClient(self.conf)
        return self._api

    async def _configure(self) -> None:
        s, conf = self.settings, self.conf
        if s.server:
            conf.host, conf.verify_ssl = s.server, not s.insecure
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(  # type: ignore[no-untyped-call]  # re-reads the bound token as it rotates
                client_configuration=conf, token_filename=f"{SA_DIR}/token", cert_filename=f"{SA_DIR}/ca.crt"
            )
        else:
            loader = await config.load_kube_config(os.environ.get("KUBECONFIG"), client_configuration=conf)
            # The library's refresher for exec-plugin and GCP credentials (returns at once for static ones).
            self._refresh = asyncio.create_task(config.refresh_token(loader, conf))

    async def connection_info(self) -> kopf.ConnectionInfo:
        """Kopf's credentials, from the client's configuration (Kopf asks again after a 401: a fresh token)."""
        await self.api()
        conf = self.conf
        auth = await conf.get_api_key_with_prefix("BearerToken")  # runs the library's refresh hook
        scheme, _, token = str(auth or "").partition(" ")
        return kopf.ConnectionInfo(
            server=str(conf.host), ca_path=conf.ssl_ca_cert, insecure=not conf.verify_ssl,
            scheme=scheme or None, token=token or None, username=conf.username or None, password=conf.password or None,
            certificate_path=conf.cert_file, private_key_path=conf.key_file,
        )  # fmt: skip

    async def _send(self, request: Awaitable[Any], answer: bool = False) -> tuple[int, Any]:
        """The status of one request made without the library's model classes (not needed here, and the costliest
        part of a call at scale), with its JSON answer when asked for or when it is an error."""
        resp = await request
        async with resp:
            if not answer and resp.status < 300:
                return int(resp.status), None
            text = await resp.text()
            try:
                return int(resp.status), json.loads(text) if text else None
            except ValueError:
                return int(resp.status), text

    async def create(self, kind: ChildKind | EngineKind, namespace: str, body: Mapping[str, Any]) -> bool:
        """True if created, False if it already existed (409); ChildRejected when the API server will never
        accept it (422, 400, 413, ...); a retry (TemporaryError) on anything else."""
        api, ns, payload = await self.api(), checked(namespace), cast(Any, dict(body))  # a manifest, as the API takes
        call: Awaitable[Any]
        if kind == "Job":
            call = client.BatchV1Api(api).create_namespaced_job(ns, payload, _preload_content=False)
        elif kind == "Deployment":
            call = client.AppsV1Api(api).create_namespaced_deployment(ns, payload, _preload_content=False)
        elif kind == "Service":
            call = client.CoreV1Api(api).create_namespaced_service(ns, payload, _preload_content=False)
        else:
            call = client.CoreV1Api(api).create_namespaced_config_map(ns, payload, _preload_content=False)
        status, out = await self._send(call)
        if status == 409:
            return False
        self._raise_for(status, out, f"creating {kind}", kind, ns, str((body.get("metadata") or {}).get("name", "")))
        return True

    @staticmethod
    def _raise_for(status: int, out: Any, doing: str, kind: str, ns: str, name: str) -> None:
        if 400 <= status < 500 and status not in RETRIABLE_4XX:
            msg = out.get("message") if isinstance(out, dict) else None
            raise ChildRejected(kind, name, status, str(msg or out)[:1000])
        if status >= 300:
            raise kopf.TemporaryError(f"{doing} in {ns}: {status} {str(out)[:300]}", delay=5)

    async def _patch(self, kind: EngineKind, namespace: str, name: str, patch: Mapping[str, Any]) -> int:
        """A JSON merge patch (RFC 7386) of one engine object: the status (404 when it does not exist)."""
        api, ns, name = await self.api(), checked(namespace), checked(name)
        call: Awaitable[Any]
        if kind == "Deployment":
            call = client.AppsV1Api(api).patch_namespaced_deployment(
                name, ns, dict(patch), _content_type="application/merge-patch+json", _preload_content=False
            )  # type: ignore[call-arg]  # the stubs omit _content_type
        else:
            call = client.CoreV1Api(api).patch_namespaced_service(
                name, ns, dict(patch), _content_type="application/merge-patch+json", _preload_content=False
            )  # type: ignore[call-arg]
        status, out = await self._send(call)
        if status != 404:
            self._raise_for(status, out, f"patching {kind} {name!r}", kind, ns, name)
        return status

    async def apply(self, kind: EngineKind, namespace: str, body: Mapping[str, Any]) -> bool:
        """Create the object, or bring an existing one to `body` (merge patch: the fields body sets, lists whole):
        True if created, False if patched. A patch lost to a concurrent delete is retried (TemporaryError)."""
        if await self.create(kind, namespace, body):
            return True
        name = str((body.get("metadata") or {}).get("name", ""))
        if await self._patch(kind, namespace, name, body) == 404:
            raise kopf.TemporaryError(f"{kind} {name!r} in {namespace} vanished while being updated", delay=1)
        return False

    async def scale(self, namespace: str, name: str, replicas: int) -> bool:
        """Set a Deployment's replicas (0 lets its GPUs go; the Deployment and Service stay): False if there is no
        such Deployment."""
        return await self._patch("Deployment", namespace, name, {"spec": {"replicas": int(replicas)}}) != 404

    async def engine_state(self, ref: RunRef) -> mf.EngineState | None:
        """The run's engine as observed (replicas asked for, ready, each pod's start and ready times), or None when
        it has no engine Deployment."""
        # The run's name goes into the label selector too: checked like any name (no ',', '=', '/' or spaces).
        api, ns, name = await self.api(), checked(ref.namespace), checked(mf.engine_name(checked(ref.name)))
        status, dep = await self._send(
            client.AppsV1Api(api).read_namespaced_deployment(name, ns, _preload_content=False), answer=True
        )
        if status == 404:
            return None
        if status >= 300 or not isinstance(dep, dict):
            raise kopf.TemporaryError(f"reading Deployment {name!r} in {ns}: {status} {str(dep)[:300]}", delay=5)
        selector = ",".join(f"{k}={v}" for k, v in mf.engine_selector(ref).items())
        status, pods = await self._send(
            client.CoreV1Api(api).list_namespaced_pod(ns, label_selector=selector, _preload_content=False),
            answer=True,
        )
        if status >= 300 or not isinstance(pods, dict):
            raise kopf.TemporaryError(f"listing the engine pods in {ns}: {status} {str(pods)[:300]}", delay=5)
        return mf.engine_state(ref, dep, list(pods.get("items") or []))

    async def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data (base64 values), or None if there is none of that name."""
        call = client.CoreV1Api(await self.api()).read_namespaced_secret(
            checked(name), checked(namespace), _preload_content=False
        )
        status, out = await self._send(call, answer=True)
        if status == 404:
            return None
        if status >= 300:
            raise kopf.TemporaryError(f"reading Secret {name!r} in {namespace}: {status} {str(out)[:300]}", delay=5)
        return dict(out.get("data") or {})

    async def patch_run_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        call = client.CustomObjectsApi(await self.api()).patch_namespaced_custom_object_status(
            GROUP, VERSION, checked(namespace), PLURAL, checked(name), {"status": dict(status)},
            _content_type="application/merge-patch+json", _preload_content=False,  # the stubs omit _content_type
        )  # type: ignore[call-arg]  # fmt: skip
        code, out = await self._send(call)
        if code >= 300 and code != 404:
            raise kopf.TemporaryError(f"patching {namespace}/{name} status: {code} {str(out)[:300]}", delay=5)

    async def delete(self, kind: ChildKind | EngineKind, namespace: str, name: str) -> None:
        api, name, ns = await self.api(), checked(name), checked(namespace)
        opts = client.V1DeleteOptions(propagation_policy="Background")
        if kind == "Job":
            await self._send(client.BatchV1Api(api).delete_namespaced_job(name, ns, body=opts, _preload_content=False))
        elif kind == "Deployment":
            await self._send(
                client.AppsV1Api(api).delete_namespaced_deployment(name, ns, body=opts, _preload_content=False)
            )
        elif kind == "Service":
            await self._send(
                client.CoreV1Api(api).delete_namespaced_service(name, ns, body=opts, _preload_content=False)
            )
        else:
            await self._send(
                client.CoreV1Api(api).delete_namespaced_config_map(name, ns, body=opts, _preload_content=False)
            )

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        if self._api is not None:
            await self._api.close()
