"""A server's ceiling on its peers (spec.peerCeilings) through the operator: bindings, conditions, Events."""

from __future__ import annotations

from typing import Any

import pytest

from kvpn_core.api import AllowedDestination
from kvpn_core.ceiling import describe
from kvpn_core.conditions import CEILING, READY, Reason
from kvpn_operator.memory import ANNOTATION_NUDGE, AddressBooks
from tests.unit.fakes import FakeStorage
from tests.unit.operator.test_peer import (
    NS,
    Operator,
    a_peer_in,
    bindings,
    reconcile_in,
    resync,
    served_by_the_gateways,
    with_server,
)

Obj = dict[str, Any]
TEAM_A = {
    "namespaces": ["team-a"],
    "destinations": [{"cidr": "10.96.5.0/24", "protocol": "TCP", "ports": [{"port": 80}]}, {"cidr": "10.96.6.0/24"}],
}
EVERYONE = {"namespaces": ["*"], "destinations": [{"cidr": "10.96.7.0/24"}]}


def dest(cidr: str, **fields: Any) -> Obj:
    return AllowedDestination.model_validate({"cidr": cidr, **fields}).to_api()


def condition(storage: FakeStorage, namespace: str, name: str, type_: str) -> Obj | None:
    obj = storage.read("vpnpeers", namespace, name)
    assert obj is not None
    return next((c for c in obj["status"]["conditions"] if c["type"] == type_), None)


def destinations_of(storage: FakeStorage, name: str) -> list[str]:
    [binding] = [b for b in bindings(storage) if b.peer_name == name]
    return [describe(d) for d in binding.allowed_destinations]


def test_the_binding_carries_what_the_ceiling_leaves_and_the_peer_says_what_was_cut() -> None:
    storage = with_server(peerNamespaces=["*"], peerCeilings=[TEAM_A])
    a_peer_in(storage, "team-a", "laptop", allowedDestinations=[dest("10.96.0.0/12")])
    report = reconcile_in(storage, AddressBooks(), "team-a", "laptop")
    assert destinations_of(storage, "laptop") == ["10.96.5.0/24 tcp/80", "10.96.6.0/24"]
    ceiling = condition(storage, "team-a", "laptop", CEILING)
    assert ceiling is not None
    assert (ceiling["status"], ceiling["reason"]) == ("False", "CutByCeiling")
    assert ceiling["message"] == (
        "the server's ceiling for namespace team-a cuts allowedDestinations 10.96.0.0/12 to 10.96.5.0/24 tcp/80, "
        "10.96.6.0/24"
    )
    assert ceiling["observedGeneration"] == 1
    ready = condition(storage, "team-a", "laptop", READY)
    assert ready is not None
    assert ready["status"] == "True"
    assert ready["message"].endswith("the server's ceiling narrows allowedDestinations (see condition Ceiling)")
    assert [(o.finding.reason, o.warning) for o in report.news] == [(Reason.CUT_BY_CEILING, True)]
    assert served_by_the_gateways(storage) == (["laptop"], [])


def test_an_empty_ask_under_a_ceiling_is_the_routes_under_it() -> None:
    storage = with_server(peerNamespaces=["*"], peerCeilings=[TEAM_A])
    a_peer_in(storage, "team-a", "laptop")
    reconcile_in(storage, AddressBooks(), "team-a", "laptop")
    assert destinations_of(storage, "laptop") == ["10.96.5.0/24 tcp/80", "10.96.6.0/24"]  # never [], every route
    ceiling = condition(storage, "team-a", "laptop", CEILING)
    assert ceiling is not None
    assert "cuts the server's routes (allowedDestinations is empty) 10.96.0.0/12 to" in ceiling["message"]


def test_an_ask_within_the_ceiling_is_said_to_be_so_without_an_event() -> None:
    storage = with_server(peerNamespaces=["*"], peerCeilings=[TEAM_A])
    a_peer_in(storage, "team-a", "laptop", allowedDestinations=[dest("10.96.6.10/32", protocol="UDP")])
    report = reconcile_in(storage, AddressBooks(), "team-a", "laptop")
    assert destinations_of(storage, "laptop") == ["10.96.6.10/32 udp"]
    ceiling = condition(storage, "team-a", "laptop", CEILING)
    assert ceiling is not None
    assert (ceiling["status"], ceiling["reason"]) == ("True", "WithinCeiling")
    assert report.news == ()


def test_a_peer_no_ceiling_holds_has_no_ceiling_condition() -> None:
    storage = with_server(peerNamespaces=["*"], peerCeilings=[TEAM_A])
    a_peer_in(storage, "team-b", "laptop")
    reconcile_in(storage, AddressBooks(), "team-b", "laptop")
    assert condition(storage, "team-b", "laptop", CEILING) is None
    assert destinations_of(storage, "laptop") == []  # every route, as before ceilings existed


def test_the_ceiling_naming_the_namespace_comes_before_the_star() -> None:
    storage = with_server(peerNamespaces=["*"], peerCeilings=[EVERYONE, TEAM_A])
    books = AddressBooks()
    for namespace in ("team-a", "team-b"):
        a_peer_in(storage, namespace, f"{namespace}-laptop")
        reconcile_in(storage, books, namespace, f"{namespace}-laptop")
    assert destinations_of(storage, "team-a-laptop") == ["10.96.5.0/24 tcp/80", "10.96.6.0/24"]
    assert destinations_of(storage, "team-b-laptop") == ["10.96.7.0/24"]
    star = condition(storage, "team-b", "team-b-laptop", CEILING)
    assert star is not None
    assert star["message"].startswith('the server\'s ceiling for every namespace ("*"), which holds namespace team-b')


def test_a_ceiling_that_leaves_nothing_refuses_the_peer_and_the_gateways_never_see_it() -> None:
    storage = with_server(peerNamespaces=["*"], peerCeilings=[TEAM_A])
    a_peer_in(storage, "team-a", "laptop", allowedDestinations=[dest("10.100.0.0/16")])
    report = reconcile_in(storage, AddressBooks(), "team-a", "laptop")
    assert (report.outcome.status, report.outcome.finding.reason, report.outcome.warning) == (
        "False",
        Reason.OUTSIDE_CEILING,
        True,
    )
    message = report.outcome.finding.message
    assert message.startswith(
        "the server's ceiling for namespace team-a (10.96.5.0/24 tcp/80, 10.96.6.0/24) leaves nothing of "
        "allowedDestinations 10.100.0.0/16: "
    )
    assert report.news == ()  # Ready says it: one Event, not two
    assert bindings(storage) == []
    assert served_by_the_gateways(storage) == ([], [])
    obj = storage.read("vpnpeers", "team-a", "laptop")
    assert obj is not None
    assert "address" not in obj["status"]
    ceiling = condition(storage, "team-a", "laptop", CEILING)
    assert ceiling is not None
    assert (ceiling["status"], ceiling["reason"]) == ("False", "OutsideCeiling")


def test_a_ceiling_change_re_renders_the_servers_peers() -> None:
    storage = with_server(peerNamespaces=["*"])
    books = AddressBooks()
    a_peer_in(storage, "team-a", "laptop")
    reconcile_in(storage, books, "team-a", "laptop")
    assert destinations_of(storage, "laptop") == []
    before = (storage.read("vpnservers", NS, "office") or {})["status"]["revision"]

    storage.edit("vpnservers", NS, "office", {"spec": {"peerCeilings": [TEAM_A]}})
    resync(storage)
    revision = (storage.read("vpnservers", NS, "office") or {})["status"]["revision"]
    assert revision != before
    nudge = (storage.read("vpnpeers", "team-a", "laptop") or {})["metadata"]["annotations"][ANNOTATION_NUDGE]
    assert nudge == revision  # what kopf acts on: the peer's reconcile runs again
    reconcile_in(storage, books, "team-a", "laptop")
    assert destinations_of(storage, "laptop") == ["10.96.5.0/24 tcp/80", "10.96.6.0/24"]

    storage.edit(
        "vpnservers", NS, "office", {"spec": {"peerCeilings": [{**TEAM_A, "destinations": [dest("192.168.0.0/16")]}]}}
    )
    resync(storage)
    assert reconcile_in(storage, books, "team-a", "laptop").outcome.finding.reason == Reason.OUTSIDE_CEILING
    assert bindings(storage) == []  # the binding it had must not stay: it let the peer reach more

    storage.edit("vpnservers", NS, "office", {"spec": {"peerCeilings": None}})
    resync(storage)
    assert (storage.read("vpnservers", NS, "office") or {})["status"]["revision"] == before
    assert reconcile_in(storage, books, "team-a", "laptop").outcome.status == "True"
    assert destinations_of(storage, "laptop") == []
    assert condition(storage, "team-a", "laptop", CEILING) is None


def test_a_second_reconcile_under_a_ceiling_writes_nothing() -> None:
    storage = with_server(peerNamespaces=["*"], peerCeilings=[TEAM_A])
    a_peer_in(storage, "team-a", "laptop", allowedDestinations=[dest("10.96.0.0/12")])
    books = AddressBooks()
    reconcile_in(storage, books, "team-a", "laptop")
    writes = list(storage.writes)
    report = reconcile_in(storage, books, "team-a", "laptop")
    assert (report.transition, report.news) == (False, ())
    assert storage.writes == writes


def test_the_warning_event_says_what_was_cut_and_names_no_other_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    operator = Operator(with_server(peerNamespaces=["*"], peerCeilings=[TEAM_A]), monkeypatch)
    a_peer_in(operator.storage, "secret-team", "ceo-phone", allowedDestinations=[dest("10.96.0.0/12")])
    operator.reconcile("secret-team", "ceo-phone")
    a_peer_in(operator.storage, "team-a", "laptop", allowedDestinations=[dest("10.96.0.0/12"), dest("10.100.0.0/16")])
    operator.reconcile("team-a", "laptop")
    mine = [e for e in operator.events if e[0] == "laptop"]
    assert [e[1:3] for e in mine] == [("Normal", "Ready"), ("Warning", "CutByCeiling")]
    assert mine[1][3] == (
        "the server's ceiling for namespace team-a cuts allowedDestinations 10.96.0.0/12 to 10.96.5.0/24 tcp/80, "
        "10.96.6.0/24; 10.100.0.0/16 to nothing"
    )
    assert not any("ceo" in e[3] or "secret-team" in e[3] for e in mine)
    operator.reconcile("team-a", "laptop")
    assert [e for e in operator.events if e[0] == "laptop"] == mine  # news once, not at every reconcile


def test_a_refused_peer_gets_one_warning_event(monkeypatch: pytest.MonkeyPatch) -> None:
    operator = Operator(with_server(peerNamespaces=["*"], peerCeilings=[TEAM_A]), monkeypatch)
    a_peer_in(operator.storage, "team-a", "laptop", allowedDestinations=[dest("10.100.0.0/16")])
    operator.reconcile("team-a", "laptop")
    assert [e[1:3] for e in operator.events] == [("Warning", "OutsideCeiling")]
