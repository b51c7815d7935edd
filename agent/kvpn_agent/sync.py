"""One sync pass: read the node back (or trust a cached state), plan, apply; backends are injected."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pyroute2.netlink.exceptions import NetlinkError

from kvpn_agent.desired import DesiredServer, PeerChange, PeerChanges, changed_peers
from kvpn_agent.nft import NftError
from kvpn_agent.observed import Observed, ObservedDevice, ObservedLink, ObservedPeer
from kvpn_agent.plan import (
    SERVER_KEEPALIVE,
    Action,
    AddAddress,
    AddPeer,
    AllowedIps,
    ConfigureDevice,
    CreateInterface,
    DeleteInterface,
    RemoveAddress,
    RemovePeer,
    ReplaceFirewall,
    SetLinkUp,
    SetMtu,
    UpdateFirewall,
    UpdatePeer,
    plan_firewall,
    plan_firewall_change,
    plan_server,
    plan_server_change,
)
from kvpn_agent.processes import WireGuardGoError
from kvpn_agent.ruleset import ObservedRuleset, PeerUpdate, Ruleset, RulesetChange, build_ruleset, patch_ruleset
from kvpn_agent.supervisor_api import SupervisorError
from kvpn_agent.uapi import UapiClient, UapiError
from kvpn_agent.wire import DeviceConfig, PeerConfig
from kvpn_core.contract import PeerBinding

# What one server's link or device can fail with; the other servers are synced all the same.
SERVER_ERRORS = (UapiError, WireGuardGoError, SupervisorError, NetlinkError, OSError, ValueError)

log = logging.getLogger(__name__)


class LinkBackend(Protocol):
    """The interface itself: created by the backend (wireguard-go or the kernel), configured by netlink."""

    def observe(self, interface: str) -> ObservedLink | None: ...
    def create(self, interface: str) -> None: ...
    def delete(self, interface: str) -> None: ...
    def set_mtu(self, interface: str, mtu: int) -> None: ...
    def add_address(self, interface: str, address: str) -> None: ...
    def remove_address(self, interface: str, address: str) -> None: ...
    def set_up(self, interface: str) -> None: ...


class WireGuardBackend(Protocol):
    def get(self, interface: str) -> ObservedDevice | None: ...
    def set(self, interface: str, device: DeviceConfig | None, peers: Sequence[PeerConfig]) -> None: ...


class Firewall(Protocol):
    def list_table(self) -> ObservedRuleset | None: ...
    def replace(self, ruleset: Ruleset) -> None: ...
    def update(self, ruleset: Ruleset, update: PeerUpdate) -> None: ...


class UapiBackend:
    """WireGuardBackend over wireguard-go's UAPI sockets."""

    def __init__(self, client: type[UapiClient] = UapiClient) -> None:
        self._client = client

    def get(self, interface: str) -> ObservedDevice | None:
        client = self._client(interface)
        if not client.exists():
            return None
        try:
            return client.get()
        except UapiError as exc:
            # A socket left behind by a killed wireguard-go refuses connections: the device is gone,
            # which the sync repairs and the loop reports (once); anything else is worth a warning.
            level = logging.DEBUG if exc.errno == errno.ECONNREFUSED else logging.WARNING
            log.log(level, "wireguard device unreadable", extra={"interface": interface, "error": str(exc)})
            return None

    def set(self, interface: str, device: DeviceConfig | None, peers: Sequence[PeerConfig]) -> None:
        self._client(interface).set(device, peers)


@dataclass(frozen=True)
class NodeState:
    """What the node holds after a sync, as that sync left it: trusted until the next read-back.

    Planning against it instead of reading back makes a one-peer change cost one peer's apply
    (a read-back of 10,000 peers costs most of a second); drift is caught by the periodic resync.
    """

    servers: Mapping[str, Observed]
    """Per interface; an interface missing here is read back."""

    ruleset: ObservedRuleset
    desired: Mapping[str, DesiredServer] = field(default_factory=dict)
    """The servers that sync was given, per interface: the next one plans only what changed since."""

    rules: Ruleset | None = None
    """The ruleset that sync loaded (``ruleset`` is what it looks like read back); None: plan it all."""


@dataclass
class SyncResult:
    actions: list[Action] = field(default_factory=list)
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)
    """Interface → why its actions failed; the other servers and the firewall were synced."""

    state: NodeState | None = None


def sync(
    servers: Sequence[DesiredServer],
    link: LinkBackend,
    wireguard: WireGuardBackend,
    firewall: Firewall,
    *,
    endpoints: Mapping[str, str] | None = None,
    gone: Sequence[str] = (),
    known: NodeState | None = None,
    memo: AllowedIps | None = None,
) -> SyncResult:
    """Makes the node match ``servers``; ``gone`` are interfaces of servers no longer served.

    With ``known`` (the state of the previous sync) nothing is read back that it covers. ``memo``:
    the caller's ``AllowedIps``, kept from one sync to the next (default: a fresh one per sync,
    which makes a full resync of thousands of peers several times slower).
    """
    started = time.perf_counter()
    memo = AllowedIps() if memo is None else memo
    result = SyncResult()
    changes = PeerChanges()
    for interface in gone:
        if link.observe(interface) is not None:
            _run([DeleteInterface(interface)], link, wireguard, firewall, result)
    synced: dict[str, Observed] = {}
    for server in servers:
        observed = known.servers.get(server.interface) if known is not None else None
        # Planned against the previous sync's own result: only the peers that changed since.
        previous = known.desired.get(server.interface) if known is not None and observed is not None else None
        try:
            if observed is None:
                # Inside the per-server guard: a device that cannot be read fails its server only.
                observed = Observed(link=link.observe(server.interface), device=wireguard.get(server.interface))
            if previous is None:
                _run(plan_server(server, observed, endpoints, memo=memo), link, wireguard, firewall, result)
            else:
                actions = plan_server_change(previous, server, observed, endpoints, changes=changes, memo=memo)
                _run(actions, link, wireguard, firewall, result)
        except SERVER_ERRORS as exc:
            result.errors[server.interface] = server_error(server, exc)  # the caller logs and counts it
            continue
        synced[server.interface] = (
            assumed(server, memo=memo)
            if previous is None
            else assumed_change(previous, server, observed, changes=changes, memo=memo)
        )
    if known is not None and known.rules is not None:
        change = patch_ruleset(known.rules, known.desired, servers, changes=changes)
        ruleset = change.ruleset
        actions = plan_firewall_change(change, known.ruleset)
        observed_rules = assumed_ruleset_change(known.ruleset, change)
    else:
        ruleset = build_ruleset(servers)
        actions = plan_firewall(ruleset, known.ruleset if known is not None else firewall.list_table())
        observed_rules = assumed_ruleset(ruleset)
    try:
        _run(actions, link, wireguard, firewall, result)
    except NftError as exc:
        if not any(isinstance(a, UpdateFirewall) for a in actions):
            raise
        # The table changed between read-back and update (a hand edit): swap the whole table.
        log.warning("element update failed, replacing the table", extra={"error": str(exc)})
        _run([ReplaceFirewall(ruleset, reason="element update failed")], link, wireguard, firewall, result)
    result.state = NodeState(
        servers=synced, ruleset=observed_rules, desired={s.interface: s for s in servers}, rules=ruleset
    )
    result.seconds = time.perf_counter() - started
    return result


def server_error(server: DesiredServer, exc: Exception) -> str:
    """What a user is told (readiness, the Dataplane condition) when a server cannot be programmed."""
    if isinstance(exc, UapiError) and exc.errno == errno.EADDRINUSE:
        # wireguard-go cannot bind: something else on the node holds the port (another VPN, a
        # second VpnServer with the same port, a hostPort).
        return f"UDP port {server.listen_port} is taken by another process on the node ({exc})"
    return str(exc) or type(exc).__name__


def assumed(server: DesiredServer, *, memo: AllowedIps | None = None) -> Observed:
    """What a read-back of the server's interface shows once the plan for it has been applied."""
    memo = AllowedIps() if memo is None else memo
    peers = {p.public_key: _assumed_peer(p, memo) for p in server.peers if p.public_key}
    return Observed(
        link=ObservedLink(mtu=server.mtu, up=True, addresses=server.addresses),
        device=ObservedDevice(
            private_key=server.private_key.get_secret_value(), listen_port=server.listen_port, peers=peers
        ),
    )


def assumed_change(
    previous: DesiredServer,
    server: DesiredServer,
    observed: Observed,
    *,
    changes: Callable[[DesiredServer | None, DesiredServer | None], PeerChange] = changed_peers,
    memo: AllowedIps | None = None,
) -> Observed:
    """``assumed(server)`` from ``observed``, which is ``assumed(previous)``: only changed peers redone."""
    memo = AllowedIps() if memo is None else memo
    if observed.device is None:
        return assumed(server, memo=memo)
    gone, added = changes(previous, server)
    peers = dict(observed.device.peers)
    for p in gone:
        peers.pop(p.public_key or "", None)
    peers.update((p.public_key, _assumed_peer(p, memo)) for p in added if p.public_key)
    return Observed(
        link=ObservedLink(mtu=server.mtu, up=True, addresses=server.addresses),
        device=ObservedDevice(
            private_key=server.private_key.get_secret_value(), listen_port=server.listen_port, peers=peers
        ),
    )


def _assumed_peer(p: PeerBinding, memo: AllowedIps) -> ObservedPeer:
    return ObservedPeer(
        public_key=p.public_key or "",
        preshared_key=p.preshared_key,
        allowed_ips=memo.of(p),
        persistent_keepalive=SERVER_KEEPALIVE,
    )


def assumed_ruleset_change(observed: ObservedRuleset, change: RulesetChange) -> ObservedRuleset:
    """``assumed_ruleset(change.ruleset)`` from ``observed``, the assumed ruleset it was patched from."""
    ruleset = change.ruleset
    peer_chains = dict(observed.peer_chains)
    for name in change.chains:
        rules = ruleset.peer_chains.get(name)
        if rules is None:
            peer_chains.pop(name, None)
        else:
            peer_chains[name] = tuple(r["rule"]["comment"] for r in rules)
    return ObservedRuleset(fingerprint=ruleset.fingerprint, peer_chains=peer_chains, peer_map=dict(ruleset.peer_map))


def assumed_ruleset(ruleset: Ruleset) -> ObservedRuleset:
    """What ``nft list table`` shows once ``ruleset`` is loaded."""
    return ObservedRuleset(
        fingerprint=ruleset.fingerprint,
        peer_chains={name: tuple(r["rule"]["comment"] for r in rules) for name, rules in ruleset.peer_chains.items()},
        peer_map=dict(ruleset.peer_map),
    )


def _run(
    actions: Sequence[Action],
    link: LinkBackend,
    wireguard: WireGuardBackend,
    firewall: Firewall,
    result: SyncResult,
) -> None:
    """Runs actions in order; consecutive WireGuard changes of one interface go out as one transaction."""
    pending_if: str | None = None
    device: DeviceConfig | None = None
    peers: list[PeerConfig] = []

    def flush() -> None:
        nonlocal pending_if, device, peers
        if pending_if is not None:
            wireguard.set(pending_if, device, peers)
        pending_if, device, peers = None, None, []

    for action in actions:
        _log(action)
        result.actions.append(action)
        if isinstance(action, ConfigureDevice | RemovePeer | UpdatePeer | AddPeer):
            if pending_if not in (None, action.interface):
                flush()
            pending_if = action.interface
            if isinstance(action, ConfigureDevice):
                device = action.device
            elif isinstance(action, RemovePeer):
                peers.append(PeerConfig(public_key=action.public_key, remove=True))
            else:
                peers.append(action.peer)
        else:
            flush()
            _run_other(action, link, firewall)
    flush()


def _run_other(action: Action, link: LinkBackend, firewall: Firewall) -> None:
    match action:
        case CreateInterface(interface):
            link.create(interface)
        case DeleteInterface(interface):
            link.delete(interface)
        case SetMtu(interface, mtu):
            link.set_mtu(interface, mtu)
        case AddAddress(interface, address):
            link.add_address(interface, address)
        case RemoveAddress(interface, address):
            link.remove_address(interface, address)
        case SetLinkUp(interface):
            link.set_up(interface)
        case ReplaceFirewall(ruleset, _):
            firewall.replace(ruleset)
        case UpdateFirewall(ruleset, update):
            firewall.update(ruleset, update)


def _log(action: Action) -> None:
    # Keys never reach the log: PeerConfig and DeviceConfig hide them from repr, and only public
    # keys are named here.
    name = type(action).__name__
    if isinstance(action, AddPeer | UpdatePeer):
        log.info(name, extra={"interface": action.interface, "public_key": action.peer.public_key})
    elif isinstance(action, RemovePeer):
        log.info(name, extra={"interface": action.interface, "public_key": action.public_key})
    elif isinstance(action, ConfigureDevice):
        changed = [k for k in ("private_key", "listen_port") if getattr(action.device, k) is not None]
        log.info(name, extra={"interface": action.interface, "changed": changed})
    elif isinstance(action, UpdateFirewall):
        u = action.update
        log.info(
            name,
            extra={"add": len(u.add_elements), "delete": len(u.delete_elements), "chains": len(u.put_chains)},
        )
    elif isinstance(action, ReplaceFirewall):
        log.info(name, extra={"reason": action.reason})
    else:
        log.info(name, extra={"interface": getattr(action, "interface", "")})
