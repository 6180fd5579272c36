"""The records the operator and the worker exchange: job specs, round plans, shard markers, round reports and their
storage keys, with one JSON codec (`to_json`/`plain` and the `*_from` readers).

Both sides import these definitions from here. This module must stay import-light (standard library only): the
operator image has no pyarrow, vllm or torch. The Parquet schema is built lazily by `example_schema()`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

CONTRACT_VERSION = 1

# The dedup tiers, in the order every presenter lists their counts (report, status, metrics, card, HTML page): the
# merge's tiers in the order they run (the names of genrun.worker.tiers.TIERS; a test checks), then the generators'
# online skip. A new tier of the merge adds its name here, before "online", besides its class in worker/tiers.py.
DUPLICATE_TIERS: tuple[str, ...] = ("exact", "near", "semantic", "online")
ONLINE_TIER = "online"  # rows the generators skipped as seen: counted from the shard markers, not a tier of the merge
MERGE_TIERS: tuple[str, ...] = tuple(t for t in DUPLICATE_TIERS if t != ONLINE_TIER)

# Field metadata of a per-tier mapping (tier -> count): its JSON form is one key per tier of DUPLICATE_TIERS, the tier's
# name plus this suffix, in that order at the field's place (`exact_duplicates`, ...; what reports have always held).
PER_TIER = "per_tier"


def tier_counts(counts: Mapping[str, int], what: str) -> dict[str, int]:
    """`counts` with every tier of DUPLICATE_TIERS, in that order (0 where absent); ValueError naming `what` for a
    tier the contract does not know."""
    unknown = sorted(set(counts) - set(DUPLICATE_TIERS))
    if unknown:
        raise ValueError(f"{what}: unknown dedup tier(s) {unknown}; add them to contract.records.DUPLICATE_TIERS")
    return {t: int(counts.get(t, 0)) for t in DUPLICATE_TIERS}


def json_fields(obj: Any) -> Iterator[tuple[str, Any]]:
    """(name, value) of a record's JSON form: its fields in order, a per-tier mapping spread into one key per tier."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if PER_TIER in f.metadata:
            yield from ((t + f.metadata[PER_TIER], v.get(t, 0)) for t in DUPLICATE_TIERS)
        else:
            yield f.name, v


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    repetition_penalty: float
    min_p: float
    max_tokens: int

    def describe(self) -> str:
        return f"T={self.temperature:g} top_p={self.top_p:g} rep={self.repetition_penalty:g}"


@dataclass(frozen=True)
class ShardPlan:
    """One seed shard: everything a generator needs besides the run spec."""

    round: int
    seed: int
    ordinal: int  # position of this shard over the whole run (0-based); drives domain rotation
    examples: int
    sampling: Sampling
    domains: tuple[str, ...] = ()
    arm: str = ""  # the policy's arm this shard measures (its sampling); "" in plans made before arms existed
    cell: tuple[tuple[str, str], ...] = ()  # (attribute, value) for every prompt of the shard; () draws them per prompt


@dataclass(frozen=True)
class RoundPlan:
    round: int
    shards: tuple[ShardPlan, ...]
    sampling: Sampling
    reason: str = ""  # why this size and sampling, for people

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(s.seed for s in self.shards)


@dataclass(frozen=True)
class DomainYield:
    domain: str
    generated: int
    new_unique: int
    new_qc_passed: int


@dataclass(frozen=True)
class TemperatureYield:
    temperature: float
    generated: int
    new_unique: int
    new_qc_passed: int


@dataclass(frozen=True)
class ShardYield:
    """One shard's figures in its round, each new row judged against what existed BEFORE the round (not against
    the round's other shards), so that keep-first order inside a round favours no seed: the bandit's reward."""

    seed: int
    rows: int  # rows the shard wrote, plus the instructions its QC rejected before their responses (its examples)
    tokens: int
    new_unique: int  # rows unique against earlier rounds (exact and near), plus those QC-rejected instructions
    new_qc_passed: int  # of those, rows that passed QC
    # What the run's counts hold of this shard (None in a report written before these existed): the instructions it
    # sampled, online-skipped ones included, and its rows kept in the dataset by keep-first across the whole round.
    # Summed over shards they are the round's `generated` and `new_qc_passed`, where `new_qc_passed` above counts a
    # row new against earlier rounds even when another shard of the round had it first.
    generated: int | None = None
    kept: int | None = None


@dataclass(frozen=True)
class SemanticCluster:
    """A cluster the semantic tier formed: its first (kept) instruction and the later ones it dropped, with their
    cosine similarity to it; `size` counts every member, including those beyond the listed sample."""

    first: str
    members: tuple[tuple[str, float], ...]
    size: int


@dataclass(frozen=True)
class RoundReport:
    """What a round's merge writes and the planner reads. Totals are cumulative over rounds 1..round."""

    round: int
    shards: int  # shards merged this round
    generated: int  # instructions sampled this round, online-skipped duplicates included
    new_unique: int  # new unique keys this round (after exact and near dedup against everything before)
    new_qc_passed: int
    generated_total: int
    unique_total: int
    qc_passed_total: int
    tokens: int = 0  # tokens generated this round
    tokens_total: int = 0
    skipped_online: int = 0  # of `generated`, how many the generators skipped (seen in earlier rounds or in the shard)
    # Rows dropped as duplicates per tier of DUPLICATE_TIERS (all rounds), each by the first tier that matched it; the
    # online tier: rows the generators skipped as seen (earlier rounds or in the shard). JSON: `exact_duplicates`, ...
    duplicates: dict[str, int] = field(default_factory=dict, metadata={PER_TIER: "_duplicates"})
    # Of `generated`, `discarded` this round (discarded_total: all rounds) were neither a row nor a skip: sampled past
    # the shard's quota in its last batch, or malformed.
    discarded: int = 0
    discarded_total: int = 0
    # Which tiers decide "unique" for this run (new_unique, unique_total and the target count what survives them all).
    dedup_tiers: tuple[str, ...] = ("exact", "near")
    semantic_clusters: tuple[SemanticCluster, ...] = ()  # the largest semantic clusters so far
    # Rows (all rounds) whose instruction is nearest another spec domain than the one asked (the quality column
    # generated_domain); per_domain then counts the generated domain. 0 without the embedding model.
    left_domain: int = 0
    # Novel instructions (all rounds) the generators' QC rejected before paying for their responses
    # (generation.qcBeforeResponse): counted in the unique totals and, by reason, in qc_rejected.
    qc_rejected_before_response: int = 0
    qc_rejected: dict[str, int] = field(default_factory=dict)
    top_duplicates: tuple[tuple[str, int], ...] = ()
    per_domain: tuple[DomainYield, ...] = ()
    per_temperature: tuple[TemperatureYield, ...] = ()
    quarantined: tuple[str, ...] = ()  # shard data or marker keys that could not be read (all rounds)
    quarantined_count: int = 0  # len(quarantined), for readers that only count
    per_shard: tuple[ShardYield, ...] = ()
    dataset: str = ""  # where the dataset of this round lives
    report: str = ""
    contract: int = CONTRACT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "duplicates", tier_counts(self.duplicates, "RoundReport.duplicates"))

    @property
    def marginal_yield(self) -> float:
        """New QC-passed examples per generated example in this round: the number that sizes the next round."""
        return self.new_qc_passed / self.generated if self.generated else 0.0

    @property
    def unique_ratio(self) -> float:
        return self.new_unique / self.generated if self.generated else 0.0

    @property
    def qc_pass_rate(self) -> float:
        return self.new_qc_passed / self.new_unique if self.new_unique else 0.0

    @property
    def duplication_ratio(self) -> float:
        """Share of everything generated so far that was a duplicate (any tier, online included; `Accounting`)."""
        gen = self.generated_total
        return (gen - self.unique_total - self.discarded_total) / gen if gen else 0.0


@dataclass(frozen=True)
class Accounting:
    """Where every generated instruction went, in one place for every presenter (status, report, card, metrics,
    HTML): generated = unique + the duplicates of every tier (exact, near, semantic, online) + discarded, and unique =
    kept + qc_rejected. `online`: skipped by the generators as seen; `discarded`: sampled past a shard's quota, or
    malformed."""

    generated: int
    unique: int
    per_tier: dict[str, int]  # rows dropped as duplicates per tier, in the order of DUPLICATE_TIERS
    discarded: int
    kept: int
    qc_rejected: int

    @property
    def duplicates(self) -> int:
        return sum(self.per_tier.values())

    @classmethod
    def total(cls, r: RoundReport) -> Accounting:
        """All rounds up to the report's."""
        return cls(r.generated_total, r.unique_total, dict(r.duplicates), r.discarded_total, r.qc_passed_total,
                   sum(r.qc_rejected.values()))  # fmt: skip

    @classmethod
    def of_round(cls, r: RoundReport, before: RoundReport | None) -> Accounting:
        """The report's round alone (`before`: the previous round's report, None for round 1)."""
        t = cls.total(r)
        b = cls.total(before) if before is not None else cls(0, 0, dict.fromkeys(t.per_tier, 0), 0, 0, 0)
        return cls(t.generated - b.generated, t.unique - b.unique,
                   {k: v - b.per_tier.get(k, 0) for k, v in t.per_tier.items()}, t.discarded - b.discarded,
                   t.kept - b.kept, t.qc_rejected - b.qc_rejected)  # fmt: skip

    def problems(self) -> list[str]:
        """The identities that do not hold, as sentences (none when the figures add up)."""
        out = []
        parts = self.unique + self.duplicates + self.discarded
        if self.generated != parts:
            tiers = "".join(f" + {t} {n}" for t, n in self.per_tier.items())
            out.append(
                f"generated {self.generated} != unique {self.unique}{tiers} + discarded {self.discarded} = {parts}"
            )
        if self.unique != self.kept + self.qc_rejected:
            out.append(f"unique {self.unique} != kept {self.kept} + QC rejected {self.qc_rejected}")
        return out


@dataclass(frozen=True)
class ShardManifest:
    """The completion marker of a shard: written last, after the data is published."""

    round: int
    seed: int
    rows: int
    generated: int  # instructions sampled, skipped ones included
    skipped_online: int
    skipped_in_shard: int
    malformed: int
    tokens: int
    seconds: float
    data: str
    rejected: str = ""
    contract: int = CONTRACT_VERSION
    # Novel instructions the generator's QC of the instruction alone rejected before paying for responses
    # (generation.qcBeforeResponse), by QC reason: examples of the shard, unique and QC-rejected, with no row.
    qc_rejected_before_response: dict[str, int] = field(default_factory=dict)
    # The examples its plan asked of it (ShardPlan.examples): a round plan decided again must give it the same.
    # 0 in markers written before it existed.
    examples: int = 0

    @property
    def examples_made(self) -> int:
        """The examples it made: its rows, and the novel instructions QC rejected before their responses (no row)."""
        return self.rows + sum(self.qc_rejected_before_response.values())


@dataclass(frozen=True)
class EngineSession:
    """One start of an engine, written by whatever hosts it (a shard Job that loads its own, the local engine host, the
    operator for a run-owned engine Deployment) when it starts, when it is ready and as it works: the record of the
    device time a run spends, start-up included. Times are Unix seconds."""

    name: str
    started: float  # the engine's process started (its device time begins)
    ready: float = 0.0  # the engine took requests from here on (0: not yet, or it never did)
    last: float = 0.0  # the last time it was seen holding its devices (its end, once `stopped`)
    devices: int = 1  # accelerators it holds: GPUs, or 1 for the machine on a CPU run
    accelerator: str = "cpu"  # "gpu" or "cpu"
    shards: int = 0  # seed shards it finished
    tokens: int = 0  # tokens it generated for them
    busy_seconds: float = 0.0  # seconds it spent generating them
    stopped: bool = False

    @property
    def startup_seconds(self) -> float:
        """Process start to ready; to its last sign of life when it never got ready."""
        return max(0.0, (self.ready or max(self.last, self.started)) - self.started)

    @property
    def held_seconds(self) -> float:
        return max(0.0, max(self.last, self.ready) - self.started)


# ----------------------------------------------------------------------------------------------------------
# Serialisation: plain JSON, tuples as lists, nested dataclasses rebuilt by type.


def to_json(obj: Any) -> str:
    return json.dumps(plain(obj), sort_keys=True, indent=1)


def plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {name: plain(v) for name, v in json_fields(obj)}
    if isinstance(obj, tuple | list):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    return obj


def shard_plan_from(d: dict[str, Any]) -> ShardPlan:
    return ShardPlan(
        round=int(d["round"]),
        seed=int(d["seed"]),
        ordinal=int(d["ordinal"]),
        examples=int(d["examples"]),
        sampling=Sampling(**d["sampling"]),
        domains=tuple(d.get("domains", ())),
        arm=str(d.get("arm", "")),
        cell=tuple((str(k), str(v)) for k, v in d.get("cell", ())),
    )


def round_plan_from(d: dict[str, Any]) -> RoundPlan:
    return RoundPlan(
        round=int(d["round"]),
        shards=tuple(shard_plan_from(s) for s in d["shards"]),
        sampling=Sampling(**d["sampling"]),
        reason=str(d.get("reason", "")),
    )


def round_report_from(d: dict[str, Any]) -> RoundReport:
    kw = dict(d)
    kw["qc_rejected"] = {str(k): int(v) for k, v in d.get("qc_rejected", {}).items()}
    kw["top_duplicates"] = tuple((str(t), int(c)) for t, c in d.get("top_duplicates", ()))
    kw["per_domain"] = tuple(DomainYield(**x) for x in d.get("per_domain", ()))
    kw["per_temperature"] = tuple(TemperatureYield(**x) for x in d.get("per_temperature", ()))
    kw["quarantined"] = tuple(d.get("quarantined", ()))
    kw["per_shard"] = tuple(ShardYield(**x) for x in d.get("per_shard", ()))
    for f in dataclasses.fields(RoundReport):  # a per-tier mapping from its keys (a tier a report lacks counts 0)
        if PER_TIER in f.metadata:
            kw[f.name] = {t: int(d.get(t + f.metadata[PER_TIER], 0)) for t in DUPLICATE_TIERS}
    kw["dedup_tiers"] = tuple(d.get("dedup_tiers", ("exact", "near")))
    kw["semantic_clusters"] = tuple(
        SemanticCluster(str(c["first"]), tuple((str(m), float(s)) for m, s in c["members"]), int(c["size"]))
        for c in d.get("semantic_clusters", ())
    )
    known = {f.name for f in dataclasses.fields(RoundReport)}
    return RoundReport(**{k: v for k, v in kw.items() if k in known})


def shard_manifest_from(d: dict[str, Any]) -> ShardManifest:
    known = {f.name for f in dataclasses.fields(ShardManifest)}
    return ShardManifest(**{k: v for k, v in d.items() if k in known})


class DamagedMarker(ValueError):
    """A shard completion marker that is empty, truncated or incomplete: the shard is set aside, never trusted."""


_MARKER_TYPES: dict[str, tuple[type, ...]] = {
    "round": (int,), "seed": (int,), "rows": (int,), "generated": (int,), "skipped_online": (int,),
    "skipped_in_shard": (int,), "malformed": (int,), "tokens": (int,), "seconds": (int, float), "data": (str,),
}  # fmt: skip


def parse_marker(data: bytes, key: str = "marker") -> ShardManifest:
    """A shard marker's bytes -> ShardManifest, or DamagedMarker naming the key and what is wrong."""
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedMarker(f"{key}: not a complete JSON document ({len(data)} bytes): {exc}") from exc
    if not isinstance(d, dict):
        raise DamagedMarker(f"{key}: expected a JSON object, got {type(d).__name__}")
    for name, types in _MARKER_TYPES.items():
        if name not in d:
            raise DamagedMarker(f"{key}: field {name!r} is missing")
        if not isinstance(d[name], types) or isinstance(d[name], bool):
            raise DamagedMarker(f"{key}: field {name!r} has the wrong type ({type(d[name]).__name__})")
        if isinstance(d[name], int) and d[name] < 0:
            raise DamagedMarker(f"{key}: field {name!r} is negative")
    early = d.get("qc_rejected_before_response", {})  # optional: markers written before it existed lack it
    if not isinstance(early, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in early.values()
    ):
        raise DamagedMarker(f"{key}: field 'qc_rejected_before_response' is not an object of counts")
    examples = d.get("examples", 0)  # optional, as above
    if not isinstance(examples, int) or isinstance(examples, bool) or examples < 0:
        raise DamagedMarker(f"{key}: field 'examples' is not a count")
    return shard_manifest_from(d)


# ----------------------------------------------------------------------------------------------------------
# Storage layout under the run's output prefix. Every name is derived from (round, seed): nothing is random, so a
# retry finds what an earlier attempt finished.


def engine_session_key(name: str) -> str:
    return f"{ENGINES_PREFIX}{name}.json"


ENGINES_PREFIX = "engines/"


def engine_session_from(d: dict[str, Any]) -> EngineSession:
    names = {f.name for f in dataclasses.fields(EngineSession)}
    return EngineSession(**{k: v for k, v in d.items() if k in names})


def round_plan_key(rnd: int) -> str:
    return f"rounds/r{rnd:04d}/plan.json"


SHARDS_PREFIX = "shards/"
MARKER_SUFFIX = ".done.json"


def shard_round_prefix(rnd: int) -> str:
    """Every file of round `rnd`'s shards starts with this."""
    return f"{SHARDS_PREFIX}r{rnd:04d}/"


def shard_data_key(rnd: int, seed: int) -> str:
    return f"{shard_round_prefix(rnd)}s{seed:010d}.parquet"


def shard_rejected_key(rnd: int, seed: int) -> str:
    return f"{shard_round_prefix(rnd)}s{seed:010d}.rejected.parquet"


def shard_manifest_key(rnd: int, seed: int) -> str:
    return f"{shard_round_prefix(rnd)}s{seed:010d}{MARKER_SUFFIX}"


def merge_prefix(rnd: int) -> str:
    return f"merge/r{rnd:04d}"


def round_report_key(rnd: int) -> str:
    return f"{merge_prefix(rnd)}/report.json"


def seen_index_key(rnd: int) -> str:
    """What round `rnd`'s merge added to the seen-index (the full index is the chunks of rounds 1..rnd)."""
    return f"{merge_prefix(rnd)}/seen-index.npz"


DATASET_PREFIX = "dataset/data/"  # a `datasets`-loadable folder: the dataset is the union of its parts


def dataset_part_key(rnd: int) -> str:
    """The rows round `rnd` added to the dataset (new, unique, QC-passed); parts are never rewritten incrementally."""
    return f"{DATASET_PREFIX}train-r{rnd:04d}.parquet"


def rejected_part_key(rnd: int) -> str:
    """Round `rnd`'s rejected rows with their reason (duplicates and QC), kept apart from the dataset."""
    return f"rejected/r{rnd:04d}.parquet"


STATUS_KEY = "status.json"


# ----------------------------------------------------------------------------------------------------------
# The Parquet schema of a shard: explicit, so every writer agrees and readers can check it.

EXAMPLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("instruction", "string"),
    ("response", "string"),
    ("domain", "string"),
    ("round", "int32"),
    ("seed", "int64"),
    ("index", "int32"),
    ("temperature", "float32"),
    ("top_p", "float32"),
    ("repetition_penalty", "float32"),
    ("model", "string"),
    ("prompt_hash", "string"),
    ("instruction_tokens", "int32"),
    ("response_tokens", "int32"),
    ("finish_reason", "string"),
    ("instruction_logprob", "float32"),
    ("response_logprob", "float32"),
    ("critic_score", "float32"),
    ("candidates", "int32"),
    # Quality signals (genrun.worker.semantic), null unless the generator loaded the embedding model: the cosine of
    # instruction and response, the spec domain the instruction is nearest to (what was generated), and how much
    # nearer that domain is than the asked one (0 when they agree).
    ("relevance", "float32"),
    ("generated_domain", "string"),
    ("domain_margin", "float32"),
    # The spec.prompt.attributes values the row's prompt was conditioned on, as a JSON object in the spec's attribute
    # order ('{"task": "compare", "audience": "kids"}'); null when the spec has no attributes.
    ("attributes", "string"),
)
NULLABLE_COLUMNS = frozenset({"critic_score", "relevance", "generated_domain", "domain_margin", "attributes"})


# Columns whose values are (nearly) all distinct: texts that a round holds once, positions, scores. The merge's Parquet
# writers dictionary-encode only the others; on these the encoder would build a dictionary only to fall back to plain
# values, which costs time and bytes.
DISTINCT_VALUED_COLUMNS = frozenset(
    {"response", "index", "instruction_logprob", "response_logprob", "critic_score", "relevance", "domain_margin",
     "duplicate_of", "id"}
)  # fmt: skip


def dictionary_columns(schema: Any, distinct: tuple[str, ...] = ()) -> list[str]:
    """The columns of an Arrow schema to write dictionary-encoded (`use_dictionary=` of pyarrow's Parquet writers);
    `distinct`: more columns that are distinct in this file (the instructions of kept rows)."""
    return [name for name in schema.names if name not in DISTINCT_VALUED_COLUMNS and name not in distinct]


def example_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [pa.field(name, getattr(pa, typ)(), nullable=name in NULLABLE_COLUMNS) for name, typ in EXAMPLE_COLUMNS]
    )


def rejected_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("round", pa.int32()),
            pa.field("seed", pa.int64()),
            pa.field("index", pa.int32()),
            pa.field("reason", pa.string()),
            pa.field("text", pa.string()),
        ]
    )


# --------------------------------------------------------------------------------------------------------------
# The job spec: what a shard or merge Job is given (a ConfigMap key on Kubernetes, a file locally). Data, never a
# shell string.


@dataclass(frozen=True)
class JobSpec:
    kind: str  # "shard" | "merge"
    run: str
    namespace: str
    spec: dict[str, Any]  # the GenerationRun's spec as applied
    round: int
    shard: ShardPlan | None = None
    shards: tuple[tuple[int, int], ...] = ()  # merge: every (round, seed) to merge, rounds 1..round


def job_spec_from(d: dict[str, Any]) -> JobSpec:
    if d.get("kind") not in ("shard", "merge"):
        raise ValueError(f"kind: must be 'shard' or 'merge', got {d.get('kind')!r}")
    return JobSpec(
        kind=d["kind"],
        run=str(d["run"]),
        namespace=str(d.get("namespace", "default")),
        spec=dict(d["spec"]),
        round=int(d["round"]),
        shard=shard_plan_from(d["shard"]) if d.get("shard") else None,
        shards=tuple((int(r), int(s)) for r, s in d.get("shards", ())),
    )
