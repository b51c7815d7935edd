"""Reconciles a VpnServer: its key, its UDP Service, the endpoint, routes and DNS peers get, and its status."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kvpn_core import keys
from kvpn_core.api import ExposeType, Kind, PeerCounts, VpnServerSpec, VpnServerStatus
from kvpn_core.conditions import CLUSTER_DNS, POD_NETWORK, READY, SERVER_CONDITIONS, Outcome, set_condition
from kvpn_core.contract import SERVER_KEY_DATA, server_key_secret_name
from kvpn_core.kube import (
    ConflictError,
    InvalidError,
    Kube,
    KubeError,
    NotFoundError,
    core_path,
    kvpn_path,
)
from kvpn_operator import builders, discovery
from kvpn_operator.ipam import Pool
from kvpn_operator.reporting import Report, describe_validation_error, write_status
from kvpn_operator.state import ANNOTATION_NUDGE, PeerEntry

Obj = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    """Cluster facts the operator is told rather than discovers."""

    cluster_domain: str = "cluster.local"
    gateway_selector: Mapping[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "kvpn", "app.kubernetes.io/component": "wireguard-go"}
    )
    """The pods that hold each gateway node's WireGuard ports, which the UDP Service selects: pods that
    outlive the agent's restarts, so that a restart never moves a laptop's flow to another gateway."""
    dns_service: tuple[str, str] = ("kube-system", "kube-dns")


class ServiceNetworks:
    """The cluster's Service networks, discovered once and kept for a while: they change only with the cluster."""

    ttl = 600.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cidrs: list[str] = []
        self._at = -self.ttl

    def get(self, kube: Kube, namespace: str) -> list[str]:
        with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return self._cidrs
        cidrs = self._discover(kube, namespace)
        with self._lock:
            self._cidrs, self._at = cidrs, time.monotonic()
        return cidrs

    @staticmethod
    def _discover(kube: Kube, namespace: str) -> list[str]:
        for version in ("v1", "v1beta1"):
            try:
                objs = kube.list(f"/apis/networking.k8s.io/{version}/servicecidrs", cached=True)
            except KubeError:
                continue
            if cidrs := discovery.service_cidrs_from_objects(objs):
                return cidrs
        # Older clusters have no ServiceCIDR objects. Their API server names the Service network when it
        # refuses a clusterIP outside of it. A dry run would not do: it skips IP allocation (seen on 1.20).
        probe = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kvpn-service-network-probe"},
            "spec": {"clusterIP": "0.0.0.0", "ports": [{"port": 1, "protocol": "UDP"}]},  # noqa: S104 - never bound
        }
        try:
            kube.create(core_path("services", namespace), probe)
        except InvalidError as exc:
            return discovery.service_cidrs_from_error(str(exc))
        except ConflictError:
            pass
        kube.delete(core_path("services", namespace, "kvpn-service-network-probe"))  # accepted: no range to learn
        return []


def revision(status: VpnServerStatus, spec: VpnServerSpec) -> str:
    """Digest of everything a peer's config takes from the server; peers re-render when it changes."""
    inputs = {
        "publicKey": status.public_key,
        "endpoint": status.endpoint,
        "addresses": status.addresses,
        "routes": status.routes,
        "dns": [status.dns_nameserver, status.dns_search],
        "spec": spec.model_dump(
            by_alias=True,
            mode="json",
            include={"mtu", "persistent_keepalive", "preshared_keys", "peer_namespaces"},
        ),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def ensure_server_key(kube: Kube, server: Obj) -> str:
    """The server's private key: read from its Secret, generated and stored once when there is none."""
    meta = server["metadata"]
    path = core_path("secrets", meta["namespace"], server_key_secret_name(meta["name"]))
    secret = kube.get(path)
    if secret is None:
        try:
            secret = kube.create(
                core_path("secrets", meta["namespace"]),
                builders.server_key_secret(server, keys.generate_private_key()),
            )
        except ConflictError:
            secret = kube.get(path)
    encoded = ((secret or {}).get("data") or {}).get(SERVER_KEY_DATA)
    if not encoded:
        raise KubeError(0, f"Secret {meta['namespace']}/{server_key_secret_name(meta['name'])} holds no privateKey")
    return base64.b64decode(encoded).decode()


def ensure_service(kube: Kube, server: Obj, spec: VpnServerSpec, settings: Settings) -> Obj | None:
    """Creates or updates the UDP Service (none for HostPort, where agents listen on the node itself)."""
    meta = server["metadata"]
    path = core_path("services", meta["namespace"], builders.service_name(meta["name"]))
    existing = kube.get(path)
    if not builders.exposes_service(spec):
        if existing and builders.owned_by(existing, meta["uid"]):
            kube.delete(path, uid=existing["metadata"]["uid"])
        return None
    desired = builders.service(server, spec, settings.gateway_selector)
    if existing is None:
        return kube.create(core_path("services", meta["namespace"]), desired)
    if patch := builders.service_patch(existing, desired):
        return kube.merge_patch(path, patch)
    return existing


def _pool_overlap(spec: VpnServerSpec) -> str | None:
    for pool in spec.address_pool:
        for route in spec.routes:
            if ipaddress.ip_network(pool).overlaps(ipaddress.ip_network(route)):
                return f"addressPool {pool} overlaps route {route}: tunnel addresses must not be cluster addresses"
    return None


def reconcile_server(
    kube: Kube,
    server: Obj,
    *,
    settings: Settings,
    service_networks: ServiceNetworks,
    peers: Callable[[], Iterable[PeerEntry]],
    now: dt.datetime,
) -> Report:
    """Brings the server's key, Service and status in line with its spec; nudges peers whose config is stale."""
    meta = server["metadata"]
    status = VpnServerStatus.model_validate(server.get("status") or {})
    if problem := builders.server_name_problem(meta["name"]):
        return _finish(kube, server, status, Outcome.rejected("InvalidName", problem), now)
    try:
        spec = VpnServerSpec.model_validate(server.get("spec") or {})
    except ValidationError as exc:
        return _finish(kube, server, status, Outcome.rejected("InvalidSpec", describe_validation_error(exc)), now)
    if overlap := _pool_overlap(spec):
        return _finish(kube, server, status, Outcome.rejected("PoolOverlapsRoutes", overlap), now)

    private_key = ensure_server_key(kube, server)
    service = ensure_service(kube, server, spec, settings)
    nodes = kube.list(core_path("nodes"), cached=True)

    pod_networks = discovery.pod_cidrs(nodes)
    routes = list(spec.routes) or [*service_networks.get(kube, meta["namespace"]), *pod_networks]
    dns_service = None
    if spec.dns.enabled and not spec.dns.nameserver:
        dns_service = kube.get(core_path("services", *settings.dns_service))
    nameserver, dns = discovery.cluster_dns(spec, dns_service, settings.dns_service)
    search = (list(spec.dns.search) or discovery.default_search(settings.cluster_domain)) if spec.dns.enabled else []
    gaps = {POD_NETWORK: discovery.pod_network(spec, pod_networks), CLUSTER_DNS: dns}
    peer_list = list(peers())
    total = sum(p.has_address for p in peer_list)
    observed = status.model_copy(
        update={
            "public_key": keys.public_key_of(private_key),
            "endpoint": discovery.endpoint(spec, service, nodes),
            "addresses": Pool(spec.address_pool).server_addresses(),
            "routes": routes,
            "dns_nameserver": nameserver,
            "dns_search": search if nameserver else [],
            "peers": PeerCounts(total=total, ready=sum(p.ready for p in peer_list)),
            "peer_count": total,
        }
    )
    observed = observed.model_copy(update={"revision": revision(observed, spec)})

    outcome = serving_outcome(spec, observed.endpoint, routes, gaps)
    report = _finish(kube, server, observed, outcome, now, gaps=gaps)
    # Read the peers again: one that looked at this server before the status above was written is in the
    # index by now (kopf indexes an object before handling it), and learns of the new revision here.
    current = observed.revision or ""
    nudge(kube, [p for p in peers() if current not in (p.server_revision, p.nudge)], current)
    return report


# What peers lack, in Ready's message, when a discovery condition is False.
_GAP_NOTES = {
    POD_NETWORK: "peers reach no pod IPs (see condition PodNetwork)",
    CLUSTER_DNS: "peers get no cluster DNS (see condition ClusterDNS)",
}


def serving_outcome(
    spec: VpnServerSpec, endpoint: str | None, routes: list[str], gaps: Mapping[str, Outcome]
) -> Outcome:
    """The Ready verdict. A server with its Service network alone is Ready (peers reach ClusterIPs), but
    its message names what `gaps` (the discovery conditions) say peers lack."""
    if endpoint is None:
        return Outcome.waiting("EndpointPending", _endpoint_hint(spec))
    if not routes:
        return Outcome.rejected(
            "NoRoutes",
            "spec.routes is empty and the cluster's Service and pod networks could not be discovered: set spec.routes",
        )
    notes = [_GAP_NOTES[type_] for type_, gap in gaps.items() if gap.status != "True" and type_ in _GAP_NOTES]
    return Outcome.ready("Ready", "; ".join([f"serving at {endpoint}, routes {', '.join(routes)}", *notes]))


def _endpoint_hint(spec: VpnServerSpec) -> str:
    if spec.expose.type is ExposeType.LOAD_BALANCER:
        return "waiting for the LoadBalancer Service to get an address; or set spec.expose.endpoint"
    return (
        "no gateway node with an address yet (no node matches spec.nodeSelector, or none reports an "
        "ExternalIP/InternalIP); or set spec.expose.endpoint"
    )


def _finish(
    kube: Kube,
    server: Obj,
    status: VpnServerStatus,
    outcome: Outcome,
    now: dt.datetime,
    *,
    gaps: Mapping[str, Outcome] | None = None,
) -> Report:
    """Writes Ready from `outcome` and the discovery conditions from `gaps` (left as they were when None:
    a refused spec says nothing new about the cluster)."""
    meta = server["metadata"]
    generation = meta.get("generation")
    previous = status.conditions
    conditions = set_condition(previous, type_=READY, outcome=outcome, generation=generation, now=now)
    for type_, gap in (gaps or {}).items():
        conditions = set_condition(conditions, type_=type_, outcome=gap, generation=generation, now=now)
    desired = status.model_copy(update={"conditions": conditions, "observed_generation": generation})
    path = kvpn_path(Kind.VPN_SERVER, meta["namespace"], meta["name"], "status")
    write_status(kube, path, server, desired.model_dump(by_alias=True, mode="json"), owned=SERVER_CONDITIONS)
    return Report.of(previous, conditions, outcome, gaps)


def nudge(kube: Kube, peers: Iterable[PeerEntry], token: str) -> int:
    """Asks peers to reconcile by setting an annotation to `token`; a change of it is a change kopf acts on.

    Used when something a peer depends on changed elsewhere: its server's revision, a freed address.
    """
    nudged = 0
    for peer in peers:
        try:
            kube.merge_patch(
                kvpn_path(Kind.VPN_PEER, peer.namespace, peer.name),
                {"metadata": {"annotations": {ANNOTATION_NUDGE: token}}},
            )
            nudged += 1
        except NotFoundError:
            continue
    return nudged


def nudge_for_service(kube: Kube, service: Obj) -> bool:
    """Nudges the Service's VpnServer when the Service's load-balancer address is not yet in its status."""
    meta = service["metadata"]
    owner = next((r for r in meta.get("ownerReferences") or [] if r.get("kind") == Kind.VPN_SERVER), None)
    ingress = (service.get("status") or {}).get("loadBalancer", {}).get("ingress") or []
    if owner is None or not ingress:
        return False
    path = kvpn_path(Kind.VPN_SERVER, meta["namespace"], owner["name"])
    vpn_server = kube.get(path)
    if vpn_server is None or vpn_server["metadata"]["uid"] != owner["uid"]:
        return False
    hosts = [i.get("ip") or i.get("hostname") for i in ingress]
    endpoint = (vpn_server.get("status") or {}).get("endpoint") or ""
    if any(h and endpoint.startswith((f"{h}:", f"[{h}]:")) for h in hosts):
        return False
    token = hashlib.sha256(json.dumps(ingress, sort_keys=True).encode()).hexdigest()[:16]
    kube.merge_patch(path, {"metadata": {"annotations": {ANNOTATION_NUDGE: token}}})
    return True
