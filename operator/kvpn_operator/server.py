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
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kvpn_core import keys
from kvpn_core.api import ExposeType, Kind, PeerCounts, VpnServerSpec, VpnServerStatus
from kvpn_core.conditions import (
    CLUSTER_DNS,
    GATEWAYS,
    POD_NETWORK,
    READY,
    SERVER_CONDITIONS,
    Outcome,
    Reason,
    find,
    set_condition,
)
from kvpn_core.contract import SERVER_KEY_DATA, server_key_secret_name
from kvpn_core.kube import ForbiddenError, KubeError, Retry
from kvpn_operator import builders, discovery, gateways
from kvpn_operator.ipam import Pool
from kvpn_operator.memory import ANNOTATION_NUDGE, PeerEntry
from kvpn_operator.reporting import Report, describe_validation_error
from kvpn_operator.storage import ServerObject, Storage, write_status

Obj = dict[str, Any]


@dataclass(frozen=True)
class ClusterFacts:
    """Cluster facts the operator is told rather than discovers."""

    cluster_domain: str = "cluster.local"
    dns_service: tuple[str, str] = ("kube-system", "kube-dns")


class ServiceNetworks:
    """The cluster's Service networks, discovered once and kept for a while: they change only with the cluster."""

    ttl = 600.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cidrs: list[str] = []
        self._at = -self.ttl

    def get(self, storage: Storage, namespace: str) -> list[str]:
        with self._lock:
            if time.monotonic() - self._at < self.ttl:
                return self._cidrs
        cidrs = self._discover(storage, namespace)
        with self._lock:
            self._cidrs, self._at = cidrs, time.monotonic()
        return cidrs

    @staticmethod
    def _discover(storage: Storage, namespace: str) -> list[str]:
        for version in ("v1", "v1beta1"):
            objs = storage.list_service_cidrs(version)
            if objs is not None and (listed := discovery.service_cidrs_from_objects(objs)):
                return listed
        # Older clusters have no ServiceCIDR objects. Their API server names the Service network when it
        # refuses a clusterIP outside of it. A dry run would not do: it skips IP allocation (seen on 1.20).
        # One probe per family: a dual-stack cluster names its IPv6 network only to an IPv6 Service (a
        # single-stack one refuses that family without naming a range).
        cidrs: list[str] = []
        for family in ({"clusterIP": "0.0.0.0"}, {"clusterIP": "::", "ipFamilies": ["IPv6"]}):  # noqa: S104 - never bound
            probe = {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "kvpn-service-network-probe"},
                "spec": {**family, "ports": [{"port": 1, "protocol": "UDP"}]},
            }
            refusal = storage.refusal_of_service(namespace, probe)  # None: accepted, no range to learn
            cidrs += [c for c in discovery.service_cidrs_from_error(refusal or "") if c not in cidrs]
        return cidrs


def revision(status: VpnServerStatus, spec: VpnServerSpec) -> str:
    """Digest of everything a peer's config and binding take from the server; peers re-render when it changes."""
    inputs: dict[str, Any] = {
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
    if spec.peer_ceilings:
        # What a peer's binding carries depends on its ceiling. Hashed only when set, so that a server
        # without ceilings keeps the revision it had and an upgrade re-renders none of its peers.
        inputs["peerCeilings"] = [c.to_api() for c in spec.peer_ceilings]
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def ensure_server_key(storage: Storage, server: ServerObject) -> str:
    """The server's private key: read from its Secret, generated and stored once when there is none."""
    name = server_key_secret_name(server.name)
    secret = storage.get_secret(server.namespace, name)
    if secret is None:
        secret = storage.create_secret(
            server.namespace, builders.server_key_secret(server.body, keys.generate_private_key())
        ) or storage.get_secret(server.namespace, name)
    encoded = ((secret or {}).get("data") or {}).get(SERVER_KEY_DATA)
    if not encoded:
        raise KubeError(0, f"Secret {server.namespace}/{name} holds no privateKey")
    return base64.b64decode(encoded).decode()


def ensure_service(storage: Storage, server: ServerObject, spec: VpnServerSpec) -> Obj | None:
    """Creates or updates the UDP Service (none for HostPort, where agents listen on the node itself)."""
    namespace, name = server.namespace, builders.service_name(server.name)
    existing = storage.get_service(namespace, name)
    if not builders.exposes_service(spec):
        if existing and builders.owned_by(existing, server.uid):
            storage.delete_service(namespace, name, uid=existing["metadata"]["uid"])
        return None
    desired = builders.service(server.body, spec)
    if existing is None:
        created = storage.create_service(namespace, desired)
        if created is None:
            raise Retry(f"Service {namespace}/{name} appeared meanwhile")
        return created
    if patch := builders.service_patch(existing, desired):
        return storage.patch_service(namespace, name, patch)
    return existing


def ensure_endpoints(
    storage: Storage, server: ServerObject, spec: VpnServerSpec, found: list[gateways.Gateway]
) -> None:
    """The Service's Endpoints: the healthy gateways; written only when they differ (kube-proxy acts on each write)."""
    name = builders.service_name(server.name)
    desired = gateways.endpoints_object(
        server.body, name, found, spec.listen_port, builders.labels(server.name, "server")
    )
    existing = storage.get_endpoints(server.namespace, name)
    if existing is None:
        if storage.create_endpoints(server.namespace, desired) is None:
            raise Retry(f"Endpoints {server.namespace}/{name} appeared meanwhile")
        return
    meta = existing.get("metadata") or {}
    ours = builders.owned_by(existing, server.uid) and (meta.get("labels") or {}) == desired["metadata"]["labels"]
    if (existing.get("subsets") or []) != desired["subsets"] or not ours:
        # Whole: a merge patch replaces lists, and takes over an Endpoints an older kvpn's selector left.
        storage.patch_endpoints(
            server.namespace,
            name,
            {
                "metadata": {k: desired["metadata"][k] for k in ("labels", "ownerReferences")},
                "subsets": desired["subsets"],
            },
        )


def _pool_overlap(spec: VpnServerSpec) -> str | None:
    for pool in spec.address_pool:
        for route in spec.routes:
            if ipaddress.ip_network(pool).overlaps(ipaddress.ip_network(route)):
                return f"addressPool {pool} overlaps route {route}: tunnel addresses must not be cluster addresses"
    return None


def validate_server(server: ServerObject) -> VpnServerSpec | Outcome:
    """The server's spec, parsed; or, when its name or spec cannot be served, the refusal for Ready."""
    if problem := builders.server_name_problem(server.name):
        return Outcome.rejected(Reason.INVALID_NAME, problem)
    try:
        spec = VpnServerSpec.model_validate(server.spec)
    except ValidationError as exc:
        return Outcome.rejected(Reason.INVALID_SPEC, describe_validation_error(exc))
    if overlap := _pool_overlap(spec):
        return Outcome.rejected(Reason.POOL_OVERLAPS_ROUTES, overlap)
    return spec


def _latest(storage: Storage, server: ServerObject) -> ServerObject:
    """The server as stored now. kopf may hand a handler the body it had before the last reconcile's status
    write reached its watch: judged on that copy, a gateway that came back looks like the current endpoint
    and is kept, moving every peer back to it."""
    fresh = storage.get(Kind.VPN_SERVER, server.namespace, server.name)
    if fresh is None or (fresh.get("metadata") or {}).get("uid") != server.uid:
        return server
    return ServerObject.model_validate(fresh)


def reconcile_server(
    storage: Storage,
    server: ServerObject,
    *,
    facts: ClusterFacts,
    service_networks: ServiceNetworks,
    peers: Callable[[], Iterable[PeerEntry]],
    now: dt.datetime,
) -> Report:
    """Brings the server's key, Service and status in line with its spec; nudges peers whose config is stale,
    and Ready peers that share a key."""
    server = _latest(storage, server)
    status = server.status
    spec = validate_server(server)
    if isinstance(spec, Outcome):
        return _finish(storage, server, status, spec, now)

    private_key = ensure_server_key(storage, server)
    service = ensure_service(storage, server, spec)
    nodes = storage.list_nodes()
    found = gateways.read_gateways(storage.list_gateway_leases(server.namespace, server.name), nodes, now)
    if service is not None:
        ensure_endpoints(storage, server, spec, found)
    peer_list = list(peers())
    choice = gateways.choose(spec, service, nodes, found, status.endpoint, sticky=bool(peer_list))

    pods: list[Obj] | None = []
    if discovery.lists_pods(spec):
        try:
            pods = storage.list_pods()
        except ForbiddenError:
            pods = None  # said in the PodNetwork condition, which names the missing permission
    pod_networks = discovery.pod_networks(spec, nodes, pods)
    routes = list(spec.routes) or [*service_networks.get(storage, server.namespace), *pod_networks.cidrs]
    dns_service = None
    if spec.dns.enabled and not spec.dns.nameserver:
        dns_service = storage.get_service(*facts.dns_service)
    nameserver, dns = discovery.cluster_dns(spec, dns_service, facts.dns_service)
    search = (list(spec.dns.search) or discovery.default_search(facts.cluster_domain)) if spec.dns.enabled else []
    gaps = {
        POD_NETWORK: pod_networks.outcome,
        CLUSTER_DNS: dns,
        GATEWAYS: gateways.outcome(found, spec.node_selector),
    }
    total = sum(p.has_address for p in peer_list)
    observed = status.model_copy(
        update={
            "public_key": keys.public_key_of(private_key),
            "endpoint": choice.endpoint,
            "endpoints": choice.endpoints,
            "gateways": choice.gateways,
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
    report = _finish(storage, server, observed, outcome, now, gaps=gaps)
    # Read the peers again: one that looked at this server before the status above was written is in the
    # index by now (kopf indexes an object before handling it), and learns of the new revision here.
    current = observed.revision or ""
    nudge(storage, [p for p in peers() if current not in (p.server_revision, p.nudge)], current)
    was = find(status.conditions, READY)
    if was is not None and was.status != "True" and outcome.status == "True":
        # Ready again (a gateway came back): peers that waited for it are not waiting on a new revision.
        nudge(storage, [p for p in peers() if not p.ready], f"ready-{now:%Y%m%dT%H%M%S}")
    for token, sharing in ready_sharing_a_key(peers()).items():
        nudge(storage, [p for p in sharing if p.nudge != token], token)
    return report


def ready_sharing_a_key(peers: Iterable[PeerEntry]) -> dict[str, list[PeerEntry]]:
    """Ready peers that share a public key, with the nudge that wakes each group: the gateways serve one.

    Peers reconciled at the same moment may each miss the other's binding; woken, the newer is refused.
    The nudge names the group, so a group that stays is not woken again at every resync.
    """
    by_key: dict[str, list[PeerEntry]] = {}
    for p in peers:
        if p.ready:
            for key in p.public_keys:
                by_key.setdefault(key, []).append(p)
    groups: dict[str, list[PeerEntry]] = {}
    for key, sharing in by_key.items():
        if len(sharing) > 1:
            names = sorted(f"{p.namespace}/{p.name}" for p in sharing)
            groups["key-" + hashlib.sha256(json.dumps([key, names]).encode()).hexdigest()[:16]] = sharing
    return groups


# What peers lack, in Ready's message, when a discovery condition is False.
_GAP_NOTES = {
    POD_NETWORK: "peers reach no pod IPs (see condition PodNetwork)",
    CLUSTER_DNS: "peers get no cluster DNS (see condition ClusterDNS)",
}


def serving_outcome(
    spec: VpnServerSpec, endpoint: str | None, routes: list[str], gaps: Mapping[str, Outcome]
) -> Outcome:
    """The Ready verdict. A server with its Service network alone is Ready (peers reach ClusterIPs), but
    its message names what `gaps` (the discovery conditions) say peers lack. With ApiServer there is no
    endpoint to wait for: laptops come through the API server and the relay."""
    through_api = spec.expose.type is ExposeType.API_SERVER
    if endpoint is None and not through_api:
        return Outcome.waiting(Reason.ENDPOINT_PENDING, _endpoint_hint(spec))
    if (serving := gaps.get(GATEWAYS)) is not None and serving.status != "True":
        return Outcome.waiting(Reason.NO_HEALTHY_GATEWAY, serving.finding.message)
    if not routes:
        return Outcome.rejected(
            Reason.NO_ROUTES,
            "spec.routes is empty and the cluster's Service and pod networks could not be discovered: set spec.routes",
        )
    notes = [_GAP_NOTES[type_] for type_, gap in gaps.items() if gap.status != "True" and type_ in _GAP_NOTES]
    if through_api:
        where = "through the API server and the chart's relay (`kubectl vpn up --via api`)"
        if ignored := _ignored_with_api_server(spec):
            notes.append(f"{', '.join(ignored)} ignored: ApiServer has no Service and no endpoint")
    else:
        where = f"at {endpoint}"
    return Outcome.ready(Reason.READY, "; ".join([f"serving {where}, routes {', '.join(routes)}", *notes]))


def _ignored_with_api_server(spec: VpnServerSpec) -> list[str]:
    """The spec.expose fields set that mean nothing with ApiServer: said in Ready's message, not refused, so
    that switching a server's type back and forth needs no other edit."""
    expose = spec.expose
    given = {"nodePort": expose.node_port, "annotations": expose.annotations, "endpoint": expose.endpoint}
    return [f"spec.expose.{name}" for name, value in given.items() if value]


def _endpoint_hint(spec: VpnServerSpec) -> str:
    if spec.expose.type is ExposeType.LOAD_BALANCER:
        return "waiting for the LoadBalancer Service to get an address; or set spec.expose.endpoint"
    return (
        "no gateway node with an address yet (no node matches spec.nodeSelector, or none reports an "
        "ExternalIP/InternalIP); or set spec.expose.endpoint"
    )


def _finish(
    storage: Storage,
    server: ServerObject,
    status: VpnServerStatus,
    outcome: Outcome,
    now: dt.datetime,
    *,
    gaps: Mapping[str, Outcome] | None = None,
) -> Report:
    """Writes Ready from `outcome` and the discovery conditions from `gaps` (left as they were when None:
    a refused spec says nothing new about the cluster)."""
    generation = server.generation
    previous = status.conditions
    conditions = set_condition(previous, type_=READY, outcome=outcome, generation=generation, now=now)
    for type_, gap in (gaps or {}).items():
        conditions = set_condition(conditions, type_=type_, outcome=gap, generation=generation, now=now)
    desired = status.model_copy(update={"conditions": conditions, "observed_generation": generation})
    write_status(
        storage, Kind.VPN_SERVER, server.body, desired.model_dump(by_alias=True, mode="json"), owned=SERVER_CONDITIONS
    )
    return Report.of(previous, conditions, outcome, gaps)


def nudge(storage: Storage, peers: Iterable[PeerEntry], token: str) -> int:
    """Asks peers to reconcile by setting an annotation to `token`; a change of it is a change kopf acts on.

    Used when something a peer depends on changed elsewhere: its server's revision, a freed address.
    """
    return sum(storage.annotate(Kind.VPN_PEER, p.namespace, p.name, {ANNOTATION_NUDGE: token}) for p in peers)


def nudge_for_service(storage: Storage, service: Obj) -> bool:
    """Nudges the Service's VpnServer when the Service's load-balancer address is not yet in its status."""
    meta = service["metadata"]
    owner = next((r for r in meta.get("ownerReferences") or [] if r.get("kind") == Kind.VPN_SERVER), None)
    ingress = (service.get("status") or {}).get("loadBalancer", {}).get("ingress") or []
    if owner is None or not ingress:
        return False
    found = storage.get(Kind.VPN_SERVER, meta["namespace"], owner["name"])
    vpn_server = ServerObject.model_validate(found) if found is not None else None
    if vpn_server is None or vpn_server.uid != owner["uid"]:
        return False
    hosts = [i.get("ip") or i.get("hostname") for i in ingress]
    endpoint = vpn_server.status.endpoint or ""
    if any(h and endpoint.startswith((f"{h}:", f"[{h}]:")) for h in hosts):
        return False
    token = hashlib.sha256(json.dumps(ingress, sort_keys=True).encode()).hexdigest()[:16]
    return storage.annotate(Kind.VPN_SERVER, meta["namespace"], owner["name"], {ANNOTATION_NUDGE: token})
