"""Record pools of real SmolLM2-135M samples per arm for the offline yield simulator (bench/yield_sim.py).

Runs the real worker (vLLM on CPU, the quickstart's prompt and domain rotation) with online dedup off, so each pool
keeps the model's natural duplicates, once per arm of a small sampling grid. Each row keeps what the real dedup and QC
need (instruction, response, token counts, log-probabilities, finish reason); each arm also records how many samples
were malformed and the tokens they cost. Output: bench/data/arm-pools.jsonl.gz (one JSON object per arm).
Usage: python -P scripts/record_arm_pools.py [shards_per_arm] [examples_per_shard]
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.operator.planner import make_round
from genrun.worker.engine import make_engine
from genrun.worker.generate import generate_shard
from genrun.worker.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "bench" / "data" / "arm-pools.jsonl.gz"
# (temperature, repetition penalty): the quickstart's ladder and one cooler arm; top_p 0.9 throughout.
GRID = ((0.5, 1.1), (0.7, 1.1), (0.8, 1.2), (0.9, 1.3), (1.0, 1.3))
KEYS = (
    "instruction",
    "response",
    "instruction_tokens",
    "response_tokens",
    "instruction_logprob",
    "response_logprob",
    "finish_reason",
)


def main() -> None:
    shards = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    per_shard = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["dedup"] = {"online": False}
    raw["shards"]["examplesPerShard"] = per_shard
    spec = parse_spec(raw)
    engine = None
    arms = []
    with tempfile.TemporaryDirectory() as d:
        storage = LocalStorage(d)
        for a, (temperature, penalty) in enumerate(GRID):
            sampling = rec.Sampling(temperature, spec.sampling.top_p, penalty, 0.0, spec.sampling.max_tokens)
            plan = make_round(spec, a + 1, shards, sampling, {}, "recording")
            rows: list[dict[str, object]] = []
            malformed = tokens = row_tokens = 0
            for shard in plan.shards:
                engine = engine or make_engine("vllm", spec, shard.seed)
                m = generate_shard(storage, spec, shard, engine)
                got = pq.read_table(Path(d) / m.data).to_pylist()
                rows += [{k: r[k] for k in KEYS} for r in got]
                malformed += m.malformed
                tokens += m.tokens
                row_tokens += sum(int(r["instruction_tokens"]) + int(r["response_tokens"]) for r in got)
            arms.append(
                {
                    "temperature": temperature,
                    "top_p": spec.sampling.top_p,
                    "repetition_penalty": penalty,
                    "malformed": malformed,
                    "malformed_tokens": max(0, tokens - row_tokens),
                    "rows": rows,
                }
            )
            print(f"arm T={temperature} rp={penalty}: {len(rows)} rows, {malformed} malformed, {tokens} tokens")
    DEST.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(DEST, "wt") as f:
        f.writelines(json.dumps(a) + "\n" for a in arms)
    print(f"{len(arms)} arms -> {DEST}")


if __name__ == "__main__":
    main()
