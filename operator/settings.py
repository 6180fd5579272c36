"""Every operator setting: one environment variable with the GENRUN_ prefix, typed, defaulted, validated at start-up.
Each maps to one Helm value (charts/genrun/values.yaml names the variable beside the value)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

PREFIX = "GENRUN_"


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
        return out

    @classmethod
    def documented(cls) -> dict[str, str]:
        return {PREFIX + f.name.upper(): str(f.metadata["doc"]) for f in dataclasses.fields(cls)}
