"""Yield benchmark on the real engine: three policies driven to the same target of unique QC-passed examples, in one run.

(a) baseline, the problem statement's process: fixed sampling (T=0.7, top_p 0.9, repetition penalty 1.1), no
    domain rotation, instruction and response sampled jointly, no online dedup, and 10 more shards whenever the
    deduplicated, QC-passed count is below target.
(b) genrun's default policy, the bandit over the simulator's sampling grid (bench/yield_sim.py): a pilot round over
    every arm, shards allocated by Thompson sampling on each arm's measured reward, a last round sized to the target;
    domain rotation, instructions first with online dedup.
(c) the best static policy from the simulator's grid (`--static T,RP`, the arm bench/yield_sim.py found best in
    hindsight): genrun's machinery on that one arm.

Both are plain GenerationRun specs run by the same local runner, so the only difference is the policy.

`--manifest problem` runs the three on examples/problem.yaml instead (the problem's regime, issue 27: its list prompt,
on which the model repeats itself): the baseline is the same process on that prompt (its list style cannot sample a
response with the instruction, so joint sampling is stood for by instructions first with online dedup and QC before
responses off: every sample still pays for its response), and genrun's bandit runs over the manifest's own arms.

    python bench/yield.py [--target 300] [--per-shard 30] [--manifest quickstart|problem] [--static T,RP] [--output DIR]

Last line: RESULT baseline_generated=<a> genrun_generated=<b> generated_ratio=<a/b> baseline_tokens=<ta>
genrun_tokens=<tb> token_ratio=<ta/tb> genrun_final_over_generated=<f> static_tokens=<ts>
genrun_over_static=<tb/ts>
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import tempfile
import time
from pathlib import Path

import yaml
from genrun.contract import records as rec
from genrun.contract.api import RunRef
from genrun.operator.local import LocalRunner
from genrun.worker.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[1]


GRID = ((0.5, 1.1), (0.7, 1.1), (0.8, 1.2), (0.9, 1.3), (1.0, 1.3))  # scripts/record_arm_pools.py's grid


def _arms(grid: tuple[tuple[float, float], ...]) -> list[dict[str, float]]:
    return [{"temperature": t, "topP": 0.9, "repetitionPenalty": rp} for t, rp in grid]


# The best static arm in hindsight of each manifest's recorded pools (bench/yield_sim.py --pools quickstart|problem)
STATIC = {"quickstart": "0.5,1.1", "problem": "0.7,1.1"}
MANIFESTS = {"quickstart": ROOT / "examples" / "quickstart.yaml", "problem": ROOT / "examples" / "problem.yaml"}


def specs(target: int, per_shard: int, static: tuple[float, float], manifest: str = "quickstart") -> dict[str, dict]:
    base = yaml.safe_load(MANIFESTS[manifest].read_text())["spec"]
    base["target"]["uniqueExamples"] = target
    base["shards"].update(initial=10, examplesPerShard=per_shard)
    base["budget"] = {"maxRounds": 10, "maxShards": 200}
    baseline = copy.deepcopy(base)
    baseline["prompt"]["domains"] = []
    baseline["escalation"] = {
        "temperatureStep": 0,
        "repetitionPenaltyStep": 0,
        "minShardsPerRound": 10,
        "maxShardsPerRound": 10,
    }
    baseline["policy"] = {"strategy": "ladder"}  # fixed rounds of 10 shards, no pilot: the process as described
    if base["prompt"].get("style") == "list":
        # a list item has no response to sample with it: every sample pays for one all the same
        baseline["generation"] = {"qcBeforeResponse": False}
        baseline["dedup"] = {**base["dedup"], "online": False}  # the manifest's tiers, as genrun's runs get them
    else:
        baseline["generation"] = {"mode": "joint"}
        baseline["dedup"] = {"online": False}
    genrun = copy.deepcopy(base)
    genrun["escalation"] = {"maxShardsPerRound": 20}
    genrun["policy"] = base.get("policy") or {"arms": _arms(GRID)}
    fixed = copy.deepcopy(genrun)
    fixed["policy"] = {"arms": _arms((static,))}
    return {"baseline": baseline, "genrun": genrun, "static": fixed}


def run(name: str, spec: dict, where: Path) -> tuple[int, int, int]:
    storage = LocalStorage(where / name)
    storage.check()
    t0 = time.perf_counter()
    plan = LocalRunner(RunRef(name), spec, storage, where / name / "_genrun", jobs=1, out=io.StringIO()).run()
    report = rec.round_report_from(json.loads(storage.read_bytes(rec.round_report_key(plan.status.round))))
    print(f"{name}: {plan.condition('Succeeded').reason} in {plan.status.round} round(s), {time.perf_counter() - t0:.0f}s; "
          f"{report.generated_total} generated, {report.unique_total} unique, {report.qc_passed_total} kept, "
          f"{report.tokens_total} tokens", flush=True)  # fmt: skip
    return report.generated_total, report.tokens_total, report.qc_passed_total


MIN_FLOOR_KEPT = 10  # an arm's cost per kept example counts towards the floor from this many kept rows (not a probe's)


def arm_costs(out: Path) -> dict[str, tuple[int, float]]:
    """Each arm's (kept examples, tokens per kept example with duplicates free) in one run's output folder: the
    tokens its shards spent (their markers), less what duplicates cost (a skipped instruction its shard's mean
    instruction tokens, a row the merge dropped as a duplicate its instruction and response tokens), over the kept
    rows its shards wrote. What the arm would cost if the model never repeated itself."""
    from collections import Counter

    import pyarrow.parquet as pq

    plans = [rec.round_plan_from(json.loads(p.read_text())) for p in sorted((out / "rounds").glob("*/plan.json"))]
    arm_of = {s.seed: s.arm for plan in plans for s in plan.shards}
    spent: Counter[str] = Counter()
    for m in sorted((out / "shards").glob("*/*.done.json")):
        shard = rec.shard_manifest_from(json.loads(m.read_text()))
        rows = out / rec.shard_data_key(shard.round, shard.seed)
        ins = pq.read_table(rows, columns=["instruction_tokens"]).column(0).to_pylist() if rows.exists() else []
        skipped = shard.skipped_online + shard.skipped_in_shard
        spent[arm_of[shard.seed]] += shard.tokens - (skipped * sum(ins) / len(ins) if ins else 0.0)
    for f in sorted((out / "rejected").glob("*.parquet")):
        for r in pq.read_table(
            f, columns=["seed", "duplicate_of", "instruction_tokens", "response_tokens"]
        ).to_pylist():
            if r["duplicate_of"] is not None:
                spent[arm_of[int(r["seed"])]] -= (r["instruction_tokens"] or 0) + (r["response_tokens"] or 0)
    kept = Counter(arm_of[int(seed)] for f in sorted((out / "dataset" / "data").glob("*.parquet"))
                   for seed in pq.read_table(f, columns=["seed"]).column(0).to_pylist())  # fmt: skip
    return {a: (k, spent[a] / k) for a, k in kept.items()}


def floor_tokens(target: int, outs: list[Path]) -> tuple[float, str]:
    """target x the cheapest arm's tokens per kept example, duplicates free, over the runs' arms that kept at least
    MIN_FLOOR_KEPT rows (the issue's floor: what no policy over these arms can beat), and that arm."""
    costs = [(c, a) for out in outs for a, (k, c) in arm_costs(out).items() if k >= MIN_FLOOR_KEPT]
    if not costs:
        return 0.0, ""
    c, a = min(costs)
    return target * c, a


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=int, default=300)
    ap.add_argument("--per-shard", type=int, default=30)
    ap.add_argument(
        "--static",
        help="T,RP of the best static arm bench/yield_sim.py finds in hindsight (default: the "
        "quickstart pools' 0.5,1.1; the problem pools' 0.7,1.1, one of examples/problem.yaml's arms)",
    )
    ap.add_argument("--output", help="keep the three runs' output folders here (default: a temporary folder)")
    ap.add_argument("--manifest", choices=tuple(MANIFESTS), default="quickstart",
                    help="quickstart (the chat prompt) or problem (examples/problem.yaml: the problem's regime)")  # fmt: skip
    args = ap.parse_args()
    t, rp = (float(x) for x in (args.static or STATIC[args.manifest]).split(","))
    with tempfile.TemporaryDirectory() as d:
        where = Path(args.output) if args.output else Path(d)
        out = {name: run(name, spec, where)
               for name, spec in specs(args.target, args.per_shard, (t, rp), args.manifest).items()}  # fmt: skip
        floor, arm = floor_tokens(args.target, [where / "genrun", where / "static"])
    (ga, ta, _), (gb, tb, kb), (_, ts, _) = out["baseline"], out["genrun"], out["static"]
    if floor > 0:
        print(f"floor: {floor:,.0f} tokens = target {args.target} x {floor / args.target:.1f} tokens per kept example "
              f"of the cheapest arm ({arm}) with duplicates free; the process costs {ta / floor:.2f}x it, so at most "
              f"{ta / floor:.2f}x fewer tokens than the process is possible for any policy over these arms")  # fmt: skip
    else:
        print(f"floor: no arm kept {MIN_FLOOR_KEPT} rows; no floor measured (nan)")
    a_floor, b_floor = (ta / floor, tb / floor) if floor > 0 else (float("nan"), float("nan"))
    print(
        f"RESULT baseline_generated={ga} genrun_generated={gb} generated_ratio={ga / gb:.2f} baseline_tokens={ta} "
        f"genrun_tokens={tb} token_ratio={ta / tb:.2f} genrun_final_over_generated={kb / gb:.3f} "
        f"static_tokens={ts} genrun_over_static={tb / ts:.2f} floor_tokens={floor:.0f} "
        f"baseline_over_floor={a_floor:.2f} genrun_over_floor={b_floor:.2f}"
    )


if __name__ == "__main__":
    main()
