"""The HTML report's kept and rejected rows per arm, on a real local run of examples/problem.yaml with the replay
engine (recorded real SmolLM2-135M outputs; no model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]


def test_the_page_shows_each_arms_kept_and_rejected_rows_with_their_reasons(tmp_path: Path) -> None:
    from genrun.contract import records as rec
    from genrun.operator.charts import arm_samples_of
    from genrun.worker.storage import LocalStorage

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    cli = [sys.executable, "-P", "-m", "genrun.operator.cli"]
    res = subprocess.run([*cli, "run", str(ROOT / "examples" / "problem.yaml"), "--engine", "replay",
                          "--output", str(out), "-q"], capture_output=True, text=True, env=env, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    storage = LocalStorage(str(out))
    plans = [rec.round_plan_from(json.loads((out / rec.round_plan_key(r)).read_text())) for r in range(1, 20)
             if (out / rec.round_plan_key(r)).exists()]  # fmt: skip
    arm_of = {s.seed: s.arm for p in plans for s in p.shards}
    samples = arm_samples_of(storage, len(plans))
    assert sorted(a for a, _, _ in samples) == sorted(set(arm_of.values()))
    kept_by_seed = {
        (r["seed"], r["instruction"])
        for part in (out / "dataset" / "data").glob("*.parquet")
        for r in pq.read_table(part, columns=["seed", "instruction"]).to_pylist()
    }
    kept_arms = {arm_of[s]: {i for s2, i in kept_by_seed if arm_of[s2] == arm_of[s]} for s, _ in kept_by_seed}
    shown_bad = 0
    for arm, kept, bad in samples:
        assert len(kept) <= 3 and len(bad) <= 3
        assert set(kept) <= kept_arms.get(arm, set())  # each kept row is the dataset's, from a shard of that arm
        assert all("duplicate" not in why and why for _, why in bad)
        shown_bad += len(bad)
    assert shown_bad > 0  # the hot arms' replayed rows include QC rejections
    page = tmp_path / "r.html"
    res = subprocess.run([*cli, "report", str(out), "--html", str(page)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    html = page.read_text()
    assert "Kept and rejected rows per arm" in html
    for arm, _, bad in samples:
        assert f"<td>{arm}</td>" in html
        for _, why in bad:
            assert f"({why})" in html
