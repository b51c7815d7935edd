"""Pure readers of cluster facts (Service and pod networks, node addresses, endpoint, DNS) and what they lack."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

from kvpn_core.api import ExposeType, VpnServerSpec
from kvpn_core.conditions import Outcome, Reason

Obj = dict[str, Any]

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


def pod_cidrs(nodes: Iterable[Obj]) -> list[str]:
    """The nodes' pod networks, merged where adjacent so peers get few routes."""
    nets = []
    for node in nodes:
        spec = node.get("spec", {})
        for cidr in spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else []):
            nets.append(ipaddress.ip_network(cidr, strict=False))
    v4 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network))
    v6 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network))
    return [*map(str, v4), *map(str, v6)]


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


def pod_network(spec: VpnServerSpec, pod_networks: list[str]) -> Outcome:
    """The PodNetwork condition: whether peers' routes include the pods, and what to set when they cannot.

    Without a Node's podCIDR the routes hold only the Service network: ClusterIPs work, pod IPs do not.
    """
    if spec.routes:
        return Outcome.ready(Reason.ROUTES_FROM_SPEC, "spec.routes is set: peers get exactly those routes")
    if pod_networks:
        return Outcome.ready(
            Reason.POD_NETWORK_FOUND, f"pod networks from the Nodes' spec.podCIDRs: {', '.join(pod_networks)}"
        )
    return Outcome.missing(
        Reason.POD_NETWORK_NOT_FOUND,
        "no Node has spec.podCIDR (is the controller manager's --allocate-node-cidrs on? some CNIs allocate "
        "pod addresses elsewhere): set spec.routes to the Service and pod networks",
    )


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
