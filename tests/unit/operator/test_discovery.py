"""Cluster facts read from API objects: Service and pod networks, gateway addresses, the endpoint to dial."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pytest

from kvpn_core.api import VpnServerSpec
from kvpn_core.conditions import Reason
from kvpn_operator.discovery import (
    cluster_dns,
    default_search,
    endpoint,
    gateway_address,
    kube_dns_address,
    pod_cidrs,
    pod_networks,
    service_cidrs_from_error,
    service_cidrs_from_objects,
)

Obj = dict[str, Any]

# kube-apiserver 1.20's answer to the operator's probe (a Service asking for clusterIP 0.0.0.0), verbatim.
REFUSAL_1_20 = (
    'Service "p" is invalid: spec.clusterIPs: Invalid value: []string{"0.0.0.0"}: failed to allocated '
    "ip:0.0.0.0 with error:provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/16"
)
# The same refusal as later releases word it.
REFUSAL_1_29 = (
    'Service "p" is invalid: spec.clusterIPs: Invalid value: []string{"0.0.0.0"}: failed to allocate IP '
    "0.0.0.0: the provided IP (0.0.0.0) is not in the valid range. The range of valid IPs is 10.96.0.0/12"
)
# A dual-stack Service asking for one address per family: one field error per family, aggregated.
REFUSAL_DUAL_STACK = (
    'Service "p" is invalid: [spec.clusterIPs[0]: Invalid value: []string{"0.0.0.0", "::"}: failed to '
    "allocated ip:0.0.0.0 with error:provided IP is not in the valid range. The range of valid IPs is "
    '10.96.0.0/16, spec.clusterIPs[1]: Invalid value: []string{"0.0.0.0", "::"}: failed to allocated ip::: '
    "with error:provided IP is not in the valid range. The range of valid IPs is fd00:10:96::/112]"
)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (REFUSAL_1_20, ["10.96.0.0/16"]),
        (REFUSAL_1_29, ["10.96.0.0/12"]),
        (REFUSAL_1_20.replace("10.96.0.0/16", "fd00:10:96::/112"), ["fd00:10:96::/112"]),
        (REFUSAL_1_20 + ".", ["10.96.0.0/16"]),
        ('Service "p" is invalid: spec.ipFamilies[0]: Invalid value: "IPv4": not configured on this cluster', []),
        ("", []),
    ],
    ids=["1.20", "1.29", "ipv6", "trailing-period", "other-refusal", "empty"],
)
def test_service_cidrs_from_error(message: str, expected: list[str]) -> None:
    assert service_cidrs_from_error(message) == expected


def test_service_cidrs_from_dual_stack_error_names_both_families() -> None:
    assert service_cidrs_from_error(REFUSAL_DUAL_STACK) == ["10.96.0.0/16", "fd00:10:96::/112"]


def test_service_cidrs_from_objects() -> None:
    objs = [
        {"spec": {"cidrs": ["10.96.0.0/16", "fd00:10:96::/112"]}},
        {"spec": {"cidrs": ["10.97.0.0/16"]}},
        {"spec": {}},
    ]
    assert service_cidrs_from_objects(objs) == ["10.96.0.0/16", "fd00:10:96::/112", "10.97.0.0/16"]


def node(
    name: str,
    *,
    pod_cidrs: list[str] | None = None,
    pod_cidr: str | None = None,
    labels: dict[str, str] | None = None,
    addresses: Sequence[tuple[str, str]] = (),
) -> Obj:
    spec: Obj = {}
    if pod_cidrs is not None:
        spec["podCIDRs"] = pod_cidrs
    if pod_cidr is not None:
        spec["podCIDR"] = pod_cidr
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
        "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]},
    }


def test_pod_cidrs_merges_adjacent_networks() -> None:
    nodes = [node(f"n{i}", pod_cidrs=[f"10.244.{i}.0/24"]) for i in (3, 0, 2, 1)]
    assert pod_cidrs(nodes) == ["10.244.0.0/22"]


def test_pod_cidrs_keeps_gaps_and_both_families_ipv4_first() -> None:
    nodes = [
        node("a", pod_cidrs=["fd00:10:244:1::/64", "10.244.1.0/24"]),
        node("b", pod_cidrs=["10.244.0.0/24", "fd00:10:244::/64"]),
        node("c", pod_cidrs=["10.244.5.0/24", "fd00:10:244:5::/64"]),
    ]
    assert pod_cidrs(nodes) == [
        "10.244.0.0/23",
        "10.244.5.0/24",
        "fd00:10:244::/63",
        "fd00:10:244:5::/64",
    ]


def test_pod_cidrs_falls_back_to_pod_cidr_and_skips_nodes_without() -> None:
    nodes = [node("old", pod_cidr="10.244.0.0/24"), node("new"), {"metadata": {"name": "bare"}}]
    assert pod_cidrs(nodes) == ["10.244.0.0/24"]


def test_pod_cidrs_of_no_nodes() -> None:
    assert pod_cidrs([]) == []


GATEWAYS = [
    node("c", labels={"kvpn.dev/gateway": "true"}, addresses=[("InternalIP", "10.0.0.3")]),
    node("b", labels={"kvpn.dev/gateway": "true"}, addresses=[("InternalIP", "10.0.0.2"), ("ExternalIP", "")]),
    node("a", labels={"kvpn.dev/gateway": "true"}, addresses=[("Hostname", "a"), ("InternalIP", "10.0.0.1")]),
    node("z", labels={}, addresses=[("ExternalIP", "203.0.113.99")]),
]


def test_gateway_address_prefers_any_external_ip() -> None:
    nodes = [*GATEWAYS, node("d", labels={"kvpn.dev/gateway": "true"}, addresses=[("ExternalIP", "203.0.113.4")])]
    assert gateway_address(nodes, {"kvpn.dev/gateway": "true"}) == "203.0.113.4"


def test_gateway_address_falls_back_to_internal_ip_of_first_node_by_name() -> None:
    assert gateway_address(GATEWAYS, {"kvpn.dev/gateway": "true"}) == "10.0.0.1"


def test_gateway_address_is_stable_whatever_the_list_order() -> None:
    answers = {gateway_address(order, {"kvpn.dev/gateway": "true"}) for order in itertools.permutations(GATEWAYS)}
    assert answers == {"10.0.0.1"}


def test_gateway_address_without_selector_takes_every_node() -> None:
    assert gateway_address(GATEWAYS, {}) == "203.0.113.99"


def test_gateway_address_none_when_no_node_matches() -> None:
    assert gateway_address(GATEWAYS, {"kvpn.dev/gateway": "other"}) is None
    assert gateway_address([node("bare")], {}) is None


def spec(**expose: Any) -> VpnServerSpec:
    return VpnServerSpec.model_validate({"addressPool": ["10.8.0.0/24"], "listenPort": 51820, "expose": expose})


def service(*, node_port: int | None = None, ingress: list[Obj] | None = None) -> Obj:
    port: Obj = {"name": "wireguard", "protocol": "UDP", "port": 51820, "targetPort": 51820}
    if node_port:
        port["nodePort"] = node_port
    svc: Obj = {"spec": {"ports": [port]}, "status": {}}
    if ingress is not None:
        svc["status"]["loadBalancer"] = {"ingress": ingress}
    return svc


NODES = [node("n1", addresses=[("InternalIP", "10.0.0.1")])]
NODES_V6 = [node("n1", addresses=[("InternalIP", "fd00::1")])]


@pytest.mark.parametrize(
    ("expose", "svc", "nodes", "expected"),
    [
        ({"type": "LoadBalancer", "endpoint": "vpn.example.com:443"}, None, [], "vpn.example.com:443"),
        ({"type": "HostPort", "endpoint": "[2001:db8::1]:51820"}, None, NODES, "[2001:db8::1]:51820"),
        ({"type": "LoadBalancer"}, service(ingress=[{"ip": "203.0.113.7"}]), [], "203.0.113.7:51820"),
        ({"type": "LoadBalancer"}, service(ingress=[{"hostname": "lb.example.com"}]), [], "lb.example.com:51820"),
        ({"type": "LoadBalancer"}, service(ingress=[{}, {"ip": "2001:db8::7"}]), [], "[2001:db8::7]:51820"),
        ({"type": "LoadBalancer"}, service(ingress=[]), NODES, None),
        ({"type": "LoadBalancer"}, service(), NODES, None),
        ({"type": "LoadBalancer"}, None, NODES, None),
        ({"type": "NodePort"}, service(node_port=31820), NODES, "10.0.0.1:31820"),
        ({"type": "NodePort"}, service(node_port=31820), NODES_V6, "[fd00::1]:31820"),
        ({"type": "NodePort"}, service(), NODES, None),
        ({"type": "NodePort"}, None, NODES, None),
        ({"type": "NodePort"}, service(node_port=31820), [], None),
        ({"type": "HostPort"}, None, NODES, "10.0.0.1:51820"),
        ({"type": "HostPort"}, None, NODES_V6, "[fd00::1]:51820"),
        ({"type": "HostPort"}, None, [], None),
    ],
    ids=[
        "explicit-wins-over-lb",
        "explicit-wins-over-node",
        "lb-ip",
        "lb-hostname",
        "lb-skips-empty-ingress-ipv6",
        "lb-empty-ingress",
        "lb-no-status",
        "lb-no-service",
        "nodeport",
        "nodeport-ipv6",
        "nodeport-not-assigned",
        "nodeport-no-service",
        "nodeport-no-gateway",
        "hostport",
        "hostport-ipv6",
        "hostport-no-gateway",
    ],
)
def test_endpoint(expose: Obj, svc: Obj | None, nodes: list[Obj], expected: str | None) -> None:
    assert endpoint(spec(**expose), svc, nodes) == expected


def test_endpoint_hostport_uses_listen_port_not_a_node_port() -> None:
    server = VpnServerSpec.model_validate(
        {"addressPool": ["10.8.0.0/24"], "listenPort": 443, "expose": {"type": "HostPort"}}
    )
    assert endpoint(server, service(node_port=31820), NODES) == "10.0.0.1:443"


def test_endpoint_nodeport_honours_node_selector() -> None:
    server = VpnServerSpec.model_validate({"addressPool": ["10.8.0.0/24"], "nodeSelector": {"gw": "yes"}})
    nodes = [
        node("a", addresses=[("ExternalIP", "203.0.113.1")]),
        node("b", labels={"gw": "yes"}, addresses=[("InternalIP", "10.0.0.2")]),
    ]
    assert endpoint(server, service(node_port=30000), nodes) == "10.0.0.2:30000"


@pytest.mark.parametrize(
    ("svc", "expected"),
    [
        ({"spec": {"clusterIP": "10.96.0.10"}}, "10.96.0.10"),
        ({"spec": {"clusterIP": "fd00:10:96::a"}}, "fd00:10:96::a"),
        ({"spec": {"clusterIP": "None"}}, None),
        ({"spec": {"clusterIP": ""}}, None),
        ({"spec": {}}, None),
        (None, None),
    ],
    ids=["ipv4", "ipv6", "headless", "empty", "unset", "no-service"],
)
def test_kube_dns_address(svc: Obj | None, expected: str | None) -> None:
    assert kube_dns_address(svc) == expected


def test_default_search() -> None:
    assert default_search("cluster.local") == ["svc.cluster.local", "cluster.local"]


# --- what discovery did not find: PodNetwork and ClusterDNS ------------------------------------------

SERVER_SPEC = {"addressPool": ["10.8.0.0/24"]}
DNS_SERVICE = ("kube-system", "kube-dns")


def spec_of(**fields: Any) -> VpnServerSpec:
    return VpnServerSpec.model_validate({**SERVER_SPEC, **fields})


def test_pod_network_found_names_the_networks() -> None:
    nodes = [node("a", pod_cidrs=["10.244.0.0/16", "fd00:244::/56"])]
    cidrs, outcome = pod_networks(spec_of(), nodes, [])
    assert cidrs == ["10.244.0.0/16", "fd00:244::/56"]
    assert (outcome.status, outcome.finding.reason, outcome.warning) == ("True", Reason.POD_NETWORK_FOUND, False)
    assert outcome.finding.message == "pod networks from the nodes' pod CIDRs: 10.244.0.0/16, fd00:244::/56"


def test_pod_network_from_spec_is_not_discovered_at_all() -> None:
    cidrs, outcome = pod_networks(spec_of(routes=["10.96.0.0/12"]), [node("a", pod_cidr="10.244.0.0/24")], None)
    assert cidrs == []
    assert (outcome.status, outcome.finding.reason) == ("True", Reason.ROUTES_FROM_SPEC)


def test_no_pod_network_is_a_warning_that_says_what_to_set() -> None:
    cidrs, outcome = pod_networks(spec_of(), [node("a")], [])
    assert cidrs == []
    assert (outcome.status, outcome.finding.reason, outcome.warning) == ("False", Reason.POD_NETWORK_NOT_FOUND, True)
    assert outcome.finding.message == (
        "no Node has spec.podCIDR (is the controller manager's --allocate-node-cidrs on? some CNIs allocate "
        "pod addresses elsewhere) and no pod outside hostNetwork has an IP yet: set spec.podNetwork.cidrs with "
        "spec.podNetwork.strategy Explicit, or set spec.routes to the Service and pod networks"
    )


def test_cluster_dns_found() -> None:
    nameserver, outcome = cluster_dns(spec_of(), {"spec": {"clusterIP": "10.96.0.10"}}, DNS_SERVICE)
    assert nameserver == "10.96.0.10"
    assert (outcome.status, outcome.finding.reason, outcome.warning) == ("True", Reason.DNS_SERVICE_FOUND, False)
    assert "10.96.0.10" in outcome.finding.message
    assert "kube-system/kube-dns" in outcome.finding.message


def test_cluster_dns_service_missing_says_what_to_set() -> None:
    nameserver, outcome = cluster_dns(spec_of(), None, ("dns", "coredns"))
    assert nameserver is None
    assert (outcome.status, outcome.finding.reason, outcome.warning) == ("False", Reason.DNS_SERVICE_NOT_FOUND, True)
    assert outcome.finding.message == (
        "Service dns/coredns not found: set spec.dns.nameserver, or the chart's operator.dnsService "
        "(the operator's --dns-service), or spec.dns.enabled: false"
    )


def test_cluster_dns_service_without_cluster_ip() -> None:
    nameserver, outcome = cluster_dns(spec_of(), {"spec": {"clusterIP": "None"}}, DNS_SERVICE)
    assert nameserver is None
    assert (outcome.status, outcome.finding.reason, outcome.warning) == (
        "False",
        Reason.DNS_SERVICE_HAS_NO_CLUSTER_IP,
        True,
    )
    assert "Service kube-system/kube-dns has no ClusterIP" in outcome.finding.message
    assert "spec.dns.nameserver" in outcome.finding.message


def test_cluster_dns_from_spec_needs_no_service() -> None:
    nameserver, outcome = cluster_dns(spec_of(dns={"nameserver": "10.0.0.53"}), None, DNS_SERVICE)
    assert nameserver == "10.0.0.53"
    assert (outcome.status, outcome.finding.reason) == ("True", Reason.NAMESERVER_FROM_SPEC)


def test_cluster_dns_disabled_is_true_and_says_so() -> None:
    """Disabled on purpose is nothing missing: True, so that False always means "act on this"."""
    nameserver, outcome = cluster_dns(
        spec_of(dns={"enabled": False}), {"spec": {"clusterIP": "10.96.0.10"}}, DNS_SERVICE
    )
    assert nameserver is None
    assert (outcome.status, outcome.finding.reason) == ("True", Reason.DISABLED)
    assert "spec.dns.enabled is false" in outcome.finding.message
