"""Conditions: lastTransitionTime moves only when a status changes; Events come from status or reason changes."""

from __future__ import annotations

from genrun.contract.status import RunCondition
from genrun.operator import conditions as c

T0, T1 = "2026-11-25T10:00:00Z", "2026-11-25T11:00:00Z"


def running(reason: str = c.SHARDS_RUNNING) -> tuple[c.Condition, ...]:
    return (
        c.Condition(c.SUCCEEDED, "False", c.TARGET_NOT_MET, "round 1"),
        c.Condition(c.PROGRESSING, "True", reason, "round 1"),
    )


def test_first_conditions_take_the_current_time_and_generation() -> None:
    out = c.merge_conditions((), running(), 3, T0)
    assert [(x.type, x.status, x.reason) for x in out] == [
        (c.SUCCEEDED, "False", c.TARGET_NOT_MET),
        (c.PROGRESSING, "True", c.SHARDS_RUNNING),
    ]
    assert all(x.last_transition_time == T0 and x.observed_generation == 3 for x in out)


def test_transition_time_is_kept_while_the_status_holds_even_if_the_reason_changes() -> None:
    old = c.merge_conditions((), running(), 1, T0)
    out = c.merge_conditions(old, running(c.MERGING), 2, T1)
    assert [x.last_transition_time for x in out] == [T0, T0]
    assert out[1].reason == c.MERGING and out[1].observed_generation == 2


def test_transition_time_moves_when_the_status_flips() -> None:
    old = c.merge_conditions((), running(), 1, T0)
    done = (
        c.Condition(c.SUCCEEDED, "True", c.TARGET_MET, "met"),
        c.Condition(c.PROGRESSING, "False", c.RUN_FINISHED, "met"),
    )
    out = c.merge_conditions(old, done, 1, T1)
    assert [x.last_transition_time for x in out] == [T1, T1]


def test_events_come_from_status_or_reason_changes_only() -> None:
    old = c.merge_conditions((), running(), 1, T0)
    assert c.transitions(old, running()) == []
    changed = c.transitions(old, running(c.MERGING))
    assert [(x.type, x.reason) for x in changed] == [(c.PROGRESSING, c.MERGING)]
    assert [x.type for x in c.transitions((), running())] == [c.SUCCEEDED, c.PROGRESSING]


def test_long_messages_are_cut_to_the_crd_bound() -> None:
    out = c.Condition(c.FAILED, "True", c.INVALID_SPEC, "x" * 5000).recorded(1, T0)
    assert len(out.message) == 2048


def test_garbage_in_old_status_is_ignored() -> None:
    """A status read back with junk in its conditions (not objects, no status, no time) starts their clocks anew."""
    old = (
        RunCondition.from_dict({"type": c.SUCCEEDED, "status": "False"}),
        RunCondition.from_dict({"type": c.PROGRESSING}),
    )
    out = c.merge_conditions(old, running(), 1, T0)
    assert [x.last_transition_time for x in out] == [T0, T0]
