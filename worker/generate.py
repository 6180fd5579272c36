"""One seed shard: few-shot prompts with rotated domains, vLLM sampling, online dedup, Best-of-N, an atomic Parquet.

Instructions first (default): sample instructions, drop those already seen (earlier rounds' seen-index, and this
shard's own), and only then spend tokens on responses for the novel ones. Joint mode samples both in one go and
dedups afterwards. Either way the shard keeps sampling until it has its quota of novel examples or reaches
examples x maxAttemptsFactor instruction samples.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from genrun.worker import records as rec
from genrun.worker.dedup import MinHasher, SeenIndex, dedup_keys
from genrun.worker.engine import Completion, Engine, Params, per_request_seed
from genrun.worker.merge import load_seen_index
from genrun.worker.prompts import (
    INSTRUCTION_STOPS,
    JOINT_STOPS,
    RESPONSE_STOPS,
    PromptBuilder,
    parse_instruction,
    parse_joint,
    parse_response,
    prompt_hash,
)
from genrun.worker.storage import Storage

log = logging.getLogger("genrun.generate")
_SCORE = re.compile(r"\d+(?:\.\d+)?")
INSTRUCTION_MAX_TOKENS = 96


@dataclass
class _Counts:
    generated: int = 0
    skipped_online: int = 0
    skipped_in_shard: int = 0
    malformed: int = 0
    tokens: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)


def _critic_pick(cands: list[Completion], judge: Any = None) -> tuple[int, float | None]:
    """Best-of-N: the candidate with the best mean token log-probability, or the judge's score when there is one."""
    if judge is not None:
        scores = judge(cands)
        best = int(np.argmax(scores))
        return best, float(scores[best])
    scores = [c.mean_logprob if c.mean_logprob is not None else -math.inf for c in cands]
    best = int(np.argmax(scores))
    return best, None


def _judge(engine: Engine, prompt_template: str, instruction: str, seed: int) -> Any:
    """An LLM-judge critic: the same model scores each candidate 1-10 with the spec's rubric prompt."""
    template = prompt_template or (
        "Rate the response to the instruction for helpfulness and accuracy on a scale of 1 to 10.\n\n"
        "Instruction: {instruction}\nResponse: {response}\n\nScore (1-10):"
    )

    def score(cands: list[Completion]) -> list[float]:
        prompts = [template.format(instruction=instruction, response=c.text) for c in cands]
        params = [Params(1, 0.0 + 1e-5, 1.0, 1.0, 0.0, 4, ("\n",), seed)] * len(prompts)
        outs = engine.generate(prompts, params)
        vals = []
        for o in outs:
            m = _SCORE.search(o[0].text)  # the first number: "9/10" is 9, not 91
            vals.append(min(10.0, float(m.group())) if m else 0.0)
        return vals

    return score


class _Novelty:
    """Online dedup: earlier rounds' seen-index plus what this shard already accepted. With `dedup.semantic` on, an
    instruction that passed exact and MinHash is also checked against the kept embeddings (earlier rounds', then this
    shard's) by the same keep-first rule the merge applies (genrun.worker.semantic)."""

    def __init__(self, spec: Any, seen: SeenIndex | None, seen_semantic: Any = None) -> None:
        d = spec.dedup
        self.key, self.normalize, self.near = d.key, d.normalize, d.near_duplicates
        self.hasher = MinHasher(d.num_perm, 1, d.shingle_size)
        self.seen = seen if (seen is not None and d.online) else None
        self.mine = SeenIndex.empty(d.threshold, d.num_perm, 1, d.shingle_size)
        self.semantic: Any = None  # (embedder, earlier rounds' SemanticIndex or None, this shard's SemanticIndex)
        self.skipped_semantic = 0
        sem = getattr(d, "semantic", None)
        if sem is not None and sem.enabled and self.key == "instruction":
            from genrun.worker.semantic import SemanticIndex, load_embedder

            emb = load_embedder(sem.model, None, sem.batch_size)
            old = seen_semantic if d.online else None
            self.semantic = (emb, old, SemanticIndex(emb.dim, sem.threshold, sem.model))

    def filter(self, instructions: list[str], ids: list[int] | None = None) -> tuple[list[bool], int, int]:
        """(novel flags, skipped as seen in earlier rounds, skipped as seen in this shard); order matters:
        the first of two near-identical candidates in one batch is kept. `ids` name the rows in the semantic index
        (the sample indices)."""
        if self.key == "pair":  # the key needs the response: dedup happens in the merge
            return [True] * len(instructions), 0, 0
        keys = dedup_keys(instructions, key="instruction", normalized=self.normalize)
        sigs = self.hasher.signatures(keys)
        old = np.zeros(len(keys), dtype=bool)
        if self.seen is not None:
            old = self.seen.contains_exact(keys) | self.seen.contains_near(sigs, self.near)
        status = np.where(old, 1, 0).astype(np.int8)
        fresh = np.flatnonzero(~old)
        status[fresh] = np.where(self.mine.admit([keys[i] for i in fresh], sigs[fresh], self.near) == 0, 0, 2)
        flags = (status == 0).tolist()
        skipped_old, skipped_mine = int((status == 1).sum()), int((status == 2).sum())
        if self.semantic is not None:
            skipped_old, skipped_mine = self._semantic(keys, flags, ids, skipped_old, skipped_mine)
        return flags, skipped_old, skipped_mine

    def _semantic(
        self, keys: list[str], flags: list[bool], ids: list[int] | None, skipped_old: int, skipped_mine: int
    ) -> tuple[int, int]:
        """Drop (in place) the exact/near-novel rows whose cosine with a kept row is >= threshold. A dropped row stays
        in the shard's exact/near index: the merge's near tier sees it too, so its near-duplicates go either way."""
        from genrun.worker.semantic import embed_keys

        embedder, old, mine = self.semantic
        rows = [j for j, ok in enumerate(flags) if ok]
        if not rows:
            return skipped_old, skipped_mine
        emb = embed_keys(embedder, [keys[j] for j in rows])
        alive = np.ones(len(rows), dtype=bool)
        if old is not None and len(old):
            alive = ~old.query(emb)[0]
            skipped_old += int((~alive).sum())
            self.skipped_semantic += int((~alive).sum())
        row_ids = np.asarray([ids[j] if ids is not None else j for j in rows], dtype=np.int64)
        res = mine.filter_add(emb[alive], row_ids[alive])
        skipped_mine += res.dropped
        self.skipped_semantic += res.dropped
        keep = alive.copy()
        keep[np.flatnonzero(alive)] = res.keep
        for j, k in zip(rows, keep, strict=True):
            flags[j] = bool(k)
        return skipped_old, skipped_mine


def _quality_signals(spec: Any) -> Any:
    """The per-row quality columns' maker when the embedding model is loaded anyway (semantic tier on) or a QC filter
    reads them (`relevance`, `domain`); else None and the columns stay null."""
    from genrun.worker.qc import SIGNAL_FILTERS

    sem = getattr(spec.dedup, "semantic", None)
    on = sem is not None and sem.enabled
    if not on and not any(f.name in SIGNAL_FILTERS for f in spec.qc.filters):
        return None
    from genrun.worker.semantic import DEFAULT_BATCH_SIZE, DEFAULT_MODEL, QualitySignals, load_embedder

    model, batch = (sem.model, sem.batch_size) if sem is not None else (DEFAULT_MODEL, DEFAULT_BATCH_SIZE)
    want_relevance = any(f.name == "relevance" for f in spec.qc.filters)  # responses are the costly texts to embed
    return QualitySignals(load_embedder(model, None, batch), spec.prompt.domains, relevance=want_relevance)


def _load_seen_semantic(spec: Any, storage: Storage, rnd: int) -> Any:
    """The kept embeddings of the rounds before `rnd` (the merge saves them in the seen-index), when semantic is on."""
    sem = getattr(spec.dedup, "semantic", None)
    if sem is None or not sem.enabled or not spec.dedup.online:
        return None
    from genrun.worker.semantic import load_seen_semantic

    return load_seen_semantic(storage, rnd - 1)


def generate_shard(
    storage: Storage, spec: Any, shard: rec.ShardPlan, engine: Engine, *, progress_every: float = 10.0
) -> rec.ShardManifest:
    import pyarrow as pa
    import pyarrow.parquet as pq

    mkey = rec.shard_manifest_key(shard.round, shard.seed)
    if storage.exists(mkey):  # a finished shard: a retried or resumed Job exits at once
        import json

        log.info("shard r%d s%d already published", shard.round, shard.seed)
        return rec.shard_manifest_from(json.loads(storage.read_bytes(mkey)))

    t0 = time.monotonic()
    builder = PromptBuilder.for_shard(spec, shard)
    seen, seen_sem = load_seen_index(storage, shard.round - 1), _load_seen_semantic(spec, storage, shard.round)
    if spec.dedup.against and spec.dedup.online:  # earlier datasets or runs count as seen (spec.dedup.against)
        from genrun.worker.against import join_seen, join_semantic, load_against

        prior = load_against(spec)
        if prior is not None:
            seen, seen_sem = join_seen(prior.seen, seen), join_semantic(prior.semantic, seen_sem)
    novelty = _Novelty(spec, seen, seen_sem)
    signals = _quality_signals(spec)
    s, g, bon = shard.sampling, spec.generation, spec.best_of_n
    quota = shard.examples
    max_attempts = math.ceil(quota * g.max_attempts_factor)
    counts = _Counts()
    rows: list[dict[str, Any]] = []
    next_log = t0 + progress_every
    joint = g.mode == "joint"

    def params(n: int, max_tokens: int, stops: tuple[str, ...], index: int, stage: int) -> Params:
        return Params(
            n, s.temperature, s.top_p, s.repetition_penalty, s.min_p, max_tokens, stops,
            per_request_seed(shard.seed, index, stage),
        )  # fmt: skip

    while len(rows) < quota and counts.generated < max_attempts:
        # Ask for what is missing, scaled by the loss seen so far (skips, malformed; 15% before any is seen), within
        # the attempt bound: one full batch beats a full one plus a small tail batch that leaves the engine idle.
        loss = 1 - len(rows) / counts.generated if counts.generated else 0.15
        missing = math.ceil((quota - len(rows)) / max(0.2, 1 - loss))
        want = min(g.batch_size, max_attempts - counts.generated, max(1, missing))
        idx = list(range(counts.generated, counts.generated + want))
        prompts = [builder.instruction_prompt(i) for i in idx]
        if joint:
            outs = engine.generate(prompts, [params(1, s.max_tokens, JOINT_STOPS, i, 0) for i in idx])
        else:
            outs = engine.generate(prompts, [params(1, INSTRUCTION_MAX_TOKENS, INSTRUCTION_STOPS, i, 0) for i in idx])
        counts.generated += want
        parsed: list[tuple[int, str, Completion, str | None]] = []  # (index, instruction, completion, response)
        for i, out in zip(idx, outs, strict=True):
            c = out[0]
            counts.tokens += c.tokens
            if joint:
                pair, why = parse_joint(c.text, c.finish_reason)
                if pair is None:
                    counts.malformed += 1
                    counts.rejected.append({"index": i, "reason": why, "text": c.text})
                    continue
                parsed.append((i, pair[0], c, pair[1]))
            else:
                ins, why = parse_instruction(c.text, c.finish_reason)
                if ins is None:
                    counts.malformed += 1
                    counts.rejected.append({"index": i, "reason": why, "text": c.text})
                    continue
                parsed.append((i, ins, c, None))
        flags, old, mine = novelty.filter([p[1] for p in parsed], [p[0] for p in parsed])
        counts.skipped_online += old
        counts.skipped_in_shard += mine
        novel = [p for p, ok in zip(parsed, flags, strict=True) if ok][: quota - len(rows)]

        if joint:
            resp = [[Completion(p[3] or "", p[2].tokens, p[2].logprob, p[2].finish_reason)] for p in novel]
        else:
            rprompts = [builder.response_prompt(i, ins) for i, ins, _, _ in novel]
            resp = engine.generate(
                rprompts, [params(bon.n, s.max_tokens, RESPONSE_STOPS, i, 1) for i, _, _, _ in novel]
            ) if novel else []  # fmt: skip
        batch_start = len(rows)
        for (i, ins, ic, _), cands in zip(novel, resp, strict=True):
            counts.tokens += sum(c.tokens for c in cands) if not joint else 0
            judge = _judge(engine, bon.judge_prompt, ins, shard.seed) if bon.critic == "judge" else None
            best, score = _critic_pick(cands, judge)
            c = cands[best]
            text, why = parse_response(c.text)
            if text is None:
                counts.malformed += 1
                counts.rejected.append({"index": i, "reason": why, "text": c.text})
                continue
            prompt = builder.instruction_prompt(i)
            rows.append(
                {
                    "instruction": ins,
                    "response": text,
                    "domain": builder.domain(i),
                    "round": shard.round,
                    "seed": shard.seed,
                    "index": i,
                    "temperature": s.temperature,
                    "top_p": s.top_p,
                    "repetition_penalty": s.repetition_penalty,
                    "model": getattr(engine, "model", spec.model.name),
                    "prompt_hash": prompt_hash(prompt),
                    "instruction_tokens": ic.tokens,
                    "response_tokens": c.tokens,
                    "finish_reason": c.finish_reason,
                    "instruction_logprob": ic.mean_logprob if ic.mean_logprob is not None else float("nan"),
                    "response_logprob": c.mean_logprob if c.mean_logprob is not None else float("nan"),
                    "critic_score": score,
                    "candidates": len(cands),
                }
            )
        if signals is not None and len(rows) > batch_start:  # one encode per batch, not per row
            new_rows = rows[batch_start:]
            cols = signals.columns(
                [r["instruction"] for r in new_rows], [r["response"] for r in new_rows], [r["domain"] for r in new_rows]
            )
            for k, values in cols.items():
                for r, v in zip(new_rows, values, strict=True):
                    r[k] = v
        now = time.monotonic()
        if now >= next_log:
            el = now - t0
            log.info(
                "shard r%d s%d: %d/%d examples, %d sampled, %.2f examples/s, %.0f tokens/s, skipped %d seen + %d "
                "in-shard, %d malformed", shard.round, shard.seed, len(rows), quota, counts.generated,
                len(rows) / el, counts.tokens / el, counts.skipped_online, counts.skipped_in_shard, counts.malformed,
            )  # fmt: skip
            next_log = now + progress_every

    dkey, rkey = rec.shard_data_key(shard.round, shard.seed), rec.shard_rejected_key(shard.round, shard.seed)
    with tempfile.TemporaryDirectory(prefix="genrun-shard-") as d:
        data = Path(d) / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=rec.example_schema()), data)
        storage.upload(data, dkey)
        rejected = Path(d) / "rejected.parquet"
        rej = [{"round": shard.round, "seed": shard.seed, **r} for r in counts.rejected]
        pq.write_table(pa.Table.from_pylist(rej, schema=rec.rejected_schema()), rejected)
        storage.upload(rejected, rkey)
    manifest = rec.ShardManifest(
        round=shard.round,
        seed=shard.seed,
        rows=len(rows),
        generated=counts.generated,
        skipped_online=counts.skipped_online,
        skipped_in_shard=counts.skipped_in_shard,
        malformed=counts.malformed,
        tokens=counts.tokens,
        seconds=round(time.monotonic() - t0, 3),
        data=storage.location(dkey),
        rejected=storage.location(rkey),
    )
    storage.write_bytes(mkey, rec.to_json(manifest).encode())  # the completion marker, last
    log.info(
        "shard r%d s%d done: %d rows from %d sampled in %.1fs (%.0f tokens/s); skipped %d seen + %d in-shard "
        "(%d of them semantic); %d malformed", shard.round, shard.seed, len(rows), counts.generated, manifest.seconds,
        counts.tokens / max(manifest.seconds, 1e-9), counts.skipped_online, counts.skipped_in_shard,
        novelty.skipped_semantic, counts.malformed,
    )  # fmt: skip
    return manifest
