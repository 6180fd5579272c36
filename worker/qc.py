"""QC filters: each returns None (keep) or a short reason; counts per reason go into the round report.

Built from the spec's `qc.filters` (name + params, checked by the API). The defaults were set on real SmolLM2 output:
high-temperature text that is incoherent has a low mean token log-probability, which the `logprob` filter catches
so that it does not count as yield.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]
Filter = Callable[[Row], str | None]

DEFAULT_REFUSALS = (
    r"\bI(?:'m| am) (?:sorry|unable|not able)\b",
    r"\bas an AI\b",
    r"\bI (?:cannot|can't|can not) (?:help|assist|provide|answer|do that)\b",
    r"\bI don't have (?:access|the ability)\b",
)
_WORD = re.compile(r"\w+", re.UNICODE)


def _length(p: Mapping[str, Any]) -> Filter:
    lo_i, hi_i = int(p.get("minInstructionChars", 10)), int(p.get("maxInstructionChars", 1000))
    lo_r, hi_r = int(p.get("minResponseChars", 2)), int(p.get("maxResponseChars", 8000))

    def f(row: Row) -> str | None:
        i, r = len(row["instruction"].strip()), len(row["response"].strip())
        if i < lo_i:
            return "instruction_too_short"
        if i > hi_i:
            return "instruction_too_long"
        if r == 0:
            return "empty_response"
        if r < lo_r:
            return "response_too_short"
        if r > hi_r:
            return "response_too_long"
        return None

    return f


def _finish(p: Mapping[str, Any]) -> Filter:
    allow = bool(p.get("allowTruncated", False))

    def f(row: Row) -> str | None:
        return "truncated" if row.get("finish_reason") == "length" and not allow else None

    return f


def _patterns(p: Mapping[str, Any], default: Sequence[str], reason: str, fields: Sequence[str]) -> Filter:
    pats = [str(x) for x in p.get("patterns", default)]
    rx = re.compile("|".join(f"(?:{x})" for x in pats), re.IGNORECASE) if pats else None

    def f(row: Row) -> str | None:
        if rx is None:
            return None
        return reason if any(rx.search(row[k]) for k in fields) else None

    return f


def _echo(p: Mapping[str, Any]) -> Filter:
    max_overlap = float(p.get("maxOverlap", 0.8))

    def f(row: Row) -> str | None:
        ins, res = row["instruction"].strip().lower(), row["response"].strip().lower()
        if ins and ins in res and len(res) < 2 * len(ins) + 20:
            return "echo"
        wi, wr = set(_WORD.findall(ins)), _WORD.findall(res)
        if wr and len(wr) <= 2 * len(wi) and sum(w in wi for w in wr) / len(wr) >= max_overlap:
            return "echo"
        return None

    return f


def repeated_ngram_ratio(text: str, n: int = 3) -> float:
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if len(grams) > 3 else 0.0


def _repetition(p: Mapping[str, Any]) -> Filter:
    max_rep, n = float(p.get("maxRepeatedNgramRatio", 0.3)), int(p.get("ngram", 3))
    min_alnum = float(p.get("minAlnumRatio", 0.6))

    def f(row: Row) -> str | None:
        text = row["response"]
        chars = [c for c in text if not c.isspace()]
        if chars and sum(c.isalnum() for c in chars) / len(chars) < min_alnum:
            return "garbage"
        if repeated_ngram_ratio(text, n) > max_rep:
            return "repetition"
        return None

    return f


def _logprob(p: Mapping[str, Any]) -> Filter:
    min_r = float(p.get("minResponseLogprob", -2.5))
    min_i = float(p.get("minInstructionLogprob", -3.0))

    def f(row: Row) -> str | None:
        for name, lo in (("response_logprob", min_r), ("instruction_logprob", min_i)):
            v = row.get(name)
            if v is None:
                continue
            if not math.isfinite(v):  # NaN or +-inf: a broken engine output, never a confident one
                return "nonfinite_logprob"
            if v < lo:
                return "low_logprob"
        return None

    return f


def _critic(p: Mapping[str, Any]) -> Filter:
    min_score = float(p.get("minScore", 6))

    def f(row: Row) -> str | None:
        s = row.get("critic_score")
        return "low_critic_score" if s is not None and s == s and s < min_score else None

    return f


BUILDERS: dict[str, Callable[[Mapping[str, Any]], Filter]] = {
    "length": _length,
    "finishReason": _finish,
    "refusal": lambda p: _patterns(p, DEFAULT_REFUSALS, "refusal", ("response",)),
    "echo": _echo,
    "repetition": _repetition,
    "bannedPatterns": lambda p: _patterns(p, (), "banned_pattern", ("instruction", "response")),
    "logprob": _logprob,
    "critic": _critic,
}


@dataclass
class QcPipeline:
    filters: list[tuple[str, Filter]]

    @classmethod
    def from_spec(cls, filters: Sequence[Any]) -> QcPipeline:
        return cls([(f.name, BUILDERS[f.name](f.params)) for f in filters])

    def check_table(self, table: Any) -> list[str | None]:
        """`check` for every row of an Arrow table (the merge's batch entry point)."""
        if not self.filters:
            return [None] * table.num_rows
        return [self.check(row) for row in table.to_pylist()]

    def check(self, row: Row) -> str | None:
        """The first reason to drop the row, or None to keep it."""
        for _, f in self.filters:
            reason = f(row)
            if reason:
                return reason
        return None
