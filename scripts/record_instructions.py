"""Record real SmolLM2-135M-Instruct instructions (and responses for a subset) with the quickstart prompts and the
problem's sampling (T 0.7, top_p 0.9, repetition penalty 1.1), for calibrating the semantic dedup tier and the
quality signals: tests/data/smollm2-instructions.jsonl.gz, one object per sample with the domain asked for.

Usage: python -P scripts/record_instructions.py [samples] [responses]
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

import yaml
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.operator.planner import make_round
from genrun.worker.engine import Params, VllmEngine, per_request_seed
from genrun.worker.prompts import INSTRUCTION_STOPS, RESPONSE_STOPS, PromptBuilder, parse_instruction, parse_response

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    n_resp = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    spec = parse_spec(raw)
    s = spec.sampling
    shard = make_round(
        spec, 1, 1, rec.Sampling(s.temperature, s.top_p, s.repetition_penalty, s.min_p, 96), {}, ""
    ).shards[0]
    engine = VllmEngine(spec.model.name, seed=0, dtype=spec.model.dtype, max_model_len=spec.model.max_model_len)
    b = PromptBuilder.for_shard(spec, shard)
    t0 = time.monotonic()
    out: list[dict[str, object]] = []
    for start in range(0, n, 250):
        idx = list(range(start, min(n, start + 250)))
        params = [Params(1, 0.7, 0.9, 1.1, 0.0, 96, INSTRUCTION_STOPS, per_request_seed(shard.seed, i, 0)) for i in idx]
        for i, c in zip(idx, engine.generate([b.instruction_prompt(i) for i in idx], params), strict=True):
            ins, why = parse_instruction(c[0].text, c[0].finish_reason)
            out.append({"index": i, "domain": b.domain(i), "instruction": ins, "reason": why, "text": c[0].text})
        print(f"{len(out)} instructions in {time.monotonic() - t0:.0f}s", flush=True)
    firsts: dict[str, dict[str, object]] = {}
    for o in out:
        if o["instruction"] and len(firsts) < n_resp:
            firsts.setdefault(str(o["instruction"]), o)
    todo = list(firsts.values())
    params = [
        Params(1, 0.7, 0.9, 1.1, 0.0, 128, RESPONSE_STOPS, per_request_seed(shard.seed, int(o["index"]), 1))  # type: ignore[call-overload]
        for o in todo
    ]
    prompts = [b.response_prompt(int(o["index"]), str(o["instruction"])) for o in todo]  # type: ignore[call-overload]
    for o, c in zip(todo, engine.generate(prompts, params), strict=True):
        o["response"] = parse_response(c[0].text)[0]
    print(f"{len(todo)} responses in {time.monotonic() - t0:.0f}s", flush=True)
    dest = ROOT / "tests" / "data" / "smollm2-instructions.jsonl.gz"
    with gzip.open(dest, "wt") as f:
        f.writelines(json.dumps(o) + "\n" for o in out)
    print(f"{len(out)} samples -> {dest}")


if __name__ == "__main__":
    main()
