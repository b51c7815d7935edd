"""Pod networks for every CNI: the nodes' pod CIDRs, the pod IPs in use, or the spec's, and what PodNetwork says."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from pydantic import ValidationError

from kvpn_core.api import PodNetwork, PodNetworkStrategy, VpnServerSpec
from kvpn_core.conditions import POD_NETWORK, READY, Reason
from kvpn_core.kube import ForbiddenError
from kvpn_operator.discovery import covering_networks, lists_pods, pod_ips, pod_networks
from kvpn_operator.reporting import describe_validation_error
from tests.unit.fakes import FakeStorage
from tests.unit.operator.test_server import NS, a_server, reconcile, status

Obj = dict[str, Any]

REMEDY = "set spec.podNetwork.cidrs with spec.podNetwork.strategy Explicit, or set spec.routes"


def node(name: str, *cidrs: str) -> Obj:
    return {"metadata": {"name": name}, "spec": {"podCIDRs": list(cidrs)} if cidrs else {}}


def pod(name: str, *ips: str, host_network: bool = False, phase: str = "Running", namespace: str = "apps") -> Obj:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"hostNetwork": True} if host_network else {},
        "status": {"phase": phase, "podIPs": [{"ip": ip} for ip in ips]},
    }


def spec_of(strategy: str | None = None, cidrs: list[str] | None = None, **fields: Any) -> VpnServerSpec:
    network: Obj = {}
    if strategy:
        network["strategy"] = strategy
    if cidrs:
        network["cidrs"] = cidrs
    return VpnServerSpec.model_validate({"addressPool": ["10.8.0.0/24"], "podNetwork": network, **fields})


# --- the pod IPs in use, summarised ------------------------------------------------------------------------


def test_pod_ips_are_every_status_pod_ip_of_pods_with_their_own() -> None:
    pods = [
        pod("web", "10.0.1.5"),
        pod("dual", "10.0.2.7", "fd00:10:0:2::7"),
        pod("pending"),  # scheduled, no address yet
        {"metadata": {"name": "bare"}},
        pod("agent", "192.0.2.10", host_network=True),  # the node's own address
        pod("job", "10.9.9.9", phase="Succeeded"),  # done: its address is free again
        pod("crashed", "10.9.9.8", phase="Failed"),
        pod("odd", "not-an-ip"),
    ]
    assert [str(ip) for ip in pod_ips(pods)] == ["10.0.1.5", "10.0.2.7", "fd00:10:0:2::7"]


def ips(*addresses: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(a) for a in addresses]


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        (("10.0.1.5", "10.0.200.9", "10.0.7.1"), ["10.0.0.0/16"]),
        # Adjacent groups merge; a gap stays a gap.
        (("10.0.1.5", "10.1.3.4", "10.3.0.1"), ["10.0.0.0/15", "10.3.0.0/16"]),
        (("fd00:10:0:0::5", "fd00:10:0:0:1::9", "fd00:10:0:1::3"), ["fd00:10::/63"]),
        (("fd00:10:0:7::1", "fd00:10:0:0::1"), ["fd00:10::/64", "fd00:10:0:7::/64"]),
        # Both families, IPv4 first, whatever the order of the pods.
        (("fd00:10::1", "192.168.3.4", "10.0.0.1"), ["10.0.0.0/16", "192.168.0.0/16", "fd00:10::/64"]),
        ((), []),
    ],
    ids=["ipv4-one-group", "ipv4-merged-and-gap", "ipv6-merged", "ipv6-gap", "mixed", "empty"],
)
def test_covering_networks(addresses: tuple[str, ...], expected: list[str]) -> None:
    assert covering_networks(ips(*addresses)) == expected


def test_covering_networks_hold_every_address_and_stay_few() -> None:
    # A Cilium cluster-pool of 200 nodes (a /24 each from 10.0.0.0/8), ten pods each.
    addresses = [f"10.{n // 256}.{n % 256}.{p}" for n in range(200) for p in range(10, 20)]
    cidrs = covering_networks(ips(*addresses))
    assert cidrs == ["10.0.0.0/16"]
    assert all(any(ip in ipaddress.ip_network(c) for c in cidrs) for ip in ips(*addresses))


# --- the strategies ----------------------------------------------------------------------------------------

NODES = [node("a", "10.244.0.0/24", "fd00:244::/64"), node("b", "10.244.1.0/24", "fd00:244:0:1::/64")]
IN_NODES = [pod("p1", "10.244.0.9", "fd00:244::9"), pod("p2", "10.244.1.3", "fd00:244:0:1::3")]


def test_auto_takes_the_nodes_pod_cidrs_when_they_hold_every_pod_ip() -> None:
    cidrs, outcome = pod_networks(spec_of(), NODES, [*IN_NODES, pod("agent", "192.0.2.10", host_network=True)])
    assert cidrs == ["10.244.0.0/23", "fd00:244::/63"]
    assert (outcome.status, outcome.finding.reason, outcome.warning) == ("True", Reason.POD_NETWORK_FOUND, False)
    assert outcome.finding.message == "pod networks from the nodes' pod CIDRs: 10.244.0.0/23, fd00:244::/63"


def test_auto_covers_the_pod_ips_when_no_node_has_a_pod_cidr() -> None:
    # Cilium cluster-pool IPAM, the AWS VPC CNI: Node.spec.podCIDR stays empty.
    cidrs, outcome = pod_networks(spec_of(), [node("a"), node("b")], [pod("p1", "10.0.1.5"), pod("p2", "10.0.2.6")])
    assert cidrs == ["10.0.0.0/16"]
    assert (outcome.status, outcome.finding.reason, outcome.warning) == ("True", Reason.POD_NETWORK_FROM_POD_IPS, False)
    assert outcome.finding.message == (
        "pod networks from the pod IPs in use (the nodes' pod CIDRs are empty: no Node has spec.podCIDR): 10.0.0.0/16"
    )


def test_auto_covers_the_pod_ips_when_the_nodes_pod_cidrs_miss_some() -> None:
    # Calico IPAM on a cluster whose controller manager allocates node CIDRs anyway: unused, and wrong.
    pods = [*IN_NODES, pod("calico", "192.168.12.7")]
    cidrs, outcome = pod_networks(spec_of(), NODES, pods)
    assert cidrs == ["10.244.0.0/16", "192.168.0.0/16", "fd00:244::/63"]  # two adjacent /64s
    assert outcome.finding.reason == Reason.POD_NETWORK_FROM_POD_IPS
    assert outcome.finding.message == (
        "pod networks from the pod IPs in use (the nodes' pod CIDRs do not cover them: 192.168.12.7 is outside "
        "10.244.0.0/23, fd00:244::/63): 10.244.0.0/16, 192.168.0.0/16, fd00:244::/63"
    )


def test_auto_covers_the_pod_ips_when_some_node_has_no_pod_cidr() -> None:
    _, outcome = pod_networks(spec_of(), [*NODES, node("virtual")], IN_NODES)
    assert outcome.finding.reason == Reason.POD_NETWORK_FROM_POD_IPS
    assert "(the nodes' pod CIDRs do not cover them: Node virtual has no spec.podCIDR)" in outcome.finding.message


def test_auto_takes_what_nodes_have_while_no_pod_has_an_ip() -> None:
    cidrs, outcome = pod_networks(spec_of(), [node("a", "10.244.0.0/24"), node("new")], [pod("pending")])
    assert (cidrs, outcome.finding.reason) == (["10.244.0.0/24"], Reason.POD_NETWORK_FOUND)


def test_auto_skips_host_network_pods_when_it_checks_the_nodes() -> None:
    # The agent and kube-proxy carry the node's address, which no pod CIDR holds.
    pods = [*IN_NODES, pod("kube-proxy", "192.0.2.10", host_network=True)]
    assert pod_networks(spec_of(), NODES, pods).outcome.finding.reason == Reason.POD_NETWORK_FOUND


def test_auto_finding_nothing_names_the_fields_to_set() -> None:
    cidrs, outcome = pod_networks(spec_of(), [node("a")], [pod("agent", "192.0.2.10", host_network=True)])
    assert cidrs == []
    assert (outcome.status, outcome.finding.reason, outcome.warning) == ("False", Reason.POD_NETWORK_NOT_FOUND, True)
    assert "no Node has spec.podCIDR" in outcome.finding.message
    assert "no pod outside hostNetwork has an IP yet" in outcome.finding.message
    assert REMEDY in outcome.finding.message


def test_auto_may_not_list_pods_keeps_the_nodes_pod_cidrs_and_says_they_are_unchecked() -> None:
    cidrs, outcome = pod_networks(spec_of(), NODES, None)
    assert cidrs == ["10.244.0.0/23", "fd00:244::/63"]
    assert (outcome.status, outcome.finding.reason) == ("True", Reason.POD_NETWORK_FOUND)
    assert outcome.finding.message == (
        "pod networks from the nodes' pod CIDRs: 10.244.0.0/23, fd00:244::/63 (not checked against the pod IPs "
        "in use: the operator may not list pods to find the pod IPs in use (its ClusterRole needs list on pods, "
        "as the chart's grants))"
    )


@pytest.mark.parametrize("strategy", ["Auto", "PodIPs"])
def test_may_not_list_pods_without_another_source_is_a_warning_naming_the_permission(strategy: str) -> None:
    cidrs, outcome = pod_networks(spec_of(strategy), [node("a")], None)
    assert cidrs == []
    assert (outcome.status, outcome.finding.reason, outcome.warning) == ("False", Reason.POD_LIST_FORBIDDEN, True)
    assert "may not list pods" in outcome.finding.message
    assert "list on pods" in outcome.finding.message
    assert REMEDY in outcome.finding.message


def test_node_pod_cidrs_trusts_the_nodes_whatever_the_pods_say() -> None:
    cidrs, outcome = pod_networks(spec_of("NodePodCIDRs"), NODES, [pod("calico", "192.168.12.7")])
    assert (cidrs, outcome.finding.reason) == (["10.244.0.0/23", "fd00:244::/63"], Reason.POD_NETWORK_FOUND)


def test_node_pod_cidrs_without_any_says_what_to_set() -> None:
    cidrs, outcome = pod_networks(spec_of("NodePodCIDRs"), [node("a")], None)
    assert (cidrs, outcome.status, outcome.finding.reason) == ([], "False", Reason.POD_NETWORK_NOT_FOUND)
    assert outcome.finding.message.startswith("no Node has spec.podCIDR (is the controller manager's")
    assert REMEDY in outcome.finding.message


def test_pod_ips_ignores_the_nodes_pod_cidrs() -> None:
    cidrs, outcome = pod_networks(spec_of("PodIPs"), NODES, IN_NODES)
    assert cidrs == ["10.244.0.0/16", "fd00:244::/63"]
    assert outcome.finding.message == (
        "pod networks from the pod IPs in use (spec.podNetwork.strategy PodIPs): 10.244.0.0/16, fd00:244::/63"
    )


def test_pod_ips_without_any_says_what_to_set() -> None:
    cidrs, outcome = pod_networks(spec_of("PodIPs"), NODES, [pod("agent", "192.0.2.10", host_network=True)])
    assert (cidrs, outcome.status, outcome.finding.reason) == ([], "False", Reason.POD_NETWORK_NOT_FOUND)
    assert outcome.finding.message.startswith("no pod outside hostNetwork has an IP yet: ")
    assert REMEDY in outcome.finding.message


def test_explicit_is_exactly_the_spec_cidrs() -> None:
    spec = spec_of("Explicit", ["10.42.0.0/16", "10.43.0.0/16", "fd00:42::/56"])
    cidrs, outcome = pod_networks(spec, NODES, None)
    assert cidrs == ["10.42.0.0/16", "10.43.0.0/16", "fd00:42::/56"]  # not merged, not discovered
    assert (outcome.status, outcome.finding.reason) == ("True", Reason.POD_NETWORK_FROM_SPEC)
    assert (
        outcome.finding.message == "pod networks from spec.podNetwork.cidrs: 10.42.0.0/16, 10.43.0.0/16, fd00:42::/56"
    )


def test_routes_override_every_strategy() -> None:
    cidrs, outcome = pod_networks(spec_of("Explicit", ["10.42.0.0/16"], routes=["10.96.0.0/12"]), NODES, None)
    assert (cidrs, outcome.finding.reason) == ([], Reason.ROUTES_FROM_SPEC)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (spec_of(), True),
        (spec_of("PodIPs"), True),
        (spec_of("NodePodCIDRs"), False),
        (spec_of("Explicit", ["10.42.0.0/16"]), False),
        (spec_of(routes=["10.96.0.0/12"]), False),
    ],
    ids=["auto", "pod-ips", "node-pod-cidrs", "explicit", "routes"],
)
def test_lists_pods_only_when_a_strategy_needs_them(spec: VpnServerSpec, expected: bool) -> None:
    assert lists_pods(spec) is expected


# --- spec.podNetwork ---------------------------------------------------------------------------------------


def test_pod_network_defaults_to_auto() -> None:
    spec = VpnServerSpec.model_validate({"addressPool": ["10.8.0.0/24"]})
    assert spec.pod_network == PodNetwork(strategy=PodNetworkStrategy.AUTO, cidrs=[])
    assert spec.to_api()["podNetwork"] == {"strategy": "Auto", "cidrs": []}


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ({"strategy": "Explicit"}, "spec.podNetwork: strategy Explicit needs cidrs: the pod networks to push to peers"),
        (
            {"cidrs": ["10.42.0.0/16"]},
            "spec.podNetwork: cidrs are taken only with strategy Explicit (it is Auto): set strategy Explicit, "
            "or remove cidrs",
        ),
        (
            {"strategy": "PodIPs", "cidrs": ["10.42.0.0/16"]},
            "spec.podNetwork: cidrs are taken only with strategy Explicit (it is PodIPs): set strategy Explicit, "
            "or remove cidrs",
        ),
        ({"strategy": "Calico"}, "spec.podNetwork.strategy: Input should be 'Auto', 'NodePodCIDRs', 'PodIPs' or"),
        ({"strategy": "Explicit", "cidrs": ["10.42.0.1/16"]}, "spec.podNetwork.cidrs[0]: '10.42.0.1/16' is not a"),
    ],
    ids=["explicit-without-cidrs", "cidrs-with-auto", "cidrs-with-pod-ips", "unknown-strategy", "host-bits"],
)
def test_pod_network_refusals_name_the_field(network: Obj, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        VpnServerSpec.model_validate({"addressPool": ["10.8.0.0/24"], "podNetwork": network})
    assert describe_validation_error(refused.value).startswith(message)


# --- reconcile_server: one list of the pods per reconcile, a 403 is a condition ---------------------------


class CountingStorage(FakeStorage):
    """The fake API, counting pod lists; `forbidden` answers them as RBAC without list on pods would."""

    def __init__(self, *, forbidden: bool = False) -> None:
        super().__init__(service_cidrs=["10.96.0.0/16"])
        self.forbidden = forbidden
        self.pod_lists = 0

    def list_pods(self) -> list[Obj]:
        self.pod_lists += 1
        if self.forbidden:
            raise ForbiddenError(403, 'pods is forbidden: User "op" cannot list resource "pods" at the cluster scope')
        return super().list_pods()


def condition(storage: FakeStorage, type_: str) -> Obj:
    return next(c for c in status(storage)["conditions"] if c["type"] == type_)


def test_a_server_routes_the_pod_ips_in_use_when_nodes_have_no_pod_cidr() -> None:
    storage = CountingStorage()
    storage.put("pods", pod("web", "10.0.3.4"))
    storage.put("pods", pod("coredns", "10.0.9.2", namespace="kube-system"))
    storage.put("pods", pod("agent", "192.0.2.10", host_network=True, namespace=NS))
    a_server(storage)
    reconcile(storage)
    assert status(storage)["routes"] == ["10.96.0.0/16", "10.0.0.0/16"]
    found = condition(storage, POD_NETWORK)
    assert (found["status"], found["reason"]) == ("True", "PodNetworkFromPodIPs")
    assert found["message"].endswith("(the nodes' pod CIDRs are empty: no Node has spec.podCIDR): 10.0.0.0/16")
    assert storage.pod_lists == 1


def test_a_server_that_may_not_list_pods_says_so_and_stays_ready_for_cluster_ips() -> None:
    storage = CountingStorage(forbidden=True)
    a_server(storage)
    report = reconcile(storage)
    gap = condition(storage, POD_NETWORK)
    assert (gap["status"], gap["reason"]) == ("False", "PodListForbidden")
    assert "list on pods" in gap["message"]
    assert (report.outcome.status, condition(storage, READY)["status"]) == ("True", "True")
    assert "peers reach no pod IPs (see condition PodNetwork)" in condition(storage, READY)["message"]
    assert status(storage)["routes"] == ["10.96.0.0/16"]
    assert Reason.POD_LIST_FORBIDDEN in [o.finding.reason for o in report.news]  # a Warning Event


def test_a_server_with_explicit_pod_networks_routes_exactly_those_and_lists_no_pods() -> None:
    storage = CountingStorage()
    storage.put("nodes", {"metadata": {"name": "n1"}, "spec": {"podCIDR": "10.244.0.0/24"}})
    a_server(storage, podNetwork={"strategy": "Explicit", "cidrs": ["10.42.0.0/16"]})
    reconcile(storage)
    assert status(storage)["routes"] == ["10.96.0.0/16", "10.42.0.0/16"]
    assert condition(storage, POD_NETWORK)["reason"] == "PodNetworkFromSpec"
    assert storage.pod_lists == 0


def test_a_server_with_routes_lists_no_pods() -> None:
    storage = CountingStorage(forbidden=True)
    a_server(storage, routes=["10.96.0.0/12"])
    reconcile(storage)
    assert condition(storage, POD_NETWORK)["reason"] == "RoutesFromSpec"
    assert storage.pod_lists == 0


def test_a_server_with_cidrs_but_no_explicit_strategy_is_refused() -> None:
    storage = CountingStorage()
    a_server(storage, podNetwork={"cidrs": ["10.42.0.0/16"]})
    report = reconcile(storage)
    assert (report.outcome.status, report.outcome.finding.reason) == ("False", Reason.INVALID_SPEC)
    assert report.outcome.finding.message.startswith("spec.podNetwork: cidrs are taken only with strategy Explicit")
    assert storage.count("services") == 0
