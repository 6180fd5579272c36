"""The GenerationRun API as Python types: parse a manifest, apply the CRD's defaults, reject semantic errors.

The CRD (crds/generationrun.yaml) is the source of truth for structure, defaults and value constraints; tests prove
that parsing a manifest here gives the same object as parsing it after the CRD's own defaulting. The CRD's bounds,
lengths and patterns are read from it at import (`BOUNDS`, `_schema_errors`), so Python applies the same numbers
with messages that name the range and the fix. Checks that the schema and CEL cannot express live in
`semantic_errors`. The whole decision for a manifest (schema, CEL, these, child names) is
`genrun.operator.validate.check_manifest`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import ipaddress
import math
import re
import string
import types
import typing
import unicodedata
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import yaml
from genrun.contract import qc_rules

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
JUDGE_PLACEHOLDERS = frozenset({"instruction", "response"})
# The QC rules' names (genrun.contract.qc_rules.NAMES, in its order: a test keeps the two equal).
QcFilterName = Literal[
    "length",
    "finishReason",
    "refusal",
    "echo",
    "repetition",
    "bannedPatterns",
    "request",
    "logprob",
    "critic",
    "relevance",
    "domain",
]


@dataclass(frozen=True)
class EndpointSpec:
    """An OpenAI-compatible server (vLLM, KServe, NIM, llm-d, ...) used instead of an in-process engine."""

    url: str = _f("url")  # base URL with the API prefix, e.g. http://vllm.inference:8000/v1
    model: str = _f("model", "")  # the served model name; empty means spec.model.name
    api_key_secret: str = _f("apiKeySecret", "")  # a Secret with key OPENAI_API_KEY
    max_concurrency: int = _f("maxConcurrency", 16)
    timeout_seconds: int = _f("timeoutSeconds", 300)


API_KEY_ENV = "OPENAI_API_KEY"  # the Secret's key and the worker's environment variable
# vLLM's --load-format values a run may choose (the CRD's enum): the ones that read a real checkpoint without extra
# configuration; dummy (random weights), tensorizer (needs its own URI) and the quantising loaders are left out.
LoadFormat = Literal[
    "auto", "safetensors", "pt", "runai_streamer", "runai_streamer_sharded", "fastsafetensors", "sharded_state"
]


@dataclass(frozen=True)
class ModelSpec:
    name: str = _f("name")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f("dtype", "auto")
    tensor_parallel_size: int = _f("tensorParallelSize", 1)
    max_model_len: int = _f("maxModelLen", 2048)
    gpu_memory_utilization: float = _f("gpuMemoryUtilization", 0.9)
    load_format: LoadFormat = _f("loadFormat", "auto")
    endpoint: EndpointSpec | None = _f("endpoint", None)


@dataclass(frozen=True)
class FewShotExample:
    instruction: str = _f("instruction")
    response: str = _f("response")
    domain: str = _f("domain", "")


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute each prompt is conditioned on (task type, difficulty, audience, persona...): a value per prompt."""

    name: str = _f("name")
    values: tuple[str, ...] = _f("values")


@dataclass(frozen=True)
class CellQuota:
    """The cells matching `match` (attribute name -> value) should hold at least `min_share` of the kept rows."""

    match: dict[str, str] = _f("match")
    min_share: float = _f("minShare")


MAX_CELLS = 256  # attribute cells (the product of the value lists) the planner measures one by one


@dataclass(frozen=True)
class PromptSpec:
    template: str = _f("template", DEFAULT_TEMPLATE)
    domains: tuple[str, ...] = _f("domains", ())
    examples: tuple[FewShotExample, ...] = _f("examples", ())
    examples_per_prompt: int = _f("examplesPerPrompt", 2)
    style: Literal["blocks", "list"] = _f("style", "blocks")
    attributes: tuple[AttributeSpec, ...] = _f("attributes", ())
    quotas: tuple[CellQuota, ...] = _f("quotas", ())


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
class ArmSpec:
    """One sampling setting the policy may give a shard (an arm of the bandit)."""

    temperature: float = _f("temperature")
    top_p: float = _f("topP", 0.9)
    repetition_penalty: float = _f("repetitionPenalty", 1.0)
    min_p: float = _f("minP", 0.0)


@dataclass(frozen=True)
class PolicySpec:
    strategy: Literal["bandit", "ladder"] = _f("strategy", "bandit")
    arms: tuple[ArmSpec, ...] = _f("arms", ())
    exploration: float = _f("exploration", 0.25)
    pilot_share: float = _f("pilotShare", 0.05)
    retire_confidence: float = _f("retireConfidence", 0.9)
    stop_confidence: float = _f("stopConfidence", 0.9)
    max_overshoot: float = _f("maxOvershoot", 0.1)


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
    qc_before_response: bool = _f("qcBeforeResponse", True)


@dataclass(frozen=True)
class SemanticDedupSpec:
    """The semantic tier: sentence embeddings of the normalised instruction, cosine >= threshold drops the later row.
    On by default (the CRD's default): where the model cannot be loaded the Jobs fail with a clear error."""

    enabled: bool = _f("enabled", True)
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
    # Earlier datasets or runs whose instructions this run treats as already seen (genrun.worker.against).
    against: tuple[str, ...] = _f("against", ())


@dataclass(frozen=True)
class QcFilter:
    name: QcFilterName = _f("name")
    params: dict[str, Any] = _f("params", factory=dict)


DEFAULT_QC_FILTERS: tuple[QcFilter, ...] = tuple(QcFilter(name=n) for n in qc_rules.DEFAULT_RULES)  # type: ignore[arg-type]


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
    license: str = _f("license", "unknown")  # the dataset card's licence id; the model's terms are the user's to check
    language: tuple[str, ...] = _f("language", ("en",))

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
    # shared: one run-owned vLLM server (a Deployment) that the shard Jobs call; perShard: vLLM inside each shard Job.
    engine: Literal["shared", "perShard"] = _f("engine", "shared")
    cache_volume_claim: str = _f("cacheVolumeClaim", "")  # vLLM's compiled artefacts, kept between engine starts


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
    policy: PolicySpec = _f("policy", factory=PolicySpec)
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


ECHO_LIMIT = 200  # characters of a bad value echoed back in a message


def short(value: Any) -> str:
    """repr() of a value for a message, cut so that a huge bad value never floods a terminal or a condition."""
    text = (
        repr(value)
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) < 10**30
        else "a huge integer"
    )
    return text if len(text) <= ECHO_LIMIT else text[:ECHO_LIMIT] + f"... ({len(text)} characters)"


def num(value: float) -> str:
    """A number for a message (integers in full; huge integers and floats never raise while formatting)."""
    if isinstance(value, int):
        return short(value)
    return f"{value:g}"


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
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a map",
    }
    return names.get(tp, str(tp))


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
        if not isinstance(value, str) or value not in typing.get_args(tp):
            errors.append(f"{path}: must be {_type_name(tp)}, got {short(value)}")
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
        bad_keys = [k for k in value if not isinstance(k, str)]
        if bad_keys:
            errors.append(f'{path}: key {short(bad_keys[0])} is not a string; quote it ("{bad_keys[0]}")')
            return {}
        (_, val_tp) = typing.get_args(tp)
        if val_tp is Any:
            return dict(value)
        return {k: _parse(val_tp, v, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: must be true or false, got {short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: must be an integer, got {short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path}: must be a number, got {short(value)}")
            return value
        if isinstance(value, int) and abs(value) > 10**300:
            errors.append(f"{path}: must be a finite number, got {short(value)}")
            return 0.0
        if not math.isfinite(value):
            errors.append(f"{path}: must be a finite number, got {value!r}; NaN and infinities are not allowed")
            return 0.0
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            hint = (
                "; quote it"
                if isinstance(value, bool)
                else f'; quote it ("{value}")'
                if isinstance(value, int | float)
                else ""
            )
            errors.append(f"{path}: must be a string, got {short(value)}{hint}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported type {tp!r} at {path}")  # a programming error, not a user one


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_dataclass(cls: type[T], data: dict[str, Any], path: str, errors: list[str]) -> T:
    hints = _hints(cls)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    known = set()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f.metadata["json"]
        known.add(key)
        if key in data and data[key] is not None:
            kwargs[f.name] = _parse(hints[f.name], data[key], f"{path}.{key}", errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{path}.{key}: is required")
    for key in sorted((k for k in data if k not in known), key=str):
        if isinstance(key, str):
            shown = key if len(key) <= ECHO_LIMIT else key[:ECHO_LIMIT] + "..."
            errors.append(f"{path}.{shown}: unknown field (known: {', '.join(sorted(known))})")
        else:
            errors.append(f"{path}: key {short(key)} is not a string and not a field; quote it or remove it")
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
# The CRD's own bounds: read from the CRD at import, so that its numbers, lengths and patterns live in one place.
# Python applies them again (with messages that name the range and the fix) because the operator, the worker and
# `genrun run` parse specs without a JSON-schema validator.


@functools.cache
def load_crd() -> dict[str, Any]:
    text = importlib.resources.files("genrun.crds").joinpath("generationrun.yaml").read_text()
    crd: dict[str, Any] = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return crd


def crd_schema() -> dict[str, Any]:
    schema: dict[str, Any] = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


SPEC_SCHEMA: dict[str, Any] = crd_schema()["properties"]["spec"]

# What each CRD pattern means, for messages; a test checks that every pattern in the CRD has an entry here.
PATTERN_HELP: dict[str, str] = {
    r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|[^:]+)$": "must be a folder (no ':') or s3://bucket/prefix",
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$": (
        "must be a Kubernetes object name (DNS-1123: lowercase letters, digits, '-' and '.', starting and ending "
        "with a letter or digit)"
    ),
    r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$": (
        "must be a label value (letters, digits, '-', '_' and '.', starting and ending with a letter or digit)"
    ),
    r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$": (
        "must be a Kubernetes quantity such as 500m, 4, 16Gi or 1e9"
    ),
    r"^[a-z0-9-]*$": "must be an S3 region name (lowercase letters, digits and '-', e.g. us-east-1)",
    r"^((([a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)(\.([a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?))*(:[0-9]+)?/)?"
    r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?)?$": (
        "must be an image reference such as registry.example.com/team/genrun-worker:1.2 (lowercase repository, "
        "optional :tag and @sha256:digest)"
    ),
    r"^(https?://[^\s/?#@]+(/[^\s?#]*)?)?$": "must be an http:// or https:// URL without credentials, query or fragment",
    r"^[a-z][a-zA-Z0-9_]*$": "must be a placeholder name (a lowercase letter, then letters, digits or '_')",
    r"^[a-z0-9][a-z0-9.+-]*$": "must be a Hugging Face Hub licence id such as apache-2.0, cc-by-4.0 or other",
    r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$": "must be a language code such as en, de or pt-BR",
}


@dataclass(frozen=True)
class Bound:
    path: str  # camelCase, below spec
    lo: float | None
    hi: float | None
    lo_ex: bool
    hi_ex: bool

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_ex else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_ex else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_ex else '>='} {num(self.lo)}"
        return f"{'<' if self.hi_ex else '<='} {num(self.hi) if self.hi is not None else ''}"

    def violated(self, value: float) -> bool:
        low = self.lo is not None and (value <= self.lo if self.lo_ex else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.hi_ex else value > self.hi)
        return low or high


def _bound(path: str, node: dict[str, Any]) -> Bound:
    # OpenAPI v3.0 (draft-4 style): exclusiveMinimum/exclusiveMaximum are booleans beside minimum/maximum.
    return Bound(
        path,
        node.get("minimum"),
        node.get("maximum"),
        bool(node.get("exclusiveMinimum")),
        bool(node.get("exclusiveMaximum")),
    )


def _leaves(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for key, sub in schema.get("properties", {}).items():
        yield from _leaves(sub, f"{path}.{key}" if path else key)
    if isinstance(schema.get("items"), dict):
        yield from _leaves(schema["items"], path + "[]")


BOUNDS: tuple[Bound, ...] = tuple(
    _bound(p, n)
    for p, n in _leaves(SPEC_SCHEMA, "")
    if n.get("type") in ("integer", "number") and ("minimum" in n or "maximum" in n)
)


def _schema_errors(value: Any, schema: dict[str, Any], path: str, errors: list[str]) -> None:
    """The CRD's value constraints (bounds, lengths, patterns, sizes) on a parsed, type-correct spec."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int | float):
        b = _bound(path, schema)
        if (b.lo is not None or b.hi is not None) and b.violated(value):
            errors.append(f"{path}: must be in {b.describe()}, got {num(value)}")
    elif isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: must be at most {schema['maxLength']} characters, got {len(value)}; shorten it")
        elif "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: must not be empty" if schema["minLength"] == 1 else f"{path}: too short")
        elif "pattern" in schema and not re.fullmatch(schema["pattern"], value):
            help_ = PATTERN_HELP.get(schema["pattern"], f"must match {schema['pattern']}")
            errors.append(f"{path}: {help_}, got {short(value)}")
    elif isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: at most {schema['maxItems']} items, got {len(value)}")
        items = schema.get("items")
        if isinstance(items, dict):
            for i, v in enumerate(value):
                _schema_errors(v, items, f"{path}[{i}]", errors)
    elif isinstance(value, dict):
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errors.append(f"{path}: at most {schema['maxProperties']} entries, got {len(value)}")
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else None)
            if sub is not None:
                _schema_errors(v, sub, f"{path}.{k}", errors)


# ----------------------------------------------------------------------------------------------------------
# Semantic checks: what the CRD schema and CEL cannot express, or express without naming the fix.

_S3_RE = re.compile(r"s3://([^/]*)(/.*)?", re.DOTALL)
# S3's bucket naming rules (general purpose buckets): these would make every write fail.
_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
# Folders no run may write into (or mount over, in a Job): the system's own, and the Job's /tmp and /models mounts.
SYSTEM_FOLDERS = (
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin", "/sys", "/usr",
    "/var/run", "/var/lib/kubelet",
)  # fmt: skip
JOB_MOUNTS = ("/tmp", "/models", "/home/genrun")  # manifests.py mounts these; a test keeps the lists in step


# Cyrillic and Greek letters that render like Latin ones: a domain written with a Cyrillic "es" and one written
# with a Latin "c" are one domain to a reader (escaped here so that the source shows what they are).
_CONFUSABLES = str.maketrans(
    "\u0430\u0432\u0435\u0451\u043a\u043c\u043d\u043e\u0440\u0441\u0442\u0443\u0445\u0456\u0457\u0458\u0455"
    "\u0501\u051b\u051d\u0261\u0131\u03b1\u03b2\u03b5\u03b7\u03b9\u03ba\u03bd\u03bf\u03c1\u03c4\u03c5\u03c7\u03c9",
    "abeekmhopctyxiijsdqwgiabenikvoptuxw",
)


def domain_key(domain: str) -> str:
    """What makes two domains the same to a reader: NFKC, no invisible characters, one space, case, lookalikes."""
    text = unicodedata.normalize("NFKC", domain)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cf", "Cc", "Zl", "Zp"))
    return " ".join(text.split()).casefold().translate(_CONFUSABLES)


def template_errors(template: str, allowed: frozenset[str], where: str) -> list[str]:
    """Only bare placeholders: str.format would run format specs ({domain:>2000000000}), conversions and indexing."""
    fix = f"use only {' and '.join('{' + a + '}' for a in sorted(allowed))}, and write literal braces as {{{{ }}}}"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return [f"{where}: malformed placeholder ({exc}); {fix}"]
    errors: list[str] = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        shown = shown if len(shown) <= ECHO_LIMIT else shown[:ECHO_LIMIT] + "...}"
        if name not in allowed:
            errors.append(f"{where}: unknown placeholder(s) {shown}; {fix}")
        elif spec or conversion:
            errors.append(f"{where}: placeholder {shown} has a format spec or conversion; {fix}")
    return errors


def _bucket_problem(bucket: str) -> str | None:
    if not 3 <= len(bucket) <= 63:
        return "must be 3-63 characters"
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*[a-z0-9]", bucket):
        return "may hold only lowercase letters, digits, '.' and '-', and must start and end with a letter or digit"
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "must not hold '..', '.-' or '-.'"
    try:
        ipaddress.ip_address(bucket)
        return "must not be an IP address"
    except ValueError:
        pass
    if bucket.startswith(_BUCKET_PREFIXES) or bucket.endswith(_BUCKET_SUFFIXES):
        return f"must not start with {', '.join(_BUCKET_PREFIXES)} nor end with {', '.join(_BUCKET_SUFFIXES)}"
    return None


def output_errors(out: OutputSpec, worker: WorkerSpec) -> list[str]:
    errors: list[str] = []
    path = out.path
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in path):
        return []  # hidden_char_errors says which character
    if out.is_s3:
        m = _S3_RE.fullmatch(path)
        bucket, key = (m.group(1), m.group(2) or "") if m else ("", "")
        problem = _bucket_problem(bucket)
        if problem:
            errors.append(
                f"spec.output.path: {short(path)} is not a valid s3://bucket/prefix: the bucket {problem} "
                "(S3 bucket naming rules)"
            )
        segments = key.strip("/").split("/")
        if any(s in (".", "..") for s in segments) or "//" in key:
            errors.append(
                f"spec.output.path: the S3 prefix of {short(path)} holds a '.', '..' or empty segment; "
                "write the prefix without them"
            )
    else:
        segments = path.split("/")
        if ".." in segments:
            errors.append(f"spec.output.path: {short(path)} holds a '..' segment; write the folder without it")
        norm = "/" + "/".join(s for s in segments if s not in ("", ".")) if path.startswith("/") else None
        if norm == "/":
            errors.append("spec.output.path: '/' is the root folder; name a folder for the run's output")
        elif norm and any(norm == f or norm.startswith(f + "/") for f in SYSTEM_FOLDERS):
            errors.append(f"spec.output.path: {short(path)} is a system folder; name a folder of your own")
        elif norm in JOB_MOUNTS:
            errors.append(f"spec.output.path: {norm} is where the Jobs mount their own volume; use a subfolder")
        if worker.output_volume_claim and not path.startswith("/"):
            errors.append(
                f"spec.output.path: {short(path)} must be absolute when spec.worker.outputVolumeClaim mounts it "
                "in the Jobs (relative paths are relative to the folder `genrun run` starts in)"
            )
    if out.s3 is not None:
        secret = out.s3.credentials_secret
        if secret and not (len(secret) <= 253 and _DNS_SUBDOMAIN.fullmatch(secret)):
            # The operator reads this Secret by name: anything but an object name could address another one.
            errors.append(
                f"spec.output.s3.credentialsSecret: {short(secret)} is not a Secret name; name a Secret in the run's "
                "own namespace (lowercase letters, digits, '-' and '.', at most 253 characters; no '/' or '..')"
            )
        if out.s3.credentials_secret and not out.is_s3:
            errors.append("spec.output.s3.credentialsSecret: is set but spec.output.path is not an s3:// URL")
        if out.s3.endpoint:
            errors += _endpoint_errors(out.s3.endpoint)
    return errors


def _endpoint_errors(endpoint: str) -> list[str]:
    where = "spec.output.s3.endpoint"
    try:
        url = urllib.parse.urlsplit(endpoint)
        port_ok = url.port is None or url.port > 0
    except ValueError:
        url, port_ok = None, False
    if url is None or url.scheme not in ("http", "https") or not url.hostname or not port_ok:
        return [
            f"{where}: must be an http:// or https:// URL such as https://minio.example:9000, got {short(endpoint)}"
        ]
    if url.username or url.password or url.query or url.fragment or any(ch.isspace() for ch in endpoint):
        return [
            f"{where}: must not hold credentials, a query, a fragment or spaces, got {short(endpoint)}; "
            "credentials belong in spec.output.s3.credentialsSecret"
        ]
    return []


AGAINST_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json")


def against_errors(spec: GenerationRunSpec) -> list[str]:
    """spec.dedup.against: absolute folders or files, or s3:// URIs, each once, never the run's own output."""
    errors: list[str] = []
    seen: dict[str, int] = {}
    own = spec.output.path.rstrip("/")
    for i, uri in enumerate(spec.dedup.against):
        at, u = f"spec.dedup.against[{i}]", uri.strip()
        fix = (
            "name an earlier run's output folder (its merge/ seen-index), a dataset folder, or a .parquet/.jsonl/.json "
            "file, as an absolute path or s3://bucket/prefix"
        )
        m = _S3_RE.fullmatch(u)
        if u.startswith("s3://") and m:
            problem = _bucket_problem(m.group(1))
            if problem:
                errors.append(f"{at}: bucket {short(m.group(1))} {problem}; {fix}")
                continue
        elif "://" in u:
            errors.append(f"{at}: {short(u)} is not a folder, file or s3:// URI (only s3:// is supported); {fix}")
            continue
        elif not u.startswith("/"):
            errors.append(f"{at}: {short(u)} is a relative path; {fix}")
            continue
        if any(part == ".." for part in u.split("/")):
            errors.append(f"{at}: must not hold a '..' segment; {fix}")
            continue
        key = u.rstrip("/")
        if key == own:
            errors.append(f"{at}: is this run's own output.path (every row would be a duplicate of itself); {fix}")
        elif key in seen:
            errors.append(f"{at}: {short(u)} is listed twice (also against[{seen[key]}]); list each source once")
        else:
            seen[key] = i
    if spec.dedup.against and spec.dedup.partitions > 1:
        # The seed enters as the merge's round 0, after the partitioned maps of round 1 have run without it.
        errors.append(
            "spec.dedup.against: not supported with spec.dedup.partitions > 1 yet; "
            "set partitions: 1 or dedup the earlier data with `genrun dedup --against`"
        )
    return errors


def _qc_errors(spec: GenerationRunSpec) -> list[str]:
    errors: list[str] = []
    seen_filters: set[str] = set()
    for i, flt in enumerate(spec.qc.filters):
        where = f"spec.qc.filters[{i}]"
        if flt.name in seen_filters:
            errors.append(f"{where}.name: filter {flt.name!r} is listed twice; merge their params")
        seen_filters.add(flt.name)
        rule = qc_rules.BY_NAME.get(flt.name)
        allowed = {p.key: p for p in rule.params} if rule else {}
        for key, val in flt.params.items():
            at = f"{where}.params.{key}"
            if key not in allowed:
                errors.append(
                    f"{where}.params.{short(key)[1:-1]}: unknown parameter for filter {flt.name!r} "
                    f"(known: {', '.join(sorted(allowed)) or 'none'})"
                )
                continue
            tp, lo, hi = allowed[key].type, allowed[key].low, allowed[key].high
            if tp is float and isinstance(val, int | float) and not isinstance(val, bool):
                if not math.isfinite(val):
                    errors.append(f"{at}: must be a finite number, got {short(val)}")
                    continue
            elif not isinstance(val, tp) or (isinstance(val, bool) and tp is not bool):
                errors.append(f"{at}: must be {_type_name(tp)}, got {short(val)}")
                continue
            if lo is not None and hi is not None and not lo <= val <= hi:
                errors.append(f"{at}: must be in [{num(lo)}, {num(hi)}], got {num(val)}")
        for lo_key, hi_key in rule.pairs if rule else ():
            lo_v, hi_v = flt.params.get(lo_key), flt.params.get(hi_key)
            if isinstance(lo_v, int) and isinstance(hi_v, int) and lo_v > hi_v:
                errors.append(
                    f"{where}.params.{lo_key}: {lo_v} is above {hi_key} ({hi_v}); every example would be rejected, "
                    "lower it or raise the maximum"
                )
        pats = flt.params.get("patterns")
        if isinstance(pats, list):
            if len(pats) > qc_rules.MAX_PATTERNS:
                errors.append(f"{where}.params.patterns: at most {qc_rules.MAX_PATTERNS} patterns, got {len(pats)}")
            for j, pat in enumerate(pats[: qc_rules.MAX_PATTERNS]):
                at = f"{where}.params.patterns[{j}]"
                if not isinstance(pat, str):
                    errors.append(f"{at}: must be a string (a regular expression), got {short(pat)}")
                elif len(pat) > qc_rules.MAX_PATTERN_CHARS:
                    errors.append(f"{at}: must be at most {qc_rules.MAX_PATTERN_CHARS} characters, got {len(pat)}")
                else:
                    try:
                        re.compile(pat)
                    except (re.error, OverflowError, RecursionError) as exc:
                        errors.append(f"{at}: not a valid regular expression ({short(str(exc))[1:-1]})")
        words = flt.params.get("requestWords")
        if isinstance(words, list):
            if not words or len(words) > qc_rules.MAX_REQUEST_WORDS:
                errors.append(
                    f"{where}.params.requestWords: must list 1 to {qc_rules.MAX_REQUEST_WORDS} words, got {len(words)}"
                )
            for j, word in enumerate(words[: qc_rules.MAX_REQUEST_WORDS]):
                # the rule compares each clause's first word (a run of letters) with these: anything else never matches
                if not isinstance(word, str) or not re.fullmatch(r"[^\W\d_]+", word):
                    errors.append(
                        f"{where}.params.requestWords[{j}]: must be one word of letters (e.g. explain), got {short(word)}"
                    )
    if "domain" in seen_filters and not spec.prompt.domains:
        errors.append("spec.qc.filters: the 'domain' filter needs spec.prompt.domains to compare each row with")
    if "critic" in seen_filters and spec.best_of_n.critic != "judge":
        errors.append("spec.qc.filters: the 'critic' filter needs spec.bestOfN.critic: judge to produce scores")
    return errors


def _worker_errors(w: WorkerSpec) -> list[str]:
    errors: list[str] = []
    for attr, field_name in (("cpu", "cpu"), ("memory", "memory")):
        value = getattr(w, attr)
        if re.fullmatch(r"[0-9.]+([eE][+-]?[0-9]+)?[A-Za-z]*", value) and not re.search(
            r"[1-9]", value.split("e")[0].split("E")[0]
        ):
            errors.append(f"spec.worker.{field_name}: must be above zero, got {short(value)}")
    for key in w.node_selector:
        problem = label_key_problem(key)
        if problem:
            errors.append(f"spec.worker.nodeSelector: key {short(key)} {problem}")
    for i, tol in enumerate(w.tolerations):
        errors += _toleration_errors(tol, f"spec.worker.tolerations[{i}]")
    return errors


_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def label_key_problem(key: str) -> str | None:
    """Why a string is not a Kubernetes label key (optional DNS prefix '/', then a name of at most 63), or None."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return "has a bad prefix: before '/' must be a DNS subdomain such as example.com"
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return (
            "is not a label key: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or "
            "digit, optionally after a prefix like example.com/"
        )
    return None


_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def _toleration_errors(tol: dict[str, Any], where: str) -> list[str]:
    errors = [
        f"{where}.{short(k)[1:-1] if isinstance(k, str) else short(k)}: unknown field (known: {', '.join(sorted(_TOLERATION_KEYS))})"
        for k in tol
        if k not in _TOLERATION_KEYS
    ]
    key, op, value, effect = (
        tol.get("key", ""),
        tol.get("operator", "Equal"),
        tol.get("value", ""),
        tol.get("effect", ""),
    )
    if not isinstance(key, str) or (key and label_key_problem(key)):
        errors.append(f"{where}.key: must be a label key such as nvidia.com/gpu, got {short(key)}")
    if op not in ("Equal", "Exists"):
        errors.append(f"{where}.operator: must be Equal or Exists, got {short(op)}")
    if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        errors.append(f"{where}.value: must be a label value (at most 63 characters), got {short(value)}")
    elif op == "Exists" and value:
        errors.append(f"{where}.value: must be empty when operator is Exists")
    if op == "Equal" and not key and isinstance(key, str):
        errors.append(f"{where}.key: is required unless operator is Exists")
    if effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
        errors.append(f"{where}.effect: must be NoSchedule, PreferNoSchedule or NoExecute, got {short(effect)}")
    secs = tol.get("tolerationSeconds")
    if secs is not None and (isinstance(secs, bool) or not isinstance(secs, int) or abs(secs) > 2**63 - 1):
        errors.append(f"{where}.tolerationSeconds: must be an integer, got {short(secs)}")
    elif secs is not None and effect != "NoExecute":
        errors.append(f"{where}.tolerationSeconds: applies only with effect NoExecute")
    return errors


def _attribute_errors(p: PromptSpec) -> list[str]:
    errors: list[str] = []
    seen: set[str] = set()
    cells = 1
    for i, a in enumerate(p.attributes):
        where = f"spec.prompt.attributes[{i}]"
        if a.name in TEMPLATE_PLACEHOLDERS:
            errors.append(f"{where}.name: {a.name!r} is a built-in placeholder; choose another name")
        if a.name in seen:
            errors.append(f"{where}.name: {a.name!r} is listed twice; list each attribute once")
        seen.add(a.name)
        if not a.values:
            errors.append(f"{where}.values: is empty; list at least one value")
        elif len(set(a.values)) != len(a.values):
            errors.append(f"{where}.values: has duplicates; list each value once")
        cells *= max(1, len(a.values))
    if cells > MAX_CELLS:
        errors.append(
            f"spec.prompt.attributes: {cells} cells (the product of the value lists) is more than {MAX_CELLS}; "
            "use fewer attributes or values"
        )
    values = {a.name: set(a.values) for a in p.attributes}
    for i, q in enumerate(p.quotas):
        for k, v in q.match.items():
            if k not in values:
                errors.append(
                    f"spec.prompt.quotas[{i}].match.{k}: no such attribute (known: {', '.join(sorted(values))})"
                )
            elif v not in values[k]:
                errors.append(f"spec.prompt.quotas[{i}].match.{k}: {v!r} is not one of that attribute's values")
    if sum(q.min_share for q in p.quotas) > 1:
        errors.append("spec.prompt.quotas: the minShare values add up to more than 1; lower them")
    return errors


def _relation_errors(spec: GenerationRunSpec) -> list[str]:
    errors: list[str] = []
    s, e, b = spec.sampling, spec.escalation, spec.budget
    if len(set(spec.policy.arms)) != len(spec.policy.arms):
        errors.append("spec.policy.arms: has duplicates; list each sampling setting once")
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
            f"spec.budget.maxShards: must be >= spec.shards.initial ({spec.shards.initial}), got {num(b.max_shards)}"
        )
    if e.max_shards_per_round < e.min_shards_per_round:
        errors.append(
            f"spec.escalation.maxShardsPerRound: must be >= spec.escalation.minShardsPerRound "
            f"({num(e.min_shards_per_round)}), got {num(e.max_shards_per_round)}"
        )
    if spec.shards.first_seed + b.max_shards - 1 > 2**31 - 1:
        errors.append("spec.shards.firstSeed: firstSeed + budget.maxShards must stay below 2^31; lower either")
    tp, gpus = spec.model.tensor_parallel_size, spec.worker.gpus
    if tp > max(gpus, 1):
        errors.append(
            f"spec.model.tensorParallelSize: {tp} is more than spec.worker.gpus ({gpus}); vLLM runs one rank per "
            "GPU: raise worker.gpus or lower tensorParallelSize"
        )
    target = spec.target.unique_examples
    if target > b.max_generated_examples:
        errors.append(
            f"spec.target.uniqueExamples: {num(target)} can never be reached: spec.budget.maxGeneratedExamples is "
            f"{num(b.max_generated_examples)}; raise the budget or lower the target"
        )
    elif target > b.max_shards * spec.shards.examples_per_shard:
        errors.append(
            f"spec.target.uniqueExamples: {num(target)} can never be reached: spec.budget.maxShards x "
            f"spec.shards.examplesPerShard is {num(b.max_shards * spec.shards.examples_per_shard)}; raise either "
            "or lower the target"
        )
    return errors


# Prose the model reads, and regular expressions: a soft hyphen or an emoji's zero-width joiner can be meant there.
PROSE_FIELDS = ("spec.prompt.template", "spec.prompt.examples[].instruction", "spec.prompt.examples[].response",
                "spec.bestOfN.judgePrompt", "spec.qc.filters[].params")  # fmt: skip


def hidden_char_errors(value: Any, path: str = "spec") -> list[str]:
    """Control and format characters (Unicode Cc and Cf: bidi overrides, zero-width spaces, ...) in every text that
    names something (domains, model, paths, attribute values, selectors, ...): such a name shows one thing and is
    another. The one place this is checked; prose fields are left to their own rules."""
    generic = re.sub(r"\[\d+\]", "[]", path)
    if generic in PROSE_FIELDS:
        return []
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out += hidden_char_errors(k, path) if isinstance(k, str) else []
            out += hidden_char_errors(v, f"{path}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [e for i, v in enumerate(value) for e in hidden_char_errors(v, f"{path}[{i}]")]
    if not isinstance(value, str):
        return []
    for ch in value:
        category = unicodedata.category(ch)
        if category == "Cc":
            return [f"{path}: must not contain control characters, got {short(value)}"]
        if category == "Cf":
            return [
                f"{path}: contains U+{ord(ch):04X} (a format character, which hides or reorders text): remove it, "
                f"got {short(value)}"
            ]
    return []


def _list_style_errors(spec: GenerationRunSpec) -> list[str]:
    """The list style writes one instruction a line, after a "[domain]" tag: it needs instructions first (a list item
    has no response to sample with it) and one-line examples and domains."""
    p = spec.prompt
    if p.style != "list":
        return []
    errors = []
    if spec.generation.mode == "joint":
        errors.append(
            "spec.prompt.style: list writes instructions only (a list item has no response); set "
            "spec.generation.mode: instructionsFirst or spec.prompt.style: blocks"
        )
    for i, e in enumerate(p.examples):
        if "\n" in e.instruction.strip():
            errors.append(f"spec.prompt.examples[{i}].instruction: spans lines, but the list style shows each "
                          "instruction as one line; write it on one line")  # fmt: skip
    for i, d in enumerate(p.domains):
        if "\n" in d or "]" in d:
            errors.append(f"spec.prompt.domains[{i}]: {short(d)} has a line break or ']', which would end the list "
                          "style's [domain] tag early; remove it")  # fmt: skip
    return errors


def semantic_errors(spec: GenerationRunSpec) -> list[str]:
    """Every problem the CRD cannot state well, as `spec.<field>: <problem and fix>`."""
    errors: list[str] = []
    generic: list[str] = []
    _schema_errors(to_manifest(spec), SPEC_SCHEMA, "spec", generic)
    if not generic:  # relations between fields mean something only once each field is in its own range
        errors += _relation_errors(spec)

    # The template is formatted with str.format: anything but bare placeholders would crash every shard.
    names = frozenset(a.name for a in spec.prompt.attributes)
    errors += template_errors(spec.prompt.template, TEMPLATE_PLACEHOLDERS | names, "spec.prompt.template")
    errors += _attribute_errors(spec.prompt)
    if "{examples}" not in spec.prompt.template and spec.prompt.examples:
        errors.append("spec.prompt.template: has few-shot examples but no {examples} placeholder; add it")
    if spec.prompt.examples_per_prompt > len(spec.prompt.examples) and spec.prompt.examples:
        errors.append(
            f"spec.prompt.examplesPerPrompt: {spec.prompt.examples_per_prompt} is more than the "
            f"{len(spec.prompt.examples)} examples given; lower it or add examples"
        )
    errors += _list_style_errors(spec)
    seen: dict[str, int] = {}
    for i, d in enumerate(spec.prompt.domains):
        k = domain_key(d)
        if not k:
            errors.append(f"spec.prompt.domains[{i}]: is blank (only spaces or invisible characters); remove it")
        elif k in seen:
            errors.append(
                f"spec.prompt.domains[{i}]: {short(d)} is a duplicate of domains[{seen[k]}] once Unicode, case, "
                "spaces, invisible characters and lookalike letters are folded; list each domain once"
            )
        else:
            seen[k] = i

    errors += output_errors(spec.output, spec.worker)
    errors += _qc_errors(spec)
    errors += against_errors(spec)
    errors += _worker_errors(spec.worker)
    if spec.best_of_n.judge_prompt:
        errors += template_errors(spec.best_of_n.judge_prompt, JUDGE_PLACEHOLDERS, "spec.bestOfN.judgePrompt")
    # The CRD's own constraints last: where a specific check above already named a field, its message (which says
    # why and how to fix it) is the one kept.
    # A field with a hidden character gets that error alone; a field a specific check above already named keeps its
    # message (which says why and how to fix it) over the CRD's own constraints, which come last.
    hidden = hidden_char_errors(to_manifest(spec))
    flagged = {error_field(x) for x in hidden}
    errors = hidden + [x for x in errors if error_field(x) not in flagged]
    named = {error_field(x) for x in errors}
    return errors + [x for x in generic if error_field(x) not in named]


def error_field(error: str) -> str:
    """The field an error message names (its text before the first ': ')."""
    return error.split(": ")[0].split(" ")[0]


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
        errors.append(f"apiVersion: must be {API_VERSION!r}, got {short(doc.get('apiVersion'))}")
    if doc.get("kind") != KIND:
        errors.append(f"kind: must be {KIND!r}, got {short(doc.get('kind'))}")
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        errors.append(f"metadata: must be a map with a name, got {type(meta).__name__}")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        errors.append(
            "metadata.name: must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit "
            f"(it names and labels every child Job), got {short(name)}"
        )
    namespace = meta.get("namespace") if isinstance(meta, dict) else None
    if namespace is not None and not isinstance(namespace, str):
        errors.append(f"metadata.namespace: must be a string, got {short(namespace)}")
    generation = meta.get("generation") if isinstance(meta, dict) else None
    if generation is not None and (isinstance(generation, bool) or not isinstance(generation, int)):
        errors.append(f"metadata.generation: must be an integer, got {short(generation)}")
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
