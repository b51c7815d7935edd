"""Status conditions: lastTransitionTime moves only when the status flips; a Ready change is news."""

from __future__ import annotations

import datetime as dt

import pytest

from kvpn_operator.api import Condition
from kvpn_operator.conditions import READY, Outcome, find, set_condition
from kvpn_operator.reporting import Report

T0 = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
T1 = dt.datetime(2024, 5, 1, 12, 5, 30, 123456, tzinfo=dt.UTC)


def condition(type_: str = READY, status: str = "True", reason: str = "Ready", message: str = "ok") -> Condition:
    return Condition.model_validate(
        {
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": T0.isoformat(),
            "observedGeneration": 1,
        }
    )


def test_first_condition_is_added_at_now_without_microseconds() -> None:
    [ready] = set_condition([], type_=READY, outcome=Outcome.ready("Ready", "serving"), generation=3, now=T1)
    assert (ready.type, ready.status, ready.reason, ready.message) == (READY, "True", "Ready", "serving")
    assert ready.last_transition_time == T1.replace(microsecond=0)
    assert ready.observed_generation == 3


def test_reason_and_message_change_keeps_last_transition_time() -> None:
    before = [condition(status="False", reason="EndpointPending", message="waiting for the load balancer")]
    outcome = Outcome.waiting("NoRoutes", "set spec.routes")
    [ready] = set_condition(before, type_=READY, outcome=outcome, generation=2, now=T1)
    assert (ready.status, ready.reason, ready.message) == ("False", "NoRoutes", "set spec.routes")
    assert ready.last_transition_time == T0
    assert ready.observed_generation == 2


@pytest.mark.parametrize(
    ("old", "outcome"),
    [
        ("False", Outcome.ready("Ready", "serving")),
        ("True", Outcome.waiting("EndpointPending", "waiting")),
        ("True", Outcome.rejected("InvalidSpec", "spec.mtu: too small")),
        ("Unknown", Outcome.ready("Ready", "serving")),
    ],
)
def test_status_flip_moves_last_transition_time(old: str, outcome: Outcome) -> None:
    [ready] = set_condition([condition(status=old)], type_=READY, outcome=outcome, generation=1, now=T1)
    assert ready.status == outcome.status
    assert ready.last_transition_time == T1.replace(microsecond=0)


def test_other_condition_types_are_untouched_and_keep_their_place() -> None:
    degraded, ready, synced = condition("Degraded", "False"), condition(), condition("Synced", "True")
    after = set_condition(
        [degraded, ready, synced], type_=READY, outcome=Outcome.waiting("Pending", "wait"), generation=1, now=T1
    )
    assert [c.type for c in after] == ["Degraded", READY, "Synced"]
    assert after[0] is degraded
    assert after[2] is synced
    assert find(after, READY) == after[1]
    assert after[1].status == "False"


def test_new_type_is_appended_after_the_others() -> None:
    degraded = condition("Degraded", "False")
    after = set_condition([degraded], type_=READY, outcome=Outcome.ready("Ready", "ok"), generation=1, now=T1)
    assert after[0] is degraded
    assert [c.type for c in after] == ["Degraded", READY]


def test_same_outcome_again_gives_equal_conditions() -> None:
    """A reconcile that finds nothing new must produce the same list, or status would be rewritten each time."""
    outcome = Outcome.ready("Ready", "serving")
    once = set_condition([], type_=READY, outcome=outcome, generation=1, now=T0)
    twice = set_condition(once, type_=READY, outcome=outcome, generation=1, now=T1)
    assert twice == once


def test_find_returns_none_when_absent() -> None:
    assert find([condition("Degraded")], READY) is None


def test_rejected_outcomes_are_warnings() -> None:
    assert Outcome.rejected("InvalidSpec", "bad").warning
    assert not Outcome.waiting("Pending", "wait").warning
    assert not Outcome.ready("Ready", "ok").warning


@pytest.mark.parametrize(
    ("before", "outcome", "transition"),
    [
        ([], Outcome.ready("Ready", "ok"), True),
        ([condition()], Outcome.ready("Ready", "ok"), False),
        ([condition()], Outcome.ready("Ready", "serving elsewhere"), True),
        ([condition()], Outcome.ready("Moved", "ok"), True),
        ([condition()], Outcome.waiting("Ready", "ok"), True),
        ([condition("Degraded")], Outcome.ready("Ready", "ok"), True),
    ],
    ids=["first", "same", "message", "reason", "status", "other-type-only"],
)
def test_report_is_a_transition_when_ready_changes(before: list[Condition], outcome: Outcome, transition: bool) -> None:
    after = set_condition(before, type_=READY, outcome=outcome, generation=1, now=T1)
    report = Report.of(before, after, outcome)
    assert report.transition is transition
    assert report.outcome is outcome


def test_report_ignores_time_and_generation() -> None:
    """A resync with a newer generation but the same verdict sends no Event."""
    before = [condition()]
    after = set_condition(before, type_=READY, outcome=Outcome.ready("Ready", "ok"), generation=7, now=T1)
    assert not Report.of(before, after, Outcome.ready("Ready", "ok")).transition
