"""Pure readers of cluster facts (Service and pod networks, node addresses, endpoint, DNS) and what they lack."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from kvpn_core.api import ExposeType, PodNetworkStrategy, VpnServerSpec
from kvpn_core.conditions import Outcome, Reason

Obj = dict[str, Any]
IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# kube-apiserver's answer to a Service whose clusterIP lies outside the Service network, e.g.
# "... provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/16".
_VALID_RANGE = re.compile(r"range of valid IPs is ([0-9a-fA-F:./, ]+)")
_CIDR = re.compile(r"[0-9a-fA-F:.]+/\d{1,3}")


def service_cidrs_from_error(message: str) -> list[str]:
    """The Service networks named in the API server's refusal of an out-of-range clusterIP."""
    return [cidr for match in _VALID_RANGE.finditer(message) for cidr in _CIDR.findall(match.group(1))]


def service_cidrs_from_objects(service_cidrs: Iterable[Obj]) -> list[str]:
    """The networks of ServiceCIDR objects (networking.k8s.io, Kubernetes 1.31 and later)."""
    return [c for obj in service_cidrs for c in obj.get("spec", {}).get("cidrs", [])]


def _node_pod_cidrs(node: Obj) -> list[str]:
    spec = node.get("spec") or {}
    return list(spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []))


def _merged(nets: Iterable[Network]) -> list[str]:
    """The networks with duplicates, nested and adjacent ones merged, IPv4 first, so peers get few routes."""
    nets = list(nets)
    v4 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network))
    v6 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network))
    return [*map(str, v4), *map(str, v6)]


def pod_cidrs(nodes: Iterable[Obj]) -> list[str]:
    """The nodes' pod networks (strategy NodePodCIDRs), merged where adjacent so peers get few routes."""
    return _merged(ipaddress.ip_network(c, strict=False) for node in nodes for c in _node_pod_cidrs(node))


# A pod IP stands for the /16 (IPv4) or /64 (IPv6) around it. Coarse on purpose: every change of the routes
# re-renders every peer's config, and a wg-quick file on a laptop is not re-read by itself, so a pod that
# starts on a new node must not change them. Node blocks are /24s (Cilium cluster-pool, kubeadm) or /26s
# (Calico) inside one pool, so one /16 holds hundreds of nodes; a /64 is the unit IPv6 networks are cut into
# (Kubernetes gives each node one, Cilium's and Calico's default IPv6 pools lie inside one). Telepresence
# starts from the same groups and then narrows each to its addresses; not narrowing keeps the routes stable.
# The cost: with the AWS VPC CNI or Azure CNI, pods share the nodes' subnets, and the /16 may hold other
# hosts of the VPC too, which peers then reach (spec.podNetwork Explicit, or spec.peerCeilings, narrow it).
POD_IP_GROUP_PREFIX = {4: 16, 6: 64}
_FINISHED = frozenset({"Succeeded", "Failed"})


def pod_ips(pods: Iterable[Obj]) -> list[IP]:
    """The pod network's addresses in use: each status.podIPs entry of pods that hold an address of their own.

    Left out: hostNetwork pods, whose IP is their node's, and finished pods, whose IP is free again.
    """
    found: list[IP] = []
    for pod in pods:
        if (pod.get("spec") or {}).get("hostNetwork"):
            continue
        status = pod.get("status") or {}
        if status.get("phase") in _FINISHED:
            continue
        for entry in status.get("podIPs") or []:
            try:
                found.append(ipaddress.ip_address(str(entry.get("ip", ""))))
            except ValueError:
                continue  # not written by a kubelet; nothing to route
    return found


def covering_networks(ips: Iterable[IP]) -> list[str]:
    """A few networks that hold every address: its group's (POD_IP_GROUP_PREFIX) for each, merged where adjacent."""
    return _merged({ipaddress.ip_network(f"{ip}/{POD_IP_GROUP_PREFIX[ip.version]}", strict=False) for ip in ips})


class PodNetworks(NamedTuple):
    """The pod networks among the default routes, and the PodNetwork condition that says where they came from."""

    cidrs: list[str]
    outcome: Outcome


def lists_pods(spec: VpnServerSpec) -> bool:
    """Whether finding the server's pod networks takes the pods: with strategy Auto or PodIPs, unless spec.routes
    replaces them. The pods are listed once per reconcile of a server, never per peer."""
    return not spec.routes and spec.pod_network.strategy in {PodNetworkStrategy.AUTO, PodNetworkStrategy.POD_IPS}


_REMEDY = (
    "set spec.podNetwork.cidrs with spec.podNetwork.strategy Explicit, or set spec.routes to the Service and pod "
    "networks"
)
_NO_NODE_CIDR = (
    "no Node has spec.podCIDR (is the controller manager's --allocate-node-cidrs on? some CNIs allocate pod "
    "addresses elsewhere)"
)
_NO_POD_IP = "no pod outside hostNetwork has an IP yet"
_PODS_FORBIDDEN = (
    "the operator may not list pods to find the pod IPs in use (its ClusterRole needs list on pods, as the "
    "chart's grants)"
)


def pod_networks(spec: VpnServerSpec, nodes: Iterable[Obj], pods: Iterable[Obj] | None) -> PodNetworks:
    """The pod networks spec.podNetwork asks for, found in `nodes` and `pods` (None: the operator may not list
    pods), with the PodNetwork condition: which strategy found what, or which field to set when none found any.

    spec.routes, when set, replaces every discovered route, and the condition says just that.
    """
    if spec.routes:
        outcome = Outcome.ready(Reason.ROUTES_FROM_SPEC, "spec.routes is set: peers get exactly those routes")
        return PodNetworks([], outcome)
    strategy = spec.pod_network.strategy
    if strategy is PodNetworkStrategy.EXPLICIT:
        cidrs = list(spec.pod_network.cidrs)
        message = f"pod networks from spec.podNetwork.cidrs: {', '.join(cidrs)}"
        return PodNetworks(cidrs, Outcome.ready(Reason.POD_NETWORK_FROM_SPEC, message))
    return _discover(strategy, list(nodes), pods)


def _discover(strategy: PodNetworkStrategy, nodes: list[Obj], pods: Iterable[Obj] | None) -> PodNetworks:
    node_cidrs = pod_cidrs(nodes)
    if strategy is PodNetworkStrategy.NODE_POD_CIDRS:
        return _from_nodes(node_cidrs) if node_cidrs else _not_found(_NO_NODE_CIDR)
    if pods is None:
        return _pods_forbidden(strategy, node_cidrs)
    ips = pod_ips(pods)
    if strategy is PodNetworkStrategy.POD_IPS:
        return _from_pod_ips(ips, "spec.podNetwork.strategy PodIPs") if ips else _not_found(_NO_POD_IP)
    return _auto(nodes, node_cidrs, ips)


def _auto(nodes: list[Obj], node_cidrs: list[str], ips: list[IP]) -> PodNetworks:
    """The nodes' pod CIDRs when every node has one and they hold every pod IP in use, else the pod IPs'
    networks. With no pod IP in use there is nothing to check the nodes' pod CIDRs against: taken, if any."""
    if not ips:
        return _from_nodes(node_cidrs) if node_cidrs else _not_found(f"{_NO_NODE_CIDR} and {_NO_POD_IP}")
    why = _not_covered(nodes, node_cidrs, ips)
    return _from_nodes(node_cidrs) if why is None else _from_pod_ips(ips, why)


def _pods_forbidden(strategy: PodNetworkStrategy, node_cidrs: list[str]) -> PodNetworks:
    if strategy is PodNetworkStrategy.AUTO and node_cidrs:
        # Right for most CNIs: taken, and said to be unchecked, rather than refused.
        return _from_nodes(node_cidrs, f" (not checked against the pod IPs in use: {_PODS_FORBIDDEN})")
    message = f"{_PODS_FORBIDDEN}: grant it, or {_REMEDY}"
    return PodNetworks([], Outcome.missing(Reason.POD_LIST_FORBIDDEN, message))


def _not_covered(nodes: list[Obj], node_cidrs: list[str], ips: list[IP]) -> str | None:
    """Why the nodes' pod CIDRs do not stand for the pod network (strategy Auto): some node has none, or some
    pod IP in use lies outside them. None when every node has one and they hold every pod IP."""
    if not node_cidrs:
        return "the nodes' pod CIDRs are empty: no Node has spec.podCIDR"
    if bare := sorted(str((n.get("metadata") or {}).get("name")) for n in nodes if not _node_pod_cidrs(n)):
        return f"the nodes' pod CIDRs do not cover them: Node {bare[0]} has no spec.podCIDR"
    nets = [ipaddress.ip_network(c) for c in node_cidrs]
    if (outside := next((ip for ip in ips if not any(ip in net for net in nets)), None)) is not None:
        return f"the nodes' pod CIDRs do not cover them: {outside} is outside {', '.join(node_cidrs)}"
    return None


def _from_nodes(node_cidrs: list[str], note: str = "") -> PodNetworks:
    message = f"pod networks from the nodes' pod CIDRs: {', '.join(node_cidrs)}{note}"
    return PodNetworks(node_cidrs, Outcome.ready(Reason.POD_NETWORK_FOUND, message))


def _from_pod_ips(ips: list[IP], why: str) -> PodNetworks:
    cidrs = covering_networks(ips)
    message = f"pod networks from the pod IPs in use ({why}): {', '.join(cidrs)}"
    return PodNetworks(cidrs, Outcome.ready(Reason.POD_NETWORK_FROM_POD_IPS, message))


def _not_found(missing: str) -> PodNetworks:
    return PodNetworks([], Outcome.missing(Reason.POD_NETWORK_NOT_FOUND, f"{missing}: {_REMEDY}"))


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def gateway_address(nodes: Iterable[Obj], selector: Mapping[str, str]) -> str | None:
    """An address laptops can dial on a gateway node: its ExternalIP, else its InternalIP.

    Nodes are taken in name order so the answer is stable from one reconcile to the next.
    """
    gateways = sorted(
        (n for n in nodes if matches(n.get("metadata", {}).get("labels") or {}, selector)),
        key=lambda n: str(n["metadata"]["name"]),
    )
    for kind in ("ExternalIP", "InternalIP"):
        for node in gateways:
            for address in node.get("status", {}).get("addresses", []):
                if address.get("type") == kind and address.get("address"):
                    return str(address["address"])
    return None


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint(spec: VpnServerSpec, service: Obj | None, nodes: Iterable[Obj]) -> str | None:
    """host:port laptops dial, or None while it cannot be known yet (a pending load balancer)."""
    if spec.expose.endpoint:
        return spec.expose.endpoint
    if spec.expose.type is ExposeType.LOAD_BALANCER:
        for ingress in (service or {}).get("status", {}).get("loadBalancer", {}).get("ingress") or []:
            host = ingress.get("ip") or ingress.get("hostname")
            if host:
                return join_host_port(str(host), spec.listen_port)
        return None
    host = gateway_address(nodes, spec.node_selector)
    if host is None:
        return None
    if spec.expose.type is ExposeType.HOST_PORT:
        return join_host_port(host, spec.listen_port)
    ports = (service or {}).get("spec", {}).get("ports") or []
    node_port = next((p.get("nodePort") for p in ports if p.get("nodePort")), None)
    return join_host_port(host, int(node_port)) if node_port else None


def kube_dns_address(service: Obj | None) -> str | None:
    cluster_ip = (service or {}).get("spec", {}).get("clusterIP")
    return str(cluster_ip) if cluster_ip and cluster_ip != "None" else None


def default_search(cluster_domain: str) -> list[str]:
    """Search domains for laptops, so `curl http://api.payments` reaches Service api in namespace payments.

    A pod also searches its own namespace first; a laptop has none, so that entry is left out.
    """
    return [f"svc.{cluster_domain}", cluster_domain]


def cluster_dns(spec: VpnServerSpec, service: Obj | None, dns_service: tuple[str, str]) -> tuple[str | None, Outcome]:
    """The nameserver peers get (None: no DNS line) and the ClusterDNS condition that explains it.

    `service` is the cluster DNS Service as read (None when absent), `dns_service` its namespace and name.
    Switched off in the spec counts as nothing missing: False always means there is something to set.
    """
    if not spec.dns.enabled:
        return None, Outcome.ready(Reason.DISABLED, "spec.dns.enabled is false: peers get no DNS server")
    if spec.dns.nameserver:
        return spec.dns.nameserver, Outcome.ready(
            Reason.NAMESERVER_FROM_SPEC, f"peers use {spec.dns.nameserver} (spec.dns.nameserver)"
        )
    name = "/".join(dns_service)
    remedy = (
        "set spec.dns.nameserver, or the chart's operator.dnsService (the operator's --dns-service), "
        "or spec.dns.enabled: false"
    )
    if service is None:
        return None, Outcome.missing(Reason.DNS_SERVICE_NOT_FOUND, f"Service {name} not found: {remedy}")
    if (address := kube_dns_address(service)) is None:
        return None, Outcome.missing(Reason.DNS_SERVICE_HAS_NO_CLUSTER_IP, f"Service {name} has no ClusterIP: {remedy}")
    return address, Outcome.ready(Reason.DNS_SERVICE_FOUND, f"peers use {address}, the ClusterIP of Service {name}")
