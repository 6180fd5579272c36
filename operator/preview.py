"""`genrun preview MANIFEST`: a few instructions and responses from the real engine, with the verdicts a run would
give them, before anyone pays for a run.

It runs one shard of round 1 through the generator's own code path (worker/generate.py's generate_shard, into a
temporary folder: nothing is written to spec.output.path) with a recording wrapper around the engine, then shows, for
every sampled instruction, whether it was kept, an exact or near duplicate of an earlier one (the dedup key and MinHash
settings of spec.dedup), or malformed; and for every kept example, the QC verdict of spec.qc.filters (pass or the
reason the merge would reject it).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from genrun.contract import errors
from genrun.contract.api import GenerationRunSpec

CUT = 160  # characters of text shown per field in the table


@dataclass
class Sample:
    index: int
    domain: str
    instruction: str  # the parsed instruction, or the raw text when malformed
    # kept | exact_duplicate | near_duplicate | malformed | qc_before_response | response_malformed | not_needed
    verdict: str
    duplicate_of: int | None = None
    similarity: float | None = None  # estimated Jaccard of the dedup keys, for near duplicates
    response: str = ""
    qc: str = ""  # "pass" or the QC reason, for kept examples (and qc_before_response: the generator's QC reason)
    instruction_logprob: float | None = None
    response_logprob: float | None = None


@dataclass
class Preview:
    model: str
    engine: str
    seconds: float
    tokens: int
    shard_skipped: int  # what generate_shard itself skipped as duplicates within the shard (a cross-check)
    samples: list[Sample] = field(default_factory=list)

    def count(self, verdict: str) -> int:
        return sum(s.verdict == verdict for s in self.samples)

    @property
    def qc_passed(self) -> int:
        return sum(s.qc == "pass" for s in self.samples)


class _Recorder:
    """The engine, recording the instruction-stage completions (the ones generate_shard dedups) in prompt order."""

    def __init__(self, engine: Any, instruction_stops: tuple[tuple[str, ...], ...]) -> None:
        self.engine = engine
        self.model = engine.model
        self.stops = instruction_stops
        self.instructions: list[Any] = []

    def generate(self, prompts: list[str], params: list[Any]) -> list[list[Any]]:
        outs: list[list[Any]] = self.engine.generate(prompts, params)
        if params and params[0].stop in self.stops:
            self.instructions += [o[0] for o in outs]
        return outs


def preview(spec: GenerationRunSpec, n: int, engine_kind: str) -> Preview:
    import pyarrow.parquet as pq
    from genrun.contract import records as rec
    from genrun.operator.planner import make_round
    from genrun.operator.policy import base_sampling
    from genrun.worker.dedup import MinHasher, dedup_keys, similar
    from genrun.worker.engine import make_engine
    from genrun.worker.generate import generate_shard
    from genrun.worker.prompts import JOINT_STOPS, PromptBuilder, parse_joint
    from genrun.worker.qc import QcPipeline
    from genrun.worker.storage import LocalStorage

    shard = make_round(spec, 1, 1, base_sampling(spec), {}, "preview", examples=n).shards[0]
    builder = PromptBuilder.for_shard(spec, shard)
    t0 = time.monotonic()
    engine = _Recorder(make_engine(engine_kind, spec, shard.seed), (builder.instruction_stops, JOINT_STOPS))
    with tempfile.TemporaryDirectory(prefix="genrun-preview-") as tmp:
        storage = LocalStorage(tmp)
        manifest = generate_shard(storage, spec, shard, engine, progress_every=3600)
        rows = pq.read_table(Path(tmp) / rec.shard_data_key(shard.round, shard.seed)).to_pylist()
        rejected = pq.read_table(Path(tmp) / rec.shard_rejected_key(shard.round, shard.seed)).to_pylist()
    seconds = time.monotonic() - t0

    by_index = {int(r["index"]): r for r in rows}
    response_rejects = {int(r["index"]): r["reason"] for r in rejected}
    qc = QcPipeline.from_spec(spec.qc.filters)
    d = spec.dedup
    joint = spec.generation.mode == "joint"
    parsed = []
    for c in engine.instructions:
        if joint:
            pair, why = parse_joint(c.text, c.finish_reason)
            parsed.append((pair[0] if pair else None, why, c))
        else:
            ins, why = builder.parse_instruction(c.text, c.finish_reason)
            parsed.append((ins, why, c))
    texts = [p[0] for p in parsed if p[0] is not None]
    keys = dedup_keys(texts, key="instruction", normalized=d.normalize) if texts else []
    sigs = MinHasher(d.num_perm, 1, d.shingle_size).signatures(keys) if texts else None
    firsts: list[tuple[int, int]] = []  # (sample index, position in keys) of first occurrences
    out = Preview(engine.model, engine_kind, round(seconds, 3), manifest.tokens, manifest.skipped_in_shard)
    k = -1
    for i, (ins, why, c) in enumerate(parsed):
        s = Sample(i, builder.domain(i), ins if ins is not None else c.text, "malformed")
        out.samples.append(s)
        if ins is None:
            s.instruction = f"{c.text} [{why}]"
            continue
        k += 1
        s.instruction_logprob = c.mean_logprob
        if d.key == "instruction":
            for j, kj in firsts:
                if keys[kj] == keys[k]:
                    s.verdict, s.duplicate_of = "exact_duplicate", j
                    break
                sim = float(similar(sigs[kj : kj + 1], sigs[k : k + 1])[0]) if sigs is not None else 0.0
                if d.near_duplicates and sim >= d.threshold:
                    s.verdict, s.duplicate_of, s.similarity = "near_duplicate", j, round(sim, 3)
                    break
            if s.duplicate_of is not None:
                continue
        firsts.append((i, k))
        row = by_index.get(i)
        if row is not None:
            s.verdict, s.response = "kept", str(row["response"])
            lp = row.get("response_logprob")
            s.response_logprob = lp if isinstance(lp, float) and lp == lp else None
            s.qc = qc.check(row) or "pass"
        elif response_rejects.get(i) in manifest.qc_rejected_before_response:
            s.verdict, s.qc = "qc_before_response", str(response_rejects[i])  # no response was paid for
        elif i in response_rejects:
            s.verdict, s.response = "response_malformed", str(response_rejects[i])
        else:
            s.verdict = "not_needed"  # novel, but the quota was already met
    return out


def _cut(text: str, n: int = CUT) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 3] + "..."


def render(p: Preview, out: TextIO) -> None:
    kept = p.count("kept")
    print(
        f"genrun preview: {p.model} ({p.engine} engine), {len(p.samples)} instruction(s) sampled in {p.seconds:.1f}s, "
        f"{p.tokens} tokens; nothing written to the run's output",
        file=out,
    )
    for s in p.samples:
        head = f"#{s.index} [{s.domain or '-'}]"
        if s.verdict == "kept":
            lp = f", mean log-prob {s.response_logprob:.2f}" if s.response_logprob is not None else ""
            print(f"\n{head} kept, QC: {s.qc}{lp}", file=out)
            print(f"  instruction: {_cut(s.instruction)}", file=out)
            print(f"  response:    {_cut(s.response)}", file=out)
        elif s.duplicate_of is not None:
            how = "exact" if s.verdict == "exact_duplicate" else f"near (est. Jaccard {s.similarity})"
            print(f"\n{head} {how} duplicate of #{s.duplicate_of}: {_cut(s.instruction, 100)}", file=out)
        elif s.verdict == "response_malformed":
            print(f"\n{head} response malformed ({s.response}): {_cut(s.instruction, 100)}", file=out)
        elif s.verdict == "qc_before_response":
            print(f"\n{head} QC rejected it before any response ({s.qc}): {_cut(s.instruction, 100)}", file=out)
        else:
            print(f"\n{head} {s.verdict.replace('_', ' ')}: {_cut(s.instruction, 100)}", file=out)
    reasons: dict[str, int] = {}
    for s in p.samples:
        if s.verdict in ("kept", "qc_before_response") and s.qc != "pass":
            reasons[s.qc] = reasons.get(s.qc, 0) + 1
    print(
        f"\n{len(p.samples)} sampled: {kept} kept ({p.qc_passed} pass QC"
        + (f"; rejected: {', '.join(f'{r} {n}' for r, n in sorted(reasons.items()))}" if reasons else "")
        + f"), {p.count('exact_duplicate')} exact and {p.count('near_duplicate')} near duplicate(s), "
        f"{p.count('malformed') + p.count('response_malformed')} malformed",
        file=out,
    )


def run_preview(path: Path, n: int, engine: str, as_json: bool, out: TextIO | None = None) -> int:
    from genrun.contract.errors import UserError
    from genrun.operator.validate import ManifestError, SpecError, load_run_manifest
    from genrun.worker.engine import ModelError
    from genrun.worker.openai_engine import EndpointError

    if not 1 <= n <= 1000:
        raise UserError(f"-n: must be 1-1000 examples, got {n}")
    try:
        _, _, spec = load_run_manifest(path, None)
    except (ManifestError, SpecError) as exc:
        for e in exc.errors if isinstance(exc, SpecError) else [str(exc)]:
            print(f"{path}: {e}", file=sys.stderr)
        return errors.EXIT_USAGE
    try:
        result = preview(spec, n, engine)
    except (ModelError, EndpointError) as exc:
        raise UserError(str(exc)) from exc
    out = out or sys.stdout
    if as_json:
        print(json.dumps(asdict(result)), file=out)
    else:
        render(result, out)
    return errors.EXIT_OK
