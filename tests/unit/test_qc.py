"""QC filters one by one (each alone in a pipeline, defaults and params), then the pipeline's order and batch path."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pytest
from genrun.contract.api import QcFilter
from genrun.worker.qc import QcPipeline

from tests.helpers import example_row

GOOD = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves."


def only(name: str, **params: Any) -> QcPipeline:
    return QcPipeline.from_spec([QcFilter(name, params)])


def check(p: QcPipeline, instruction: str = "Explain how photosynthesis works.", response: str = GOOD,
          **over: Any) -> str | None:  # fmt: skip
    return p.check(example_row(instruction, response=response, **over))


@pytest.mark.parametrize(
    ("instruction", "response", "reason"),
    [
        ("Explain how photosynthesis works.", GOOD, None),
        ("Why?", GOOD, "instruction_too_short"),  # 4 chars < 10
        ("   Why?    ", GOOD, "instruction_too_short"),  # stripped first
        ("x" * 1001, GOOD, "instruction_too_long"),
        ("Explain how photosynthesis works.", "   ", "empty_response"),
        ("Explain how photosynthesis works.", "k", "response_too_short"),
        ("Explain how photosynthesis works.", "y" * 8001, "response_too_long"),
        ("Why?", "", "instruction_too_short"),  # the instruction is checked first
    ],
)
def test_length(instruction: str, response: str, reason: str | None) -> None:
    assert check(only("length"), instruction, response) == reason


def test_length_params() -> None:
    p = only("length", minInstructionChars=3, maxResponseChars=20, minResponseChars=5)
    assert check(p, "Why?", "Because it is.") is None
    assert check(p, "Why?", "Yes.") == "response_too_short"
    assert check(p, "Why?", "Because " * 5) == "response_too_long"


def test_finish_reason() -> None:
    assert check(only("finishReason"), finish_reason="length") == "truncated"
    assert check(only("finishReason"), finish_reason="stop") is None
    assert check(only("finishReason", allowTruncated=True), finish_reason="length") is None


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("I'm sorry, but I can't do that.", "refusal"),
        ("i am unable to browse the web.", "refusal"),  # case-insensitive
        ("As an AI language model, I have no body.", "refusal"),
        ("I cannot help with that request.", "refusal"),
        ("I don't have access to real-time data.", "refusal"),
        (GOOD, None),
        ("Sorryville is a town; I am sorrowful.", None),  # word boundaries
    ],
)
def test_refusal_defaults(response: str, reason: str | None) -> None:
    assert check(only("refusal"), response=response) == reason


def test_refusal_custom_patterns_and_python_only_syntax() -> None:
    assert check(only("refusal", patterns=[r"\bnope\b"]), response="Nope, not today.") == "refusal"
    assert check(only("refusal", patterns=[r"\bnope\b"]), response="I'm sorry.") is None  # replaces the defaults
    # a look-behind RE2 cannot run: Python's re runs it, same verdicts
    p = only("refusal", patterns=[r"(?<=not )possible"])
    assert check(p, response="That is not possible.") == "refusal"
    assert check(p, response="That is possible.") is None


def test_banned_patterns_look_at_both_fields() -> None:
    p = only("bannedPatterns", patterns=["lorem ipsum", r"\bTODO\b"])
    assert check(p, instruction="Write lorem ipsum filler text.") == "banned_pattern"
    assert check(p, response="todo: fill in later") == "banned_pattern"
    assert check(p) is None
    assert check(only("bannedPatterns")) is None  # no patterns: nothing banned


@pytest.mark.parametrize(
    ("instruction", "reason"),
    [
        # what the hot arms of examples/problem.yaml wrote (bench/data/problem-pools.jsonl.gz) and a reader throws away
        ("1976 vs 1984", "few_words"),  # a bare comparison: one word with a letter
        ("solve 8 5", "few_words"),  # an arithmetic stub: a verb and two numbers
        ("1976 vs 1984?", "few_words"),  # a question mark does not make it a request
        ("biology the human body part 6 lungs work double fold in rapi", "not_a_request"),  # word salad
        ("Nitrogen Cycle.", "not_a_request"),  # a title
        ("I have a dream.", "not_a_request"),  # a statement
        ("The sum of all integers less than 100 that are either multiples of 7 or 9 is 6.", "not_a_request"),
        ("Showcase of modern art.", "not_a_request"),  # a request word must be the whole first word
        # requests: a question, or a clause that opens on a question word or a request verb
        ("When did World War II begin?", None),
        ("Explain photosynthesis.", None),
        ("Write a haiku about rain.", None),
        ("What's 1 + 1?", None),  # 'what' and 's': two words with a letter
        ("In 200 words, explain gravity.", None),  # the second clause opens on the verb
        ("Given a list of numbers, find the largest", None),
        ("1. List three fruits", None),  # a list number before the verb
        ("¿Qué es la fotosíntesis?", None),  # a question in any language
    ],
)
def test_request_keeps_questions_and_requests_and_names_what_asks_nothing(instruction: str, reason: str | None) -> None:
    assert check(only("request"), instruction) == reason
    # the same verdict before the response exists: the rule reads the instruction alone
    side = QcPipeline.instruction_side([QcFilter("request")])
    assert side.check_instructions([instruction], [math.nan]) == [reason]


def test_request_params_replace_the_words_and_the_minimum() -> None:
    assert check(only("request", requestWords=["erkläre"]), "Erkläre die Photosynthese.") is None
    assert check(only("request", requestWords=["erkläre"]), "Explain photosynthesis.") == "not_a_request"  # replaced
    assert check(only("request", minWords=1), "solve 8 5") is None
    assert check(only("request", minWords=3), "Explain photosynthesis.") == "few_words"
    assert check(only("request", minWords=0), "") == "not_a_request"


@pytest.mark.parametrize(
    ("instruction", "response", "reason"),
    [
        ("Explain how photosynthesis works.", "Explain how photosynthesis works.", "echo"),  # verbatim
        ("Explain how photosynthesis works.", "explain how photosynthesis works!!", "echo"),  # case, little more
        ("Name the planets in order", "planets in order name the", "echo"),  # the same words, reordered
        ("Explain how photosynthesis works.", GOOD, None),
        ("Explain how photosynthesis works.", "Explain how photosynthesis works. " + GOOD * 2, None),  # long answer
    ],
)
def test_echo(instruction: str, response: str, reason: str | None) -> None:
    assert check(only("echo"), instruction, response) == reason


def test_echo_overlap_param() -> None:
    ins, res = "Name the planets in order", "planets order name mercury venus"  # 3 of 5 words from the instruction
    assert check(only("echo", maxOverlap=0.5), ins, res) == "echo"
    assert check(only("echo", maxOverlap=0.8), ins, res) is None


def test_repetition_and_garbage() -> None:
    p = only("repetition")
    assert check(p, response="the cat sat on the mat " * 6) == "repetition"
    assert check(p) is None
    assert check(p, response="@@@ ### !!! $$$ %%% ^^^ ok") == "garbage"
    # 7 word 3-grams, 3 distinct: a repeated share of 1 - 3/7 = 0.571
    assert check(only("repetition", maxRepeatedNgramRatio=0.57), response="a b c a b c a b c") == "repetition"
    assert check(only("repetition", maxRepeatedNgramRatio=0.58), response="a b c a b c a b c") is None
    assert check(only("repetition", maxRepeatedNgramRatio=0), response="a b c d") is None  # 2 3-grams: too few
    loose = only("repetition", maxRepeatedNgramRatio=0.9, minAlnumRatio=0.1)
    assert check(loose, response="the cat sat on the mat " * 6) is None
    assert check(loose, response="@@@ ### ok") is None


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({}, None),
        ({"response_logprob": -3.0}, "low_logprob"),
        ({"instruction_logprob": -3.5}, "low_logprob"),
        ({"response_logprob": math.nan}, "nonfinite_logprob"),
        ({"response_logprob": math.inf}, "nonfinite_logprob"),
        ({"instruction_logprob": -math.inf}, "nonfinite_logprob"),
        ({"response_logprob": -3.0, "instruction_logprob": math.nan}, "low_logprob"),  # the response's verdict first
        ({"response_logprob": None, "instruction_logprob": None}, None),  # not measured: no verdict
    ],
)
def test_logprob(over: dict[str, Any], reason: str | None) -> None:
    assert check(only("logprob"), **over) == reason
    nonfinite = any(v is not None and not math.isfinite(v) for v in over.values())
    loose = only("logprob", minResponseLogprob=-4.0, minInstructionLogprob=-4.0)
    assert check(loose, **over) == ("nonfinite_logprob" if nonfinite else None)


def test_critic() -> None:
    assert check(only("critic"), critic_score=3.0) == "low_critic_score"
    assert check(only("critic"), critic_score=8.0) is None
    assert check(only("critic"), critic_score=None) is None
    assert check(only("critic", minScore=9), critic_score=8.0) == "low_critic_score"


def test_pipeline_first_reason_in_spec_order_and_batch_equals_rows() -> None:
    rows = [
        example_row("Why?", response="I'm sorry, I cannot help with that."),
        example_row("Explain how photosynthesis works.", response="I'm sorry, I cannot help with that."),
        example_row("Explain how photosynthesis works.", response=GOOD, finish_reason="length"),
        example_row("Explain how photosynthesis works.", response=GOOD, response_logprob=float("nan")),
        example_row("Explain how photosynthesis works.", response=GOOD),
    ]
    a = QcPipeline.from_spec([QcFilter("length", {}), QcFilter("refusal", {}), QcFilter("finishReason", {}),
                              QcFilter("logprob", {})])  # fmt: skip
    b = QcPipeline.from_spec([QcFilter("refusal", {}), QcFilter("length", {})])
    want = ["instruction_too_short", "refusal", "truncated", "nonfinite_logprob", None]
    assert a.check_table(pa.Table.from_pylist(rows)) == want == [a.check(r) for r in rows]
    assert b.check(rows[0]) == "refusal"
    assert QcPipeline.from_spec([]).check(rows[0]) is None


@pytest.mark.parametrize(
    ("name", "column", "value", "params", "reason"),
    [
        ("relevance", "relevance", 0.05, {}, "irrelevant_response"),
        ("relevance", "relevance", 0.15, {}, None),  # the threshold itself passes
        ("relevance", "relevance", 0.4, {"minRelevance": 0.5}, "irrelevant_response"),
        ("relevance", "relevance", None, {}, None),  # no model loaded: no verdict
        ("domain", "domain_margin", 0.1, {}, "off_domain"),
        ("domain", "domain_margin", 0.0, {}, None),
        ("domain", "domain_margin", 0.3, {"maxMargin": 0.5}, None),
        ("domain", "domain_margin", None, {}, None),
    ],
)
def test_quality_signal_filters(name: str, column: str, value: float | None, params: dict, reason: str | None) -> None:
    assert check(only(name, **params), **{column: value}) == reason


def test_quality_signal_params_are_checked_by_the_api() -> None:
    from genrun.contract.api import SpecError, parse_spec

    base = {"model": {"name": "m"}, "target": {"uniqueExamples": 10}, "output": {"path": "/data/x"}}
    with pytest.raises(SpecError, match=r"spec.qc.filters\[0\].params.minRelevance: must be in \[-1, 1\]"):
        parse_spec(
            {
                **base,
                "prompt": {"domains": ["a"]},
                "qc": {"filters": [{"name": "relevance", "params": {"minRelevance": 3}}]},
            }
        )
    with pytest.raises(SpecError, match=r"the 'domain' filter needs spec\.prompt\.domains"):
        parse_spec({**base, "qc": {"filters": [{"name": "domain"}]}})
    parse_spec(
        {
            **base,
            "prompt": {"domains": ["a", "b"]},
            "qc": {"filters": [{"name": "domain", "params": {"maxMargin": 0.2}}]},
        }
    )


# The ASCII byte paths of the word, whitespace and letter/digit counts against the Unicode regexes they replace, on
# random texts that mix ASCII (letters, digits, '_', punctuation, every ASCII space incl. \v) with non-ASCII letters,
# digits, marks, spaces, symbols and emoji, as whole, sliced and null-bearing arrays.
_ALPHABET = list("abcXYZ019_ .,;:!?'\"-()\t\n\v\f\r") + list("éßİΣж²٣Ⅳ\u0301\u00a0\u2003—東京🙂ﬁ")


def _random_texts(seed: int, n: int) -> list[str | None]:
    import random

    rng = random.Random(seed)
    out: list[str | None] = []
    for _ in range(n):
        k = rng.random()
        pool = _ALPHABET[:30] if k < 0.6 else _ALPHABET  # most rows pure ASCII, as in model output
        out.append(None if k > 0.97 else "".join(rng.choice(pool) for _ in range(rng.randint(0, 40))))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_byte_paths_equal_the_regexes_on_random_texts(seed: int) -> None:
    import numpy as np
    import pyarrow.compute as pc
    from genrun.worker import qc

    texts = _random_texts(seed, 400)
    full = pa.array(texts, pa.string())
    for col in (pc.fill_null(full, ""), pc.fill_null(full, "").slice(37, 300)):
        ref_spaced = pc.utf8_trim(pc.replace_substring_regex(pc.utf8_lower(col), r"[^\p{L}\p{N}_]+", " "), " ")
        want = [[w for w in (s or "").split(" ") if w] for s in ref_spaced.to_pylist()]
        rows, codes, names = qc._words(col)
        got: list[list[str]] = [[] for _ in range(len(col))]
        for r, c in zip(rows.tolist(), codes.tolist(), strict=True):
            got[r].append(names[c].as_py())
        assert got == want
        alnum = np.asarray(pc.utf8_length(pc.replace_substring_regex(col, r"[^\p{L}\p{N}]+", "")))
        assert qc._alnum_counts(col).tolist() == alnum.tolist()
        chars = np.asarray(pc.utf8_length(pc.replace_substring_regex(col, r"\s+", "")))
        spaces = qc._row_counts(col, qc._SPACE)
        assert spaces is not None
        assert (np.asarray(pc.utf8_length(col)) - spaces).tolist() == chars.tolist()


def test_pipeline_on_random_rows_equals_row_by_row_checks() -> None:
    """Batch (byte paths over mostly ASCII rows) and one-row tables agree for every default filter."""
    from genrun.contract.records import example_schema

    p = QcPipeline.from_spec([QcFilter(n, {}) for n in ("length", "refusal", "echo", "repetition")])
    ins, res = _random_texts(11, 300), _random_texts(12, 300)
    res = [r if i % 7 else (ins[i] or "") + " " + (ins[i] or "") for i, r in enumerate(res)]  # some echoes
    rows = [example_row(i or "", response=r or "") for i, r in zip(ins, res, strict=True)]
    batch = p.check_table(pa.Table.from_pylist(rows, schema=example_schema()))
    assert batch == [p.check(r) for r in rows]
    assert len(set(batch)) > 3  # the random rows reach several reasons


def test_repetition_verdicts_of_a_batch_equal_a_direct_count_per_text() -> None:
    """The repetition filter's batch computation (every row's n-grams in one packed sort) against counting each
    text's word 3-grams directly, at several thresholds: random texts from a small vocabulary (so n-grams repeat),
    mixed case, punctuation and non-ASCII words, empty and short texts, in one batch of thousands of rows."""
    import random

    from genrun.contract.records import example_schema

    rng = random.Random(7)
    vocab = ["the", "The", "cat", "CAT", "café", "naïve", "日本", "sat", "on", "mat", "x_1", "42"]
    seps = [" ", "  ", ", ", ". ", "!\n", " - "]
    texts, words = [], []
    for _ in range(5000):
        ws = [rng.choice(vocab) for _ in range(rng.choice([0, 1, 3, 4, 5, 8, 20, 60]))]
        texts.append("".join(w + rng.choice(seps) for w in ws))
        words.append([w.lower() for w in ws])

    def direct(ws: list[str], n: int = 3) -> float:
        grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
        return 1 - len(set(grams)) / len(grams) if len(grams) > 3 else 0.0

    table = pa.Table.from_pylist([example_row("Explain it.", response=t) for t in texts], schema=example_schema())
    ratios = [direct(ws) for ws in words]
    for limit in (0.0, 0.1, 0.3, 0.5):
        got = only("repetition", maxRepeatedNgramRatio=limit, minAlnumRatio=0).check_table(table)
        assert got == ["repetition" if r > limit else None for r in ratios], limit
    assert sum(r > 0 for r in ratios) > 500  # the vocabulary makes repeats common: the check is not vacuous


def test_arrow_lower_case_maps_every_code_point_to_one() -> None:
    """Echo measures lengths before lower-casing (it lowers only the rows its substring test reads): right only while
    pc.utf8_lower maps each code point to exactly one, which this checks for every code point."""
    import pyarrow.compute as pc

    points = pa.array([chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000], pa.string())
    assert pc.all(pc.equal(pc.utf8_length(pc.utf8_lower(points)), 1)).as_py()


def test_echo_of_a_batch_equals_a_direct_check_per_row() -> None:
    """The batch echo filter (each side's words coded once per table, the instruction's words looked up in the
    responses' dictionary) against the rule applied to each row directly: responses made of their instruction's
    words, reordered, partly or with others, mixed case, punctuation and non-ASCII words, empty sides; and the
    repetition filter in the same pipeline (it reuses the responses' words) equal to it alone."""
    import random
    import re

    from genrun.contract.records import example_schema

    rng = random.Random(3)
    vocab = ["the", "The", "cat", "CAT", "café", "naïve", "日本", "sat", "on", "mat", "x_1", "42", "dog", "ran"]
    seps = [" ", "  ", ", ", ". ", "!\n", " - "]

    def text(ws: list[str]) -> str:
        return "".join(w + rng.choice(seps) for w in ws)

    rows, want = [], []
    for _ in range(3000):
        iw = [rng.choice(vocab) for _ in range(rng.choice([0, 1, 2, 4, 6, 10]))]
        k = rng.random()
        if k < 0.3:
            rw = rng.sample(iw, len(iw))  # the same words, reordered
        elif k < 0.6:
            rw = [w if rng.random() < 0.8 else rng.choice(vocab) for w in iw] * rng.choice([1, 2, 3])
        else:
            rw = [rng.choice(vocab) for _ in range(rng.choice([0, 3, 8, 20]))]
        ins, res = text(iw), text(rw)
        if rng.random() < 0.05:
            res = ins + " " + res[:5]  # the instruction verbatim inside a short response
        rows.append(example_row(ins, response=res))
        want.append((ins.strip().lower(), res.strip().lower()))
    table = pa.Table.from_pylist(rows, schema=example_schema())
    got = only("echo").check_table(table)

    def words(s: str) -> list[str]:
        return re.findall(r"[^\W]+", s)  # the vocabulary's words are runs of \w

    def direct(il: str, rl: str) -> str | None:
        if il and len(rl) < 2 * len(il) + 20 and il in rl:
            return "echo"
        iw, rw = words(il), words(rl)
        if not rw or len(rw) > 2 * len(set(iw)):
            return None
        return "echo" if sum(w in set(iw) for w in rw) / len(rw) >= 0.8 else None

    assert got == [direct(il, rl) for il, rl in want]
    assert 300 < got.count("echo") < 2700  # both verdicts are common: the check is not vacuous
    both = QcPipeline.from_spec([QcFilter("echo", {}), QcFilter("repetition", {})])
    alone = only("repetition").check_table(table)
    assert both.check_table(table) == [e or r for e, r in zip(got, alone, strict=True)]


def test_each_filter_judges_on_its_declared_columns_alone_as_on_whole_rows() -> None:
    """Each rule's record (genrun.contract.qc_rules) names every column its filter reads: the merge's QC workers take
    only those. Each filter, on random rows that reach its verdicts, judges the table of its columns as the whole
    table."""
    import random

    from genrun.contract.qc_rules import BY_NAME
    from genrun.contract.records import example_schema

    rng = random.Random(5)
    ins, res = _random_texts(21, 400), _random_texts(22, 400)
    rows = [
        example_row(
            i or "", response=(r or "") + rng.choice(["", " I am sorry", " foo"]),
            finish_reason=rng.choice(["stop", "length"]), instruction_logprob=rng.choice([-1.0, -5.0, float("nan")]),
            response_logprob=rng.choice([-1.0, -4.0]), critic_score=rng.choice([None, 2.0, 9.0]),
            relevance=rng.choice([None, 0.05, 0.5]), domain_margin=rng.choice([None, 0.0, 0.3]),
        )
        for i, r in zip(ins, res, strict=True)
    ]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=example_schema())
    params = {"bannedPatterns": {"patterns": ["foo"]}}
    for name, rule in BY_NAME.items():
        p = QcPipeline.from_spec([QcFilter(name, params.get(name, {}))])  # type: ignore[arg-type]
        cols = p.columns(table.column_names)
        assert set(cols) == set(rule.columns)
        got = p.check_table(table.select(cols))
        assert got == p.check_table(table) and any(got), name  # the rows reach the filter's verdicts
