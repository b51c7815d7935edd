"""Status conditions: lastTransitionTime moves only on a flip; Ready changes are news; stale ones are not current."""

from __future__ import annotations

import datetime as dt

import pytest

from kvpn_core.api import Condition
from kvpn_core.conditions import (
    CLUSTER_DNS,
    GATEWAYS,
    POD_NETWORK,
    READY,
    SERVER_CONDITIONS,
    Outcome,
    Reason,
    condition_of,
    find,
    find_current,
    is_ready,
    set_condition,
)
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
    [ready] = set_condition([], type_=READY, outcome=Outcome.ready(Reason.READY, "serving"), generation=3, now=T1)
    assert (ready.type, ready.status, ready.reason, ready.message) == (READY, "True", "Ready", "serving")
    assert ready.last_transition_time == T1.replace(microsecond=0)
    assert ready.observed_generation == 3


def test_reason_and_message_change_keeps_last_transition_time() -> None:
    before = [condition(status="False", reason="EndpointPending", message="waiting for the load balancer")]
    outcome = Outcome.waiting(Reason.NO_ROUTES, "set spec.routes")
    [ready] = set_condition(before, type_=READY, outcome=outcome, generation=2, now=T1)
    assert (ready.status, ready.reason, ready.message) == ("False", "NoRoutes", "set spec.routes")
    assert ready.last_transition_time == T0
    assert ready.observed_generation == 2


@pytest.mark.parametrize(
    ("old", "outcome"),
    [
        ("False", Outcome.ready(Reason.READY, "serving")),
        ("True", Outcome.waiting(Reason.ENDPOINT_PENDING, "waiting")),
        ("True", Outcome.rejected(Reason.INVALID_SPEC, "spec.mtu: too small")),
        ("Unknown", Outcome.ready(Reason.READY, "serving")),
    ],
)
def test_status_flip_moves_last_transition_time(old: str, outcome: Outcome) -> None:
    [ready] = set_condition([condition(status=old)], type_=READY, outcome=outcome, generation=1, now=T1)
    assert ready.status == outcome.status
    assert ready.last_transition_time == T1.replace(microsecond=0)


def test_other_condition_types_are_untouched_and_keep_their_place() -> None:
    degraded, ready, synced = condition("Degraded", "False"), condition(), condition("Synced", "True")
    after = set_condition(
        [degraded, ready, synced],
        type_=READY,
        outcome=Outcome.waiting(Reason.ENDPOINT_PENDING, "wait"),
        generation=1,
        now=T1,
    )
    assert [c.type for c in after] == ["Degraded", READY, "Synced"]
    assert after[0] is degraded
    assert after[2] is synced
    assert find(after, READY) == after[1]
    assert after[1].status == "False"


def test_new_type_is_appended_after_the_others() -> None:
    degraded = condition("Degraded", "False")
    after = set_condition([degraded], type_=READY, outcome=Outcome.ready(Reason.READY, "ok"), generation=1, now=T1)
    assert after[0] is degraded
    assert [c.type for c in after] == ["Degraded", READY]


def test_same_outcome_again_gives_equal_conditions() -> None:
    """A reconcile that finds nothing new must produce the same list, or status would be rewritten each time."""
    outcome = Outcome.ready(Reason.READY, "serving")
    once = set_condition([], type_=READY, outcome=outcome, generation=1, now=T0)
    twice = set_condition(once, type_=READY, outcome=outcome, generation=1, now=T1)
    assert twice == once


def test_find_returns_none_when_absent() -> None:
    assert find([condition("Degraded")], READY) is None


def test_rejected_outcomes_are_warnings() -> None:
    assert Outcome.rejected(Reason.INVALID_SPEC, "bad").warning
    assert not Outcome.waiting(Reason.ENDPOINT_PENDING, "wait").warning
    assert not Outcome.ready(Reason.READY, "ok").warning


@pytest.mark.parametrize(
    ("before", "outcome", "transition"),
    [
        ([], Outcome.ready(Reason.READY, "ok"), True),
        ([condition()], Outcome.ready(Reason.READY, "ok"), False),
        ([condition()], Outcome.ready(Reason.READY, "serving elsewhere"), True),
        ([condition()], Outcome.ready(Reason.DISABLED, "ok"), True),
        ([condition()], Outcome.waiting(Reason.READY, "ok"), True),
        ([condition("Degraded")], Outcome.ready(Reason.READY, "ok"), True),
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
    after = set_condition(before, type_=READY, outcome=Outcome.ready(Reason.READY, "ok"), generation=7, now=T1)
    assert not Report.of(before, after, Outcome.ready(Reason.READY, "ok")).transition


def other(status: str, reason: str, type_: str = POD_NETWORK) -> Condition:
    return condition(type_, status, reason, "m")


@pytest.mark.parametrize(
    ("before", "outcome", "news"),
    [
        ([], Outcome.missing(Reason.POD_NETWORK_NOT_FOUND, "set spec.routes"), True),
        ([], Outcome.ready(Reason.POD_NETWORK_FOUND, "10.244.0.0/16"), False),
        (
            [other("True", Reason.POD_NETWORK_FOUND)],
            Outcome.missing(Reason.POD_NETWORK_NOT_FOUND, "set spec.routes"),
            True,
        ),
        (
            [other("False", Reason.POD_NETWORK_NOT_FOUND)],
            Outcome.ready(Reason.POD_NETWORK_FOUND, "10.244.0.0/16"),
            True,
        ),
        (
            [other("False", Reason.POD_NETWORK_NOT_FOUND)],
            Outcome.missing(Reason.POD_NETWORK_NOT_FOUND, "other words"),
            False,
        ),
        ([other("True", Reason.POD_NETWORK_FOUND)], Outcome.ready(Reason.POD_NETWORK_FOUND, "10.244.0.0/15"), False),
    ],
    ids=["first-false", "first-true", "lost", "recovered", "still-false", "still-true"],
)
def test_report_news_of_other_conditions_is_a_status_flip(
    before: list[Condition], outcome: Outcome, news: bool
) -> None:
    """An Event for a discovery condition when it goes False (a Warning) or comes back (Normal); a new
    server whose discovery works gets none, and a resync that finds the same gap sends nothing again."""
    ready = Outcome.ready(Reason.READY, "ok")
    after = set_condition(before, type_=READY, outcome=ready, generation=1, now=T1)
    after = set_condition(after, type_=POD_NETWORK, outcome=outcome, generation=1, now=T1)
    report = Report.of(before, after, ready, others={POD_NETWORK: outcome})
    assert report.news == ((outcome,) if news else ())


def test_report_news_follows_the_order_given() -> None:
    pod, dns = Outcome.missing(Reason.POD_NETWORK_NOT_FOUND, "p"), Outcome.missing(Reason.DNS_SERVICE_NOT_FOUND, "d")
    report = Report.of([], [], Outcome.ready(Reason.READY, "ok"), others={POD_NETWORK: pod, CLUSTER_DNS: dns})
    assert report.news == (pod, dns)


def test_missing_outcomes_are_warnings() -> None:
    outcome = Outcome.missing(Reason.DNS_SERVICE_NOT_FOUND, "set spec.dns.nameserver")
    assert (outcome.status, outcome.warning) == ("False", True)


def test_the_server_owns_its_discovery_and_gateways_conditions() -> None:
    assert SERVER_CONDITIONS == (READY, POD_NETWORK, CLUSTER_DNS, GATEWAYS)


# --- reading conditions: current only when written for the object's generation ---------------------


def obj(generation: int | None, *conditions: dict[str, object]) -> dict[str, object]:
    metadata = {"name": "office"} if generation is None else {"name": "office", "generation": generation}
    return {"metadata": metadata, "status": {"conditions": list(conditions)}}


def raw(type_: str = READY, status: str = "True", observed: int | None = 2) -> dict[str, object]:
    entry: dict[str, object] = {"type": type_, "status": status, "reason": "Ready", "message": ""}
    if observed is not None:
        entry["observedGeneration"] = observed
    return entry


def test_find_current_returns_the_condition_written_for_this_generation() -> None:
    ready = condition()  # observedGeneration 1
    assert find_current([condition("Degraded"), ready], READY, 1) == ready


def test_find_current_refuses_a_condition_of_an_older_generation() -> None:
    assert find_current([condition()], READY, 2) is None


def test_find_current_counts_a_condition_without_generation_as_current() -> None:
    """The agents write Dataplane without one; an object without a generation cannot be judged either."""
    unversioned = condition().model_copy(update={"observed_generation": None})
    assert find_current([unversioned], READY, 5) == unversioned
    assert find_current([condition()], READY, None) is not None


def test_find_current_is_none_when_absent() -> None:
    assert find_current([condition("Degraded")], READY, 1) is None


def test_condition_of_reads_a_plain_object() -> None:
    assert condition_of(obj(2, raw("Dataplane"), raw()), READY) == raw()
    assert condition_of(obj(3, raw()), READY) is None
    assert condition_of({"metadata": {}}, READY) is None


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (obj(2, raw()), True),
        (obj(2, raw(status="False")), False),
        (obj(3, raw()), False),  # the spec changed since Ready was written: not yet known to be Ready
        (obj(3, raw(observed=None)), True),
        (obj(None, raw()), True),
        (obj(2, raw("Dataplane")), False),
        ({"metadata": {"generation": 1}}, False),
    ],
    ids=["ready", "not-ready", "stale", "no-observed-generation", "no-generation", "other-type", "no-status"],
)
def test_is_ready_needs_a_true_ready_of_the_current_generation(subject: dict[str, object], expected: bool) -> None:
    assert is_ready(subject) is expected


def test_reasons_are_their_api_values() -> None:
    """Reasons are API: users and alerts match on these words."""
    assert [Reason.READY, Reason.POOL_EXHAUSTED, Reason.SYNC_FAILED, Reason.KERNEL_WIREGUARD_FAILED] == [
        "Ready",
        "PoolExhausted",
        "SyncFailed",
        "KernelWireGuardFailed",
    ]
    assert len({r.value for r in Reason}) == len(Reason)
