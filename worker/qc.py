"""QC filters: each gives, per row, None (keep) or a short reason; counts per reason go into the round report.

Built from the spec's `qc.filters` (name + params, checked by the API against each rule's record in
genrun.contract.qc_rules, which also holds the defaults); `RULES` registers each rule's builders against that record.
The defaults were set on real SmolLM2 output:
high-temperature text that is incoherent has a low mean token log-probability, which the `logprob` filter catches
so that it does not count as yield.

Every filter works on a whole Arrow table at once (Arrow compute kernels and numpy; a Python loop only over the
few rows a cheap test cannot settle), and a row is checked as a one-row table: one implementation. Words are runs
of letters, digits and '_' (Unicode), text is compared case-folded.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from genrun.contract import qc_rules
from genrun.worker.ascii_bytes import ALNUM, BYTE, non_ascii, regex_on_non_ascii, string_bytes

Row = Mapping[str, Any]
Reasons = np.ndarray  # object array: str or None per row
Filter = Callable[[Any], Reasons]  # Arrow table -> reasons

DEFAULT_REFUSALS = (
    r"\bI(?:'m| am) (?:sorry|unable|not able)\b",
    r"\bas an AI\b",
    r"\bI (?:cannot|can't|can not) (?:help|assist|provide|answer|do that)\b",
    r"\bI don't have (?:access|the ability)\b",
)


def _none(n: int) -> Reasons:
    return np.full(n, None, dtype=object)


def _np(arr: Any) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False))


def _text(table: Any, name: str) -> Any:
    import pyarrow.compute as pc

    col = table.column(name)
    return pc.fill_null(col.combine_chunks() if hasattr(col, "combine_chunks") else col, "")


def _length(p: Mapping[str, Any], response: bool = True) -> Filter:
    lo_i, hi_i = int(_param(p, "length", "minInstructionChars")), int(_param(p, "length", "maxInstructionChars"))
    lo_r, hi_r = int(_param(p, "length", "minResponseChars")), int(_param(p, "length", "maxResponseChars"))

    def f(table: Any) -> Reasons:
        import pyarrow.compute as pc

        i = _np(pc.utf8_length(pc.utf8_trim_whitespace(_text(table, "instruction"))))
        out = _none(len(i))
        checks: list[tuple[np.ndarray, str]] = []
        if response:
            r = _np(pc.utf8_length(pc.utf8_trim_whitespace(_text(table, "response"))))
            checks += [(r > hi_r, "response_too_long"), (r < lo_r, "response_too_short"), (r == 0, "empty_response")]
        # first matching reason wins: assign in reverse order of precedence (the instruction's verdicts win)
        for mask, reason in (*checks, (i > hi_i, "instruction_too_long"), (i < lo_i, "instruction_too_short")):
            out[mask] = reason
        return out

    return f


def _finish(p: Mapping[str, Any]) -> Filter:
    allow = bool(_param(p, "finishReason", "allowTruncated"))

    def f(table: Any) -> Reasons:
        out = _none(table.num_rows)
        if not allow:
            out[_np(table.column("finish_reason")) == "length"] = "truncated"
        return out

    return f


def _patterns(p: Mapping[str, Any], default: Sequence[str], reason: str, fields: Sequence[str]) -> Filter:
    """Case-insensitive regular expressions, run by RE2 (Arrow); a pattern RE2 cannot compile (look-around,
    back-references) is run by Python's `re` on each row instead."""
    import pyarrow.compute as pc

    pats = [str(x) for x in p.get("patterns", default)]
    joined = "|".join(f"(?:{x})" for x in pats)
    use_re2 = True
    if pats:
        try:
            pc.match_substring_regex(_arrow_strings([""]), joined, ignore_case=True)
        except Exception:
            use_re2 = False
    rx = re.compile(joined, re.IGNORECASE) if pats else None

    def f(table: Any) -> Reasons:
        out = _none(table.num_rows)
        if rx is None:
            return out
        hit = np.zeros(table.num_rows, dtype=bool)
        for k in fields:
            col = _text(table, k)
            if use_re2:
                hit |= _np(pc.match_substring_regex(col, joined, ignore_case=True))
            else:
                hit |= np.array([rx.search(x) is not None for x in col.to_pylist()], dtype=bool)
        out[hit] = reason
        return out

    return f


# The words that open an English request: question words, the verbs that start an inverted question ("Is there ...",
# "Can you ..."), and the imperative verbs instructions open with ("Explain ...", "Solve ...", "List ...").
DEFAULT_REQUEST_WORDS = (
    "what", "how", "why", "who", "whom", "whose", "when", "where", "which", "whether", "is", "are", "was", "were",
    "am", "do", "does", "did", "can", "could", "will", "would", "should", "shall", "may", "might", "must", "have",
    "has", "had", "please", "let", "tell", "give", "show", "name", "list", "explain", "describe", "define",
    "summarize", "summarise", "outline", "discuss", "compare", "contrast", "write", "rewrite", "rephrase",
    "paraphrase", "translate", "compose", "draft", "edit", "correct", "fix", "improve", "complete", "continue",
    "answer", "solve", "calculate", "compute", "find", "determine", "estimate", "evaluate", "simplify", "prove",
    "derive", "convert", "analyze", "analyse", "identify", "classify", "categorize", "sort", "rank", "order",
    "arrange", "choose", "select", "pick", "suggest", "recommend", "propose", "brainstorm", "plan", "design",
    "create", "make", "build", "develop", "implement", "generate", "draw", "sketch", "illustrate", "demonstrate",
    "predict", "imagine", "pretend", "suppose", "assume", "consider", "invent", "construct", "provide", "teach",
    "help", "check", "verify", "review", "critique", "assess", "interpret", "argue", "justify", "state", "count",
    "convince", "add", "subtract", "multiply", "divide", "research", "investigate", "use", "read", "fill", "match",
    "spell", "expand", "shorten", "extract",
)  # fmt: skip
_WORD_CHAR = r"[\p{L}\p{N}_]"


def _request(p: Mapping[str, Any]) -> Filter:
    """An instruction that asks for something: at least `minWords` words with a letter in them (numbers and symbols
    alone ask nothing: "1976 vs 1984", "solve 8 5"), and either a question mark or a clause (the text's start, or
    after . , ; : ! ? ) ] or a line break) whose first word is one of `requestWords`. What fails is a title, a statement or
    a run of words that asks nothing ("Nitrogen Cycle.", "I have a dream.", "biology the human body part 6 ...")."""
    import pyarrow.compute as pc

    min_words = int(_param(p, "request", "minWords"))
    words = "|".join(re.escape(str(w)) for w in sorted(set(p.get("requestWords", DEFAULT_REQUEST_WORDS))))
    # a clause's first word (case-insensitive): the whole word, not a prefix ("showcase" is not "show")
    opens = rf"(?:^|[.,;:!?)\]\n])[^\p{{L}}\p{{N}}_]*(?:{words})(?:[^\p{{L}}\p{{N}}_]|$)"

    def f(table: Any) -> Reasons:
        col = _text(table, "instruction")
        out = _none(table.num_rows)
        asks = _np(pc.match_substring(col, "?")) | _np(pc.match_substring_regex(col, opens, ignore_case=True))
        out[~asks] = "not_a_request"
        # words with a letter: a run of word characters that holds one (checked last: the short verdict wins)
        lettered = _np(pc.count_substring_regex(col, rf"{_WORD_CHAR}*\p{{L}}{_WORD_CHAR}*"))
        out[lettered < min_words] = "few_words"
        return out

    return f


def _arrow_strings(values: Sequence[str]) -> Any:
    import pyarrow as pa

    return pa.array(list(values), pa.string())


# ASCII byte classes for the rows that are pure ASCII (genrun.worker.ascii_bytes): there the Unicode regexes below
# reduce to byte lookups; byte counts of ASCII classes are exact on any row.
_WORD = ALNUM | np.isin(BYTE, list(b"_"))
_TO_SPACE = np.where(_WORD | (BYTE >= 0x80), BYTE, 0x20).astype(np.uint8)  # separators -> ' ', others kept
_LOWER_TO_SPACE = _TO_SPACE[np.where((BYTE >= 0x41) & (BYTE <= 0x5A), BYTE + 0x20, BYTE)]  # A-Z -> a-z first
WORD_SEPARATORS = r"[^\p{L}\p{N}_]+"  # what splits words (`_words`); _TO_SPACE is its ASCII share
_SPACE = np.isin(BYTE, [ord(c) for c in "\t\n\f\r "])  # RE2's \s (ASCII only, no \v)


def _row_counts(col: Any, byte_class: np.ndarray) -> np.ndarray | None:
    """Per row, how many bytes of the class (an ASCII class: exact counts of those characters)."""
    got = string_bytes(col)
    if got is None:
        return None
    data, off = got
    # a sum per non-empty row over the class's bytes (int32: a row's bytes fit Arrow's int32 offsets), cheaper than
    # the difference of a running int64 sum over all bytes
    hits = byte_class[data[off[0] : off[-1]]].view(np.uint8)
    out = np.zeros(len(off) - 1, np.int64)
    some = off[1:] > off[:-1]
    if some.any():
        out[some] = np.add.reduceat(hits, off[:-1][some] - off[0], dtype=np.int32)
    return out


def _lower_spaced(col: Any) -> Any:
    """For splitting into words: pc.replace_substring_regex(pc.utf8_lower(col), WORD_SEPARATORS, " "). Pure ASCII rows
    go by one byte map (A-Z to lower case, separators to spaces: a run becomes several spaces, splitting drops the
    empty pieces), the others by utf8_lower and the regex."""
    import pyarrow as pa
    import pyarrow.compute as pc

    got = string_bytes(col)
    if got is None:
        return pc.replace_substring_regex(pc.utf8_lower(col), WORD_SEPARATORS, " ")
    data, _ = got
    buffers = col.buffers()
    mapped = pa.StringArray.from_buffers(
        len(col), buffers[1], pa.py_buffer(_LOWER_TO_SPACE[data]), buffers[0], col.null_count, col.offset
    )
    return regex_on_non_ascii(col, mapped, WORD_SEPARATORS, " ", lower=True)


def _words(col: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    """(row of each word, code of each word, the words' dictionary: codes index it) over a string column, words in
    order, case-folded."""
    import pyarrow.compute as pc

    # lower case and separators to spaces (a byte map on ASCII rows, else utf8_lower and one regex pass), then a
    # literal split (a regex split runs the regex engine over every byte again); empty pieces are dropped
    spaced = pc.utf8_trim(_lower_spaced(col), " ")
    lists = pc.split_pattern(spaced, " ")
    flat = pc.list_flatten(lists)
    rows = _np(pc.list_parent_indices(lists)).astype(np.int64)
    keep = _np(pc.not_equal(flat, ""))
    enc = pc.dictionary_encode(flat)
    return rows[keep], _np(enc.indices)[keep].astype(np.int64), enc.dictionary


# The words of a table's text columns while `QcPipeline.check_table` runs its filters, per thread: echo and
# repetition both split the responses, so they split them once. Keyed by the table object, which the memo holds (so
# its id is not reused); Arrow tables are immutable. Unset outside check_table.
_MEMO = threading.local()


def _column_words(table: Any, name: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """`_words` of a table's column, shared by the filters of one `check_table` call."""
    memo: dict[str, Any] | None = getattr(_MEMO, "words", None)
    if memo is None:
        return _words(_text(table, name))
    if memo.get("table") is not table:
        memo.clear()
        memo["table"] = table
    got: tuple[np.ndarray, np.ndarray, Any] | None = memo.get(name)
    if got is None:
        got = memo[name] = _words(_text(table, name))
    return got


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    a = np.sort(a)  # faster than np.unique's hash table on these int64 codes
    return a[np.append(True, a[1:] != a[:-1])] if len(a) else a


def _echo(p: Mapping[str, Any]) -> Filter:
    max_overlap = float(_param(p, "echo", "maxOverlap"))

    def f(table: Any) -> Reasons:
        import pyarrow as pa
        import pyarrow.compute as pc

        n = table.num_rows
        out = _none(n)
        ins = pc.utf8_trim_whitespace(_text(table, "instruction"))
        res = pc.utf8_trim_whitespace(_text(table, "response"))
        li, lr = _np(pc.utf8_length(ins)), _np(pc.utf8_length(res))  # as in lower case: utf8_lower maps 1 to 1
        # 1. the response contains the instruction and is little longer: only short responses need the substring test
        # (in lower case: lowered here, on those rows only)
        short = np.flatnonzero((li > 0) & (lr < 2 * li + 20))
        if len(short):
            at = pa.array(short)
            pairs = zip(pc.utf8_lower(ins.take(at)).to_pylist(), pc.utf8_lower(res.take(at)).to_pylist(), strict=True)
            out[short[[a in b for a, b in pairs]]] = "echo"
        # 2. the response is mostly the instruction's words: (row, word) codes of both sides, the instruction's words
        # coded in the responses' dictionary (-1: in no response)
        ri, ci, di = _column_words(table, "instruction")
        rr, cr, dr = _column_words(table, "response")
        vi, vr = max(len(di), 1), len(dr) + 1
        n_res = np.bincount(rr, minlength=n)
        ins_distinct = _sorted_unique(ri * vi + ci)
        n_ins_distinct = np.bincount(ins_distinct // vi, minlength=n) if len(ins_distinct) else np.zeros(n, np.int64)
        mapped = _np(pc.fill_null(pc.index_in(di, value_set=dr), -1)).astype(np.int64)[ci] if len(ci) else ci
        shared = mapped >= 0
        ins_pairs = _sorted_unique(ri[shared] * vr + mapped[shared])
        res_codes = rr * vr + cr
        in_ins = np.zeros(len(res_codes), dtype=bool)
        if len(ins_pairs):
            pos = np.searchsorted(ins_pairs, res_codes).clip(0, len(ins_pairs) - 1)
            in_ins = ins_pairs[pos] == res_codes
        overlap = np.bincount(rr[in_ins], minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(n_res > 0, overlap / np.maximum(n_res, 1), 0.0)
        out[(n_res > 0) & (n_res <= 2 * n_ins_distinct) & (frac >= max_overlap)] = "echo"
        return out

    return f


def _ngram_ratios(rows: np.ndarray, codes: np.ndarray, size: int, n: int) -> np.ndarray:
    """Per text of `size` texts, from their words (`_words`): 1 - distinct word n-grams / n-grams, 0 when a text has
    at most 3 n-grams."""
    out = np.zeros(size)
    if len(rows) < n:
        return out
    m = len(rows) - n + 1
    same_row = rows[:m] == rows[n - 1 :]  # an n-gram starting at i stays within its row
    start = np.flatnonzero(same_row)
    key = np.zeros(len(start), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # mixed hash of the n codes (collisions only make a repeat look distinct or vice versa)
            key = key * np.uint64(0x9E3779B97F4A7C15) + codes[start + j].astype(np.uint64) + np.uint64(1)
    r = rows[start]
    total = np.bincount(r, minlength=size)
    # (row, n-gram) packed into one uint64, the row in the high bits and the hash's low bits below (the low bits of a
    # multiply-add hash mix every code): one plain sort instead of a two-key lexsort, twice as fast. A row of m
    # n-grams has two of them collide with odd m^2 / 2^(64 - row bits) (1e-9 at 1,000 n-grams, 1M rows).
    row_bits = max(1, size.bit_length())
    low = np.uint64((1 << (64 - row_bits)) - 1)
    packed = np.sort((r.astype(np.uint64) << np.uint64(64 - row_bits)) | (key & low))
    first = np.ones(len(packed), dtype=bool)
    first[1:] = packed[1:] != packed[:-1]
    distinct = np.bincount((packed[first] >> np.uint64(64 - row_bits)).astype(np.int64), minlength=size)
    has = total > 3
    out[has] = 1 - distinct[has] / total[has]
    return out


def _alnum_counts(col: Any) -> np.ndarray:
    """Per text, its letters and digits (Unicode): byte counts on ASCII rows, the length after deleting the other
    characters' runs (one regex) on the rest."""
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = _row_counts(col, ALNUM)
    if counts is None:
        return _np(pc.utf8_length(pc.replace_substring_regex(col, r"[^\p{L}\p{N}]+", "")))
    other = np.flatnonzero(_np(non_ascii(col)))
    if len(other):
        sub = col.take(pa.array(other))
        counts[other] = _np(pc.utf8_length(pc.replace_substring_regex(sub, r"[^\p{L}\p{N}]+", "")))
    return counts


def _repetition(p: Mapping[str, Any]) -> Filter:
    max_rep, n = float(_param(p, "repetition", "maxRepeatedNgramRatio")), int(_param(p, "repetition", "ngram"))
    min_alnum = float(_param(p, "repetition", "minAlnumRatio"))

    def f(table: Any) -> Reasons:
        import pyarrow.compute as pc

        col = _text(table, "response")
        out = _none(table.num_rows)
        rows, codes, _ = _column_words(table, "response")
        out[_ngram_ratios(rows, codes, table.num_rows, n) > max_rep] = "repetition"
        # characters other than RE2's whitespace (ASCII bytes: counted exactly on any row), and letters and digits
        spaces = _row_counts(col, _SPACE)
        chars = (
            _np(pc.utf8_length(col)) - spaces
            if spaces is not None
            else _np(pc.utf8_length(pc.replace_substring_regex(col, r"\s+", "")))
        )
        alnum = _alnum_counts(col)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[(chars > 0) & (alnum / np.maximum(chars, 1) < min_alnum)] = "garbage"  # checked first: wins
        return out

    return f


def _logprob(p: Mapping[str, Any], response: bool = True) -> Filter:
    min_r = float(_param(p, "logprob", "minResponseLogprob"))
    min_i = float(_param(p, "logprob", "minInstructionLogprob"))
    sides = (("instruction_logprob", min_i), ("response_logprob", min_r))[: 2 if response else 1]

    def f(table: Any) -> Reasons:
        out = _none(table.num_rows)
        # reverse precedence: the response's verdict wins over the instruction's, "nonfinite" over "low"
        for name, lo in sides:
            if name not in table.column_names:
                continue
            v = _np(table.column(name)).astype(np.float64)  # nulls become NaN: mask them
            present = ~np.asarray(table.column(name).is_null().to_numpy(zero_copy_only=False))
            with np.errstate(invalid="ignore"):
                out[present & (v < lo)] = "low_logprob"
            out[present & ~np.isfinite(v)] = "nonfinite_logprob"  # NaN or +-inf: a broken engine output
        return out

    return f


def _critic(p: Mapping[str, Any]) -> Filter:
    min_score = float(_param(p, "critic", "minScore"))

    def f(table: Any) -> Reasons:
        out = _none(table.num_rows)
        if "critic_score" not in table.column_names:
            return out
        s = _np(table.column("critic_score")).astype(np.float64)  # null -> NaN: no score, no verdict
        with np.errstate(invalid="ignore"):
            out[~np.isnan(s) & (s < min_score)] = "low_critic_score"
        return out

    return f


def _param(p: Mapping[str, Any], name: str, key: str) -> Any:
    return p.get(key, qc_rules.default(name, key))


def _signal(column: str, bad: Callable[[np.ndarray], np.ndarray], reason: str) -> Filter:
    """A filter on a quality column the generator writes when the embedding model is loaded; a null (no model, no
    domains) gives no verdict."""

    def f(table: Any) -> Reasons:
        out = _none(table.num_rows)
        if column not in table.column_names:
            return out
        v = _np(table.column(column)).astype(np.float64)  # null -> NaN
        with np.errstate(invalid="ignore"):
            out[~np.isnan(v) & bad(v)] = reason
        return out

    return f


def _relevance(p: Mapping[str, Any]) -> Filter:
    lo = float(_param(p, "relevance", "minRelevance"))
    return _signal("relevance", lambda v: v < lo, "irrelevant_response")


def _domain(p: Mapping[str, Any]) -> Filter:
    hi = float(_param(p, "domain", "maxMargin"))
    return _signal("domain_margin", lambda v: v >= hi, "off_domain")


@dataclass(frozen=True)
class Rule:
    """A QC rule's builders against its facts (genrun.contract.qc_rules): `build` makes the filter from the spec's
    params; `instruction_side`, for a rule that has that variant, the filter of the instruction alone: the rule's
    checks reading only `instruction` and `instruction_logprob`, so instructions-first generators run it on each novel
    instruction before paying for its responses (genrun.worker.generate)."""

    facts: qc_rules.QcRule
    build: Callable[[Mapping[str, Any]], Filter]
    instruction_side: Callable[[Mapping[str, Any]], Filter] | None = None


def _register(*rules: Rule) -> dict[str, Rule]:
    return {r.facts.name: r for r in rules}


_RULE = qc_rules.BY_NAME
RULES = _register(
    Rule(_RULE["length"], _length, lambda p: _length(p, response=False)),
    Rule(_RULE["finishReason"], _finish),
    Rule(_RULE["refusal"], lambda p: _patterns(p, DEFAULT_REFUSALS, "refusal", ("response",))),
    Rule(_RULE["echo"], _echo),
    Rule(_RULE["repetition"], _repetition),
    Rule(
        _RULE["bannedPatterns"],
        lambda p: _patterns(p, (), "banned_pattern", ("instruction", "response")),
        lambda p: _patterns(p, (), "banned_pattern", ("instruction",)),
    ),
    Rule(_RULE["request"], _request, _request),  # reads the instruction alone: its own instruction side
    Rule(_RULE["logprob"], _logprob, lambda p: _logprob(p, response=False)),
    Rule(_RULE["critic"], _critic),
    Rule(_RULE["relevance"], _relevance),
    Rule(_RULE["domain"], _domain),
)


@dataclass
class QcPipeline:
    filters: list[tuple[str, Filter]]

    @classmethod
    def from_spec(cls, filters: Sequence[Any]) -> QcPipeline:
        return cls([(f.name, RULES[f.name].build(f.params)) for f in filters])

    @classmethod
    def instruction_side(cls, filters: Sequence[Any]) -> QcPipeline:
        """The spec's filters that can judge an instruction before it has a response (`Rule.instruction_side`), in
        spec order: a row they give a reason is one `from_spec(filters)` drops, whatever its response."""
        sides = [(f.name, RULES[f.name].instruction_side, f.params) for f in filters]
        return cls([(name, side(params)) for name, side, params in sides if side is not None])

    def columns(self, available: Sequence[str]) -> list[str]:
        """The columns of `available` that this pipeline's filters read (their rules' `columns`), in `available`'s
        order."""
        want = {c for name, _ in self.filters for c in RULES[name].facts.columns}
        return [c for c in available if c in want]

    def check_instructions(self, instructions: Sequence[str], logprobs: Sequence[float]) -> list[str | None]:
        """An `instruction_side` pipeline's verdicts on instructions without responses: the columns as a row holds
        them (the mean log-probability as float32: the merge's QC reads the stored value; NaN when unknown)."""
        import pyarrow as pa

        return self.check_table(pa.table({
            "instruction": pa.array(list(instructions), pa.string()),
            "instruction_logprob": pa.array(list(logprobs), pa.float32()),
        }))  # fmt: skip

    def check_table(self, table: Any) -> list[str | None]:
        """Per row of an Arrow table, the first filter's reason to drop it (filters in spec order), or None."""
        import pyarrow as pa

        out = _none(table.num_rows)
        todo = np.arange(table.num_rows)
        sub = table  # the rows no filter has rejected yet: one table object while none is (the words memo's key)
        _MEMO.words = {}
        try:
            for _, f in self.filters:
                if len(todo) == 0:
                    break
                if sub.num_rows != len(todo):
                    sub = table.take(pa.array(todo))
                got = f(sub)
                hit = np.array([x is not None for x in got], dtype=bool)
                out[todo[hit]] = got[hit]
                todo = todo[~hit]
        finally:
            del _MEMO.words
        return list(out)

    def check(self, row: Row) -> str | None:
        """The first reason to drop one row (a dict with the example columns), or None to keep it."""
        import pyarrow as pa

        return self.check_table(pa.Table.from_pylist([dict(row)]))[0]
