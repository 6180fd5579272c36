"""Record pools of real SmolLM2-135M samples per arm for the offline yield simulator (bench/yield_sim.py).

Two recordings, one JSON object per arm in a gzip'd JSONL file:
- the quickstart's (no --manifest): runs the real worker (vLLM on CPU, the quickstart's prompt and domain rotation)
  with online dedup off, so each pool keeps the model's natural duplicates, once per arm of a small sampling grid;
  every row has its response. Output: bench/data/arm-pools.jsonl.gz.
- a manifest's (--manifest, e.g. examples/problem.yaml, the problem's regime): per arm of --grid, `--instructions`
  instruction samples from the manifest's own prompts (its style, its domains when the arm rotates them, none when it
  does not), and responses for the first `--responses` parsed ones only: at ~25 tokens/s on 2 cores, instructions
  are what duplication is measured on, and a response costs several instructions. Rows without a response have
  "response": null; each arm says so in its "responses" field, and bench/yield_sim.py charges such a row the arm's
  measured mean response tokens and passes it through the response side of QC at the arm's measured rate (see its
  docstring). Output: --out (default bench/data/problem-pools.jsonl.gz).
Each row keeps what the real dedup and QC need (instruction, response, token counts, log-probabilities, finish
reason); each arm also records how many samples were malformed, the tokens they cost, and (manifest recordings) the
first malformed completions as the model wrote them.
Usage: python -P scripts/record_arm_pools.py [shards_per_arm] [examples_per_shard]
       python -P scripts/record_arm_pools.py --manifest examples/problem.yaml [--grid T,RP,MINP,on|off ...]
           [--instructions 250] [--responses 40] [--out bench/data/problem-pools.jsonl.gz]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.operator.planner import make_round
from genrun.worker.engine import Engine, Params, make_engine, per_request_seed
from genrun.worker.generate import INSTRUCTION_MAX_TOKENS, generate_shard
from genrun.worker.prompts import RESPONSE_STOPS, PromptBuilder, parse_response
from genrun.worker.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "bench" / "data" / "arm-pools.jsonl.gz"
MANIFEST_DEST = ROOT / "bench" / "data" / "problem-pools.jsonl.gz"
PROMPTS_PER_SHARD = 50  # a manifest recording's prompts per simulated shard: each shard rotates the few-shot examples
MALFORMED_KEPT = 20  # malformed completions kept per arm, as written, for people to read
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
    if len(sys.argv) > 1 and sys.argv[1].startswith("-"):
        record_manifest(sys.argv[1:])
        return
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
    write(arms, DEST)


def write(arms: list[dict[str, Any]], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")  # a recording stopped mid-write keeps the previous file whole
    with gzip.open(part, "wt") as f:
        f.writelines(json.dumps(a, ensure_ascii=False) + "\n" for a in arms)
    part.replace(dest)
    print(f"{len(arms)} arms -> {dest}")


@dataclasses.dataclass(frozen=True)
class GridArm:
    temperature: float
    top_p: float
    repetition_penalty: float
    min_p: float
    rotate: bool  # domain rotation: the manifest's domains, one per prompt; off, no domain (the model picks a tag)

    def name(self) -> str:
        return (f"T={self.temperature:g} rp={self.repetition_penalty:g} min_p={self.min_p:g} "
                f"rotation={'on' if self.rotate else 'off'}")  # fmt: skip


def parse_grid(items: list[str], top_p: float) -> list[GridArm]:
    """--grid T,RP,MINP,on|off ... -> arms; a clear one-line error on a bad item."""
    out = []
    for item in items:
        parts = item.split(",")
        try:
            if len(parts) != 4 or parts[3] not in ("on", "off"):
                raise ValueError
            out.append(GridArm(float(parts[0]), top_p, float(parts[1]), float(parts[2]), parts[3] == "on"))
        except ValueError:
            sys.exit(f"--grid: {item!r} is not T,RP,MINP,on|off (e.g. 0.7,1.1,0,off: domain rotation off)")
    return out


def default_grid(spec: Any) -> list[GridArm]:
    """The manifest's sampling without domain rotation (the problem's process: its tags are the model's choice),
    then each of its policy arms with rotation (genrun's way)."""
    s = spec.sampling
    grid = [GridArm(s.temperature, s.top_p, s.repetition_penalty, s.min_p, False)]
    arms = spec.policy.arms or ()
    grid += [GridArm(a.temperature, a.top_p, a.repetition_penalty, a.min_p, True) for a in arms]
    return grid


def record_manifest(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="record a manifest's arm pools (instructions, responses for a subset)")
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--grid", nargs="*", default=[], help="arms as T,RP,MINP,on|off (domain rotation); default: the "
                    "manifest's sampling with rotation off, then its policy arms with rotation on")  # fmt: skip
    ap.add_argument("--instructions", type=int, default=250, help="instruction samples per arm")
    ap.add_argument("--responses", type=int, default=40, help="responses per arm, for its first parsed instructions")
    ap.add_argument("--out", type=Path, default=MANIFEST_DEST)
    ap.add_argument("--engine", default="vllm", help="vllm (the real model) or replay (a quick check of the script)")
    args = ap.parse_args(argv)
    if not args.manifest.is_file():
        ap.error(f"--manifest: no such file {args.manifest}")
    raw = yaml.safe_load(args.manifest.read_text())["spec"]
    raw["dedup"] = {**raw.get("dedup", {}), "online": False}
    spec = parse_spec(raw)
    grid = parse_grid(args.grid, spec.sampling.top_p) if args.grid else default_grid(spec)
    # Two engine calls for the whole grid, one for every arm's instructions and one for the responses, each request
    # with its own arm's sampling: on CPU a step costs about the same for 30 sequences as for 250, and a call lasts
    # as many steps as its longest completion, so one large call beats one per arm.
    t0 = time.monotonic()
    plans: dict[int, rec.RoundPlan] = {}  # earlier arms' plans: each arm's shards get fresh seeds and positions
    asks: list[tuple[int, PromptBuilder, int, int]] = []  # (arm, builder, shard seed, prompt index) per sample
    samplings = []
    for a, arm in enumerate(grid):
        sampling = rec.Sampling(arm.temperature, arm.top_p, arm.repetition_penalty, arm.min_p, spec.sampling.max_tokens)
        samplings.append(sampling)
        shards = math.ceil(args.instructions / PROMPTS_PER_SHARD)
        plans[a + 1] = make_round(spec, a + 1, shards, sampling, plans, "recording", examples=PROMPTS_PER_SHARD)
        mine = []
        for shard in plans[a + 1].shards:
            b = PromptBuilder.for_shard(spec, shard)
            b = b if arm.rotate else dataclasses.replace(b, domains=())
            mine += [(a, b, shard.seed, i) for i in range(PROMPTS_PER_SHARD)]
        asks += mine[: args.instructions]
    engine: Engine = make_engine(args.engine, spec, plans[1].shards[0].seed)
    print(f"engine ready in {time.monotonic() - t0:.0f} s; {len(asks)} instruction prompts", flush=True)

    def params(a: int, max_tokens: int, stops: tuple[str, ...], seed: int) -> Params:
        s = samplings[a]
        return Params(1, s.temperature, s.top_p, s.repetition_penalty, s.min_p, max_tokens, stops, seed)

    outs = engine.generate(
        [b.instruction_prompt(i) for _, b, _, i in asks],
        [
            params(a, INSTRUCTION_MAX_TOKENS, b.instruction_stops, per_request_seed(seed, i, 0))
            for a, b, seed, i in asks
        ],
    )
    tokens = [sum(o[0].tokens for o in outs)]
    print(f"instructions: {tokens[0]} tokens in {time.monotonic() - t0:.0f} s", flush=True)
    arms: list[dict[str, Any]] = []
    pending: list[tuple[int, dict[str, Any], PromptBuilder, int, int]] = []  # rows whose responses are recorded
    for a, arm in enumerate(grid):
        rows: list[dict[str, Any]] = []
        malformed = malformed_tokens = asked = 0
        malformed_texts: list[list[str]] = []
        for (arm_i, b, seed, i), out in zip(asks, outs, strict=True):
            if arm_i != a:
                continue
            c = out[0]
            ins, why = b.parse_instruction(c.text, c.finish_reason)
            if ins is None:
                malformed += 1
                malformed_tokens += c.tokens
                if len(malformed_texts) < MALFORMED_KEPT:
                    malformed_texts.append([c.text, why])
                continue
            row: dict[str, Any] = {
                "instruction": ins, "response": None, "domain": b.domain(i), "instruction_tokens": c.tokens,
                "response_tokens": None, "instruction_logprob": c.mean_logprob, "response_logprob": None,
                "finish_reason": None,
            }  # fmt: skip
            rows.append(row)
            if asked < args.responses:
                pending.append((a, row, b, seed, i))
                asked += 1
        arms.append({
            "temperature": arm.temperature, "top_p": arm.top_p, "repetition_penalty": arm.repetition_penalty,
            "min_p": arm.min_p, "rotate": arm.rotate, "style": spec.prompt.style,
            "responses": f"recorded for the first {asked} of {len(rows)} rows (the others: response null); "
                         "bench/yield_sim.py charges those the arm's mean response tokens and passes them through "
                         "the response side of QC at the arm's measured rate",
            "malformed": malformed, "malformed_tokens": malformed_tokens, "malformed_samples": malformed_texts,
            "rows": rows,
        })  # fmt: skip
        uniq = len({r["instruction"].casefold() for r in rows})
        print(f"arm {arm.name()}: {len(rows)} rows ({uniq} distinct), {malformed} malformed", flush=True)
    answers = engine.generate(
        [b.response_prompt(i, r["instruction"]) for _, r, b, _, i in pending],
        [params(a, spec.sampling.max_tokens, RESPONSE_STOPS, per_request_seed(seed, i, 1)) for a, _, _, seed, i in pending],
    ) if pending else []  # fmt: skip
    for (_, row, _, _, _), out in zip(pending, answers, strict=True):
        c = out[0]
        text, _why = parse_response(c.text)
        row.update(response=text or "", response_tokens=c.tokens, response_logprob=c.mean_logprob,
                   finish_reason=c.finish_reason)  # fmt: skip
    tokens.append(sum(o[0].tokens for o in answers))
    print(f"responses: {len(pending)}, {tokens[1]} tokens; {sum(tokens)} tokens in {time.monotonic() - t0:.0f} s")
    write(arms, args.out)


if __name__ == "__main__":
    main()
