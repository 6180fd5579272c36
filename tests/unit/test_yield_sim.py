"""bench/yield_sim.py end to end on pools made from the replay recording, written as the recorder writes them (real SmolLM2-135M samples at T 0.7 and
1.0): it drives the real planner, dedup and QC, and its RESULT line holds the figures it printed."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_simulator_runs_the_three_policies_on_real_samples(tmp_path: Path) -> None:
    arms: dict[float, list[dict]] = {}
    with gzip.open(ROOT / "worker" / "replay" / "smollm2-135m.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            arms.setdefault(round(row.pop("temperature"), 2), []).append(row)
    pools = tmp_path / "pools.jsonl.gz"
    with gzip.open(pools, "wt") as f:
        for t, rows in sorted(arms.items()):
            rep = 1.1 if t < 1 else 1.3
            f.write(json.dumps({"temperature": t, "top_p": 0.9, "repetition_penalty": rep, "malformed": 3,
                                "malformed_tokens": 90, "rows": rows}) + "\n")  # fmt: skip
    env = {**os.environ, "GENRUN_ARM_POOLS": str(pools), "PYTHONSAFEPATH": "1"}
    res = subprocess.run(
        [sys.executable, "-P", str(ROOT / "bench" / "yield_sim.py"), "--target", "60", "--seeds", "3"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    m = dict(kv.split("=") for kv in last.removeprefix("RESULT ").split())
    assert set(m) == {"genrun_tokens", "best_static_tokens", "seed_tokens", "genrun_over_best_static",
                      "seed_over_genrun", "overshoot", "genrun_without_qc_before_response_tokens", "floor_tokens",
                      "seed_over_floor", "genrun_gpu_s", "best_static_gpu_s", "seed_gpu_s", "seed_over_genrun_gpu",
                      "genrun_over_best_static_gpu", "startup_share"}  # fmt: skip
    g, b, s = float(m["genrun_tokens"]), float(m["best_static_tokens"]), float(m["seed_tokens"])
    assert abs(float(m["genrun_over_best_static"]) - g / b) < 0.01 and abs(float(m["seed_over_genrun"]) - s / g) < 0.01
    # The T=1.0 pool mostly fails QC, so the best static arm is T=0.7, and the problem's process (10 joint shards of
    # 40 a round for a target of 60) overshoots and pays for every response.
    assert re.search(r"best static: T=0\.7 ", res.stdout)
    assert s > g
    # on these pools the check before responses saves tokens: the same bandit without it pays for every response
    assert float(m["genrun_without_qc_before_response_tokens"]) >= g
    assert float(m["overshoot"]) <= 0.25
    # the floor: duplicates free, so every policy here pays more; the RESULT's ratio is the one it printed
    floor = float(m["floor_tokens"])
    assert 0 < floor < min(g, b) and abs(float(m["seed_over_floor"]) - s / floor) < 0.01
    assert f"floor: {floor:,.0f} tokens" in res.stdout
    # Device-seconds under the default (gpu) profile: the RESULT's figures are the gpu section's, and the problem's
    # process, which starts an engine in each of its 10 shard Jobs, costs more than genrun's one engine start.
    gpu = res.stdout.split("device-seconds, gpu profile")[1]
    gg, bg, sg = float(m["genrun_gpu_s"]), float(m["best_static_gpu_s"]), float(m["seed_gpu_s"])
    assert re.search(rf"genrun \(bandit\) +{gg:,.0f} device-s +run-owned engine, 1 replica", gpu)
    assert re.search(rf"seed \(problem process\) +{sg:,.0f} device-s", gpu)
    assert sg > gg > 0 and abs(float(m["seed_over_genrun_gpu"]) - sg / gg) < 0.01
    assert abs(float(m["genrun_over_best_static_gpu"]) - gg / bg) < 0.01
    assert 0 < float(m["startup_share"]) < 1
    assert "supply: " in res.stdout and "the problem's arm (T=0.7 rp=1.1) alone" in res.stdout


def test_cost_per_kept_counts_what_each_sample_pays() -> None:
    """Hand-checked: 4 rows, one malformed sample in 5; the instruction side of QC gates one row (its response is
    never paid), QC keeps two."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    from yield_sim import Arm, Pools

    rows = np.arange(4)
    pools = Pools([], cluster=rows, qc_ok=np.array([1, 1, 0, 0], bool), gate_ok=np.array([1, 1, 1, 0], bool),
                  itok=np.array([10, 10, 10, 10]), rtok=np.array([30, 50, 40, 99]))  # fmt: skip
    arm = Arm(0.7, 0.9, 1.1, rows, malformed_rate=0.2, malformed_tokens=100.0)
    paid = (40 + 60 + 50 + 10) / 4 * 0.8 + 0.2 * 100  # per sample drawn
    assert abs(pools.cost_per_kept(arm) - paid / (0.5 * 0.8)) < 1e-9
    never = Arm(1.0, 0.9, 1.3, rows[2:], malformed_rate=0.0, malformed_tokens=0.0)
    assert pools.cost_per_kept(never) == float("inf")


def test_a_median_most_runs_never_reached_is_unreached_and_gives_no_ratio() -> None:
    """Runs that never reach the target count as infinite tokens (they printed 2^63 as a token count and a ratio of
    1e14 before): the median is inf when most runs are unreached, and a ratio with it is nan, never a number."""
    import math

    sys.path.insert(0, str(ROOT / "bench"))
    from yield_sim import UNREACHED, median_of, ratio

    assert median_of([(UNREACHED, 10), (UNREACHED, 20), (900.0, 150)]) == math.inf
    assert median_of([(UNREACHED, 10), (800.0, 150), (900.0, 150)]) == 900.0
    assert math.isnan(ratio(UNREACHED, 900.0)) and math.isnan(ratio(900.0, UNREACHED))
    assert ratio(900.0, 300.0) == 3.0
    assert f"{UNREACHED:.0f}" == "inf"


def _sim():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "bench"))
    import yield_sim

    return yield_sim


def test_the_problems_process_pays_a_start_up_per_shard_job_and_genrun_one_per_replica() -> None:
    """Hand-checked device-seconds. A profile of 100 s start-up, 50 tokens/s, 2 devices; a simulated token stands for
    2; each round holds a run-owned engine 30 s more. Two rounds of 10 shard Jobs, 1,000 and 1,200 tokens."""
    from genrun.operator.cost import CostProfile

    ys = _sim()
    charge = ys.Charge("test", CostProfile(100.0, 50.0, 2), round_gap_seconds=30.0, token_scale=2.0)
    run = ys.Run(2200.0, 10, ((10, 1000), (10, 1200)))
    # the process: 20 starts, 4,400 tokens, no device held while the round is deduplicated
    assert ys.process_device_seconds(run, charge) == 2 * (20 * 100 + 4400 / 50)
    # genrun's engine: 4,400 tokens are far fewer than one replica needs (100 s x 50/s x 9 = 45,000 for start-up
    # within 10%), so one replica, started once, held through two merges
    assert ys.engine_replicas(run, charge) == 1
    assert ys.engine_device_seconds(run, charge) == 2 * (100 + 2 * 30 + 4400 / 50)
    assert abs(ys.engine_startup_share(run, charge) - 200 / (2 * (100 + 60 + 88))) < 1e-12
    # a run that missed the target costs inf and has no share
    missed = ys.Run(ys.UNREACHED, 3, run.rounds)
    assert ys.process_device_seconds(missed, charge) == ys.engine_device_seconds(missed, charge) == float("inf")
    assert ys.engine_startup_share(missed, charge) != ys.engine_startup_share(missed, charge)  # nan


def test_replicas_grow_with_the_run_up_to_its_widest_round_and_one_on_a_cpu_machine() -> None:
    from genrun.operator.cost import CostProfile, replica_tokens, replicas_for

    ys = _sim()
    p = CostProfile(100.0, 50.0, 2)
    assert replica_tokens(p, 0.1) == 100 * 50 * 9
    assert replica_tokens(p, 0.5) == 100 * 50
    assert [replicas_for(p, t, 4) for t in (0, 44_999, 45_000, 135_000, 10**9)] == [1, 1, 1, 3, 4]
    # 200,000 tokens of the profile's model in a run whose widest round has 3 shard Jobs: 3 replicas (4 fit)...
    run = ys.Run(100_000.0, 10, ((1, 20_000), (3, 80_000)))
    gpu = ys.Charge("gpu", p, 30.0, token_scale=2.0)
    assert ys.engine_replicas(run, gpu) == 3
    assert ys.engine_device_seconds(run, gpu) == 2 * (3 * (100 + 2 * 30) + 200_000 / 50)
    # ...and one on a CPU machine, whatever the run
    cpu = ys.Charge("cpu", p, 30.0, token_scale=2.0, max_replicas=1)
    assert ys.engine_replicas(run, cpu) == 1


def test_the_gpu_profile_charges_a_simulated_shard_of_the_process_as_one_of_the_problems() -> None:
    from genrun.operator.cost import CPU_PRIOR, GPU_PRIOR

    ys = _sim()
    seed = [ys.Run(5000.0, 1, ((10, 2000), (10, 3000))), ys.Run(ys.UNREACHED, 1, ((10, 3000),))]
    ch = ys.charges(seed)
    assert ch["cpu"].profile == CPU_PRIOR and ch["cpu"].token_scale == 1.0 and ch["cpu"].max_replicas == 1
    assert ch["gpu"].profile == GPU_PRIOR
    # 30 Jobs, 8,000 tokens (the missed run's Jobs count too: they ran): 266.7 tokens a Job
    assert abs(ch["gpu"].token_scale - ys.PROBLEM_SHARD_TOKENS / (8000 / 30)) < 1e-9
    job = ys.Run(1.0, 1, ((1, 8000 / 30),))
    assert abs(ys.process_device_seconds(job, ch["gpu"]) - GPU_PRIOR.device_seconds(ys.PROBLEM_SHARD_TOKENS, 1)) < 1e-6


def test_supply_counts_distinct_clusters_and_those_with_a_qc_passing_row() -> None:
    import numpy as np

    ys = _sim()
    # rows 0-1 one cluster (row 1 passes QC), row 2 its own (fails), rows 3-4 one cluster (both pass)
    pools = ys.Pools([], cluster=np.array([0, 0, 2, 3, 3]), qc_ok=np.array([0, 1, 0, 1, 1], bool),
                     gate_ok=np.ones(5, bool), itok=np.ones(5), rtok=np.ones(5))  # fmt: skip
    assert ys.supply(pools) == (3, 2)
    arm = ys.Arm(0.7, 0.9, 1.1, np.array([0, 2]), 0.0, 0.0)
    assert ys.supply(pools, arm) == (2, 0)  # row 0 fails QC; its cluster's passing row is another arm's


def test_problem_shard_size_keeps_the_problems_target_over_shard_size() -> None:
    import yaml

    ys = _sim()
    raw = yaml.safe_load((ROOT / "examples" / "stage1-qwen32b.yaml").read_text())["spec"]
    target, eps = raw["target"]["uniqueExamples"], raw["shards"]["examplesPerShard"]
    assert ys.problem_shard_size(target) == eps
    assert ys.problem_shard_size(target // 10) == round(eps / 10)
    assert ys.problem_shard_size(1) == 1


def test_rows_recorded_without_a_response_are_charged_the_arms_measured_means(tmp_path: Path) -> None:
    """A manifest recording's pool (scripts/record_arm_pools.py --manifest: responses for the first rows only): the
    other rows cost the arm's mean recorded response tokens and pass the response side of QC at the arm's measured
    rate among its answered rows that pass the instruction side; a row the instruction side rejects never passes."""

    ys = _sim()
    answered = [
        {"instruction": f"How do I plant tree number {i} in my garden?", "response": "Dig a hole and water it well."
         if i < 3 else "", "instruction_tokens": 12, "response_tokens": 20 + 10 * i, "instruction_logprob": -1.0,
         "response_logprob": -1.0, "finish_reason": "stop"}
        for i in range(4)
    ]  # fmt: skip
    unanswered = [
        {"instruction": f"Explain how the number {i} relates to prime factorisation?", "response": None,
         "instruction_tokens": 12, "response_tokens": None, "instruction_logprob": -1.0 if i % 5 else -9.0,
         "response_logprob": None, "finish_reason": None}
        for i in range(400)
    ]  # fmt: skip
    pools = tmp_path / "p.jsonl.gz"
    with gzip.open(pools, "wt") as f:
        f.write(json.dumps({"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1, "min_p": 0.0,
                            "rotate": False, "malformed": 0, "malformed_tokens": 0,
                            "rows": answered + unanswered}) + "\n")  # fmt: skip
    p = ys.Pools.load(ys.sim_spec(10, None), pools)
    assert p.qc_ok[:4].tolist() == [True, True, True, False]  # the 4th has an empty response
    assert set(p.rtok[4:].tolist()) == {round((20 + 30 + 40 + 50) / 4)}
    gated = p.gate_ok[4:]
    assert gated.sum() == 320 and not p.qc_ok[4:][~gated].any()  # every 5th has a low log-probability
    share = p.qc_ok[4:][gated].mean()
    assert 0.65 < share < 0.85, share  # the arm's rate among answered, gate-passing rows: 3 of 4
    assert {p.reasons[4 + i] for i in range(0, 400, 5)} == {"low_logprob"}
    assert not p.arms[0].rotate and p.arm(0.7, 1.1) is p.arms[0] and p.rotating == []
