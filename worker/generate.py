"""One seed shard: few-shot prompts with rotated domains, vLLM sampling, online dedup, Best-of-N, an atomic Parquet.

The shard is a pipeline of stages, run batch by batch until the shard has its quota of novel examples or has
sampled examples x maxAttemptsFactor instructions:

    sample -> parse -> novelty -> gate -> respond -> pick -> row

Instructions first (default): sample instructions, parse them, drop those already seen (earlier rounds' seen-index,
and this shard's own), run the QC checks that read the instruction alone (`generation.qcBeforeResponse`: a novel
instruction they reject is one the merge would drop whatever its response, so it counts as a QC-rejected example of
the shard and costs no response), and only then spend tokens on responses for the rest; the critic picks one of the
Best-of-N responses and the pick becomes a row. Joint mode samples both in one go (respond only unwraps the response
written with the instruction), so a duplicate's response tokens are spent before novelty drops it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import numpy as np
from genrun.contract import records as rec
from genrun.worker.dedup import SeenIndex
from genrun.worker.dedup_config import DedupConfig
from genrun.worker.engine import Completion, Engine, Params, per_request_seed
from genrun.worker.merge_state import load_seen_index
from genrun.worker.online import OnlineSkip
from genrun.worker.prompts import (
    JOINT_STOPS,
    RESPONSE_STOPS,
    PromptBuilder,
    parse_joint,
    parse_response,
    prompt_hash,
)
from genrun.worker.qc import QcPipeline
from genrun.worker.storage import DamagedMarker, Storage, read_marker

if TYPE_CHECKING:
    from genrun.contract.api import GenerationRunSpec

log = logging.getLogger("genrun.generate")
_SCORE = re.compile(r"\d+(?:\.\d+)?")
# An instruction pass lasts as long as its longest sample, and a sample that runs past 64 tokens without a paragraph
# break is rarely an instruction: in the recorded arm pools (bench/data/arm-pools.jsonl.gz) those are lists, rambles
# and word salad (one known puzzle aside). Cut at the cap, it is rejected as truncated (parse_instruction), so the
# pass does not wait on it.
INSTRUCTION_MAX_TOKENS = 64
DEFAULT_JUDGE_PROMPT = (
    "Rate the response to the instruction for helpfulness and accuracy on a scale of 1 to 10.\n\n"
    "Instruction: {instruction}\nResponse: {response}\n\nScore (1-10):"
)


# ----------------------------------------------------------------------------------------------------------
# What flows between the stages


@dataclass(frozen=True)
class Sample:
    """sample's output: the completion of instruction prompt `index` (joint mode: instruction and response)."""

    index: int
    completion: Completion


@dataclass(frozen=True)
class Candidate:
    """parse's output: a well-formed instruction (and, in joint mode, the response written with it)."""

    index: int
    instruction: str
    sample: Completion
    response: str | None = None


@dataclass(frozen=True)
class Reject:
    """A completion that parse (instruction) or row (picked response) could not use: kept in the rejected file."""

    index: int
    reason: str
    text: str


@dataclass(frozen=True)
class Novel:
    """novelty's output: the candidates to spend responses on, in order, and how many were skipped as seen."""

    kept: list[Candidate]
    skipped_online: int  # seen in earlier rounds (or the spec's `dedup.against` sources)
    skipped_in_shard: int  # seen earlier in this shard


@dataclass(frozen=True)
class Responses:
    """respond's output: the Best-of-N completions of each novel candidate, and the tokens that cost."""

    options: list[list[Completion]]
    tokens: int  # 0 in joint mode: the sample stage paid for the responses


@dataclass(frozen=True)
class Pick:
    """pick's output: the critic's choice among a candidate's responses."""

    candidate: Candidate
    completion: Completion
    score: float | None  # the judge's score; None under the log-probability critic
    options: int
    judge_tokens: int = 0  # what the judge's scoring cost: counted in the shard's tokens like any other generation


@dataclass
class _Counts:
    generated: int = 0
    skipped_online: int = 0
    skipped_in_shard: int = 0
    malformed: int = 0
    tokens: int = 0
    rejected: list[Reject] = field(default_factory=list)
    gated: dict[str, int] = field(default_factory=dict)  # QC reason -> novel instructions rejected before responses

    def reject(self, rejects: Sequence[Reject]) -> None:
        self.malformed += len(rejects)
        self.rejected.extend(rejects)

    def gate(self, rejects: Sequence[Reject]) -> None:
        for r in rejects:
            self.gated[r.reason] = self.gated.get(r.reason, 0) + 1
        self.rejected.extend(rejects)

    def examples(self, rows: int) -> int:
        """The shard's examples so far: rows, and novel instructions QC rejected before their responses."""
        return rows + sum(self.gated.values())

    def skip(self, novel: Novel) -> None:
        self.skipped_online += novel.skipped_online
        self.skipped_in_shard += novel.skipped_in_shard

    def log_progress(self, shard: rec.ShardPlan, rows: int, elapsed: float) -> None:
        log.info(
            "shard r%d s%d: %d/%d examples, %d sampled, %.2f examples/s, %.0f tokens/s, skipped %d seen + %d "
            "in-shard, %d malformed", shard.round, shard.seed, rows, shard.examples, self.generated,
            rows / elapsed, self.tokens / elapsed, self.skipped_online, self.skipped_in_shard, self.malformed,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The stages


@dataclass(frozen=True)
class Asker:
    """The engine requests of one shard: the shard's sampling, and a seed per (prompt index, stage) so that a rerun
    asks the same and identical prompts still sample different text."""

    engine: Engine
    builder: PromptBuilder
    sampling: rec.Sampling
    shard_seed: int
    joint: bool

    def params(self, n: int, max_tokens: int, stops: tuple[str, ...], index: int, stage: int) -> Params:
        s = self.sampling
        seed = per_request_seed(self.shard_seed, index, stage)
        return Params(n, s.temperature, s.top_p, s.repetition_penalty, s.min_p, max_tokens, stops, seed)

    def sample(self, indices: list[int]) -> list[Sample]:
        """Stage 1: one completion per instruction prompt (joint: the pair, up to the response's token limit)."""
        prompts = [self.builder.instruction_prompt(i) for i in indices]
        if self.joint:
            params = [self.params(1, self.sampling.max_tokens, JOINT_STOPS, i, 0) for i in indices]
        else:
            params = [self.params(1, INSTRUCTION_MAX_TOKENS, self.builder.instruction_stops, i, 0) for i in indices]
        outs = self.engine.generate(prompts, params)
        return [Sample(i, out[0]) for i, out in zip(indices, outs, strict=True)]

    def respond(self, novel: list[Candidate], n: int) -> Responses:
        """Stage 4: n responses per novel instruction (joint: the one it was written with, no engine call)."""
        if self.joint:
            options = [[Completion(c.response or "", c.sample.tokens, c.sample.logprob, c.sample.finish_reason)]
                       for c in novel]  # fmt: skip
            return Responses(options, 0)
        if not novel:
            return Responses([], 0)
        prompts = [self.builder.response_prompt(c.index, c.instruction) for c in novel]
        params = [self.params(n, self.sampling.max_tokens, RESPONSE_STOPS, c.index, 1) for c in novel]
        options = self.engine.generate(prompts, params)
        return Responses(options, sum(c.tokens for cands in options for c in cands))


def parse(samples: list[Sample], joint: bool, builder: PromptBuilder) -> tuple[list[Candidate], list[Reject]]:
    """Stage 2: the instruction (joint: and response) each completion holds, or why it holds none."""
    kept: list[Candidate] = []
    rejects: list[Reject] = []
    for s in samples:
        c = s.completion
        if joint:
            pair, why = parse_joint(c.text, c.finish_reason)
            if pair is None:
                rejects.append(Reject(s.index, why, c.text))
            else:
                kept.append(Candidate(s.index, pair[0], c, pair[1]))
        else:
            ins, why = builder.parse_instruction(c.text, c.finish_reason)
            if ins is None:
                rejects.append(Reject(s.index, why, c.text))
            else:
                kept.append(Candidate(s.index, ins, c))
    return kept, rejects


def select(skip: OnlineSkip, cands: list[Candidate], room: int) -> Novel:
    """Stage 3, novelty: the candidates whose instruction the online skip (genrun.worker.online: the registered dedup
    tiers against earlier rounds and this shard) finds new, keep-first, at most `room` of them."""
    flags, old, mine = skip.filter([c.instruction for c in cands], [c.index for c in cands])
    return Novel([c for c, ok in zip(cands, flags, strict=True) if ok][:room], old, mine)


@dataclass(frozen=True)
class Gate:
    """Stage 3b, QC before responses: the spec's QC filters that can judge an instruction alone
    (`QcPipeline.instruction_side`: its length, banned patterns, mean token log-probability) on each novel
    instruction. One they reject is an example the merge would drop whatever its response: it becomes a reject with
    the QC reason, counts towards the shard's examples, and costs its instruction tokens only. Off in joint mode
    (the response is paid for already) and with `generation.qcBeforeResponse: false`."""

    qc: QcPipeline | None

    @classmethod
    def for_shard(cls, spec: GenerationRunSpec) -> Gate:
        g = spec.generation
        qc = QcPipeline.instruction_side(spec.qc.filters) if g.qc_before_response and g.mode != "joint" else None
        return cls(qc if qc is not None and qc.filters else None)

    def split(self, novel: list[Candidate]) -> tuple[list[Candidate], list[Reject]]:
        """(the candidates to respond to, the rejects), both in order."""
        if self.qc is None or not novel:
            return novel, []
        verdicts = self.qc.check_instructions(
            [c.instruction for c in novel], [_or_nan(c.sample.mean_logprob) for c in novel]
        )
        keep = [c for c, v in zip(novel, verdicts, strict=True) if v is None]
        rejects = [Reject(c.index, v, c.instruction) for c, v in zip(novel, verdicts, strict=True) if v is not None]
        return keep, rejects


@dataclass(frozen=True)
class Judge:
    """An LLM-judge critic: the same model scores each candidate 1-10 with the spec's rubric prompt. One per shard."""

    engine: Engine
    template: str
    seed: int

    def scores(self, instruction: str, cands: list[Completion]) -> tuple[list[float], int]:
        """Each candidate's score, and the tokens the judge generated for them."""
        prompts = [self.template.format(instruction=instruction, response=c.text) for c in cands]
        params = [Params(1, 0.0 + 1e-5, 1.0, 1.0, 0.0, 4, ("\n",), self.seed)] * len(prompts)
        vals, tokens = [], 0
        for o in self.engine.generate(prompts, params):
            m = _SCORE.search(o[0].text)  # the first number: "9/10" is 9, not 91
            vals.append(min(10.0, float(m.group())) if m else 0.0)
            tokens += o[0].tokens
        return vals, tokens


@dataclass(frozen=True)
class Critic:
    """Stage 5, Best-of-N: the candidate with the best mean token log-probability, or the judge's best score."""

    judge: Judge | None = None

    @classmethod
    def for_shard(cls, spec: GenerationRunSpec, engine: Engine, shard_seed: int) -> Critic:
        bon = spec.best_of_n
        if bon.critic != "judge":
            return cls()
        return cls(Judge(engine, bon.judge_prompt or DEFAULT_JUDGE_PROMPT, shard_seed))

    def best(self, instruction: str, cands: list[Completion]) -> tuple[int, float | None, int]:
        """(position of the best candidate, its judge score or None, the judge's tokens)."""
        if self.judge is not None:
            scores, tokens = self.judge.scores(instruction, cands)
            top = int(np.argmax(scores))
            return top, float(scores[top]), tokens
        means = [c.mean_logprob if c.mean_logprob is not None else -math.inf for c in cands]
        return int(np.argmax(means)), None, 0

    def pick(self, cand: Candidate, options: list[Completion]) -> Pick:
        top, score, tokens = self.best(cand.instruction, options)
        return Pick(cand, options[top], score, len(options), tokens)


@dataclass(frozen=True)
class RowMaker:
    """Stage 6: a pick -> the shard row (the contract's columns, genrun.contract.records.EXAMPLE_COLUMNS), or a reject
    when the picked response parses to nothing."""

    builder: PromptBuilder
    shard: rec.ShardPlan
    model: str

    def row(self, p: Pick) -> dict[str, Any] | Reject:
        c, i, s = p.completion, p.candidate.index, self.shard.sampling
        text, why = parse_response(c.text)
        if text is None:
            return Reject(i, why, c.text)
        ic = p.candidate.sample
        return {
            "instruction": p.candidate.instruction,
            "response": text,
            "domain": self.builder.domain(i),
            "round": self.shard.round,
            "seed": self.shard.seed,
            "index": i,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "repetition_penalty": s.repetition_penalty,
            "model": self.model,
            "prompt_hash": prompt_hash(self.builder.instruction_prompt(i)),
            "instruction_tokens": ic.tokens,
            "response_tokens": c.tokens,
            "finish_reason": c.finish_reason,
            "instruction_logprob": _or_nan(ic.mean_logprob),
            "response_logprob": _or_nan(c.mean_logprob),
            "critic_score": p.score,
            "candidates": p.options,
            "attributes": self.attributes(i),
        }

    def attributes(self, index: int) -> str | None:
        """The attribute values prompt `index` was built with, as the row's JSON object (None without attributes)."""
        values = self.builder.values(index)
        return json.dumps(dict(values), ensure_ascii=False) if values else None


def _or_nan(x: float | None) -> float:
    return x if x is not None else float("nan")


def add_signals(signals: Any, rows: list[dict[str, Any]]) -> None:
    """The quality columns of a batch's new rows, in place: one encode per batch, not per row."""
    if signals is None or not rows:
        return
    cols = signals.columns([r["instruction"] for r in rows], [r["response"] for r in rows], [r["domain"] for r in rows])
    for k, values in cols.items():
        for r, v in zip(rows, values, strict=True):
            r[k] = v


def _quality_signals(spec: GenerationRunSpec) -> Any:
    """The per-row quality columns' maker when the embedding model is loaded anyway (semantic tier on) or a QC filter
    reads them (`relevance`, `domain`); else None and the columns stay null."""
    from genrun.contract.qc_rules import SIGNAL_RULES

    sem = DedupConfig.from_spec(spec.dedup).semantic
    if sem is None and not any(f.name in SIGNAL_RULES for f in spec.qc.filters):
        return None
    from genrun.worker.semantic import DEFAULT_BATCH_SIZE, DEFAULT_MODEL, QualitySignals, load_embedder

    model, batch = (sem.model, sem.batch_size) if sem is not None else (DEFAULT_MODEL, DEFAULT_BATCH_SIZE)
    want_relevance = any(f.name == "relevance" for f in spec.qc.filters)  # responses are the costly texts to embed
    return QualitySignals(load_embedder(model, None, batch), spec.prompt.domains, relevance=want_relevance)


def _load_seen_semantic(spec: GenerationRunSpec, storage: Storage, rnd: int) -> Any:
    """The kept embeddings of the rounds before `rnd` (the merge saves them in the seen-index), when semantic is on."""
    cfg = DedupConfig.from_spec(spec.dedup)
    if cfg.semantic is None or not cfg.online:
        return None
    from genrun.worker.semantic import load_seen_semantic

    return load_seen_semantic(storage, rnd - 1)


LOSS_PRIOR = 0.15  # a sample's chance of not becoming an example (skipped, malformed) before the run has seen any
PASS_CONFIDENCE = 0.9  # how sure a pass is to fill its shard: another pass costs the engine a round trip


def _batch_size(rows: int, generated: int, quota: int, max_attempts: int, batch_size: int, prior: float) -> int:
    """How many instructions to sample next: enough to fill what is missing with probability PASS_CONFIDENCE at
    the loss (skips, malformed) this shard has seen so far, or before any at `prior` (`_loss_before`), within the
    attempt bound and one engine batch (one full batch beats a full one plus a small tail batch that leaves the
    engine idle). A pass that falls short costs another pass, a whole round trip of the engine at a small batch
    (its latency, not its tokens: a decode step costs nearly as much for two sequences as for forty), while a spare
    sample costs its instruction's few tokens and no response."""
    loss = min(0.8, 1 - rows / generated if generated else prior)
    keep, missing = 1 - loss, quota - rows
    z = NormalDist().inv_cdf(PASS_CONFIDENCE)
    root = (z * math.sqrt(keep * loss) + math.sqrt(z * z * keep * loss + 4 * keep * missing)) / (2 * keep)
    return min(batch_size, max_attempts - generated, max(1, math.ceil(root * root)))


def _loss_before(storage: Storage, shard: rec.ShardPlan) -> float:
    """The share of the previous round's samples that became no example (skipped as seen, malformed), from its shard
    markers, over the shards that sampled as this one does when its round plan names any (a hot arm's malformed
    samples say little of a cooler one's), else over all: this round's samples meet at least as many duplicates.
    LOSS_PRIOR in round 1, or when the previous round left no readable marker (the merge sets damaged ones aside;
    this is only a first guess, which the shard corrects from its own samples)."""
    if shard.round <= 1:
        return LOSS_PRIOR
    prev = shard.round - 1
    try:
        plan = rec.round_plan_from(json.loads(storage.read_bytes(rec.round_plan_key(prev))))
        alike = {s.seed for s in plan.shards if s.sampling == shard.sampling}
    except (KeyError, OSError, ValueError, TypeError, AttributeError):
        alike = set()
    alike_counts, every = [0, 0], [0, 0]  # [examples made, samples] of the alike shards, and of every shard
    for key in storage.list(rec.shard_round_prefix(prev)):
        if not key.endswith(rec.MARKER_SUFFIX):
            continue
        try:
            m = read_marker(storage, key)
        except (DamagedMarker, OSError):
            continue
        if m is None:
            continue
        for c in (alike_counts, every) if m.seed in alike else (every,):
            c[0] += m.examples_made
            c[1] += m.generated
    made, sampled = alike_counts if alike_counts[1] else every
    return 1 - made / sampled if sampled else LOSS_PRIOR


def generate_shard(
    storage: Storage, spec: GenerationRunSpec, shard: rec.ShardPlan, engine: Engine, *, progress_every: float = 10.0
) -> rec.ShardManifest:
    mkey = rec.shard_manifest_key(shard.round, shard.seed)
    if storage.exists(mkey):  # a finished shard: a retried or resumed Job exits at once
        log.info("shard r%d s%d already published", shard.round, shard.seed)
        return rec.shard_manifest_from(json.loads(storage.read_bytes(mkey)))

    t0 = time.monotonic()
    builder = PromptBuilder.for_shard(spec, shard)
    joint = spec.generation.mode == "joint"
    asker = Asker(engine, builder, shard.sampling, shard.seed, joint)
    novelty = OnlineSkip(DedupConfig.from_spec(spec.dedup), *_load_seen(spec, storage, shard.round))
    gate = Gate.for_shard(spec)
    critic = Critic.for_shard(spec, engine, shard.seed)
    maker = RowMaker(builder, shard, getattr(engine, "model", spec.model.name))
    signals = _quality_signals(spec)
    quota = shard.examples
    max_attempts = math.ceil(quota * spec.generation.max_attempts_factor)
    counts = _Counts()
    rows: list[dict[str, Any]] = []
    next_log = t0 + progress_every
    prior = _loss_before(storage, shard)

    while (done := counts.examples(len(rows))) < quota and counts.generated < max_attempts:
        want = _batch_size(done, counts.generated, quota, max_attempts, spec.generation.batch_size, prior)
        samples = asker.sample(list(range(counts.generated, counts.generated + want)))
        counts.generated += want
        counts.tokens += sum(s.completion.tokens for s in samples)
        cands, rejects = parse(samples, joint, builder)
        counts.reject(rejects)
        novel = select(novelty, cands, quota - done)
        counts.skip(novel)
        answer, early = gate.split(novel.kept)
        counts.gate(early)
        responses = asker.respond(answer, spec.best_of_n.n)
        counts.tokens += responses.tokens
        picks = [critic.pick(c, opts) for c, opts in zip(answer, responses.options, strict=True)]
        counts.tokens += sum(p.judge_tokens for p in picks)
        made = [maker.row(p) for p in picks]
        counts.reject([r for r in made if isinstance(r, Reject)])
        new_rows = [r for r in made if not isinstance(r, Reject)]
        add_signals(signals, new_rows)
        rows += new_rows
        now = time.monotonic()
        if now >= next_log:
            counts.log_progress(shard, counts.examples(len(rows)), now - t0)
            next_log = now + progress_every

    manifest = _publish(storage, shard, rows, counts, t0)
    log.info(
        "shard r%d s%d done: %d rows from %d sampled in %.1fs (%.0f tokens/s); skipped %d seen + %d in-shard "
        "(%d of them semantic); %d malformed; %d rejected by QC before their responses", shard.round, shard.seed,
        len(rows), counts.generated, manifest.seconds, counts.tokens / max(manifest.seconds, 1e-9),
        counts.skipped_online, counts.skipped_in_shard, novelty.skipped["semantic"], counts.malformed,
        sum(counts.gated.values()),
    )  # fmt: skip
    return manifest


def _load_seen(spec: GenerationRunSpec, storage: Storage, rnd: int) -> tuple[SeenIndex | None, Any]:
    """What counts as seen before this round: the seen-index and kept embeddings of the rounds before `rnd`, joined
    with the spec's earlier datasets or runs (spec.dedup.against)."""
    seen, seen_sem = load_seen_index(storage, rnd - 1), _load_seen_semantic(spec, storage, rnd)
    if spec.dedup.against and spec.dedup.online:
        from genrun.worker.against import join_seen, join_semantic, load_against

        prior = load_against(spec)
        if prior is not None:
            seen, seen_sem = join_seen(prior.seen, seen), join_semantic(prior.semantic, seen_sem)
    return seen, seen_sem


def _publish(
    storage: Storage, shard: rec.ShardPlan, rows: list[dict[str, Any]], counts: _Counts, t0: float
) -> rec.ShardManifest:
    """The shard's data and rejects, then its completion marker, last: a reader that sees the marker sees all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dkey, rkey = rec.shard_data_key(shard.round, shard.seed), rec.shard_rejected_key(shard.round, shard.seed)
    with storage.staged(dkey) as data:
        pq.write_table(pa.Table.from_pylist(rows, schema=rec.example_schema()), data)
    rej = [{"round": shard.round, "seed": shard.seed, "index": r.index, "reason": r.reason, "text": r.text}
           for r in counts.rejected]  # fmt: skip
    with storage.staged(rkey) as rejected:
        pq.write_table(pa.Table.from_pylist(rej, schema=rec.rejected_schema()), rejected)
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
        qc_rejected_before_response=dict(sorted(counts.gated.items())),
        examples=shard.examples,
    )
    storage.write_bytes(rec.shard_manifest_key(shard.round, shard.seed), rec.to_json(manifest).encode())
    return manifest
