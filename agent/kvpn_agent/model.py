"""The agent's desired state of one server's dataplane, built by a pure function from the contract objects."""

from __future__ import annotations

import base64
import bisect
import contextlib
import functools
import hashlib
import ipaddress
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from kvpn_agent.linux import IFNAMSIZ
from kvpn_core.api import VpnServerSpec, VpnServerStatus
from kvpn_core.contract import SERVER_KEY_DATA, PeerBinding
from kvpn_core.keys import clamped, decode_key, public_key_of

INTERFACE_PREFIX = "kvpn-"


class DesiredStateError(Exception):
    """The server as a whole cannot be programmed; ``reason`` is a CamelCase word for a condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


Claim = str | ipaddress.IPv4Address | ipaddress.IPv6Address
"""What a binding competes for with the others: its public key and its addresses."""


class PeerProblem(BaseModel):
    """A binding the agent skipped, and why: reported on that peer, the other peers keep working."""

    model_config = ConfigDict(frozen=True)

    binding: str
    """Name of the binding Secret."""

    peer_namespace: str = ""
    peer_name: str = ""
    reason: str
    message: str


class DesiredServer(BaseModel):
    """Everything the node's dataplane must hold for one VpnServer."""

    model_config = ConfigDict(frozen=True)

    namespace: str
    name: str
    interface: str = Field(max_length=IFNAMSIZ)
    """WireGuard interface name, unique on the node."""

    private_key: SecretStr
    """Base64 private key; SecretStr so that no repr, log line or traceback shows it."""

    public_key: str
    """Base64, derived from private_key: for status, and to refuse a peer that uses the server's own key."""

    listen_port: int
    mtu: int
    addresses: tuple[str, ...]
    """The server's tunnel addresses with the pool's prefix length, e.g. 10.8.0.1/24."""

    routes: tuple[str, ...]
    """Networks peers reach through this server (the routes in effect), normalized."""

    masquerade: bool
    dns_nameservers: tuple[str, ...] = ()
    """DNS servers pushed to peers: every enabled peer may reach them on port 53 whatever its destinations."""

    peers: tuple[PeerBinding, ...] = Field(default=(), repr=False)
    """Enabled peers with a valid key, sorted by first address; destinations already limited to the routes.

    Out of repr: a PeerBinding's repr shows its preshared key.
    """

    problems: tuple[PeerProblem, ...] = ()

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_interface(a).network) for a in self.addresses)


def interface_name(namespace: str, name: str) -> str:
    """``kvpn-`` and a digest of namespace/name: unique on the node, stable, within IFNAMSIZ.

    A readable ``kvpn-<name>`` would collide for equally named servers of two namespaces and would
    not fit most names; the agent logs the mapping instead.
    """
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()
    return INTERFACE_PREFIX + digest[: IFNAMSIZ - len(INTERFACE_PREFIX)]


def host_prefix(address: str) -> str:
    """An address as the single-host network WireGuard's AllowedIPs and nft want (10.8.0.2/32)."""
    ip = ipaddress.ip_address(address.split("/", 1)[0])
    return f"{ip}/{ip.max_prefixlen}"


def build_desired(
    server: Mapping[str, Any],
    key_secret: Mapping[str, Any] | None,
    bindings: Iterable[Mapping[str, Any]],
    *,
    interface: str | None = None,
    judged: dict[str, Judged] | None = None,
) -> DesiredServer:
    """The desired state of one server from the objects of the operator→agent contract.

    ``server`` is the VpnServer, ``key_secret`` the Secret ``kvpn-server-<name>``, ``bindings`` the
    peer binding Secrets, all as the API returns them. Raises DesiredStateError when the server
    itself is unusable; a bad binding only lands in ``problems``.
    """
    meta = server.get("metadata") or {}
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    try:
        spec = VpnServerSpec.model_validate(server.get("spec") or {})
        status = VpnServerStatus.model_validate(server.get("status") or {})
    except ValidationError as exc:
        raise DesiredStateError("InvalidSpec", f"VpnServer {namespace}/{name}: {exc}") from None

    private_key = clamped(_server_private_key(key_secret))
    pools = [ipaddress.ip_network(p) for p in spec.address_pool]
    addresses = _server_addresses(status.addresses, pools)
    routes = _collapse(status.routes or spec.routes)
    route_nets = [ipaddress.ip_network(r) for r in routes]
    dns = tuple(status.dns_nameserver.split(",")) if spec.dns.enabled and status.dns_nameserver else ()
    public_key = public_key_of(private_key)
    server_ips = {ipaddress.ip_interface(a).ip for a in addresses}
    peers, problems = _peers(bindings, pools, route_nets, public_key, server_ips, judged=judged)
    return DesiredServer(
        namespace=namespace,
        name=name,
        interface=interface or interface_name(namespace, name),
        private_key=SecretStr(private_key),
        public_key=public_key,
        listen_port=spec.listen_port,
        mtu=spec.mtu,
        addresses=addresses,
        routes=routes,
        masquerade=spec.masquerade,
        dns_nameservers=tuple(str(ipaddress.ip_address(d.strip())) for d in dns),
        peers=peers,
        problems=problems,
    )


def _server_private_key(secret: Mapping[str, Any] | None) -> str:
    data = (secret or {}).get("data") or {}
    encoded = data.get(SERVER_KEY_DATA)
    if not encoded:
        raise DesiredStateError("ServerKeyMissing", f"the server key Secret has no {SERVER_KEY_DATA!r} yet")
    try:
        key = base64.b64decode(encoded, validate=True).decode().strip()
        decode_key(key)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DesiredStateError("InvalidServerKey", f"the server's private key is unusable: {exc}") from None
    return key


def _server_addresses(
    status_addresses: list[str], pools: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> tuple[str, ...]:
    """Status addresses (with or without a prefix) with the pool's prefix; the pool's first host if unset.

    The first usable address is the documented rule (DESIGN.md), so deriving it is not allocating;
    it lets the agent bring the interface up before the operator has written status.
    """
    result = []
    for pool in pools:
        mine = [a for a in status_addresses if ipaddress.ip_address(a.split("/")[0]).version == pool.version]
        ip = ipaddress.ip_address(mine[0].split("/")[0]) if mine else next(pool.hosts())
        if ip not in pool:
            raise DesiredStateError("AddressOutsidePool", f"server address {ip} is outside its pool {pool}")
        result.append(f"{ip}/{pool.prefixlen}")
    return tuple(result)


def _collapse(cidrs: Iterable[str]) -> tuple[str, ...]:
    # nft interval sets refuse overlapping elements, and 10.0.0.0/8 next to 10.96.0.0/12 is common.
    nets = [ipaddress.ip_network(c) for c in cidrs]
    v4 = ipaddress.collapse_addresses(n for n in nets if n.version == 4)
    v6 = ipaddress.collapse_addresses(n for n in nets if n.version == 6)
    return tuple(str(n) for n in [*v4, *v6])


def _inside(cidr: str, routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    net = ipaddress.ip_network(cidr)
    return any(net.version == r.version and net.subnet_of(r) for r in routes)  # type: ignore[arg-type]


def _sort_key(secret: Mapping[str, Any]) -> tuple[str, str]:
    # Older bindings win a conflict: a newcomer cannot push out a working peer.
    meta = secret.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))


# A running agent rebuilds a server's peers on every binding change; at 10,000 peers parsing
# dominates that, so parsed bindings and addresses are kept. A binding is keyed by its
# resourceVersion, which the API server changes on every write. Used from one thread (the sync loop).
_BINDING_CACHE_SIZE = 1 << 17
_bindings: OrderedDict[tuple[str, str, str], PeerBinding] = OrderedDict()
_ip = functools.lru_cache(maxsize=_BINDING_CACHE_SIZE)(ipaddress.ip_address)


def _parse_binding(secret: Mapping[str, Any]) -> PeerBinding:
    meta = secret.get("metadata") or {}
    version = str(meta.get("resourceVersion") or "")
    if not version:
        return PeerBinding.from_secret(dict(secret))
    key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""), version)
    binding = _bindings.get(key)
    if binding is None:
        binding = _bindings[key] = PeerBinding.from_secret(dict(secret))
        if len(_bindings) > _BINDING_CACHE_SIZE:
            _bindings.popitem(last=False)
    return binding


def _peers(
    secrets: Iterable[Mapping[str, Any]],
    pools: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    server_public_key: str,
    server_ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address],
    *,
    judged: dict[str, Judged] | None = None,
) -> tuple[tuple[PeerBinding, ...], tuple[PeerProblem, ...]]:
    """The accepted peers and the problems; ``judged`` gets each binding's outcome by Secret name."""
    peers: list[PeerBinding] = []
    problems: list[PeerProblem] = []
    keys: set[str] = {server_public_key}
    taken = set(server_ips)
    for secret in sorted(secrets, key=_sort_key):
        peer, problem = _judge(secret, pools, routes, keys, taken)
        if judged is not None:
            judged[str((secret.get("metadata") or {}).get("name", ""))] = (_sort_key(secret), peer, problem)
        if problem is not None:
            problems.append(problem)
        if peer is not None:
            peers.append(peer)
    peers.sort(key=lambda p: _address_key(p.addresses[0]))
    return tuple(peers), tuple(problems)


def _judge(
    secret: Mapping[str, Any],
    pools: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    keys: set[str],
    taken: set[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> tuple[PeerBinding | None, PeerProblem | None]:
    """One binding against the keys and addresses older bindings hold (both updated when it is accepted)."""
    secret_name = str((secret.get("metadata") or {}).get("name", ""))
    try:
        binding = _parse_binding(secret)
    except (ValidationError, ValueError, UnicodeDecodeError) as exc:
        return None, PeerProblem(binding=secret_name, reason="InvalidBinding", message=_short(exc))
    reject = _check(binding, pools, keys, taken)
    if reject is not None:
        reason, message = reject
        return None, PeerProblem(
            binding=secret_name,
            peer_namespace=binding.peer_namespace,
            peer_name=binding.peer_name,
            reason=reason,
            message=message,
        )
    if not binding.enabled or not binding.public_key:
        return None, None  # not an error: disabled, expired, or the key is still being set up
    keys.add(binding.public_key)
    taken.update(_ip(a) for a in binding.addresses)
    kept = [d for d in binding.allowed_destinations if _inside(d.cidr, routes)]
    dropped = [d.cidr for d in binding.allowed_destinations if not _inside(d.cidr, routes)]
    if not dropped:
        return binding, None
    problem = PeerProblem(
        binding=secret_name,
        peer_namespace=binding.peer_namespace,
        peer_name=binding.peer_name,
        reason="DestinationOutsideRoutes",
        message=f"allowedDestinations outside the server's routes: {', '.join(dropped)}",
    )
    if not kept:
        return None, problem  # dropping every destination must not widen the peer to all routes
    return binding.model_copy(update={"allowed_destinations": kept}), problem


def _check(
    binding: PeerBinding,
    pools: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    keys: set[str],
    taken: set[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> tuple[str, str] | None:
    for key, what in ((binding.public_key, "publicKey"), (binding.preshared_key, "presharedKey")):
        if key:
            try:
                decode_key(key)
            except ValueError as exc:
                return ("InvalidPublicKey" if what == "publicKey" else "InvalidPresharedKey", f"{what} {exc}")
    try:
        ips = [_ip(a) for a in binding.addresses]
    except ValueError as exc:
        return ("InvalidAddress", str(exc))
    for ip in ips:
        if not any(ip in pool for pool in pools):
            return ("AddressOutsidePool", f"address {ip} is outside the server's pool")
        if ip in taken:
            return ("AddressConflict", f"address {ip} is the server's own or an older binding's")
    if binding.public_key and binding.enabled and binding.public_key in keys:
        return (
            "DuplicatePublicKey",
            "publicKey is already used by another peer of this server (or the server)",
        )
    return None


def _address_key(address: str) -> tuple[int, int]:
    ip = _ip(address)
    return (ip.version, int(ip))


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()
    return text[0] if text else type(exc).__name__


Judged = tuple[tuple[str, str], PeerBinding | None, PeerProblem | None]
"""A binding's sort key (its age), the peer it became (or None) and its problem (or None)."""


class DesiredBuilder:
    """One server's desired state kept current one binding change at a time (the watch-event path).

    ``apply`` gives exactly what ``build_desired`` over the current bindings gives. A binding's
    outcome depends on the others only through the public key and addresses it claims (older
    bindings win), so a change whose claims no other binding shares is patched in and out alone;
    any other change rebuilds from all bindings. Not thread-safe: used by the sync loop only.
    """

    def __init__(
        self,
        server: Mapping[str, Any],
        key_secret: Mapping[str, Any] | None,
        bindings: Iterable[Mapping[str, Any]],
        *,
        interface: str | None = None,
    ) -> None:
        self._server, self._key_secret, self._interface = server, key_secret, interface
        self.secrets: dict[str, Mapping[str, Any]] = {_secret_name(b): b for b in bindings}
        self.desired = self._rebuild()  # raises DesiredStateError like build_desired
        self._pools = [ipaddress.ip_network(p) for p in self.desired.pools]
        self._routes = [ipaddress.ip_network(r) for r in self.desired.routes]
        self._server_ips = {ipaddress.ip_interface(a).ip for a in self.desired.addresses}

    def _rebuild(self) -> DesiredServer:
        judged: dict[str, Judged] = {}
        desired = build_desired(
            self._server, self._key_secret, self.secrets.values(), interface=self._interface, judged=judged
        )
        self._claims = {name: _claims(secret) for name, secret in self.secrets.items()}
        self._count: dict[Claim, int] = {}
        for claims in self._claims.values():
            for claim in claims:
                self._count[claim] = self._count.get(claim, 0) + 1
        self._peer = {name: peer for name, (_, peer, _) in judged.items() if peer is not None}
        self._problem = {name: (age, problem) for name, (age, _, problem) in judged.items() if problem is not None}
        self._keys = [_address_key(p.addresses[0]) for p in desired.peers]
        self._peers = list(desired.peers)
        return desired

    def apply(self, changes: Mapping[str, Mapping[str, Any] | None]) -> DesiredServer:
        """Binding Secret name → its new version, or None when it is gone; the new desired state."""
        full = False
        for name, secret in changes.items():
            old = self._claims.pop(name, ())
            for claim in old:
                self._count[claim] -= 1
                if not self._count[claim]:
                    del self._count[claim]
            self.secrets.pop(name, None)
            new = _claims(secret) if secret is not None else ()
            full = full or any(c in self._count for c in (*old, *new))
            if secret is not None:
                self.secrets[name] = secret
                self._claims[name] = new
                for claim in new:
                    self._count[claim] = self._count.get(claim, 0) + 1
            if not full:
                self._patch(name, secret)
        if full:
            self.desired = self._rebuild()
            return self.desired
        problems = sorted(self._problem.values(), key=lambda item: item[0])
        self.desired = self.desired.model_copy(
            update={"peers": tuple(self._peers), "problems": tuple(p for _, p in problems)}
        )
        return self.desired

    def _patch(self, name: str, secret: Mapping[str, Any] | None) -> None:
        if (gone := self._peer.pop(name, None)) is not None:
            i = bisect.bisect_left(self._keys, _address_key(gone.addresses[0]))
            del self._keys[i], self._peers[i]
        self._problem.pop(name, None)
        if secret is None:
            return
        peer, problem = _judge(secret, self._pools, self._routes, {self.desired.public_key}, set(self._server_ips))
        if problem is not None:
            self._problem[name] = (_sort_key(secret), problem)
        if peer is not None:
            self._peer[name] = peer
            key = _address_key(peer.addresses[0])
            i = bisect.bisect_left(self._keys, key)
            self._keys.insert(i, key)
            self._peers.insert(i, peer)


def changed_peers(
    old: DesiredServer | None, new: DesiredServer | None
) -> tuple[tuple[PeerBinding, ...], tuple[PeerBinding, ...]]:
    """The peers only ``old`` has and those only ``new`` has, by identity, each in its server's order.

    A peer kept by a DesiredBuilder is the same object in both; an equal but rebuilt one counts as
    changed, which costs planning it again and nothing else.
    """
    global _last_change  # noqa: PLW0603 - one sync asks three times (plan, assumed state, ruleset)
    if _last_change is not None and _last_change[0] is old and _last_change[1] is new:
        return _last_change[2]
    old_peers, new_peers = (old.peers if old else ()), (new.peers if new else ())
    # Set operations over ids run in C: at 10,000 peers a Python loop over them is most of the cost.
    before, after = (
        dict(zip(map(id, old_peers), old_peers, strict=True)),
        dict(zip(map(id, new_peers), new_peers, strict=True)),
    )
    gone = sorted((before[i] for i in before.keys() - after.keys()), key=lambda p: _address_key(p.addresses[0]))
    added = sorted((after[i] for i in after.keys() - before.keys()), key=lambda p: _address_key(p.addresses[0]))
    result = (tuple(gone), tuple(added))
    _last_change = (old, new, result)
    return result


_last_change: (
    tuple[DesiredServer | None, DesiredServer | None, tuple[tuple[PeerBinding, ...], tuple[PeerBinding, ...]]] | None
) = None


def _secret_name(secret: Mapping[str, Any]) -> str:
    return str((secret.get("metadata") or {}).get("name", ""))


def _claims(secret: Mapping[str, Any]) -> tuple[Claim, ...]:
    try:
        binding = _parse_binding(secret)
    except (ValidationError, ValueError, UnicodeDecodeError):
        return ()  # refused whatever the others hold
    claims: list[Claim] = [binding.public_key] if binding.public_key else []
    for address in binding.addresses:
        with contextlib.suppress(ValueError):
            claims.append(_ip(address))
    return tuple(claims)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Interface-level settings to change; None leaves a setting as it is."""

    private_key: str | None = field(default=None, repr=False)
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer's change. None leaves a setting as it is; ``preshared_key=""`` clears it."""

    public_key: str
    remove: bool = False
    update_only: bool = False
    preshared_key: str | None = field(default=None, repr=False)
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: tuple[str, ...] = ()


def sort_networks(cidrs: Iterable[str]) -> tuple[str, ...]:
    """Networks normalized and in one order, so that desired and observed lists compare equal."""
    nets = {ipaddress.ip_network(c, strict=False) for c in cidrs}
    return tuple(str(n) for n in sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen)))


# --- Observed state, read back from the system -------------------------------------------------
# Plain dataclasses rather than pydantic: a read-back of 10,000 peers builds 10,000 of them per sync
# and needs no validation (the system is the source).


@dataclass(frozen=True, slots=True)
class ObservedPeer:
    public_key: str
    """Base64."""

    preshared_key: str | None = field(default=None, repr=False)
    """Base64, None when unset (all zero)."""

    endpoint: str | None = None
    allowed_ips: tuple[str, ...] = ()
    """Normalized networks, sorted."""

    persistent_keepalive: int = 0
    last_handshake: float | None = None
    """Unix time of the last handshake, None when never."""

    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ObservedDevice:
    private_key: str | None = field(default=None, repr=False)
    listen_port: int = 0
    fwmark: int = 0
    peers: Mapping[str, ObservedPeer] = field(default_factory=dict)
    """Keyed by base64 public key."""


@dataclass(frozen=True, slots=True)
class ObservedLink:
    mtu: int
    up: bool
    addresses: tuple[str, ...] = ()
    """Interface addresses with prefix length (10.8.0.1/24)."""


@dataclass(frozen=True, slots=True)
class Observed:
    """One server's interface as read back; None parts are missing on the node."""

    link: ObservedLink | None = None
    device: ObservedDevice | None = None
