"""Pure readers of the gateway leases (see kvpn_core.contract): which nodes serve a server now, where laptops
dial them, and the Endpoints that send a Service's traffic to those nodes only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kvpn_core.api import ExposeType, GatewayStatus, VpnServerSpec
from kvpn_core.conditions import Finding, Outcome, Reason
from kvpn_core.contract import ANNOTATION_GATEWAY, GatewayLease, read_gateway_lease
from kvpn_operator import discovery
from kvpn_operator.builders import owner_reference

Obj = dict[str, Any]


@dataclass(frozen=True)
class Gateway:
    """One node's standing for one server, from its lease and its Node."""

    node: str
    ready: bool
    reason: Reason
    message: str
    address: str | None
    """Where laptops dial the node: its ExternalIP, else its InternalIP."""

    internal: str | None
    """Its InternalIP: where a Service's traffic is sent inside the cluster, and the relay's (its status's address)."""

    expires: dt.datetime | None
    """When its lease runs out, unless renewed."""

    def status(self, endpoint: str | None) -> GatewayStatus:
        return GatewayStatus(
            node=self.node,
            ready=self.ready,
            reason=self.reason,
            message=self.message,
            endpoint=endpoint,
            address=self.internal,
        )


def _addresses(node: Obj) -> dict[str, str]:
    found: dict[str, str] = {}
    for address in (node.get("status") or {}).get("addresses") or []:
        if address.get("address"):
            found.setdefault(str(address.get("type")), str(address["address"]))
    return found


def read_gateway(lease: Obj, nodes: Mapping[str, Obj], now: dt.datetime) -> Gateway | None:
    """The gateway a lease speaks for, or None when the lease names no node."""
    read = read_gateway_lease(lease)
    if read is None:
        return None
    node = nodes.get(read.node)
    addresses = _addresses(node) if node is not None else {}
    address = addresses.get("ExternalIP") or addresses.get("InternalIP")
    ready, (reason, message) = _standing(read, node, address, now)
    return Gateway(read.node, ready, reason, message, address, addresses.get("InternalIP") or address, read.expires)


def _standing(lease: GatewayLease, node: Obj | None, address: str | None, now: dt.datetime) -> tuple[bool, Finding]:
    if not lease.current(now):
        # A time, not an age: the message stays the same from one reconcile to the next.
        renewed = lease.renewed
        last = f"last renewed {renewed.strftime('%Y-%m-%dT%H:%M:%SZ')}" if renewed else "never renewed"
        why = f"its agent stopped reporting ({last}): the node, its network or the agent is down"
        return False, Finding(Reason.LEASE_EXPIRED, why)
    report = lease.report
    if report is None:
        return False, Finding(Reason.NOT_PROGRAMMED, f"its lease holds no readable {ANNOTATION_GATEWAY} annotation")
    if not report.ready:
        return False, Finding(Reason.NOT_PROGRAMMED, report.message or "its agent says the server is not programmed")
    if node is None:
        return False, Finding(Reason.NODE_NOT_FOUND, "no Node of that name")
    if address is None:
        return False, Finding(Reason.NODE_NOT_FOUND, "the Node reports no ExternalIP or InternalIP")
    backend = f" ({report.backend})" if report.backend else ""
    return True, Finding(Reason.SERVING, (report.message or "programmed") + backend)


def read_gateways(leases: Iterable[Obj], nodes: Iterable[Obj], now: dt.datetime) -> list[Gateway]:
    """Every gateway of a server's leases, by node name; one per node (the latest lease wins)."""
    by_name = {str(n["metadata"]["name"]): n for n in nodes}
    found: dict[str, Gateway] = {}
    for lease in leases:
        gateway = read_gateway(lease, by_name, now)
        if gateway is None:
            continue
        seen = found.get(gateway.node)
        if seen is None or (gateway.expires or now) > (seen.expires or now):
            found[gateway.node] = gateway
    return [found[name] for name in sorted(found)]


def lease_fingerprint(leases: Iterable[Obj], now: dt.datetime) -> tuple[tuple[str, str], ...]:
    """What a server's leases say now, by node: "serving", "not ready" or "expired". A change of it is
    worth a reconcile; the Nodes' part (addresses) is looked at by the reconcile itself."""
    said: dict[str, str] = {}
    for read in filter(None, map(read_gateway_lease, leases)):
        verdict = "serving" if read.report is not None and read.report.ready else "not ready"
        said[read.node] = verdict if read.current(now) else "expired"
    return tuple(sorted(said.items()))


def gateway_endpoint(gateway: Gateway, spec: VpnServerSpec, service: Obj | None) -> str | None:
    """host:port laptops dial on this gateway: its listen port (HostPort) or the Service's NodePort; None behind
    a load balancer and with ApiServer, where laptops dial no gateway."""
    if gateway.address is None:
        return None
    if spec.expose.type is ExposeType.HOST_PORT:
        return discovery.join_host_port(gateway.address, spec.listen_port)
    if spec.expose.type is ExposeType.NODE_PORT:
        ports = (service or {}).get("spec", {}).get("ports") or []
        node_port = next((p.get("nodePort") for p in ports if p.get("nodePort")), None)
        return discovery.join_host_port(gateway.address, int(node_port)) if node_port else None
    return None


@dataclass(frozen=True)
class Choice:
    endpoint: str | None
    """The one in peers' configs."""

    endpoints: list[str]
    """Every one laptops may dial now."""

    gateways: list[GatewayStatus]


def choose(
    spec: VpnServerSpec,
    service: Obj | None,
    nodes: Iterable[Obj],
    gateways: list[Gateway],
    current: str | None,
    *,
    sticky: bool = True,
) -> Choice:
    """Where laptops dial. A load balancer's address (or spec.expose.endpoint) stays whatever happens behind
    it. With NodePort and HostPort each node has its own: the current one is kept while its gateway is healthy
    (a change rewrites every peer's config), else the first healthy one by node name; with no peer yet
    (``sticky`` False) the first healthy one, so that the choice does not depend on which gateway reported
    first. With none healthy the current one stays, or, before any gateway has reported, the first gateway
    node's (discovery.endpoint). With ApiServer laptops dial nothing: no endpoint at all."""
    own = {g.node: gateway_endpoint(g, spec, service) for g in gateways}
    statuses = [g.status(own[g.node]) for g in gateways]
    if spec.expose.type is ExposeType.API_SERVER:
        return Choice(None, [], statuses)
    if spec.expose.endpoint or spec.expose.type is ExposeType.LOAD_BALANCER:
        stable = discovery.endpoint(spec, service, nodes)
        return Choice(stable, [stable] if stable and any(g.ready for g in gateways) else [], statuses)
    healthy = [e for g in gateways if g.ready and (e := own[g.node]) is not None]
    endpoint: str | None
    if current in healthy and sticky:
        endpoint = current
    elif healthy:
        endpoint = healthy[0]
    else:
        endpoint = current or discovery.endpoint(spec, service, nodes)
    return Choice(endpoint, healthy, statuses)


def outcome(gateways: list[Gateway], node_selector: Mapping[str, str]) -> Outcome:
    """The Gateways condition: True while some gateway serves, naming the ones that do not and why."""
    serving = [g.node for g in gateways if g.ready]
    failing = "; ".join(f"{g.node}: {g.message}" for g in gateways if not g.ready)
    if serving:
        message = f"serving from {', '.join(serving)}" + (f"; not from {failing}" if failing else "")
        return Outcome.ready(Reason.GATEWAYS_SERVING, message)
    if failing:
        return Outcome.waiting(Reason.NO_HEALTHY_GATEWAY, f"no gateway serves this server: {failing}")
    labels = ",".join(f"{k}={v}" for k, v in sorted(node_selector.items()))
    where = f"the nodes labelled {labels}" if node_selector else "the nodes"
    return Outcome.waiting(
        Reason.NO_HEALTHY_GATEWAY,
        f"no gateway has reported for this server yet: is the kvpn agent running on {where} (spec.nodeSelector)?",
    )


def endpoints_object(server: Obj, name: str, gateways: Iterable[Gateway], port: int, labels: Mapping[str, str]) -> Obj:
    """The Endpoints of a server's Service: the healthy gateways' InternalIPs on the listen port. The Service
    has no selector, so these are all kube-proxy (through EndpointSlice mirroring) sends its traffic to."""
    addresses = [{"ip": g.internal, "nodeName": g.node} for g in gateways if g.ready and g.internal]
    subsets = (
        [{"addresses": addresses, "ports": [{"name": "wireguard", "port": port, "protocol": "UDP"}]}]
        if addresses
        else []
    )
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {
            "name": name,
            "namespace": server["metadata"]["namespace"],
            "labels": dict(labels),
            "ownerReferences": [owner_reference(server)],
        },
        "subsets": subsets,
    }
