"""Every operator setting: one environment variable with the GENRUN_ prefix, typed, defaulted, validated at start-up.
Each maps to one Helm value (charts/genrun/values.yaml names the variable beside the value)."""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

PREFIX = "GENRUN_"
ANY = "*"  # an allow-list entry that allows everything
# In-cluster Services only: a name under .svc resolves through the cluster's DNS to a Service, never to a host a run's
# author registered on the internet (a two-label "name.namespace" cannot be told from a public domain, so it is not
# covered: write name.namespace.svc).
DEFAULT_ENDPOINT_HOSTS = ("*.svc", "*.svc.cluster.local")


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    namespace: str = field(default="", metadata={"doc": "watch only this namespace; empty watches all namespaces"})
    worker_image: str = field(
        default="ghcr.io/genrun/genrun-worker:0.1.0", metadata={"doc": "worker image when a run names none"}
    )
    worker_service_account: str = field(default="", metadata={"doc": "ServiceAccount of shard and merge pods"})
    merge_cpu: str = field(default="2", metadata={"doc": "CPU request/limit of merge Jobs"})
    merge_memory: str = field(default="8Gi", metadata={"doc": "memory request/limit of merge Jobs"})
    shard_client_cpu: str = field(
        default="2",
        metadata={"doc": "CPU request/limit of shard Jobs that call the run's engine (spec.worker.engine: shared)"},
    )
    shard_client_memory: str = field(
        default="4Gi",
        metadata={"doc": "memory request/limit of shard Jobs that call the run's engine (spec.worker.engine: shared)"},
    )
    shm_size: str = field(default="8Gi", metadata={"doc": "size of /dev/shm for vLLM in shard pods"})
    job_ttl_seconds: int = field(default=604800, metadata={"doc": "ttlSecondsAfterFinished of finished Jobs"})
    start_concurrency: int = field(
        default=5, metadata={"doc": "shard and merge Jobs being created at once, across runs (runs take turns)"}
    )
    timer_seconds: float = field(default=15.0, metadata={"doc": "periodic re-reconcile of every run"})
    metrics_port: int = field(default=8080, metadata={"doc": "Prometheus /metrics port (0 disables)"})
    health_port: int = field(default=8081, metadata={"doc": "liveness /healthz port (0 disables)"})
    server: str = field(default="", metadata={"doc": "API server URL; empty: in-cluster or kubeconfig"})
    insecure: bool = field(default=False, metadata={"doc": "skip TLS verification (tests against an emulator only)"})
    log_level: str = field(default="INFO", metadata={"doc": "DEBUG, INFO, WARNING or ERROR"})
    allow_ambient_credentials: bool = field(
        default=False,
        metadata={
            "doc": "let runs with an s3:// output and no credentialsSecret use the operator's own cloud credentials "
            "(off: such runs fail InvalidSpec, so no run can borrow the operator's identity)"
        },
    )
    storage_endpoint: str = field(
        default="", metadata={"doc": "S3 endpoint the operator uses to read reports (defaults to the run's)"}
    )
    allowed_image_prefixes: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "comma-separated prefixes a run's spec.worker.image must start with, matched against the full "
            "reference (python:3 is docker.io/library/python:3) and ending at a '/', ':' or '@' of the image; "
            "empty: the repository of GENRUN_WORKER_IMAGE; * allows any image"
        },
    )
    allowed_endpoint_hosts: tuple[str, ...] = field(
        default=DEFAULT_ENDPOINT_HOSTS,
        metadata={
            "doc": "comma-separated hosts a run's spec.output.s3.endpoint and spec.model.endpoint.url may name "
            "(and GENRUN_STORAGE_ENDPOINT): exact names or IPs, *.suffix for any name under suffix, * for any host; "
            "an empty spec.output.s3.endpoint (AWS itself) is always allowed. Default: in-cluster Services only"
        },
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        kwargs: dict[str, object] = {}
        errors = []
        for f in dataclasses.fields(cls):
            var = PREFIX + f.name.upper()
            if var not in env:
                continue
            raw = env[var]
            try:
                if f.type in ("int", int):
                    kwargs[f.name] = int(raw)
                elif f.type in ("float", float):
                    kwargs[f.name] = float(raw)
                elif f.type in ("bool", bool):
                    if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError("expected true or false")
                    kwargs[f.name] = raw.lower() in ("true", "1", "yes")
                elif f.type in ("tuple[str, ...]", tuple[str, ...]):
                    kwargs[f.name] = tuple(item.strip() for item in raw.split(",") if item.strip())
                else:
                    kwargs[f.name] = raw
            except ValueError as exc:
                errors.append(f"{var}={raw!r}: {exc}")
        settings = cls(**kwargs)  # type: ignore[arg-type]
        errors += settings.problems()
        if errors:
            raise SettingsError("; ".join(errors))
        return settings

    def problems(self) -> list[str]:
        out = []
        for name in ("metrics_port", "health_port"):
            v = getattr(self, name)
            if not 0 <= v <= 65535:
                out.append(f"{PREFIX}{name.upper()}: must be a port number, got {v}")
        if self.timer_seconds < 1:
            out.append(f"{PREFIX}TIMER_SECONDS: must be >= 1, got {self.timer_seconds}")
        if self.start_concurrency < 1:
            out.append(f"{PREFIX}START_CONCURRENCY: must be >= 1, got {self.start_concurrency}")
        if self.job_ttl_seconds < 0:
            out.append(f"{PREFIX}JOB_TTL_SECONDS: must be >= 0, got {self.job_ttl_seconds}")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            out.append(f"{PREFIX}LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        for prefix in self.allowed_image_prefixes:
            if prefix != ANY and ("*" in prefix or any(ch.isspace() for ch in prefix)):
                out.append(
                    f"{PREFIX}ALLOWED_IMAGE_PREFIXES: {prefix!r} is not an image prefix (no '*' or spaces inside; "
                    "a lone * allows any image)"
                )
        for host in self.allowed_endpoint_hosts:
            if host != ANY and not _HOST_ENTRY.fullmatch(host.lower()):
                out.append(
                    f"{PREFIX}ALLOWED_ENDPOINT_HOSTS: {host!r} is not a host name, an IP or *.suffix (no scheme, "
                    "port or path; a lone * allows any host)"
                )
        if self.storage_endpoint and not self.endpoint_allowed(self.storage_endpoint):
            out.append(
                f"{PREFIX}STORAGE_ENDPOINT: the host of {self.storage_endpoint!r} is not in "
                f"{PREFIX}ALLOWED_ENDPOINT_HOSTS; add it there (the operator sends runs' S3 credentials to it)"
            )
        return out

    # -- the allow-lists: what a run may name (operator/manifests.py `not_allowed` refuses the rest) -------------
    def image_prefixes(self) -> tuple[str, ...]:
        """The allowed image prefixes, full references; the default worker image's repository when none is set."""
        if self.allowed_image_prefixes:
            return tuple(p if p == ANY else full_image_reference(p) for p in self.allowed_image_prefixes)
        return (image_repository(full_image_reference(self.worker_image)),)

    def image_allowed(self, image: str) -> bool:
        """Empty (the operator's own GENRUN_WORKER_IMAGE) or under an allowed prefix, at a component boundary: the
        prefix ghcr.io/genrun/genrun-worker allows ghcr.io/genrun/genrun-worker:0.2 but not ...genrun-worker-evil."""
        if not image:
            return True
        full = full_image_reference(image)
        for prefix in self.image_prefixes():
            if prefix == ANY or full == prefix:
                return True
            if full.startswith(prefix) and (prefix[-1] in "/:@" or full[len(prefix)] in "/:@"):
                return True
        return False

    def endpoint_allowed(self, url: str) -> bool:
        """Empty (AWS's own endpoint, or the operator's configured one) or a URL whose host the list covers."""
        if not url:
            return True
        try:
            parts = urllib.parse.urlsplit(url)
            host = (parts.hostname or "").rstrip(".")
        except ValueError:
            return False
        # Only a plain host[:port]: no user info, backslash or escapes that another URL parser could read as a
        # different host than this one does.
        if not host or "@" in parts.netloc or "\\" in parts.netloc or not _HOST_PATTERN.fullmatch(host):
            return False
        for entry in self.allowed_endpoint_hosts:
            pattern = entry.lower().strip("[]").rstrip(".")
            if pattern == ANY or host == pattern:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):  # a name under it, not the suffix itself
                return True
        return False

    @classmethod
    def documented(cls) -> dict[str, str]:
        return {PREFIX + f.name.upper(): str(f.metadata["doc"]) for f in dataclasses.fields(cls)}


# A host name (labels of letters, digits and '-'), or an IPv4/IPv6 address; an allow-list entry may add a leading "*.".
_HOST = r"[a-z0-9_]([-a-z0-9_]*[a-z0-9_])?(\.[a-z0-9_]([-a-z0-9_]*[a-z0-9_])?)*\.?|\[?[0-9a-f:.]+\]?"
_HOST_PATTERN = re.compile(_HOST)
_HOST_ENTRY = re.compile(rf"(\*\.)?({_HOST})")


def full_image_reference(image: str) -> str:
    """The reference as the container runtime resolves it: a first component that is no registry (no '.' or ':',
    not localhost) is on docker.io, and a single-component name under library/ (python:3 ->
    docker.io/library/python:3). Prefixes are compared with this, so "attacker/x" cannot pass as "x"."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if sep else f"docker.io/library/{image}"


def image_repository(image: str) -> str:
    """The image without its tag or digest: registry.example:5000/team/worker:1@sha256:... -> .../team/worker."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name
