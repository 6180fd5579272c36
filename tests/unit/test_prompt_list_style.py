"""spec.prompt.style: the list style (the problem's completion-style few-shot list with topic tags) and the blocks
default. Prompt bytes are asserted whole; the completions parsed below are written to look like what SmolLM2-135M
writes to examples/problem.yaml's prompt (the issue's own examples of its fragments and word salad among them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from genrun.contract.api import SpecError, parse_spec, semantic_errors
from genrun.contract.records import Sampling, ShardPlan
from genrun.worker.engine_types import Completion, Params
from genrun.worker.prompts import INSTRUCTION_STOPS, LIST_STOPS, PromptBuilder, parse_list_item

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "model": {"name": "m"},
    "target": {"uniqueExamples": 1},
    "output": {"path": "/x"},
    "prompt": {
        "template": "Questions people ask, one per line:\n\n{examples}",
        "domains": ["Science", "History"],
        "examplesPerPrompt": 2,
        "examples": [
            {
                "instruction": "Explain photosynthesis.",
                "response": "Plants make sugar from light.",
                "domain": "Science",
            },
            {"instruction": "When did World War II begin?", "response": "In 1939.", "domain": "History"},
        ],
    },
}


def _spec(style: str | None = None, **prompt: object) -> object:
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["prompt"].update(prompt)
    if style is not None:
        raw["prompt"]["style"] = style
    return parse_spec(raw)


def _shard(domains: tuple[str, ...] = ("Science", "History")) -> ShardPlan:
    return ShardPlan(1, 5, 0, 10, Sampling(0.7, 0.9, 1.1, 0.0, 64), domains)


def test_list_prompt_bytes_number_the_examples_and_end_at_the_next_tag() -> None:
    b = PromptBuilder.for_shard(_spec("list"), _shard())
    assert b.instruction_prompt(0) == (
        "Questions people ask, one per line:\n\n"
        "1. [Science] Explain photosynthesis.\n"
        "2. [History] When did World War II begin?\n"
        "3. [Science]"
    )
    # prompt 1 is History's: its own example first, then the rest rotated
    assert b.instruction_prompt(1).endswith("1. [History] When did World War II begin?\n"
                                           "2. [Science] Explain photosynthesis.\n3. [History]")  # fmt: skip
    assert b.instruction_stops == LIST_STOPS == ("\n",)


def test_list_prompt_without_domains_leaves_the_tag_to_the_model() -> None:
    b = PromptBuilder.for_shard(_spec("list", domains=[]), _shard(()))
    assert b.instruction_prompt(0).endswith("2. [History] When did World War II begin?\n3.")


def test_list_style_asks_responses_in_the_blocks_style_under_the_default_template() -> None:
    default_template = {k: v for k, v in BASE["prompt"].items() if k != "template"}
    blocks = PromptBuilder.for_shard(parse_spec({**BASE, "prompt": default_template}), _shard())
    listed = PromptBuilder.for_shard(_spec("list"), _shard())
    assert listed.response_prompt(1, "Who was Napoleon?") == blocks.response_prompt(1, "Who was Napoleon?")
    assert listed.response_prompt(1, "Who was Napoleon?").endswith(
        "### Instruction:\nWho was Napoleon?\n\n### Response:\n"
    )


def test_blocks_is_the_default_and_its_bytes_do_not_change() -> None:
    default, explicit = (PromptBuilder.for_shard(s, _shard()) for s in (_spec(), _spec("blocks")))
    assert default.style == "blocks"
    expected = (
        "Questions people ask, one per line:\n\n"
        "### Instruction:\nExplain photosynthesis.\n\n### Response:\nPlants make sugar from light.\n\n"
        "### Instruction:\nWhen did World War II begin?\n\n### Response:\nIn 1939.\n\n"
        "### Instruction:\n"
    )
    assert default.instruction_prompt(0) == explicit.instruction_prompt(0) == expected
    assert default.instruction_stops == INSTRUCTION_STOPS


@pytest.mark.parametrize(
    ("text", "finish", "expected"),
    [
        (" How many days are in a month?", "stop", ("How many days are in a month?", "")),
        (" What is the capital of France?\n6. [Math] What is 2+2?", "stop", ("What is the capital of France?", "")),
        # no domain given: the model writes its own tag first
        (" [Geography] What is the longest river in Africa?", "stop", ("What is the longest river in Africa?", "")),
        # it went on with the next item on the same line
        (" Who wrote Hamlet? 6. [Literature] Who wrote Macbeth?", "stop", ("Who wrote Hamlet?", "")),
        (' "What causes rain?"', "stop", ("What causes rain?", "")),
        # fragments: too short to be an instruction, a stub, an empty line, a line cut by the token limit
        (" solve 8 5", "stop", ("solve 8 5", "")),
        (" Volcano", "stop", (None, "instruction_too_short")),
        ("", "stop", (None, "empty_instruction")),
        (" [Math]", "stop", (None, "empty_instruction")),
        (" biology the human body part 6 lungs work double fold in rapi", "length", (None, "instruction_truncated")),
    ],
)
def test_list_items_parse_to_one_instruction_per_completion(text: str, finish: str, expected: tuple) -> None:
    assert parse_list_item(text, finish) == expected
    b = PromptBuilder.for_shard(_spec("list"), _shard())
    assert b.parse_instruction(text, finish) == expected


def test_list_style_rejects_joint_mode_and_multi_line_examples_with_the_fix() -> None:
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["prompt"]["style"] = "list"
    raw["generation"] = {"mode": "joint"}
    raw["prompt"]["examples"][0]["instruction"] = "Explain\nphotosynthesis."
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    errors = info.value.errors
    assert any(e.startswith("spec.prompt.style: list writes instructions only") and "instructionsFirst" in e
               for e in errors), errors  # fmt: skip
    assert any(e.startswith("spec.prompt.examples[0].instruction: spans lines") for e in errors), errors
    with pytest.raises(SpecError, match=r"spec\.prompt\.style"):
        parse_spec({**BASE, "prompt": {**BASE["prompt"], "style": "bullets"}})


def test_the_problem_manifest_is_valid_and_in_the_list_style() -> None:
    spec = parse_spec(yaml.safe_load((ROOT / "examples" / "problem.yaml").read_text())["spec"])
    assert semantic_errors(spec) == []
    assert spec.prompt.style == "list"
    s = spec.sampling
    assert (s.temperature, s.top_p, s.repetition_penalty) == (0.7, 0.9, 1.1)


class _ScriptedListEngine:
    """Emulated engine (no model): answers list-style instruction prompts with scripted one-line completions and
    response prompts with a fixed answer, recording the stops it was asked with."""

    model = "scripted"

    def __init__(self) -> None:
        self.stops: list[tuple[str, ...]] = []
        self.lines = iter([" What is the capital of France?", " Volcano", " What is the capital of France?",
                           " Why is the sky blue?"] * 50)  # fmt: skip

    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]:
        self.stops += [p.stop for p in params]
        if params and params[0].stop == LIST_STOPS:
            return [[Completion(next(self.lines), 8, -8.0, "stop")] for _ in prompts]
        return [[Completion("A clear answer of some length.", 9, -9.0, "stop")] for _ in prompts]


def test_a_list_style_shard_with_a_scripted_engine_keeps_one_row_per_novel_line(tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    from genrun.contract import records as rec
    from genrun.worker.generate import generate_shard
    from genrun.worker.storage import LocalStorage

    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["prompt"]["style"] = "list"
    raw["dedup"] = {"semantic": {"enabled": False}}
    spec = parse_spec(raw)
    shard = ShardPlan(1, 5, 0, 2, Sampling(0.7, 0.9, 1.1, 0.0, 64), ("Science", "History"))
    engine = _ScriptedListEngine()
    m = generate_shard(LocalStorage(str(tmp_path)), spec, shard, engine)
    rows = pq.read_table(tmp_path / rec.shard_data_key(1, 5)).to_pylist()
    assert [r["instruction"] for r in rows] == ["What is the capital of France?", "Why is the sky blue?"]
    assert m.malformed >= 1  # "Volcano" was rejected as too short
    assert LIST_STOPS in engine.stops and INSTRUCTION_STOPS not in engine.stops
