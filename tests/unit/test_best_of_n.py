"""Best-of-N: n candidates per instruction ranked by a critic. ScriptedEngine is a test double that returns fixed
completions (named so); the real engine's n>1 sampling is exercised in tests/e2e via vLLM's `n`."""

from __future__ import annotations

from genrun.worker.engine import Completion, Params
from genrun.worker.generate import Candidate, Critic, Judge


class ScriptedEngine:
    model = "scripted"

    def __init__(self, answers: list[str]) -> None:
        self.answers, self.prompts = answers, []

    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]:
        self.prompts += prompts
        return [[Completion(a, 2, None, "stop")] for a in self.answers[: len(prompts)]]


def test_logprob_critic_picks_the_best_mean_token_logprob() -> None:
    cands = [Completion("a", 10, -30.0, "stop"), Completion("b", 4, -4.0, "stop"), Completion("c", 2, None, "stop")]
    assert Critic().best("Explain tides.", cands) == (1, None, 0)  # -1.0 per token beats -3.0; no logprob ranks last


def test_judge_critic_scores_with_the_rubric_and_keeps_the_score() -> None:
    engine = ScriptedEngine([" 3", " 9/10", "seven"])
    critic = Critic(Judge(engine, "Rate {response} for {instruction}. Score:", seed=1))
    cands = [Completion(t, 5, -5.0, "stop") for t in ("meh", "The Moon's gravity pulls the oceans.", "?")]
    pick = critic.pick(Candidate(4, "Explain tides.", Completion("Explain tides.", 3, -1.0, "stop")), cands)
    assert (pick.completion, pick.score, pick.options) == (cands[1], 9.0, 3)
    assert pick.judge_tokens == 3 * 2  # the judge's own generations are paid for: 2 tokens per scripted answer
    assert engine.prompts[1] == "Rate The Moon's gravity pulls the oceans. for Explain tides.. Score:"
