"""What every engine speaks (the in-process vLLM and replay engines in engine.py, the OpenAI-compatible endpoint in
openai_engine.py): request parameters, completions, the protocol and the not-retriable model error. A module of its
own so that engine.py can choose an engine without the engines importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Params:
    n: int
    temperature: float
    top_p: float
    repetition_penalty: float
    min_p: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    logprob: float | None  # cumulative log-probability of the sampled tokens
    finish_reason: str  # "stop" | "length"

    @property
    def mean_logprob(self) -> float | None:
        return self.logprob / self.tokens if self.logprob is not None and self.tokens else None


class Engine(Protocol):
    model: str

    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]: ...


class ModelError(Exception):
    """The model cannot be found or loaded (not retriable)."""
