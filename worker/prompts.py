"""Few-shot prompts for a base model, and robust parsing of what it writes back."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from genrun.contract.api import FewShotExample, GenerationRunSpec
    from genrun.contract.records import ShardPlan

INSTRUCTION = "### Instruction:\n"
RESPONSE = "### Response:\n"
NO_DOMAIN = "a wide range of everyday topics"
# Stops: the model tends to start the next example; "\n\n" ends a one-paragraph instruction.
INSTRUCTION_STOPS = ("### Response", "###", "\n\n")
RESPONSE_STOPS = ("### Instruction", "### Response", "\n\n\n")
JOINT_STOPS = ("### Instruction",)


_MARKER_LINE = re.compile(r"(?:^|\n)[ \t]*##")


def format_example(instruction: str, response: str) -> str:
    return f"{INSTRUCTION}{instruction.strip()}\n\n{RESPONSE}{response.strip()}\n\n"


def attribute_values(
    attributes: tuple[tuple[str, tuple[str, ...]], ...], cell: tuple[tuple[str, str], ...], seed: int, index: int
) -> tuple[tuple[str, str], ...]:
    """The (attribute, value) pairs of prompt `index` of the shard with `seed`: the shard's cell where the planner
    gave it one, else each value drawn from a hash of (seed, index, attribute), so a rerun of the shard builds the
    same prompts and prompts of one shard cover the combinations evenly in expectation."""
    fixed = dict(cell)
    out = []
    for name, values in attributes:
        if name in fixed:
            out.append((name, fixed[name]))
            continue
        h = hashlib.sha256(f"{seed}/{index}/{name}".encode()).digest()
        out.append((name, values[int.from_bytes(h[:8], "big") % len(values)]))
    return tuple(out)


@dataclass(frozen=True)
class PromptBuilder:
    template: str
    domains: tuple[str, ...]
    examples: tuple[FewShotExample, ...]
    per_prompt: int
    ordinal: int  # the shard's position in the run: rotates few-shot examples across shards
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()  # spec.prompt.attributes as (name, values)
    cell: tuple[tuple[str, str], ...] = ()  # the shard's cell, if the planner gave it one
    seed: int = 0

    @classmethod
    def for_shard(cls, spec: GenerationRunSpec, shard: ShardPlan) -> PromptBuilder:
        p = spec.prompt
        attrs = tuple((a.name, tuple(a.values)) for a in p.attributes)
        return cls(
            p.template,
            tuple(shard.domains),
            tuple(p.examples),
            p.examples_per_prompt,
            shard.ordinal,
            attrs,
            tuple(shard.cell),
            shard.seed,
        )

    def domain(self, index: int) -> str:
        return self.domains[index % len(self.domains)] if self.domains else ""

    def values(self, index: int) -> tuple[tuple[str, str], ...]:
        return attribute_values(self.attributes, self.cell, self.seed, index) if self.attributes else ()

    def prefix(self, index: int) -> str:
        """The prompt up to (not including) the instruction to be generated. Attribute values fill their
        placeholders; those the template does not name are appended to the domain ("cooking (audience: kids)")."""
        domain = self.domain(index)
        values = self.values(index)
        shots = ""
        if self.examples and self.per_prompt:
            # Prefer examples of this prompt's domain, then rotate through the rest.
            same = [e for e in self.examples if domain and e.domain == domain]
            rest = [e for e in self.examples if e not in same]
            k = (self.ordinal * 7 + index) % len(rest) if rest else 0
            pool = same + rest[k:] + rest[:k]
            shots = "".join(format_example(e.instruction, e.response) for e in pool[: self.per_prompt])
        named = {n: v for n, v in values if "{" + n + "}" in self.template}
        others = "; ".join(f"{n}: {v}" for n, v in values if n not in named)
        shown = (domain or NO_DOMAIN) + (f" ({others})" if others else "")
        return self.template.format(domain=shown, examples=shots, **named).rstrip() + "\n\n"

    def instruction_prompt(self, index: int) -> str:
        return self.prefix(index) + INSTRUCTION

    def response_prompt(self, index: int, instruction: str) -> str:
        return f"{self.prefix(index)}{INSTRUCTION}{instruction.strip()}\n\n{RESPONSE}"


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def parse_instruction(text: str, finish_reason: str) -> tuple[str | None, str]:
    """(instruction, "") or (None, reason). A base model rambles: keep the first paragraph, drop markers."""
    t = text.replace("\r\n", "\n")
    for stop in INSTRUCTION_STOPS:
        t = t.split(stop, 1)[0]
    t = t.strip().strip('"').strip()
    if not t:
        return None, "empty_instruction"
    if finish_reason == "length":
        return None, "instruction_truncated"
    if len(t) < 8 or len(t.split()) < 2:
        return None, "instruction_too_short"
    return t, ""


def parse_response(text: str) -> tuple[str | None, str]:
    t = text.replace("\r\n", "\n")
    for stop in RESPONSE_STOPS:
        t = t.split(stop, 1)[0]
    # A completion cut by max_tokens can end inside the next marker ("### Instr"): drop any line that starts one.
    t = _MARKER_LINE.split(t, maxsplit=1)[0].strip()
    if not t:
        return None, "empty_response"
    return t, ""


def parse_joint(text: str, finish_reason: str) -> tuple[tuple[str, str] | None, str]:
    """Joint mode: the model wrote "instruction ### Response: response" in one go."""
    if "### Response" not in text:
        return None, "no_response_marker"
    head, _, tail = text.partition("### Response")
    tail = tail.lstrip(":").lstrip("\n ")
    ins, why = parse_instruction(head, "stop")
    if ins is None:
        return None, why
    res, why = parse_response(tail)
    if res is None:
        return None, why
    return (ins, res), ""
