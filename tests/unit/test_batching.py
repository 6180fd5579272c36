"""worker/batching.Batcher: the shards an engine host runs at once share the engine's batches."""

from __future__ import annotations

import threading

import pytest
from genrun.worker.batching import Batcher
from genrun.worker.engine_types import Completion, Params


class CountingEngine:
    """Answers each prompt with itself and counts the calls and their sizes (the batches the engine saw)."""

    model = "counting"

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.fail = fail

    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]:
        self.batches.append(len(prompts))
        if self.fail:
            raise RuntimeError("engine died")
        return [[Completion(f"{p}/{q.seed}", 1, None, "stop")] for p, q in zip(prompts, params, strict=True)]


def params(seed: int) -> Params:
    return Params(1, 0.7, 0.9, 1.1, 0.0, 8, (), seed)


def run_members(batcher: Batcher, asks: list[list[list[str]]]) -> list[list[list[str]]]:
    """Each member (a thread) makes its calls in turn; returns the texts each call got back."""
    got: list[list[list[str]]] = [[] for _ in asks]
    errors: list[BaseException] = []

    def member(i: int) -> None:
        try:
            for call in asks[i]:
                outs = batcher.generate(call, [params(100 * i + k) for k in range(len(call))])
                got[i].append([o[0].text for o in outs])
        except BaseException as exc:
            errors.append(exc)
        finally:
            batcher.leave()

    threads = [threading.Thread(target=member, args=(i,)) for i in range(len(asks))]
    for _ in threads:
        batcher.join()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return got


def test_members_asking_together_share_one_engine_call_and_each_gets_its_own_answers() -> None:
    engine = CountingEngine()
    asks = [[["a1", "a2"], ["a3"]], [["b1", "b2", "b3"], ["b4"]], [["c1"], ["c2", "c3"]]]
    got = run_members(Batcher(engine), asks)
    assert engine.batches == [6, 4]  # two rounds of requests, each one batch of every member's prompts
    for i, calls in enumerate(asks):
        assert got[i] == [[f"{p}/{100 * i + k}" for k, p in enumerate(call)] for call in calls]


def test_a_member_that_ends_early_does_not_hold_up_the_others() -> None:
    engine = CountingEngine()
    got = run_members(Batcher(engine), [[["a1"]], [["b1"], ["b2"], ["b3"]]])
    assert engine.batches == [2, 1, 1]
    assert got[1] == [["b1/100"], ["b2/100"], ["b3/100"]]


def test_an_engine_failure_reaches_every_member_of_the_batch() -> None:
    batcher = Batcher(CountingEngine(fail=True))
    with pytest.raises(RuntimeError, match="engine died"):
        run_members(batcher, [[["a1"]], [["b1"]]])
    # The batcher is still usable: the failure ended that batch only.
    batcher.engine = CountingEngine()
    assert run_members(batcher, [[["c1"]]]) == [[["c1/0"]]]
