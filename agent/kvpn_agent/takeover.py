"""Gateway takeover: when a gateway is lost, the gateway that replaces it initiates the handshake with its peers.

A WireGuard session cannot move between gateways. Left alone, a laptop whose gateway is gone waits
for its own timers (about 15 s), or forever when its config's endpoint is the lost node's address.
But the laptop's WireGuard answers an authenticated handshake initiation from any address, and then
roams its endpoint to where it came from. So one gateway, chosen from the VpnServer status alone
(every agent reaches the same choice), initiates towards each recent peer of the lost gateway, at
the peer's last endpoint (VpnPeer status.endpoint, which the gateways write).

WireGuard has no "initiate now" call. Switching a peer's persistent keepalive from 0 to non-zero
sends a keepalive at once (wireguard-go ``device/uapi.go``: ``pkaOn = old == 0 && secs != 0``, sent
in ``handlePostConfig`` when the device is up; the kernel's ``set_peer`` in
``drivers/net/wireguard/netlink.c``: ``send_keepalive = !old && new && netif_running``), and a
keepalive for a peer without a session is staged and starts a handshake initiation instead. The
interval is then put back to the gateways' 0 in a second call (in one call the 0 would cancel the
switch in wireguard-go, and netlink carries one value per peer).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kvpn_agent.desired import interface_name
from kvpn_agent.observed import ObservedDevice, ObservedPeer
from kvpn_agent.plan import SERVER_KEEPALIVE
from kvpn_agent.sync import SERVER_ERRORS, WireGuardBackend
from kvpn_agent.watch import Key, Obj, key_of
from kvpn_agent.wire import PeerConfig
from kvpn_core.api import API_VERSION, PLURALS, GatewayStatus, Kind, VpnServerStatus
from kvpn_core.contract import read_gateway_lease
from kvpn_core.kube import Kube, KubeError, kvpn_path

log = logging.getLogger(__name__)

SESSION_LIFETIME = 180.0
"""Seconds a handshake is worth following up: WireGuard's REJECT_AFTER_TIME. A laptop idle for longer
has no session left to lose, and starts a new one itself when it next sends."""

INITIATE_KEEPALIVE = 1
"""The interval switched on for a moment, to make the backend send (and so initiate) at once."""


# --- decisions ------------------------------------------------------------------------------------


def takeover_node(status: VpnServerStatus | None) -> str | None:
    """The gateway that takes over for a server, or None when none is ready.

    With NodePort or HostPort the ready gateway whose endpoint is status.endpoint: laptops' configs
    point there now, so its sessions are the ones that last. Behind a load balancer, or with an
    explicit endpoint, no gateway's endpoint is that one: the first ready gateway by node name.
    """
    if status is None:
        return None
    ready = sorted((g for g in status.gateways if g.ready), key=lambda g: g.node)
    if status.endpoint:
        wanted = _canonical(status.endpoint)
        for gateway in ready:
            if gateway.endpoint and _canonical(gateway.endpoint) == wanted:
                return gateway.node
    return ready[0].node if ready else None


def ready_gateways(status: VpnServerStatus | None) -> set[str]:
    return {g.node for g in status.gateways if g.ready} if status is not None else set()


def lost_gateways(before: VpnServerStatus | None, after: VpnServerStatus | None) -> set[str]:
    """Nodes ready in ``before`` and not ready, or gone, in ``after``."""
    return ready_gateways(before) - ready_gateways(after)


def peers_to_initiate(
    peers: Iterable[Mapping[str, Any]],
    server_key: Key,
    lost: Collection[str],
    me: str,
    device: ObservedDevice | None,
    *,
    now: float,
) -> list[tuple[str, str]]:
    """(public key, endpoint) of the VpnPeers (as the API returns them) to initiate a handshake with.

    Those of server ``server_key`` whose latest handshake, under SESSION_LIFETIME ago at ``now`` (Unix
    time), was with a gateway in ``lost``, with an endpoint to send to, and that this node's
    ``device`` holds (a peer it lacks cannot be reached from here) without a handshake as recent:
    a peer that has come to ``me`` already needs nothing. Sorted by key.
    """
    if device is None:
        return []
    found = []
    for peer in peers:
        meta = peer.get("metadata") or {}
        ref = (peer.get("spec") or {}).get("serverRef") or {}
        if (ref.get("namespace") or meta.get("namespace"), ref.get("name")) != server_key:
            continue
        status = peer.get("status") or {}
        gateway, public_key = status.get("gateway"), status.get("publicKey")
        if gateway not in lost or gateway == me or not isinstance(public_key, str):
            continue
        theirs = _unix_time(status.get("lastHandshake"))
        endpoint = _ip_endpoint(status.get("endpoint"))
        if theirs is None or endpoint is None or not 0 <= now - theirs <= SESSION_LIFETIME:
            continue
        seen = device.peers.get(public_key)
        if seen is None or (seen.last_handshake is not None and int(seen.last_handshake) >= theirs):
            continue
        found.append((public_key, endpoint))
    return sorted(found)


def lease_verdicts(leases: Iterable[Mapping[str, Any]], now: float) -> dict[Key, dict[str, bool]]:
    """Per server (namespace, name), each gateway node's standing as its lease says at ``now`` (Unix
    time): True when the lease is current and its report says ready."""
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    found: dict[Key, dict[str, bool]] = {}
    for lease in leases:
        read = read_gateway_lease(lease)
        if read is None:
            continue
        namespace = str((lease.get("metadata") or {}).get("namespace") or "")
        ready = read.current(at) and read.report is not None and read.report.ready
        found.setdefault((namespace, read.server), {})[read.node] = ready
    return found


def _unix_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()


def _split(endpoint: str) -> tuple[str, str] | None:
    """host and port of host:port, the brackets of an IPv6 host removed; None without a port."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1], str(int(port))
    return (host, str(int(port))) if ":" not in host else None  # an IPv6 host without brackets is ambiguous


def _ip_endpoint(value: object) -> str | None:
    """``value`` when it is IP:port ([IPv6]:port), written canonically; None otherwise: the backends take
    no names, and a gateway only ever writes addresses."""
    parts = _split(value) if isinstance(value, str) else None
    if parts is None:
        return None
    try:
        address = ipaddress.ip_address(parts[0])
    except ValueError:
        return None
    return f"[{address}]:{parts[1]}" if address.version == 6 else f"{address}:{parts[1]}"


def _canonical(endpoint: str) -> str:
    """The endpoint in one spelling, to compare: addresses canonical, names in lower case."""
    return _ip_endpoint(endpoint) or endpoint.lower()


# --- the executor ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    key: Key
    lost: frozenset[str]
    peer_namespaces: tuple[str, ...]
    """spec.peerNamespaces; "*" for all."""


class Takeover:
    """Watches VpnServer events; on the takeover node, makes a lost gateway's recent peers handshake here.

    ``on_server`` is called from the watch thread and returns at once: the work (a list of VpnPeers,
    a device read, two backend calls per peer) runs in a worker thread, one at a time per server; an
    event arriving meanwhile is folded into the next run. ``wireguard`` and ``device`` must be this
    object's alone (the kernel backend's socket is not thread-safe): their calls are serialized here.
    """

    def __init__(
        self,
        kube: Kube,
        node: str,
        wireguard: WireGuardBackend,
        device: Callable[[str], ObservedDevice | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kube = kube
        self.node = node
        self.wireguard = wireguard
        self.device = device
        self.clock = clock
        self._lock = threading.Lock()
        self._backend = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._previous: dict[Key, VpnServerStatus] = {}
        """The status last seen per server: a loss is a change from it."""
        self._previous_leases: dict[Key, VpnServerStatus] = {}
        """The same, as this agent's read of the gateway leases says (on_leases)."""
        self._servers: dict[Key, Obj] = {}
        """Each server as last seen."""
        self._unclaimed: dict[Key, frozenset[str]] = {}
        """Gateways lost while no gateway was ready: the first to become ready takes over for them."""
        self._running: set[Key] = set()
        self._queued: dict[Key, _Job] = {}

    def on_server(self, obj: Obj) -> None:
        key = key_of(obj)
        status = _status(obj)
        if status is None:
            return  # unreadable: judged against the last readable one when the next arrives
        with self._lock:
            self._servers[key] = obj
        self._evaluate(key, status, obj, self._previous)

    def on_leases(self, key: Key, verdicts: Mapping[str, bool]) -> None:
        """What the server's gateway leases say now (node: current and ready), as this agent read them: a
        gateway lost is taken over at once, without waiting for the operator's status, which does not come
        when the operator ran on the lost node. The server's last status seen gives each node's endpoint."""
        with self._lock:
            obj = self._servers.get(key)
        status = _status(obj) if obj is not None else None
        if obj is None or status is None:
            return
        endpoints = {g.node: g.endpoint for g in status.gateways}
        gateways = [
            GatewayStatus(node=n, ready=ready, reason="Serving" if ready else "LeaseExpired", endpoint=endpoints.get(n))
            for n, ready in sorted(verdicts.items())
        ]
        self._evaluate(key, status.model_copy(update={"gateways": gateways}), obj, self._previous_leases)

    def _evaluate(self, key: Key, status: VpnServerStatus, obj: Obj, previous: dict[Key, VpnServerStatus]) -> None:
        with self._lock:
            before = previous.get(key)
            previous[key] = status
            ready = ready_gateways(status)
            lost = lost_gateways(before, status) | (self._unclaimed.pop(key, frozenset()) - ready)
            if not lost:
                return
            chosen = takeover_node(status)
            if chosen is None:
                self._unclaimed[key] = frozenset(lost)
                return
            if chosen != self.node:
                return  # that agent decides the same from the same status, and acts
            namespaces = tuple((obj.get("spec") or {}).get("peerNamespaces") or ())
            job = _Job(key, frozenset(lost), namespaces)
            if key in self._running:
                queued = self._queued.get(key)
                self._queued[key] = _Job(key, job.lost | (queued.lost if queued else frozenset()), namespaces)
                return
            self._running.add(key)
        threading.Thread(target=self._work, args=(job,), name=f"takeover {key[0]}/{key[1]}", daemon=True).start()

    def read(self, interface: str) -> ObservedDevice | None:
        """The device, through this object's own client (serialized with its other calls)."""
        with self._backend:
            return self.device(interface)

    def drop_sessions(self, interface: str, peers: Iterable[ObservedPeer]) -> int:
        """Ends this node's sessions with ``peers`` (removed and added back as they were, keys and queued
        packets gone): for a node cut off long enough that the others took its laptops over. A session
        kept would pull its laptop back on one stale packet (a pod's TCP retransmission reaching this node
        once its network is back), to a session the laptop no longer uses: 15 s of silence. Returns how
        many were ended; a peer the backend refuses is logged and left."""
        ended = 0
        with self._backend:
            for peer in peers:
                again = PeerConfig(
                    peer.public_key,
                    preshared_key=peer.preshared_key,
                    endpoint=peer.endpoint,
                    replace_allowed_ips=True,
                    allowed_ips=peer.allowed_ips,
                )
                try:
                    self.wireguard.set(interface, None, [PeerConfig(peer.public_key, remove=True)])
                    self.wireguard.set(interface, None, [again])
                except SERVER_ERRORS as exc:
                    log.warning(
                        "session not ended",
                        extra={"interface": interface, "public_key": peer.public_key, "error": str(exc)},
                    )
                    continue
                ended += 1
        return ended

    def wait_idle(self, timeout: float) -> bool:
        """Whether every run has ended within ``timeout`` seconds (for tests and shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._running, timeout)

    def _work(self, job: _Job) -> None:
        next_job: _Job | None = job
        while next_job is not None:
            try:
                self._take_over(next_job)
            except Exception:
                # Best effort on top of the peers' own timers: a bug here must not end the thread silently.
                log.exception("takeover failed", extra={"server_namespace": job.key[0], "server": job.key[1]})
            with self._lock:
                next_job = self._queued.pop(job.key, None)
                if next_job is None:
                    self._running.discard(job.key)
                    self._idle.notify_all()

    def _take_over(self, job: _Job) -> None:
        namespace, name = job.key
        where = {"server_namespace": namespace, "server": name, "lost": ",".join(sorted(job.lost))}
        interface = interface_name(namespace, name)
        try:
            peers = self._list_peers(namespace, job.peer_namespaces)
        except KubeError as exc:
            log.warning("takeover: VpnPeers not listed", extra={**where, "error": str(exc)})
            return
        with self._backend:
            try:
                device = self.device(interface)
            except SERVER_ERRORS as exc:
                log.warning("takeover: device not read", extra={**where, "interface": interface, "error": str(exc)})
                return
            if device is None:
                log.warning("takeover: no device on this node", extra={**where, "interface": interface})
                return
            targets = peers_to_initiate(peers, job.key, job.lost, self.node, device, now=self.clock())
            failed = 0
            for public_key, endpoint in targets:
                try:
                    self._initiate(interface, public_key, endpoint, device.peers[public_key].persistent_keepalive)
                except SERVER_ERRORS as exc:
                    failed += 1
                    log.warning(
                        "takeover: handshake not initiated",
                        extra={**where, "public_key": public_key, "endpoint": endpoint, "error": str(exc)},
                    )
        log.info("took over", extra={**where, "node": self.node, "peers": len(targets) - failed, "failed": failed})

    def _initiate(self, interface: str, public_key: str, endpoint: str, keepalive: int) -> None:
        if keepalive:  # only a switch from 0 sends: a peer with an interval (a restored endpoint's) goes by 0
            self.wireguard.set(interface, None, [PeerConfig(public_key, update_only=True, persistent_keepalive=0)])
        first = PeerConfig(public_key, update_only=True, endpoint=endpoint, persistent_keepalive=INITIATE_KEEPALIVE)
        self.wireguard.set(interface, None, [first])
        # Without the endpoint: the laptop's answer may already have roamed it to where the laptop is now.
        back = PeerConfig(public_key, update_only=True, persistent_keepalive=SERVER_KEEPALIVE)
        self.wireguard.set(interface, None, [back])

    def _list_peers(self, namespace: str, peer_namespaces: tuple[str, ...]) -> list[Obj]:
        """The VpnPeers that may use the server: its namespace's and spec.peerNamespaces', or all with "*".

        From the watch cache: no etcd read of every VpnPeer at the moment a node is lost, and a status
        milliseconds old is as good as the current one here.
        """
        if "*" in peer_namespaces:
            return self.kube.list(f"/apis/{API_VERSION}/{PLURALS[Kind.VPN_PEER]}", cached=True)
        peers: list[Obj] = []
        for ns in sorted({namespace, *peer_namespaces}):
            peers.extend(self.kube.list(kvpn_path(Kind.VPN_PEER, ns), cached=True))
        return peers


def _status(obj: Obj) -> VpnServerStatus | None:
    try:
        return VpnServerStatus.model_validate(obj.get("status") or {})
    except ValidationError as exc:
        log.warning(
            "VpnServer status unreadable", extra={"server": "/".join(key_of(obj)), "error": str(exc).splitlines()[0]}
        )
        return None
