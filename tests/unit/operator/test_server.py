"""The VpnServer: its Ready verdict (still Ready when discovery left gaps), and its reconcile against a fake API."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

from kvpn_core import keys
from kvpn_core.api import Kind, VpnServerSpec
from kvpn_core.conditions import CLUSTER_DNS, GATEWAYS, POD_NETWORK, READY, Outcome, Reason
from kvpn_core.contract import SERVER_KEY_DATA, server_key_secret_name
from kvpn_operator import builders
from kvpn_operator.memory import ANNOTATION_NUDGE, PeerEntry
from kvpn_operator.reporting import Report
from kvpn_operator.server import (
    ClusterFacts,
    ServiceNetworks,
    nudge,
    nudge_for_service,
    reconcile_server,
    serving_outcome,
)
from kvpn_operator.storage import ServerObject
from tests.unit.fakes import FakeStorage, a_gateway

Obj = dict[str, Any]

SPEC = VpnServerSpec.model_validate({"addressPool": ["10.8.0.0/24"]})
FOUND = {
    POD_NETWORK: Outcome.ready(Reason.POD_NETWORK_FOUND, "p"),
    CLUSTER_DNS: Outcome.ready(Reason.DNS_SERVICE_FOUND, "d"),
}


def test_ready_with_everything_found() -> None:
    outcome = serving_outcome(SPEC, "vpn.example.com:51820", ["10.96.0.0/16", "10.244.0.0/16"], FOUND)
    assert (outcome.status, outcome.finding.reason) == ("True", "Ready")
    assert outcome.finding.message == "serving at vpn.example.com:51820, routes 10.96.0.0/16, 10.244.0.0/16"


def test_still_ready_without_pod_network_and_dns_but_says_what_peers_lack() -> None:
    gaps = {
        POD_NETWORK: Outcome.missing(Reason.POD_NETWORK_NOT_FOUND, "p"),
        CLUSTER_DNS: Outcome.missing(Reason.DNS_SERVICE_NOT_FOUND, "d"),
    }
    outcome = serving_outcome(SPEC, "vpn.example.com:51820", ["10.96.0.0/16"], gaps)
    assert (outcome.status, outcome.finding.reason, outcome.warning) == ("True", "Ready", False)
    assert outcome.finding.message == (
        "serving at vpn.example.com:51820, routes 10.96.0.0/16; peers reach no pod IPs (see condition PodNetwork); "
        "peers get no cluster DNS (see condition ClusterDNS)"
    )


def test_only_the_missing_one_is_named() -> None:
    gaps = {**FOUND, CLUSTER_DNS: Outcome.missing(Reason.DNS_SERVICE_NOT_FOUND, "d")}
    message = serving_outcome(SPEC, "vpn.example.com:51820", ["10.96.0.0/16", "10.244.0.0/16"], gaps).finding.message
    assert "ClusterDNS" in message
    assert "PodNetwork" not in message


def test_no_routes_at_all_is_not_ready() -> None:
    outcome = serving_outcome(
        SPEC, "vpn.example.com:51820", [], {POD_NETWORK: Outcome.missing(Reason.POD_NETWORK_NOT_FOUND, "p")}
    )
    assert (outcome.status, outcome.finding.reason, outcome.warning) == ("False", "NoRoutes", True)


def test_no_endpoint_yet_comes_first() -> None:
    outcome = serving_outcome(SPEC, None, [], {})
    assert (outcome.status, outcome.finding.reason) == ("False", "EndpointPending")


API_SERVER = VpnServerSpec.model_validate({"addressPool": ["10.8.0.0/24"], "expose": {"type": "ApiServer"}})


def test_through_the_api_server_no_endpoint_is_ready_and_says_how_to_connect() -> None:
    outcome = serving_outcome(API_SERVER, None, ["10.96.0.0/16"], FOUND)
    assert (outcome.status, outcome.finding.reason) == ("True", "Ready")
    assert outcome.finding.message == (
        "serving through the API server and the chart's relay (`kubectl vpn up --via api`), routes 10.96.0.0/16"
    )


def test_through_the_api_server_the_expose_fields_it_ignores_are_named() -> None:
    spec = VpnServerSpec.model_validate(
        {
            "addressPool": ["10.8.0.0/24"],
            "expose": {"type": "ApiServer", "nodePort": 31820, "annotations": {"lb.example.com/x": "y"}},
        }
    )
    outcome = serving_outcome(spec, None, ["10.96.0.0/16"], FOUND)
    assert (outcome.status, outcome.warning) == ("True", False)
    assert outcome.finding.message.endswith(
        "; spec.expose.nodePort, spec.expose.annotations ignored: ApiServer has no Service and no endpoint"
    )


# --- reconcile_server against the fake Storage -----------------------------------------------------

T0 = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
NS = "vpn"


def a_server(storage: FakeStorage, **spec: object) -> Obj:
    body = {"addressPool": ["10.8.0.0/24"], "expose": {"endpoint": "vpn.example.com:51820"}, **spec}
    a_gateway(storage, NS, "office", renewed=T0)
    return storage.put("vpnservers", {"metadata": {"name": "office", "namespace": NS}, "spec": body})


def reconcile(storage: FakeStorage, peers: list[PeerEntry] | None = None, *, now: dt.datetime = T0) -> Report:
    """One reconcile of the server as stored now, as kopf would hand it over."""
    obj = storage.read("vpnservers", NS, "office")
    assert obj is not None
    return reconcile_server(
        storage,
        ServerObject.model_validate(obj),
        facts=ClusterFacts(),
        service_networks=ServiceNetworks(),
        peers=lambda: list(peers or []),
        now=now,
    )


def status(storage: FakeStorage) -> Obj:
    obj = storage.read("vpnservers", NS, "office")
    assert obj is not None
    return dict(obj.get("status") or {})


def ready(storage: FakeStorage) -> Obj:
    return next(c for c in status(storage)["conditions"] if c["type"] == READY)


def private_key_in(storage: FakeStorage) -> str:
    secret = storage.read("secrets", NS, server_key_secret_name("office"))
    assert secret is not None
    return base64.b64decode(secret["data"][SERVER_KEY_DATA]).decode()


def test_a_new_server_gets_a_key_a_service_and_a_ready_status() -> None:
    storage = FakeStorage()
    a_server(storage, routes=["10.96.0.0/12"])
    report = reconcile(storage)
    assert (report.outcome.status, report.outcome.finding.reason, report.transition) == ("True", Reason.READY, True)
    assert storage.read("services", NS, "kvpn-office") is not None
    current = status(storage)
    assert current["publicKey"] == keys.public_key_of(private_key_in(storage))
    assert (current["endpoint"], current["routes"], current["observedGeneration"]) == (
        "vpn.example.com:51820",
        ["10.96.0.0/12"],
        1,
    )
    assert ready(storage)["observedGeneration"] == 1


def test_a_second_reconcile_writes_nothing() -> None:
    storage = FakeStorage()
    a_server(storage, routes=["10.96.0.0/12"])
    reconcile(storage)
    later = T0 + dt.timedelta(minutes=5)
    a_gateway(storage, NS, "office", renewed=later)  # the agent kept renewing its lease
    writes = list(storage.writes)
    report = reconcile(storage, now=later)
    assert storage.writes == writes
    assert not report.transition


def test_an_existing_key_is_kept_and_none_is_generated() -> None:
    storage = FakeStorage()
    server = a_server(storage, routes=["10.96.0.0/12"])
    key = keys.generate_private_key()
    storage.put("secrets", builders.server_key_secret(server, key))
    reconcile(storage)
    assert private_key_in(storage) == key
    assert status(storage)["publicKey"] == keys.public_key_of(key)
    assert storage.count("secrets") == 1


def test_routes_are_discovered_when_the_spec_has_none() -> None:
    storage = FakeStorage(service_cidrs=["10.96.0.0/12"])
    storage.put("nodes", {"metadata": {"name": "n1"}, "spec": {"podCIDR": "10.244.0.0/24"}})
    a_server(storage)
    reconcile(storage)
    assert status(storage)["routes"] == ["10.96.0.0/12", "10.244.0.0/24"]


def test_a_dual_stack_clusters_service_networks_are_both_discovered() -> None:
    """Without ServiceCIDR objects (Kubernetes before 1.31), one probe per family: the API server names its
    IPv6 Service network only when refusing an IPv6 clusterIP."""
    storage = FakeStorage(service_cidrs=["10.96.0.0/12", "fd00:10:96::/112"])
    storage.put("nodes", {"metadata": {"name": "n1"}, "spec": {"podCIDRs": ["10.244.0.0/24", "fd00:10:244::/64"]}})
    a_server(storage, addressPool=["10.8.0.0/24", "fd00:8::/120"])
    reconcile(storage)
    assert status(storage)["routes"] == ["10.96.0.0/12", "fd00:10:96::/112", "10.244.0.0/24", "fd00:10:244::/64"]


def test_an_invalid_spec_is_refused_and_nothing_is_created() -> None:
    storage = FakeStorage()
    a_server(storage, addressPool=["not-a-cidr"])
    report = reconcile(storage)
    assert (report.outcome.status, report.outcome.finding.reason, report.outcome.warning) == (
        "False",
        Reason.INVALID_SPEC,
        True,
    )
    assert storage.count("secrets") == storage.count("services") == 0
    assert ready(storage)["reason"] == "InvalidSpec"


def test_host_port_deletes_the_service_the_server_owned() -> None:
    storage = FakeStorage()
    a_server(storage, routes=["10.96.0.0/12"])
    reconcile(storage)
    storage.edit("vpnservers", NS, "office", {"spec": {"expose": {"type": "HostPort"}}})
    reconcile(storage)
    assert storage.read("services", NS, "kvpn-office") is None
    assert ready(storage)["observedGeneration"] == 2


def test_api_server_creates_no_service_and_is_ready_with_a_healthy_gateway_and_no_endpoint() -> None:
    storage = FakeStorage()
    a_server(storage, routes=["10.96.0.0/12"], expose={"type": "ApiServer"})
    report = reconcile(storage)
    assert (report.outcome.status, report.outcome.finding.reason) == ("True", Reason.READY)
    assert "kubectl vpn up --via api" in ready(storage)["message"]
    assert storage.count("services") == storage.count("endpoints") == 0
    current = status(storage)
    assert current.get("endpoint") is None
    assert current["endpoints"] == []
    [gateway] = current["gateways"]
    assert (gateway["node"], gateway["ready"], gateway["address"]) == ("node-a", True, "192.0.2.10")
    assert gateway.get("endpoint") is None
    assert next(c for c in current["conditions"] if c["type"] == GATEWAYS)["status"] == "True"


def test_switching_to_api_server_deletes_the_service_the_server_owned_and_drops_the_endpoint() -> None:
    storage = FakeStorage()
    a_server(storage, routes=["10.96.0.0/12"], expose={"type": "NodePort", "endpoint": "vpn.example.com:31820"})
    reconcile(storage)
    assert storage.read("services", NS, "kvpn-office") is not None
    before = status(storage)
    assert before["endpoint"] == "vpn.example.com:31820"
    storage.edit("vpnservers", NS, "office", {"spec": {"expose": {"type": "ApiServer"}}})
    report = reconcile(storage)
    assert storage.read("services", NS, "kvpn-office") is None
    after = status(storage)
    assert after.get("endpoint") is None
    assert after["endpoints"] == []
    assert after["revision"] != before["revision"]  # peers re-render their configs, without an Endpoint
    assert (report.outcome.status, ready(storage)["observedGeneration"]) == ("True", 2)
    # spec.expose.endpoint is left as it was, and said to be ignored.
    assert "spec.expose.endpoint ignored" in ready(storage)["message"]


def test_api_server_leaves_a_service_it_does_not_own_alone() -> None:
    storage = FakeStorage()
    storage.put("services", {"metadata": {"name": "kvpn-office", "namespace": NS}, "spec": {"type": "ClusterIP"}})
    a_server(storage, routes=["10.96.0.0/12"], expose={"type": "ApiServer"})
    reconcile(storage)
    assert storage.read("services", NS, "kvpn-office") is not None


def test_a_condition_another_writer_added_after_our_read_is_kept() -> None:
    """The agent writes Dataplane between kopf's read and the operator's status patch (a 409 for the patch)."""
    storage = FakeStorage()
    a_server(storage, routes=["10.96.0.0/12"])
    stale = storage.read("vpnservers", NS, "office")
    assert stale is not None
    dataplane = {
        "type": "Dataplane",
        "status": "False",
        "reason": "SyncFailed",
        "message": "port taken on n1",
        "lastTransitionTime": "2026-12-01T12:00:00Z",
    }
    storage.patch_status(
        Kind.VPN_SERVER,
        NS,
        "office",
        {"conditions": [dataplane]},
        resource_version=stale["metadata"]["resourceVersion"],
    )
    reconcile_server(
        storage,
        ServerObject.model_validate(stale),
        facts=ClusterFacts(),
        service_networks=ServiceNetworks(),
        peers=list,
        now=T0,
    )
    types = [c["type"] for c in status(storage)["conditions"]]
    assert sorted(types) == sorted([READY, "PodNetwork", "ClusterDNS", "Gateways", "Dataplane"])


def test_peers_with_an_old_revision_are_nudged_and_a_deleted_one_is_skipped() -> None:
    storage = FakeStorage()
    a_server(storage, routes=["10.96.0.0/12"])
    storage.put(
        "vpnpeers", {"metadata": {"name": "laptop", "namespace": NS}, "spec": {"serverRef": {"name": "office"}}}
    )
    entries = [
        PeerEntry(NS, name, ready=False, reason="", address=None, server_revision=None, nudge=None)
        for name in ("laptop", "gone")
    ]
    reconcile(storage, entries)
    revision = status(storage)["revision"]
    peer = storage.read("vpnpeers", NS, "laptop")
    assert peer is not None
    assert peer["metadata"]["annotations"] == {ANNOTATION_NUDGE: revision}
    assert nudge(storage, entries, revision) == 1


def a_load_balancer(storage: FakeStorage, server: Obj, ip: str) -> Obj:
    owner = {"kind": "VpnServer", "name": server["metadata"]["name"], "uid": server["metadata"]["uid"]}
    return storage.put(
        "services",
        {
            "metadata": {"name": "kvpn-office", "namespace": NS, "ownerReferences": [owner]},
            "status": {"loadBalancer": {"ingress": [{"ip": ip}]}},
        },
    )


def test_a_new_load_balancer_address_nudges_its_server() -> None:
    storage = FakeStorage()
    server = a_server(storage, routes=["10.96.0.0/12"])
    reconcile(storage)  # endpoint vpn.example.com:51820, from the spec
    assert nudge_for_service(storage, a_load_balancer(storage, server, "203.0.113.7"))
    nudged = storage.read("vpnservers", NS, "office")
    assert nudged is not None
    assert ANNOTATION_NUDGE in nudged["metadata"]["annotations"]


def test_a_load_balancer_address_already_in_the_endpoint_nudges_nothing() -> None:
    storage = FakeStorage()
    server = a_server(storage, routes=["10.96.0.0/12"], expose={"endpoint": "203.0.113.7:51820"})
    reconcile(storage)
    writes = list(storage.writes)
    assert not nudge_for_service(storage, a_load_balancer(storage, server, "203.0.113.7"))
    assert storage.writes == writes
