"""Record real SmolLM2-135M-Instruct outputs for the replay engine (worker/replay/smollm2-135m.jsonl.gz).

Runs the real worker (vLLM, the quickstart prompts) with online dedup off, so that the recording keeps the model's
natural duplicates, at the quickstart temperature and at 1.0. Usage: python scripts/record_replay.py [examples]
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


def main() -> None:
    per_shard = int(sys.argv[1]) if len(sys.argv) > 1 else 150
    doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    raw = doc["spec"]
    raw["dedup"] = {"online": False}
    raw["shards"]["examplesPerShard"] = per_shard
    out = []
    with tempfile.TemporaryDirectory() as d:
        storage = LocalStorage(d)
        engine = None
        for i, temperature in enumerate((0.7, 0.7, 1.0)):
            raw["sampling"]["temperature"] = temperature
            spec = parse_spec(raw)
            base = rec.Sampling(
                temperature, spec.sampling.top_p, spec.sampling.repetition_penalty, 0.0, spec.sampling.max_tokens
            )
            shard = make_round(spec, 1, 3, base, {}, "recording").shards[i]
            engine = engine or make_engine("vllm", spec, shard.seed)
            generate_shard(storage, spec, shard, engine)
            for row in pq.read_table(Path(d) / rec.shard_data_key(1, shard.seed)).to_pylist():
                out.append(
                    {
                        k: row[k]
                        for k in (
                            "instruction",
                            "response",
                            "instruction_tokens",
                            "response_tokens",
                            "instruction_logprob",
                            "response_logprob",
                            "finish_reason",
                            "temperature",
                        )
                    }
                )
    dest = ROOT / "worker" / rec_path()
    with gzip.open(dest, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    print(f"{len(out)} records -> {dest}")


def rec_path() -> str:
    from genrun.worker.engine import REPLAY_DATA

    return REPLAY_DATA


if __name__ == "__main__":
    main()
