"""The problem's regime end to end: scripts/record_arm_pools.py --manifest examples/problem.yaml writes pools (here
with the replay engine: recorded real SmolLM2-135M outputs, not list-style completions; no model), and
bench/yield_sim.py --pools problem replays them with the manifest's QC, keeping today's RESULT fields."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-P", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONSAFEPATH": "1", **(env or {})})  # fmt: skip


def test_a_manifest_recording_feeds_the_simulators_problem_pools(tmp_path: Path) -> None:
    pools = tmp_path / "problem-pools.jsonl.gz"
    rec = _run(str(ROOT / "scripts" / "record_arm_pools.py"), "--manifest", str(ROOT / "examples" / "problem.yaml"),
               "--engine", "replay", "--instructions", "60", "--responses", "12", "--out", str(pools))  # fmt: skip
    assert rec.returncode == 0, rec.stderr[-2000:]
    with gzip.open(pools, "rt") as f:
        arms = [json.loads(line) for line in f]
    # the manifest's sampling without rotation, then its policy arms with it
    assert [(a["temperature"], a["repetition_penalty"], a["min_p"], a["rotate"]) for a in arms] == [
        (0.7, 1.1, 0.0, False), (0.7, 1.1, 0.0, True), (1.0, 1.3, 0.0, True), (1.0, 1.1, 0.1, True),
        (1.0, 1.1, 0.0, True),
    ]  # fmt: skip
    for a in arms:
        answered = [r for r in a["rows"] if r["response"] is not None]
        assert len(a["rows"]) + a["malformed"] == 60 and len(answered) == 12
        assert a["rows"][:12] == answered  # responses for the first parsed rows
        assert "the arm's mean response tokens" in a["responses"]
        assert all(bool(r["domain"]) == a["rotate"] for r in a["rows"])  # no rotation: no domain asked for
    sim = _run(str(ROOT / "bench" / "yield_sim.py"), "--pools", "problem", "--target", "20", "--seeds", "2",
               "--show-kept", "6", env={"GENRUN_ARM_POOLS": str(pools)})  # fmt: skip
    assert sim.returncode == 0, sim.stderr[-2000:]
    out = sim.stdout
    assert "pools: problem" in out and "manifest examples/problem.yaml" in out
    assert "the problem's arm (T=0.7 rp=1.1 no-rotation) alone" in out
    # the problem's process runs the rotation-free arm; the static arms are the rotating ones
    assert "static T=0.7 rp=1.1 no-rotation" not in out and "static T=1 rp=1.1 min_p=0.1 " in out
    kept = (
        out.split("kept by genrun from the hottest arms it used")[1].split("kept in pool")[0].strip().splitlines()[1:]
    )
    assert 0 < len(kept) <= 6 and all(line.startswith("  [T=") for line in kept)
    assert out.count("rejected in pool ") == 5
    last = out.strip().splitlines()[-1]
    fields = {kv.split("=")[0] for kv in last.removeprefix("RESULT ").split()}
    assert fields == {"genrun_tokens", "best_static_tokens", "seed_tokens", "genrun_over_best_static",
                      "seed_over_genrun", "overshoot", "genrun_without_qc_before_response_tokens", "floor_tokens",
                      "seed_over_floor", "genrun_gpu_s", "best_static_gpu_s", "seed_gpu_s", "seed_over_genrun_gpu",
                      "genrun_over_best_static_gpu", "startup_share"}  # fmt: skip


def test_problem_pools_not_recorded_give_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "none.jsonl.gz"
    sim = _run(str(ROOT / "bench" / "yield_sim.py"), "--pools", "problem", env={"GENRUN_ARM_POOLS": str(missing)})
    assert sim.returncode == 2
    assert "--pools problem:" in sim.stderr and "record_arm_pools.py --manifest examples/problem.yaml" in sim.stderr
