"""The GenerationRun API as Python types: parse a manifest, apply the CRD's defaults, reject semantic errors.

The CRD (crds/generationrun.yaml) is the source of truth for structure and defaults; tests prove that parsing a
manifest here gives the same object as parsing it after the CRD's own defaulting. Checks that the schema and CEL
cannot express live in `semantic_errors`, each message naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
import re
import string
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

GROUP = "genrun.io"
VERSION = "v1alpha1"
KIND = "GenerationRun"
PLURAL = "generationruns"
API_VERSION = f"{GROUP}/{VERSION}"


class SpecError(ValueError):
    """One or more field-named problems with a manifest."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


def _f(camel: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that knows its camelCase manifest name."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"json": camel})
    if default is dataclasses.MISSING:
        return field(metadata={"json": camel})
    return field(default=default, metadata={"json": camel})


DEFAULT_TEMPLATE = (
    "The following are diverse, high-quality examples of instructions that a user might give an AI assistant "
    "about {domain}, each followed by a helpful, accurate response.\n\n{examples}"
)
TEMPLATE_PLACEHOLDERS = frozenset({"domain", "examples"})
QC_FILTERS = (
    "length",
    "finishReason",
    "refusal",
    "echo",
    "repetition",
    "bannedPatterns",
    "logprob",
    "critic",
)
QcFilterName = Literal["length", "finishReason", "refusal", "echo", "repetition", "bannedPatterns", "logprob", "critic"]


@dataclass(frozen=True)
class ModelSpec:
    name: str = _f("name")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f("dtype", "auto")
    tensor_parallel_size: int = _f("tensorParallelSize", 1)
    max_model_len: int = _f("maxModelLen", 2048)
    gpu_memory_utilization: float = _f("gpuMemoryUtilization", 0.9)


@dataclass(frozen=True)
class FewShotExample:
    instruction: str = _f("instruction")
    response: str = _f("response")
    domain: str = _f("domain", "")


@dataclass(frozen=True)
class PromptSpec:
    template: str = _f("template", DEFAULT_TEMPLATE)
    domains: tuple[str, ...] = _f("domains", ())
    examples: tuple[FewShotExample, ...] = _f("examples", ())
    examples_per_prompt: int = _f("examplesPerPrompt", 2)


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float = _f("temperature", 0.7)
    top_p: float = _f("topP", 0.9)
    repetition_penalty: float = _f("repetitionPenalty", 1.1)
    min_p: float = _f("minP", 0.0)
    max_tokens: int = _f("maxTokens", 512)


@dataclass(frozen=True)
class ShardsSpec:
    initial: int = _f("initial", 4)
    first_seed: int = _f("firstSeed", 0)
    examples_per_shard: int = _f("examplesPerShard", 500)


@dataclass(frozen=True)
class TargetSpec:
    unique_examples: int = _f("uniqueExamples")


@dataclass(frozen=True)
class EscalationSpec:
    temperature_step: float = _f("temperatureStep", 0.1)
    max_temperature: float = _f("maxTemperature", 1.0)
    repetition_penalty_step: float = _f("repetitionPenaltyStep", 0.1)
    max_repetition_penalty: float = _f("maxRepetitionPenalty", 1.3)
    escalate_below_unique_ratio: float = _f("escalateBelowUniqueRatio", 0.7)
    min_qc_pass_rate: float = _f("minQcPassRate", 0.7)
    rotate_domains: bool = _f("rotateDomains", True)
    headroom: float = _f("headroom", 1.2)
    min_shards_per_round: int = _f("minShardsPerRound", 1)
    max_shards_per_round: int = _f("maxShardsPerRound", 64)


@dataclass(frozen=True)
class BudgetSpec:
    max_rounds: int = _f("maxRounds", 10)
    max_shards: int = _f("maxShards", 200)
    max_generated_examples: int = _f("maxGeneratedExamples", 10_000_000)
    max_shard_retries: int = _f("maxShardRetries", 2)
    max_failed_shards: int = _f("maxFailedShards", 0)


@dataclass(frozen=True)
class GenerationSpec:
    mode: Literal["instructionsFirst", "joint"] = _f("mode", "instructionsFirst")
    max_attempts_factor: float = _f("maxAttemptsFactor", 4.0)
    batch_size: int = _f("batchSize", 64)


@dataclass(frozen=True)
class SemanticDedupSpec:
    """The semantic tier: sentence embeddings of the normalised instruction, cosine >= threshold drops the later row."""

    enabled: bool = _f("enabled", False)
    model: str = _f("model", "embedded:all-minilm-l6-v2")
    threshold: float = _f("threshold", 0.9)
    batch_size: int = _f("batchSize", 256)


@dataclass(frozen=True)
class DedupSpec:
    key: Literal["instruction", "pair"] = _f("key", "instruction")
    normalize: bool = _f("normalize", True)
    online: bool = _f("online", True)
    near_duplicates: bool = _f("nearDuplicates", True)
    threshold: float = _f("threshold", 0.8)
    num_perm: int = _f("numPerm", 128)
    shingle_size: int = _f("shingleSize", 1)
    partitions: int = _f("partitions", 1)
    semantic: SemanticDedupSpec = _f("semantic", factory=SemanticDedupSpec)


@dataclass(frozen=True)
class QcFilter:
    name: QcFilterName = _f("name")
    params: dict[str, Any] = _f("params", factory=dict)


DEFAULT_QC_FILTERS: tuple[QcFilter, ...] = tuple(
    QcFilter(name=n) for n in ("length", "finishReason", "refusal", "echo", "repetition", "logprob")
)


@dataclass(frozen=True)
class QcSpec:
    filters: tuple[QcFilter, ...] = _f("filters", DEFAULT_QC_FILTERS)


@dataclass(frozen=True)
class BestOfNSpec:
    n: int = _f("n", 1)
    critic: Literal["logprob", "judge"] = _f("critic", "logprob")
    judge_prompt: str = _f("judgePrompt", "")


@dataclass(frozen=True)
class S3Spec:
    endpoint: str = _f("endpoint", "")
    region: str = _f("region", "us-east-1")
    credentials_secret: str = _f("credentialsSecret", "")


@dataclass(frozen=True)
class OutputSpec:
    path: str = _f("path")
    s3: S3Spec | None = _f("s3", None)

    @property
    def is_s3(self) -> bool:
        return self.path.startswith("s3://")


@dataclass(frozen=True)
class WorkerSpec:
    image: str = _f("image", "")
    gpus: int = _f("gpus", 1)
    cpu: str = _f("cpu", "4")
    memory: str = _f("memory", "32Gi")
    node_selector: dict[str, str] = _f("nodeSelector", factory=dict)
    tolerations: tuple[dict[str, Any], ...] = _f("tolerations", ())
    priority_class_name: str = _f("priorityClassName", "")
    queue_name: str = _f("queueName", "")
    model_volume_claim: str = _f("modelVolumeClaim", "")
    output_volume_claim: str = _f("outputVolumeClaim", "")
    active_deadline_seconds: int = _f("activeDeadlineSeconds", 86400)
    parallelism: int = _f("parallelism", 0)


@dataclass(frozen=True)
class GenerationRunSpec:
    model: ModelSpec = _f("model")
    target: TargetSpec = _f("target")
    output: OutputSpec = _f("output")
    suspend: bool = _f("suspend", False)
    prompt: PromptSpec = _f("prompt", factory=PromptSpec)
    sampling: SamplingSpec = _f("sampling", factory=SamplingSpec)
    shards: ShardsSpec = _f("shards", factory=ShardsSpec)
    escalation: EscalationSpec = _f("escalation", factory=EscalationSpec)
    budget: BudgetSpec = _f("budget", factory=BudgetSpec)
    generation: GenerationSpec = _f("generation", factory=GenerationSpec)
    dedup: DedupSpec = _f("dedup", factory=DedupSpec)
    qc: QcSpec = _f("qc", factory=QcSpec)
    best_of_n: BestOfNSpec = _f("bestOfN", factory=BestOfNSpec)
    worker: WorkerSpec = _f("worker", factory=WorkerSpec)


@dataclass(frozen=True)
class RunRef:
    """Who a run is: enough to name its children and label its metrics."""

    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 1


# ----------------------------------------------------------------------------------------------------------
# Parsing: one generic walk over the dataclasses, so every type error names its field.

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "an object"
    if origin in (tuple, list):
        return "a list"
    if origin is dict or tp is dict:
        return "a map"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _parse(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _parse(args[0], value, path, errors)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: must be an object, got {type(value).__name__}")
            return None
        return _parse_dataclass(tp, value, path, errors)  # type: ignore[arg-type]
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.append(f"{path}: must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: must be a list, got {type(value).__name__}")
            return ()
        return tuple(_parse(item_tp, v, f"{path}[{i}]", errors) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: must be a map, got {type(value).__name__}")
            return {}
        (_, val_tp) = typing.get_args(tp)
        if val_tp is Any:
            return dict(value)
        return {str(k): _parse(val_tp, v, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path}: must be a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported type {tp!r} at {path}")  # a programming error, not a user one


def _parse_dataclass(cls: type[T], data: dict[str, Any], path: str, errors: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    known = set()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f.metadata["json"]
        known.add(key)
        if key in data and data[key] is not None:
            kwargs[f.name] = _parse(hints[f.name], data[key], f"{path}.{key}", errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{path}.{key}: is required")
    for key in sorted(set(data) - known):
        errors.append(f"{path}.{key}: unknown field (known: {', '.join(sorted(known))})")
    if any(e.startswith(path + ".") or e.startswith(path + ":") for e in errors):
        # Fill what is missing so construction succeeds; the caller raises with the collected errors.
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kwargs[f.name] = None
    return cls(**kwargs)


def to_manifest(obj: Any) -> Any:
    """The camelCase manifest form of a parsed object (defaults included)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if v is None or (isinstance(v, dict) and not v):
                continue  # omitempty, like the Go types: the CRD declares no default for these
            out[f.metadata["json"]] = to_manifest(v)
        return out
    if isinstance(obj, tuple | list):
        return [to_manifest(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_manifest(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------------------
# Semantic checks: what the CRD schema and CEL cannot express, or express without naming the fix.

_BOUNDS: list[tuple[str, float, float, bool, bool]] = [
    # (dotted path, low, high, low exclusive, high exclusive)
    ("sampling.temperature", 0, 2, True, False),
    ("sampling.top_p", 0, 1, True, False),
    ("sampling.repetition_penalty", 1, 2, False, False),
    ("sampling.min_p", 0, 1, False, True),
    ("sampling.max_tokens", 16, 32768, False, False),
    ("escalation.max_temperature", 0, 2, True, False),
    ("escalation.max_repetition_penalty", 1, 2, False, False),
    ("escalation.temperature_step", 0, 1, False, False),
    ("escalation.repetition_penalty_step", 0, 1, False, False),
    ("escalation.min_qc_pass_rate", 0, 1, False, False),
    ("escalation.escalate_below_unique_ratio", 0, 1, False, False),
    ("escalation.headroom", 1, 4, False, False),
    ("escalation.min_shards_per_round", 1, 1000, False, False),
    ("escalation.max_shards_per_round", 1, 1000, False, False),
    ("shards.initial", 1, 1000, False, False),
    ("shards.first_seed", 0, 2**31 - 1, False, False),
    ("shards.examples_per_shard", 1, 1_000_000, False, False),
    ("target.unique_examples", 1, 100_000_000, False, False),
    ("budget.max_rounds", 1, 1000, False, False),
    ("budget.max_shards", 1, 100_000, False, False),
    ("budget.max_generated_examples", 1, 10**10, False, False),
    ("budget.max_shard_retries", 0, 20, False, False),
    ("budget.max_failed_shards", 0, 100_000, False, False),
    ("dedup.threshold", 0, 1, True, False),
    ("dedup.num_perm", 16, 1024, False, False),
    ("dedup.shingle_size", 1, 32, False, False),
    ("dedup.partitions", 1, 256, False, False),
    ("best_of_n.n", 1, 16, False, False),
    ("generation.max_attempts_factor", 1, 50, False, False),
    ("generation.batch_size", 1, 8192, False, False),
    ("model.tensor_parallel_size", 1, 64, False, False),
    ("model.max_model_len", 128, 1_048_576, False, False),
    ("model.gpu_memory_utilization", 0.05, 0.99, False, False),
    ("prompt.examples_per_prompt", 0, 16, False, False),
    ("worker.gpus", 0, 16, False, False),
    ("worker.active_deadline_seconds", 60, 2_592_000, False, False),
    ("worker.parallelism", 0, 10_000, False, False),
]


def _camel_path(dotted: str) -> str:
    parts = dotted.split(".")
    return ".".join(p.split("_")[0] + "".join(w.title() for w in p.split("_")[1:]) for p in parts)


def _fmt_range(lo: float, hi: float, lo_ex: bool, hi_ex: bool) -> str:
    return f"{'(' if lo_ex else '['}{lo:g}, {hi:g}{')' if hi_ex else ']'}"


_S3_RE = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?$")
_QC_PARAMS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "length": {
        "minInstructionChars": int,
        "maxInstructionChars": int,
        "minResponseChars": int,
        "maxResponseChars": int,
    },
    "finishReason": {"allowTruncated": bool},
    "refusal": {"patterns": list},
    "echo": {"maxOverlap": (int, float)},
    "repetition": {"maxRepeatedNgramRatio": (int, float), "ngram": int, "minAlnumRatio": (int, float)},
    "bannedPatterns": {"patterns": list},
    "logprob": {"minResponseLogprob": (int, float), "minInstructionLogprob": (int, float)},
    "critic": {"minScore": (int, float)},
}


def semantic_errors(spec: GenerationRunSpec) -> list[str]:
    """Every problem the CRD cannot state well, as `spec.<field>: <problem and fix>`."""
    errors: list[str] = []
    for dotted, lo, hi, lo_ex, hi_ex in _BOUNDS:
        section, attr = dotted.split(".")
        value = getattr(getattr(spec, section), attr)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        too_low = value <= lo if lo_ex else value < lo
        too_high = value >= hi if hi_ex else value > hi
        if too_low or too_high:
            errors.append(f"spec.{_camel_path(dotted)}: must be in {_fmt_range(lo, hi, lo_ex, hi_ex)}, got {value:g}")
    s, e, b = spec.sampling, spec.escalation, spec.budget
    if e.max_temperature < s.temperature:
        errors.append(
            f"spec.escalation.maxTemperature: must be >= spec.sampling.temperature ({s.temperature:g}), "
            f"got {e.max_temperature:g}"
        )
    if e.max_repetition_penalty < s.repetition_penalty:
        errors.append(
            f"spec.escalation.maxRepetitionPenalty: must be >= spec.sampling.repetitionPenalty "
            f"({s.repetition_penalty:g}), got {e.max_repetition_penalty:g}"
        )
    if b.max_shards < spec.shards.initial:
        errors.append(
            f"spec.budget.maxShards: must be >= spec.shards.initial ({spec.shards.initial}), got {b.max_shards}"
        )
    if e.max_shards_per_round < e.min_shards_per_round:
        errors.append(
            f"spec.escalation.maxShardsPerRound: must be >= spec.escalation.minShardsPerRound "
            f"({e.min_shards_per_round}), got {e.max_shards_per_round}"
        )
    if spec.shards.first_seed + b.max_shards - 1 > 2**31 - 1:
        errors.append("spec.shards.firstSeed: firstSeed + budget.maxShards must stay below 2^31; lower either")

    # The template is formatted with str.format: unknown or malformed placeholders would crash every shard.
    try:
        names = {fname for _, fname, _, _ in string.Formatter().parse(spec.prompt.template) if fname is not None}
    except ValueError as exc:
        errors.append(f"spec.prompt.template: malformed placeholder ({exc}); write literal braces as {{{{ }}}}")
    else:
        unknown = names - TEMPLATE_PLACEHOLDERS
        if unknown:
            errors.append(
                f"spec.prompt.template: unknown placeholder(s) {', '.join('{' + n + '}' for n in sorted(unknown))}; "
                "use {domain} and {examples}, and write literal braces as {{ }}"
            )
        if "examples" not in names and spec.prompt.examples:
            errors.append("spec.prompt.template: has few-shot examples but no {examples} placeholder; add it")
    if spec.prompt.examples_per_prompt > len(spec.prompt.examples) and spec.prompt.examples:
        errors.append(
            f"spec.prompt.examplesPerPrompt: {spec.prompt.examples_per_prompt} is more than the "
            f"{len(spec.prompt.examples)} examples given; lower it or add examples"
        )
    if len(set(spec.prompt.domains)) != len(spec.prompt.domains):
        errors.append("spec.prompt.domains: has duplicates; list each domain once")

    out = spec.output
    if out.is_s3 and not _S3_RE.match(out.path):
        errors.append(
            f"spec.output.path: {out.path!r} is not a valid s3://bucket/prefix (bucket: 3-63 lowercase letters, "
            "digits, dots or hyphens)"
        )
    if out.s3 is not None and out.s3.credentials_secret and not out.is_s3:
        errors.append("spec.output.s3.credentialsSecret: is set but spec.output.path is not an s3:// URL")

    seen_filters: set[str] = set()
    for i, flt in enumerate(spec.qc.filters):
        where = f"spec.qc.filters[{i}]"
        if flt.name in seen_filters:
            errors.append(f"{where}.name: filter {flt.name!r} is listed twice; merge their params")
        seen_filters.add(flt.name)
        allowed = _QC_PARAMS.get(flt.name, {})
        for key, val in flt.params.items():
            if key not in allowed:
                errors.append(
                    f"{where}.params.{key}: unknown parameter for filter {flt.name!r} "
                    f"(known: {', '.join(sorted(allowed)) or 'none'})"
                )
            elif not isinstance(val, allowed[key]) or (isinstance(val, bool) and allowed[key] is not bool):
                errors.append(f"{where}.params.{key}: has the wrong type ({type(val).__name__})")
        for key in ("patterns",):
            for j, pat in enumerate(flt.params.get(key, []) if isinstance(flt.params.get(key), list) else []):
                try:
                    re.compile(str(pat))
                except re.error as exc:
                    errors.append(f"{where}.params.{key}[{j}]: not a valid regular expression ({exc})")
    if "critic" in seen_filters and spec.best_of_n.critic != "judge":
        errors.append("spec.qc.filters: the 'critic' filter needs spec.bestOfN.critic: judge to produce scores")
    if spec.best_of_n.critic == "judge" and spec.best_of_n.judge_prompt:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(spec.best_of_n.judge_prompt) if f is not None}
        except ValueError as exc:
            errors.append(f"spec.bestOfN.judgePrompt: malformed placeholder ({exc})")
        else:
            if not names <= {"instruction", "response"}:
                errors.append("spec.bestOfN.judgePrompt: only {instruction} and {response} are placeholders")
    return errors


def parse_spec(spec: Any, path: str = "spec") -> GenerationRunSpec:
    """Parse a manifest's spec (defaults applied); raise SpecError naming every bad field."""
    errors: list[str] = []
    if not isinstance(spec, dict):
        raise SpecError([f"{path}: must be an object"])
    parsed = _parse_dataclass(GenerationRunSpec, spec, path, errors)
    if errors:
        raise SpecError(errors)
    errors = semantic_errors(parsed)
    if errors:
        raise SpecError(errors)
    return parsed


def parse_manifest(doc: Any) -> tuple[RunRef, GenerationRunSpec]:
    """Parse a whole GenerationRun document as `kubectl apply` would receive it."""
    if not isinstance(doc, dict):
        raise SpecError(["(document): must be a YAML mapping (a GenerationRun manifest)"])
    errors = []
    if doc.get("apiVersion") != API_VERSION:
        errors.append(f"apiVersion: must be {API_VERSION!r}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != KIND:
        errors.append(f"kind: must be {KIND!r}, got {doc.get('kind')!r}")
    meta = doc.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", name):
        errors.append(
            f"metadata.name: must be 1-42 lowercase letters, digits or '-' (child Jobs add a suffix), got {name!r}"
        )
    if "spec" not in doc:
        errors.append("spec: is required")
    if errors:
        raise SpecError(errors)
    spec = parse_spec(doc["spec"])
    ref = RunRef(
        name=str(name),
        namespace=str(meta.get("namespace") or "default"),
        uid=str(meta.get("uid") or ""),
        generation=int(meta.get("generation") or 1),
    )
    return ref, spec
