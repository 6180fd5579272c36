"""Few-shot prompts for a base model, and robust parsing of what it writes back."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from genrun.contract.api import FewShotExample, GenerationRunSpec
    from genrun.contract.records import ShardPlan

from genrun.contract.api import DEFAULT_TEMPLATE

INSTRUCTION = "### Instruction:\n"
RESPONSE = "### Response:\n"
NO_DOMAIN = "a wide range of everyday topics"
# Stops: the model tends to start the next example; "\n\n" ends a one-paragraph instruction.
INSTRUCTION_STOPS = ("### Response", "###", "\n\n")
RESPONSE_STOPS = ("### Instruction", "### Response", "\n\n\n")
JOINT_STOPS = ("### Instruction",)
# The list style (spec.prompt.style: list): one item a line, so the item ends at the newline.
LIST_STOPS = ("\n",)
_LIST_TAG = re.compile(r"^\[[^\]\n]{0,80}\]")  # the "[Domain]" the model wrote itself (no domain given)
_NEXT_ITEM = re.compile(r"\s+\d{1,3}\.\s*\[")  # " 6. [History] ...": the model went on with the next item inline


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
    style: str = "blocks"  # spec.prompt.style: "blocks" (### Instruction/### Response) or "list" (a numbered list)

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
            getattr(p, "style", "blocks"),
        )

    def domain(self, index: int) -> str:
        return self.domains[index % len(self.domains)] if self.domains else ""

    def values(self, index: int) -> tuple[tuple[str, str], ...]:
        return attribute_values(self.attributes, self.cell, self.seed, index) if self.attributes else ()

    def prefix(self, index: int, template: str | None = None) -> str:
        """The prompt up to (not including) the instruction to be generated, in the blocks style. Attribute values
        fill their placeholders; those the template does not name are appended to the domain ("cooking (audience:
        kids)"). `template`: another framing than spec.prompt.template (the list style's response prompt)."""
        template = self.template if template is None else template
        shots = "".join(format_example(e.instruction, e.response) for e in self._pool(index))
        return self._frame(template, index, shots) + "\n\n"

    def _pool(self, index: int) -> list[FewShotExample]:
        """The few-shot examples prompt `index` shows: its domain's own first, then the rest rotated by the shard's
        position and the prompt's index."""
        if not (self.examples and self.per_prompt):
            return []
        domain = self.domain(index)
        same = [e for e in self.examples if domain and e.domain == domain]
        rest = [e for e in self.examples if e not in same]
        k = (self.ordinal * 7 + index) % len(rest) if rest else 0
        return (same + rest[k:] + rest[:k])[: self.per_prompt]

    def _frame(self, template: str, index: int, examples: str) -> str:
        """`template` filled for prompt `index` (its domain, attribute values and `examples`), trailing space cut."""
        values = self.values(index)
        named = {n: v for n, v in values if "{" + n + "}" in template}
        shown = (self.domain(index) or NO_DOMAIN) + self._others(index, named)
        return template.format(domain=shown, examples=examples, **named).rstrip()

    def _others(self, index: int, named: dict[str, str] | None = None) -> str:
        """The attribute values the template does not name, as " (name: value; ...)", or ""."""
        others = "; ".join(f"{n}: {v}" for n, v in self.values(index) if n not in (named or {}))
        return f" ({others})" if others else ""

    def list_prompt(self, index: int) -> str:
        """The list style's instruction prompt: the few-shot instructions as a numbered list tagged with their
        domains ("1. [Science] Explain photosynthesis"), then the next number and this prompt's domain tag for the
        model to complete. Without a domain the prompt ends at the number, and the model writes a tag of its own."""
        shots = self._pool(index)
        items = "\n".join(f"{n}. {_tag(e.domain)}{e.instruction.strip()}" for n, e in enumerate(shots, 1))
        named = {n: v for n, v in self.values(index) if "{" + n + "}" in self.template}
        domain = self.domain(index)
        tag = f" [{domain}{self._others(index, named)}]" if domain else ""
        # The prompt ends without a trailing space: a space-ended prompt pushes a BPE model off its usual tokens.
        return f"{self._frame(self.template, index, items)}\n{len(shots) + 1}.{tag}"

    def instruction_prompt(self, index: int) -> str:
        if self.style == "list":
            return self.list_prompt(index)
        return self.prefix(index) + INSTRUCTION

    @property
    def instruction_stops(self) -> tuple[str, ...]:
        return LIST_STOPS if self.style == "list" else INSTRUCTION_STOPS

    def parse_instruction(self, text: str, finish_reason: str) -> tuple[str | None, str]:
        """What an instruction prompt's completion holds, in this builder's style."""
        if self.style == "list":
            return parse_list_item(text, finish_reason)
        return parse_instruction(text, finish_reason)

    def response_prompt(self, index: int, instruction: str) -> str:
        """The response prompt, in the blocks style in both styles (a list holds no responses to imitate); the list
        style frames it with the default template, since its own template frames a list."""
        template = DEFAULT_TEMPLATE if self.style == "list" else None
        return f"{self.prefix(index, template)}{INSTRUCTION}{instruction.strip()}\n\n{RESPONSE}"


def _tag(domain: str) -> str:
    return f"[{domain.strip()}] " if domain.strip() else ""


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


def parse_list_item(text: str, finish_reason: str) -> tuple[str | None, str]:
    """(instruction, "") or (None, reason) from a list-style completion: the rest of its line, without a "[Domain]"
    tag the model wrote itself and without a next item it went on to on the same line ("... 6. [Math] ...")."""
    t = text.replace("\r\n", "\n").split("\n", 1)[0].strip()
    t = _LIST_TAG.sub("", t, count=1)
    t = _NEXT_ITEM.split(t, maxsplit=1)[0]
    return parse_instruction(t, finish_reason)


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
