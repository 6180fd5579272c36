"""One engine shared by the shards an engine host serves at once: their requests go to the engine in one batch.

An engine's throughput grows with its batch (a decode step on CPU costs about the same for 30 sequences as for 250,
and a GPU engine is sized for hundreds), while one seed shard asks for a few dozen prompts at a time and a pilot probe
for a handful. So the host runs the shards it has queued side by side, each in its own thread through the same
`Batcher`, which waits until every shard still running has asked (or ended) and then calls the engine once with all
of their requests. This is what vLLM's server does across shard Jobs on a cluster; here it is one process.

What a shard generates does not depend on its neighbours: every request carries its own sampling seed. (A real
engine's arithmetic can still differ slightly with the batch's composition, as an online server's does.)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from genrun.worker.engine_types import Completion, Engine, Params


@dataclass
class _Ask:
    prompts: list[str]
    params: list[Params]
    result: list[list[Completion]] | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


class Batcher:
    """An Engine for several threads at once (each a member between `join` and `leave`): their concurrent calls
    become one engine call."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model = getattr(engine, "model", "")
        self._cond = threading.Condition()
        self._members = 0
        self._waiting: list[_Ask] = []
        self._busy = False

    def join(self) -> None:
        """One more member: from now on a batch waits for its request (or its `leave`). Called before the member's
        thread starts, so that shards started together are batched together from their first request."""
        with self._cond:
            self._members += 1

    def leave(self) -> None:
        with self._cond:
            self._members -= 1
            self._cond.notify_all()  # the others may now be all there is to wait for

    @contextmanager
    def member(self) -> Iterator[None]:
        self.join()
        try:
            yield
        finally:
            self.leave()

    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]:
        ask = _Ask(prompts, params)
        with self._cond:
            self._waiting.append(ask)
            while not ask.done:
                if not self._busy and len(self._waiting) >= self._members:
                    self._lead()  # releases the lock while the engine runs
                else:
                    self._cond.wait()
        if ask.error is not None:
            raise ask.error
        assert ask.result is not None
        return ask.result

    def _lead(self) -> None:
        """Called with the lock held: send every waiting request to the engine in one call, then hand out results."""
        batch, self._waiting, self._busy = self._waiting, [], True
        prompts = [p for a in batch for p in a.prompts]
        params = [p for a in batch for p in a.params]
        self._cond.release()
        outs: list[list[Completion]] = []
        error: BaseException | None = None
        try:
            outs = self.engine.generate(prompts, params) if prompts else []
        except BaseException as exc:  # every shard of the batch sees the engine's failure as its own
            error = exc
        finally:
            self._cond.acquire()
        start = 0
        for a in batch:
            if error is None:
                a.result = outs[start : start + len(a.prompts)]
            a.error, a.done = error, True
            start += len(a.prompts)
        self._busy = False
        self._cond.notify_all()
