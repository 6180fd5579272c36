"""The record of an engine's device time (contract.records.EngineSession), kept by whatever process hosts the engine.

It is written when the process starts loading (so a host killed while loading still counts its start-up), when the
engine is ready, after each shard, every `HEARTBEAT` seconds while idle, and when it stops. Each write replaces the
whole record atomically, so a reader sees one whole version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

from genrun.contract import records as rec
from genrun.worker.storage import Storage

log = logging.getLogger("genrun.worker.sessions")

HEARTBEAT = 5.0  # seconds between writes while the engine idles: the most device time a kill -9 leaves uncounted


def process_started() -> float:
    """Unix time this process started (the kernel's record, so the interpreter's own start-up counts too)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: clock ticks after boot
        since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        if since_start >= 0:
            return time.time() - since_start
    return time.time()


def devices(tensor_parallel_size: int = 1) -> tuple[int, str]:
    """(accelerators an engine of this process holds, their kind): the GPUs it uses, or the machine on a CPU run."""
    try:
        import torch

        if torch.cuda.is_available():
            return max(1, min(tensor_parallel_size, torch.cuda.device_count())), "gpu"
    except ImportError:
        pass
    return 1, "cpu"


class SessionRecorder:
    def __init__(self, storage: Storage, name: str, *, started: float | None = None) -> None:
        self.storage = storage
        self.session = rec.EngineSession(name=name, started=process_started() if started is None else started)
        self._written = 0.0
        self._write(last=time.time())

    def ready(self, devices: int, accelerator: str) -> None:
        now = time.time()
        self._write(ready=now, last=now, devices=devices, accelerator=accelerator)
        log.info("engine ready %.1f s after its process started", now - self.session.started)

    def shard_done(self, manifest: rec.ShardManifest, busy_seconds: float | None = None) -> None:
        """`busy_seconds`: the engine's busy time since the last shard ended, where shards overlap (an engine host
        serving several at once); else the shard's own generation seconds."""
        s = self.session
        busy = manifest.seconds if busy_seconds is None else busy_seconds
        self._write(
            last=time.time(),
            shards=s.shards + 1,
            tokens=s.tokens + manifest.tokens,
            busy_seconds=round(s.busy_seconds + busy, 3),
        )

    def heartbeat(self) -> None:
        if time.time() - self._written >= HEARTBEAT:
            self._write(last=time.time())

    def stop(self) -> None:
        with contextlib.suppress(Exception):  # the last record is best effort: the heartbeat bounds what is lost
            self._write(last=time.time(), stopped=True)

    def _write(self, **changes: object) -> None:
        self.session = dataclasses.replace(self.session, **changes)  # type: ignore[arg-type]
        self.storage.write_bytes(rec.engine_session_key(self.session.name), rec.to_json(self.session).encode())
        self._written = time.time()


def session_name(prefix: str) -> str:
    """Unique per engine start: a retried pod or a restarted host is another start, with its own device time."""
    return f"{prefix}-{int(time.time() * 1000)}-{os.getpid()}"
