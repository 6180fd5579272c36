"""The QC rules as facts: one record per rule (its name, parameters with defaults and bounds, the columns it reads, the
reasons it gives, whether it has an instruction-side variant or needs the embedding signals).

The API validates `spec.qc.filters` against these records, the worker registers one builder per record
(genrun.worker.qc), and tests check that the CRD's enum and default list, the `QcFilterName` type and the docs'
parameter table say the same. Adding a rule is one record here plus its builder's registration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QcParam:
    """One parameter of a rule: its manifest key, type, default (None: the rule's own value, e.g. a pattern list) and
    inclusive bounds (None: unbounded)."""

    key: str
    type: type
    default: Any = None
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class QcRule:
    name: str
    params: tuple[QcParam, ...]
    columns: tuple[str, ...]  # every column the rule reads: a row's other columns never change its verdict
    reasons: tuple[str, ...]  # the reasons it gives, counted per reason in the round report
    # Runs on each novel instruction before its responses are generated (generation.qcBeforeResponse): the rule's
    # verdict on the instruction alone drops the row whatever its response is.
    instruction_side: bool = False
    needs_signals: bool = False  # reads the quality columns: listing it makes the generator load the embedding model
    on_by_default: bool = False  # in spec.qc.filters when the manifest leaves it out
    pairs: tuple[tuple[str, str], ...] = ()  # (min, max) parameters that must not cross

    def param(self, key: str) -> QcParam:
        return next(p for p in self.params if p.key == key)

    @property
    def defaults(self) -> dict[str, Any]:
        """The parameters a spec may leave out, with the values the rule then runs with."""
        return {p.key: p.default for p in self.params if p.default is not None}


_CHARS = 10**6
_PATTERNS = (QcParam("patterns", list),)

# In the order of the CRD's enum; the default filter list keeps this order too.
RULES: tuple[QcRule, ...] = (
    QcRule(
        "length",
        (
            QcParam("minInstructionChars", int, 10, 0, _CHARS),
            QcParam("maxInstructionChars", int, 1000, 1, _CHARS),
            QcParam("minResponseChars", int, 2, 0, _CHARS),
            QcParam("maxResponseChars", int, 8000, 1, _CHARS),
        ),
        ("instruction", "response"),
        ("instruction_too_short", "instruction_too_long", "empty_response", "response_too_short", "response_too_long"),
        instruction_side=True,
        on_by_default=True,
        pairs=(("minInstructionChars", "maxInstructionChars"), ("minResponseChars", "maxResponseChars")),
    ),
    QcRule(
        "finishReason",
        (QcParam("allowTruncated", bool, False),),
        ("finish_reason",),
        ("truncated",),
        on_by_default=True,
    ),
    QcRule("refusal", _PATTERNS, ("response",), ("refusal",), on_by_default=True),
    QcRule(
        "echo", (QcParam("maxOverlap", float, 0.8, 0, 1),), ("instruction", "response"), ("echo",), on_by_default=True
    ),
    QcRule(
        "repetition",
        (
            QcParam("maxRepeatedNgramRatio", float, 0.3, 0, 1),
            QcParam("ngram", int, 3, 1, 32),
            QcParam("minAlnumRatio", float, 0.6, 0, 1),
        ),
        ("response",),
        ("repetition", "garbage"),
        on_by_default=True,
    ),
    QcRule("bannedPatterns", _PATTERNS, ("instruction", "response"), ("banned_pattern",), instruction_side=True),
    # An instruction that asks for nothing: a number comparison ("1976 vs 1984"), a title, a statement, word salad
    # without a question or a request verb. English by default; `requestWords` replaces the list.
    QcRule(
        "request",
        (QcParam("minWords", int, 2, 0, 100), QcParam("requestWords", list)),
        ("instruction",),
        ("few_words", "not_a_request"),
        instruction_side=True,
    ),
    QcRule(
        "logprob",
        (QcParam("minResponseLogprob", float, -2.5, -100, 0), QcParam("minInstructionLogprob", float, -3.0, -100, 0)),
        ("instruction_logprob", "response_logprob"),
        ("low_logprob", "nonfinite_logprob"),
        instruction_side=True,
        on_by_default=True,
    ),
    QcRule("critic", (QcParam("minScore", float, 6, 0, 10),), ("critic_score",), ("low_critic_score",)),
    # The signal rules' defaults were calibrated on recorded SmolLM2 output, read by hand (docs/manifest.md, Quality
    # signals; tests/unit/test_semantic_real.py checks them on that data).
    QcRule(
        "relevance",
        (QcParam("minRelevance", float, 0.15, -1, 1),),
        ("relevance",),
        ("irrelevant_response",),
        needs_signals=True,
    ),
    QcRule(
        "domain", (QcParam("maxMargin", float, 0.1, 0, 2),), ("domain_margin",), ("off_domain",), needs_signals=True
    ),
)

BY_NAME: dict[str, QcRule] = {r.name: r for r in RULES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
DEFAULT_RULES: tuple[str, ...] = tuple(r.name for r in RULES if r.on_by_default)
SIGNAL_RULES: tuple[str, ...] = tuple(r.name for r in RULES if r.needs_signals)
INSTRUCTION_SIDE_RULES: tuple[str, ...] = tuple(r.name for r in RULES if r.instruction_side)
MAX_PATTERNS, MAX_PATTERN_CHARS = 64, 1000
MAX_REQUEST_WORDS = 1000


def default(rule: str, key: str) -> Any:
    """A parameter's value when the spec leaves it out."""
    return BY_NAME[rule].param(key).default


def effective_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """A rule's parameters as it runs: the spec's over the defaults."""
    rule = BY_NAME.get(name)
    return {**(rule.defaults if rule else {}), **params}
