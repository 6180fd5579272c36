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
                      "seed_over_floor"}  # fmt: skip
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
