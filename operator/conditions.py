"""Condition types and reasons: one place, so status, events, metrics and docs agree on the words."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from genrun.contract.status import RunCondition

# Types: adjectives / past tense, per the Kubernetes API conventions.
SUCCEEDED = "Succeeded"
FAILED = "Failed"
PROGRESSING = "Progressing"
SUSPENDED = "Suspended"
CONDITION_TYPES = (SUCCEEDED, FAILED, PROGRESSING, SUSPENDED)
# Derived from the four above for generic health tools, listed after them (the Status printer column shows the first
# True condition): kstatus reads Reconciling (in progress) and Stalled (failed), Flux-style tools and humans read Ready,
# which a batch resource sets True once it is done and good.
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"

# Reasons: one CamelCase word each.
TARGET_MET = "TargetMet"
TARGET_NOT_MET = "TargetNotMet"
BUDGET_EXHAUSTED = "BudgetExhausted"
SHARDS_FAILED = "ShardsFailed"
MERGE_FAILED = "MergeFailed"
INVALID_SPEC = "InvalidSpec"
NOT_ALLOWED = "NotAllowed"  # an image or endpoint outside the operator's allow-lists (settings.py)
CHILD_REJECTED = "ChildRejected"  # the API server refused a Job or ConfigMap for good (422, ...)
SHARDS_QUARANTINED = "ShardsQuarantined"  # Warning Event: unreadable shards set aside
ROUND_STARTED = "RoundStarted"
ROUND_FINISHED = "RoundFinished"
SHARDS_RUNNING = "ShardsRunning"
MERGING = "Merging"
SUSPENDED_BY_SPEC = "SuspendedBySpec"
NOT_SUSPENDED = "NotSuspended"
RUN_FINISHED = "RunFinished"
NO_FAILURE = "NoFailure"
ESCALATED = "Escalated"
STEPPED_BACK = "SteppedBack"
HELD = "Held"

NOT_DONE = "NotDone"  # Ready=False while the run is still going or suspended


@dataclass(frozen=True)
class Condition:
    """A condition as the planner decides it; published as a RunCondition (with its generation and time)."""

    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""

    def recorded(self, generation: int, transition_time: str) -> RunCondition:
        return RunCondition(self.type, self.status, self.reason, self.message[:2048], generation, transition_time)


def merge_conditions(
    old: Sequence[RunCondition], new: tuple[Condition, ...], generation: int, now: str
) -> tuple[RunCondition, ...]:
    """Keep lastTransitionTime when a condition's status did not change (the time is the effect layer's clock)."""
    previous = {c.type: c for c in old}
    out = []
    for cond in new:
        before = previous.get(cond.type)
        when = now
        if before is not None and before.status == cond.status and before.last_transition_time:
            when = before.last_transition_time
        out.append(cond.recorded(generation, when))
    return tuple(out)


def transitions(old: Sequence[RunCondition], new: tuple[Condition, ...]) -> list[Condition]:
    """Conditions whose status or reason changed: what deserves a Kubernetes Event."""
    previous = {c.type: (c.status, c.reason) for c in old}
    return [c for c in new if previous.get(c.type) != (c.status, c.reason)]
