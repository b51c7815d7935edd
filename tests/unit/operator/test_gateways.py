"""Which gateways serve a server, from the agents' leases: its Ready, status, endpoint and Service Endpoints."""

from __future__ import annotations

import datetime as dt
from typing import Any

from kvpn_core.conditions import GATEWAYS, READY, Reason
from kvpn_operator import gateways
from kvpn_operator.memory import PeerEntry
from kvpn_operator.server import ClusterFacts, ServiceNetworks, reconcile_server
from kvpn_operator.storage import ServerObject
from tests.unit.fakes import FakeStorage, a_gateway

Obj = dict[str, Any]
T0 = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)
NS = "vpn"


def a_server(storage: FakeStorage, expose: str = "HostPort", **spec: object) -> None:
    body = {"addressPool": ["10.8.0.0/24"], "routes": ["10.96.0.0/12"], "expose": {"type": expose}, **spec}
    storage.put("vpnservers", {"metadata": {"name": "office", "namespace": NS}, "spec": body})


LAPTOP = PeerEntry(NS, "laptop", ready=True, reason="Ready", address="10.8.0.2", server_revision=None, nudge=None)


def reconcile(storage: FakeStorage, now: dt.datetime = T0, peers: tuple[PeerEntry, ...] = ()) -> Obj:
    obj = storage.read("vpnservers", NS, "office")
    assert obj is not None
    reconcile_server(
        storage,
        ServerObject.model_validate(obj),
        facts=ClusterFacts(),
        service_networks=ServiceNetworks(),
        peers=lambda: list(peers),
        now=now,
    )
    found = storage.read("vpnservers", NS, "office")
    assert found is not None
    status: Obj = found["status"]
    return status


def condition(status: Obj, type_: str) -> Obj:
    return next(c for c in status["conditions"] if c["type"] == type_)


def endpoint_ips(storage: FakeStorage) -> list[str]:
    endpoints = storage.read("endpoints", NS, "kvpn-office")
    assert endpoints is not None
    return [a["ip"] for subset in endpoints["subsets"] for a in subset["addresses"]]


def test_a_server_no_gateway_reported_for_is_not_ready_and_says_where_to_look() -> None:
    storage = FakeStorage()
    a_server(storage, nodeSelector={"kvpn.dev/gateway": "true"})
    node = a_node("node-a")
    node["metadata"]["labels"] = {"kvpn.dev/gateway": "true"}
    storage.put("nodes", node)  # a gateway node, whose agent never reported
    status = reconcile(storage)
    assert status["endpoint"] == "192.0.2.11:51820"
    ready = condition(status, READY)
    assert (ready["status"], ready["reason"]) == ("False", Reason.NO_HEALTHY_GATEWAY)
    assert "kvpn.dev/gateway=true" in ready["message"]
    assert condition(status, GATEWAYS)["status"] == "False"


def test_gateways_are_listed_and_the_endpoint_is_the_first_healthy_one() -> None:
    storage = FakeStorage()
    a_server(storage)
    a_gateway(storage, NS, "office", "node-b", address="192.0.2.12", renewed=T0)
    a_gateway(storage, NS, "office", "node-a", address="192.0.2.11", renewed=T0)
    status = reconcile(storage)
    assert condition(status, READY)["status"] == "True"
    assert status["endpoint"] == "192.0.2.11:51820"
    assert status["endpoints"] == ["192.0.2.11:51820", "192.0.2.12:51820"]
    assert [(g["node"], g["ready"], g["reason"]) for g in status["gateways"]] == [
        ("node-a", True, Reason.SERVING),
        ("node-b", True, Reason.SERVING),
    ]


def test_a_gateway_that_went_silent_is_left_and_the_endpoint_moves_and_stays() -> None:
    storage = FakeStorage()
    a_server(storage)
    a_gateway(storage, NS, "office", "node-a", address="192.0.2.11", renewed=T0)
    a_gateway(storage, NS, "office", "node-b", address="192.0.2.12", renewed=T0)
    first = reconcile(storage)
    later = T0 + dt.timedelta(seconds=30)
    a_gateway(storage, NS, "office", "node-b", renewed=later)  # node-a's agent stopped renewing
    status = reconcile(storage, later)
    assert status["endpoint"] == "192.0.2.12:51820"
    assert status["endpoints"] == ["192.0.2.12:51820"]
    assert status["revision"] != first["revision"]  # peers re-render their configs with the new endpoint
    gateway_a = status["gateways"][0]
    assert (gateway_a["node"], gateway_a["ready"], gateway_a["reason"]) == ("node-a", False, Reason.LEASE_EXPIRED)
    assert "node-a" in condition(status, GATEWAYS)["message"]
    assert condition(status, READY)["status"] == "True"
    # node-a comes back: configs stay with node-b (a move rewrites every peer's config)...
    a_gateway(storage, NS, "office", "node-a", renewed=later)
    assert reconcile(storage, later, peers=(LAPTOP,))["endpoint"] == "192.0.2.12:51820"
    # ... unless there is no peer yet, whose config it would rewrite: the first healthy node by name.
    assert reconcile(storage, later)["endpoint"] == "192.0.2.11:51820"


def test_a_reconcile_on_a_copy_from_before_the_move_does_not_move_the_endpoint_back() -> None:
    """kopf may hand a resync the body it had before the reconcile that moved the endpoint wrote its status.
    Judged on that copy, the gateway that came back would look current and healthy, and win."""
    storage = FakeStorage()
    a_server(storage)
    a_gateway(storage, NS, "office", "node-a", address="192.0.2.11", renewed=T0)
    a_gateway(storage, NS, "office", "node-b", address="192.0.2.12", renewed=T0)
    assert reconcile(storage, peers=(LAPTOP,))["endpoint"] == "192.0.2.11:51820"
    before_the_move = storage.read("vpnservers", NS, "office")
    assert before_the_move is not None
    later = T0 + dt.timedelta(seconds=30)
    a_gateway(storage, NS, "office", "node-b", renewed=later)  # node-a went silent
    assert reconcile(storage, later, peers=(LAPTOP,))["endpoint"] == "192.0.2.12:51820"
    a_gateway(storage, NS, "office", "node-a", renewed=later)  # and came back
    joined = PeerEntry(NS, "desktop", ready=False, reason="", address="10.8.0.3", server_revision=None, nudge=None)
    reconcile_server(  # with something to write: a peer joined meanwhile
        storage,
        ServerObject.model_validate(before_the_move),
        facts=ClusterFacts(),
        service_networks=ServiceNetworks(),
        peers=lambda: [LAPTOP, joined],
        now=later,
    )
    found = storage.read("vpnservers", NS, "office")
    assert found is not None
    assert found["status"]["endpoint"] == "192.0.2.12:51820"
    assert found["status"]["peers"]["total"] == 2  # the reconcile did write


def test_no_healthy_gateway_is_not_ready_naming_each_node_and_why() -> None:
    storage = FakeStorage()
    a_server(storage)
    a_gateway(storage, NS, "office", "node-a", renewed=T0 - dt.timedelta(minutes=1))
    a_gateway(
        storage, NS, "office", "node-b", address="192.0.2.12", renewed=T0, ready=False, message="sync failed: EBUSY"
    )
    status = reconcile(storage)
    ready = condition(status, READY)
    assert (ready["status"], ready["reason"]) == ("False", Reason.NO_HEALTHY_GATEWAY)
    assert "node-a: its agent stopped reporting (last renewed 2026-12-01T11:59:00Z)" in ready["message"]
    assert "node-b: sync failed: EBUSY" in ready["message"]
    assert status["endpoints"] == []
    assert status["endpoint"] is not None  # kept: configs do not churn while nothing can serve


def test_the_service_sends_only_to_healthy_gateways_of_this_server() -> None:
    storage = FakeStorage()
    a_server(storage, expose="NodePort")
    a_gateway(storage, NS, "office", "node-a", address="192.0.2.11", renewed=T0)
    a_gateway(storage, NS, "office", "node-b", address="192.0.2.12", renewed=T0)
    a_gateway(storage, NS, "other", "node-c", address="192.0.2.13", renewed=T0)  # another server's gateway
    reconcile(storage)
    service = storage.read("services", NS, "kvpn-office")
    assert service is not None
    assert "selector" not in service["spec"]
    assert endpoint_ips(storage) == ["192.0.2.11", "192.0.2.12"]
    later = T0 + dt.timedelta(seconds=11)
    a_gateway(storage, NS, "office", "node-b", renewed=later)
    reconcile(storage, later)
    assert endpoint_ips(storage) == ["192.0.2.12"]


def test_every_gateway_says_its_address_on_the_cluster_network() -> None:
    """The in-cluster relay sends to a gateway's InternalIP, even where laptops dial its ExternalIP."""
    storage = FakeStorage()
    a_server(storage)
    a_gateway(storage, NS, "office", "node-a", address="10.0.0.11", renewed=T0)
    a_gateway(storage, NS, "office", "node-b", address="10.0.0.12", renewed=T0, ready=False, message="EBUSY")
    node_a = storage.read("nodes", "", "node-a")
    assert node_a is not None
    node_a["status"]["addresses"].insert(0, {"type": "ExternalIP", "address": "203.0.113.11"})
    storage.put("nodes", node_a)
    status = reconcile(storage)
    assert [(g["node"], g["ready"], g.get("endpoint"), g["address"]) for g in status["gateways"]] == [
        ("node-a", True, "203.0.113.11:51820", "10.0.0.11"),
        ("node-b", False, "10.0.0.12:51820", "10.0.0.12"),
    ]


def test_through_the_api_server_gateways_have_addresses_and_no_endpoints() -> None:
    storage = FakeStorage()
    a_server(storage, expose="ApiServer")
    a_gateway(storage, NS, "office", "node-b", address="10.0.0.12", renewed=T0)
    a_gateway(storage, NS, "office", "node-a", address="10.0.0.11", renewed=T0)
    status = reconcile(storage, peers=(LAPTOP,))
    assert condition(status, READY)["status"] == "True"
    assert (status.get("endpoint"), status["endpoints"]) == (None, [])
    assert [(g["node"], g.get("endpoint"), g["address"]) for g in status["gateways"]] == [
        ("node-a", None, "10.0.0.11"),
        ("node-b", None, "10.0.0.12"),
    ]
    assert storage.read("endpoints", NS, "kvpn-office") is None
    # A gateway lost: still Ready on the other, and still nothing for laptops to dial.
    later = T0 + dt.timedelta(seconds=30)
    a_gateway(storage, NS, "office", "node-b", renewed=later)
    status = reconcile(storage, later, peers=(LAPTOP,))
    assert condition(status, READY)["status"] == "True"
    assert [(g["node"], g["ready"]) for g in status["gateways"]] == [("node-a", False), ("node-b", True)]
    assert (status.get("endpoint"), status["endpoints"]) == (None, [])


def test_through_the_api_server_no_healthy_gateway_is_not_ready() -> None:
    storage = FakeStorage()
    a_server(storage, expose="ApiServer")
    a_gateway(storage, NS, "office", "node-a", renewed=T0 - dt.timedelta(minutes=1))
    ready = condition(reconcile(storage), READY)
    assert (ready["status"], ready["reason"]) == ("False", Reason.NO_HEALTHY_GATEWAY)


def test_a_not_ready_report_names_the_agents_reason() -> None:
    [gateway] = gateways.read_gateways(
        [a_lease(ready=False, message="wireguard-go supervisor unreachable")], [a_node("node-a")], T0
    )
    assert (gateway.ready, gateway.reason, gateway.message) == (
        False,
        Reason.NOT_PROGRAMMED,
        "wireguard-go supervisor unreachable",
    )


def test_the_lease_fingerprint_changes_when_a_lease_runs_out_or_a_verdict_flips() -> None:
    lease = a_lease()
    assert gateways.lease_fingerprint([lease], T0) == (("node-a", "serving"),)
    assert gateways.lease_fingerprint([lease], T0 + dt.timedelta(seconds=10)) == (("node-a", "expired"),)
    assert gateways.lease_fingerprint([a_lease(ready=False)], T0) == (("node-a", "not ready"),)


def a_lease(**report: Any) -> Obj:
    storage = FakeStorage()
    return a_gateway(storage, NS, "office", "node-a", renewed=T0, **report)


def a_node(name: str) -> Obj:
    return {"metadata": {"name": name}, "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.11"}]}}
