"""The run status: one typed definition of what `.status` of a GenerationRun (and status.json next to a run's output)
holds. The planner builds it; the metrics, `genrun status`/`report`, the HTML page and the run loop read it.

The wire names are the CRD's (crds/generationrun.yaml, status schema): each field's camelCase name is derived from
its Python name (`qc_passed` -> `qcPassed`), or given in its metadata where Python cannot spell it (`yield`); a test
checks both directions against the CRD. `to_dict()` writes today's JSON: optional fields that are None are left out
(a round not merged yet has no yields; a run with no merge has no output). `from_dict()` reads what `to_dict()`
wrote: a missing or mistyped field takes its default, so a status.json with garbage in it still reads.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar, get_args, get_origin

from genrun.contract import records

T = TypeVar("T", bound="Wire")


def camel_case(name: str) -> str:
    head, *rest = name.rstrip("_").split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def wire_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("json") or camel_case(f.name))


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return len(args) < len(get_args(tp)), args[0] if len(args) == 1 else tp
    return False, tp


def _encode(v: Any) -> Any:
    if isinstance(v, Wire):
        return v.to_dict()
    if isinstance(v, tuple):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return dict(v)
    return v


_MISSING = object()


def _decode(tp: Any, v: Any) -> Any:
    """v read as type tp, or _MISSING when it is not one (the field then takes its default)."""
    optional, tp = _is_optional(tp)
    if v is None:
        return None if optional else _MISSING
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Wire):
        return tp.from_dict(v) if isinstance(v, Mapping) else _MISSING
    if origin is tuple:
        if not isinstance(v, list | tuple):
            return _MISSING
        items = (_decode(get_args(tp)[0], x) for x in v)
        return tuple(x for x in items if x is not _MISSING)  # an unreadable item is dropped, not the whole list
    if origin is dict:
        if not isinstance(v, Mapping):
            return _MISSING
        value = get_args(tp)[1]
        if value is str:  # attribute values: whatever was written, as text
            return {str(k): str(x) for k, x in v.items()}
        items = ((str(k), _decode(value, x)) for k, x in v.items())
        return {k: x for k, x in items if x is not _MISSING}  # a mistyped count is dropped, not the whole mapping
    if tp is bool:
        return v if isinstance(v, bool) else _MISSING
    if tp is int:
        return v if isinstance(v, int) and not isinstance(v, bool) else _MISSING
    if tp is float:  # a hand-written 1 is a number too: kept as read, so it writes back alike
        return v if isinstance(v, int | float) and not isinstance(v, bool) else _MISSING
    if tp is str:
        return v if isinstance(v, str) else _MISSING
    raise TypeError(f"no wire form for {tp!r}")


class Wire:
    """A status part: dataclass fields <-> the CRD's camelCase JSON."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is not None:
                out[wire_name(f)] = _encode(v)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        hints = _hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            name = wire_name(f)
            if name in d:
                v = _decode(hints[f.name], d[name])
                if v is not _MISSING:
                    kwargs[f.name] = v
        return cls(**kwargs)


def wire_paths(cls: type[Wire], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, Python type) of every field the status can write, nested ones included ("rounds[].marginalYield"):
    what the CRD's status schema must declare."""
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        path = prefix + wire_name(f)
        _, tp = _is_optional(_hints(cls)[f.name])
        yield path, tp
        item = get_args(tp)[0] if get_origin(tp) is tuple else tp
        if isinstance(item, type) and issubclass(item, Wire):
            yield from wire_paths(item, path + ("[]." if get_origin(tp) is tuple else "."))


# ----------------------------------------------------------------------------------------------------------
# The parts, in the order (and with the names) they are written


def _no_duplicates() -> dict[str, int]:
    return dict.fromkeys(records.DUPLICATE_TIERS, 0)


@dataclass(frozen=True, slots=True)
class Totals(Wire):
    """Figures over all merged rounds, and the shards' states."""

    generated: int = 0
    unique: int = 0
    qc_passed: int = 0  # what counts towards the target
    duplication_ratio: float = 0.0
    duplication_percent: str = "0.0%"  # for kubectl's Dup column
    tokens: int = 0
    # Of `unique`, the instructions QC rejected in the generators before their responses (generation.qcBeforeResponse)
    qc_rejected_before_response: int = 0
    # generated = unique + duplicates (all tiers, online included) + discarded (sampled past a shard's quota, malformed)
    discarded: int = 0
    shards_succeeded: int = 0
    shards_failed: int = 0
    shards_running: int = 0
    shards_quarantined: int = 0
    rounds_planned: int = 0  # all rounds, where RunStatus.rounds lists the last 100
    shards_planned: int = 0
    # Rows dropped as duplicates per dedup tier (all rounds), every tier of records.DUPLICATE_TIERS in its order; online:
    # skipped by the generators as seen (earlier rounds or in the shard)
    duplicates: dict[str, int] = field(default_factory=_no_duplicates)
    dedup_tiers: tuple[str, ...] = ()  # the tiers "unique" (and the target) count through
    # Device time (contract.records.EngineSession): accelerator-seconds held by the run's engines, start-up included
    # (on a CPU run the machine counts as one device, so these are its wall seconds), and the start-up part of it.
    engine_starts: int = 0
    engine_seconds: float = 0.0
    startup_seconds: float = 0.0
    startup_share: float = 0.0
    gpu_hours: float = 0.0  # engine_seconds / 3600, for kubectl's GPU-h column

    def __post_init__(self) -> None:
        # Every tier in the contract's order, whatever a document held (an older run's lacks some): the same bytes out
        object.__setattr__(self, "duplicates", {t: self.duplicates.get(t, 0) for t in records.DUPLICATE_TIERS})


@dataclass(frozen=True, slots=True)
class RoundEntry(Wire):
    """One round: its plan, and once merged (the fields that are None until then) its figures."""

    round: int = 0
    shards: int = 0
    seeds: str = ""
    temperature: float = 0.0
    top_p: float = 0.0
    repetition_penalty: float = 0.0
    # the arms its shards ran (temperature, top_p and repetition_penalty above are the most used one's)
    arms: tuple[str, ...] | None = None
    generated: int | None = None  # this round's own figures ...
    new_unique: int | None = None
    new_qc_passed: int | None = None
    unique: int | None = None  # ... and the running totals after it
    qc_passed: int | None = None
    marginal_yield: float | None = None
    qc_pass_rate: float | None = None


@dataclass(frozen=True, slots=True)
class TopDuplicate(Wire):
    instruction: str = ""
    count: int = 0


@dataclass(frozen=True, slots=True)
class Output(Wire):
    dataset: str = ""
    report: str = ""


@dataclass(frozen=True, slots=True)
class ArmEntry(Wire):
    """A sampling arm's measured figures (discounted towards recent rounds)."""

    arm: str = ""
    temperature: float = 0.0
    top_p: float = 0.0
    repetition_penalty: float = 0.0
    min_p: float = 0.0
    shards: int = 0
    examples: int = 0
    tokens: int = 0
    kept: int = 0
    reward_per_1k_tokens: float = 0.0
    qc_pass_rate: float = 0.0
    retired: bool = False


@dataclass(frozen=True, slots=True)
class CellEntry(Wire):
    """An attribute cell's measured figures."""

    cell: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    shards: int = 0
    examples: int = 0
    tokens: int = 0
    kept: int = 0
    yield_: float = field(default=0.0, metadata={"json": "yield"})
    reward_per_1k_tokens: float = 0.0
    qc_pass_rate: float = 0.0
    retired: bool = False


@dataclass(frozen=True, slots=True)
class RunCondition(Wire):
    """A condition as published: the planner's decision with the generation and the time it took this status."""

    type: str = ""
    status: str = "Unknown"
    reason: str = ""
    message: str = ""
    observed_generation: int = 0
    last_transition_time: str = ""


@dataclass(frozen=True, slots=True)
class RunStatus(Wire):
    """`.status` of a GenerationRun. A status read from a run that has not planned yet is all defaults."""

    observed_generation: int = 0
    round: int = 0  # the latest round started (0 before the first)
    totals: Totals = field(default_factory=Totals)
    rounds: tuple[RoundEntry, ...] = ()  # the latest 100
    top_duplicates: tuple[TopDuplicate, ...] = ()
    output: Output | None = None  # after the first merge
    projected_tokens_to_target: int | None = None
    projected_rounds: int | None = None
    arms: tuple[ArmEntry, ...] | None = None  # after the first merge
    cells: tuple[CellEntry, ...] | None = None  # after the first merge, when the spec has attributes
    conditions: tuple[RunCondition, ...] = ()

    def condition(self, type_: str) -> RunCondition | None:
        return next((c for c in self.conditions if c.type == type_), None)
