"""Where each VpnServer's gateways listen: the cluster's VpnServers and gateway leases, listed in a thread,
as an immutable snapshot."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError
from urllib3.exceptions import HTTPError

from kvpn_core.api import API_VERSION, PLURALS, GatewayStatus, Kind, VpnServerSpec
from kvpn_core.contract import LABEL_ROLE, ROLE_GATEWAY, read_gateway_lease
from kvpn_core.kube import Kube, KubeError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Address = tuple[str, int]
"""(IP address, UDP port), as a socket's recvfrom names a datagram's source."""

SERVERS_PATH = f"/apis/{API_VERSION}/{PLURALS[Kind.VPN_SERVER]}"
LEASES_PATH = "/apis/coordination.k8s.io/v1/leases"

STALE_SECONDS = 30.0
"""A relay whose last successful list is older than this is unhealthy: it may be sending streams to
gateways that are gone and miss the ones that took over."""

DEFAULT_LISTEN_PORT: int = VpnServerSpec.model_fields["listen_port"].default


@dataclass(frozen=True)
class ServerGateways:
    """One VpnServer's gateways, as the relay uses them."""

    listen_port: int
    ready: tuple[tuple[str, str], ...]
    """(node, address) of each ready gateway that has an address, by node: where streams are sent."""

    known: frozenset[Address]
    """(address, listen port) of every gateway listed, ready or not: whom a stream's socket hears from
    (a gateway taking over may start a handshake toward the relay before it reports ready)."""

    def pick(self, public_key: str, preferred: str, version: int | None = None) -> tuple[str, str] | None:
        """(node, address) of the ready gateway for this laptop (see choose), among those of IP
        `version` only when given: a stream's socket, once open, speaks one family."""
        candidates = {
            node: address
            for node, address in self.ready
            if version is None or ipaddress.ip_address(address).version == version
        }
        node = choose(candidates, public_key, preferred)
        return None if node is None else (node, candidates[node])


def choose(ready_nodes: Collection[str], public_key: str, preferred: str) -> str | None:
    """The gateway node for a laptop: the one it prefers while that is ready (its WireGuard session lives
    there), else the ready node with the highest sha256(key + node). Rendezvous hashing: every relay pod
    picks the same node for the same laptop, laptops spread evenly, and a node that goes away moves only
    its own laptops."""
    if preferred in ready_nodes:
        return preferred
    if not ready_nodes:
        return None
    return max(ready_nodes, key=lambda node: hashlib.sha256((public_key + node).encode()).digest())


def _ip(value: object) -> str | None:
    """The address in its canonical text (the form recvfrom gives), or None when it is no IP address."""
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        return None


def _short(exc: Exception) -> str:
    lines = str(exc).splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def expired_gateways(leases: list[Obj], now: dt.datetime) -> frozenset[tuple[str, str]]:
    """(NAMESPACE/SERVER, node) of every gateway whose lease has run out: a gateway that went silent (its
    node cut off, say) is given up from here at once, whether or not the operator is there to say so in
    the server's status (it may have been on that node)."""
    expired = set()
    for lease in leases:
        read = read_gateway_lease(lease)
        if read is not None and not read.current(now):
            namespace = (lease.get("metadata") or {}).get("namespace")
            expired.add((f"{namespace}/{read.server}", read.node))
    return frozenset(expired)


def read_server(server: Obj, expired: Collection[tuple[str, str]] = ()) -> ServerGateways:
    """One VpnServer's usable gateways. A gateway without an address is unusable: the relay sends only to
    where the server's own status says its WireGuard listens, never to a name or to what a laptop says.
    A gateway whose lease ran out (`expired`) is not ready, whatever the status still says."""
    port = (server.get("spec") or {}).get("listenPort", DEFAULT_LISTEN_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        # The CRD's schema rules this out; a relay that guessed a port could send anywhere.
        return ServerGateways(DEFAULT_LISTEN_PORT, (), frozenset())
    meta = server.get("metadata") or {}
    name = f"{meta.get('namespace')}/{meta.get('name')}"
    ready: list[tuple[str, str]] = []
    known: set[Address] = set()
    for raw in (server.get("status") or {}).get("gateways") or []:
        try:
            gateway = GatewayStatus.model_validate(raw)
        except ValidationError:
            continue
        # Read from the raw entry: GatewayStatus may not have the field yet, and pydantic drops what it
        # does not know.
        address = _ip(raw.get("address"))
        if address is None:
            continue
        known.add((address, port))
        if gateway.ready and (name, gateway.node) not in expired:
            ready.append((gateway.node, address))
    return ServerGateways(port, tuple(sorted(ready)), frozenset(known))


def read_servers(servers: list[Obj], expired: Collection[tuple[str, str]] = ()) -> dict[str, ServerGateways]:
    """Every VpnServer by NAMESPACE/NAME (the way a Hello names it), with or without gateways."""
    found = {}
    for server in servers:
        meta = server.get("metadata") or {}
        found[f"{meta.get('namespace')}/{meta.get('name')}"] = read_server(server, expired)
    return found


class Gateways:
    """The cluster's VpnServers, listed every `poll_seconds` in a daemon thread.

    `snapshot` is replaced whole after each list, never changed, so the event loop reads it without a
    lock. When a list fails the last snapshot stays: gateways outlive a short API outage, and sending to
    them beats refusing every laptop. The failure is logged once per outage.
    """

    def __init__(self, kube: Kube, poll_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._kube = kube
        self._poll_seconds = poll_seconds
        self._clock = clock
        self._snapshot: Mapping[str, ServerGateways] = MappingProxyType({})
        self._listed_at: float | None = None
        self._failing = False
        self._leases_failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateways", daemon=True)

    @property
    def snapshot(self) -> Mapping[str, ServerGateways]:
        return self._snapshot

    @property
    def listed(self) -> bool:
        """Whether a list has succeeded at all: before, every server is unknown."""
        return self._listed_at is not None

    @property
    def ready(self) -> bool:
        """For /healthz: listed, and not longer than STALE_SECONDS ago."""
        listed_at = self._listed_at
        return listed_at is not None and self._clock() - listed_at < STALE_SECONDS

    def start(self) -> Gateways:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        """One list: a new snapshot, or (the API server unreachable or refusing) the old one kept."""
        try:
            # From the API server's watch cache: one list a second from every relay pod costs etcd nothing.
            servers = self._kube.list(SERVERS_PATH, cached=True)
        except (KubeError, HTTPError, OSError, ValueError) as exc:
            if not self._failing:
                log.warning(
                    "listing the VpnServers failed; streams keep the gateways last listed, retrying",
                    extra={"error": _short(exc)},
                )
            self._failing = True
            return
        snapshot = read_servers(servers, self._expired())
        news = self._failing or self._listed_at is None
        self._snapshot = MappingProxyType(snapshot)
        self._listed_at = self._clock()
        self._failing = False
        if news:  # said once it holds: a stream that comes after the line finds the servers listed
            log.info(
                "listed the VpnServers",
                extra={"servers": len(snapshot), "ready_gateways": sum(len(s.ready) for s in snapshot.values())},
            )

    def _expired(self) -> frozenset[tuple[str, str]]:
        """The gateways whose leases ran out; none when the leases cannot be read (the status alone then)."""
        try:
            leases = self._kube.list(LEASES_PATH, label_selector=f"{LABEL_ROLE}={ROLE_GATEWAY}", cached=True)
        except (KubeError, HTTPError, OSError, ValueError) as exc:
            if not self._leases_failing:
                log.warning(
                    "listing the gateway leases failed; judging gateways by status", extra={"error": _short(exc)}
                )
            self._leases_failing = True
            return frozenset()
        self._leases_failing = False
        return expired_gateways(leases, dt.datetime.now(dt.UTC))

    def _run(self) -> None:
        while True:
            self.poll()
            if self._stop.wait(self._poll_seconds):
                return
