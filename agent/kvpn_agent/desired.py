"""The desired state of one server's dataplane, built by a pure function from the contract objects."""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from kvpn_agent.linux import IFNAMSIZ
from kvpn_core.api import PeerCeiling, VpnServerSpec, VpnServerStatus
from kvpn_core.ceiling import ceiling_for, cuts_message, effective_destinations, nothing_left_message
from kvpn_core.conditions import Finding, Reason
from kvpn_core.contract import SERVER_KEY_DATA, PeerBinding, binding_age
from kvpn_core.keys import clamped, decode_key, public_key_of

GATEWAY_PREFIX = "kvgw-"
"""Starts the name of every interface the agent owns, and of nothing else.

The CLI names a laptop's interfaces ``kvpn-<server>``, so a gateway that also runs `kubectl vpn up`
keeps that tunnel: cleanup and adoption go by this prefix. Agents before it named theirs
``kvpn-<digest>`` (``legacy_interface_name``): an upgraded agent re-creates each server's interface
under the new name and deletes the old one, found by its exact name, never by the prefix.
"""

LEGACY_PREFIX = "kvpn-"
"""The prefix of the agent's interfaces before GATEWAY_PREFIX, shared with the CLI's laptop tunnels."""


class DesiredStateError(Exception):
    """The server as a whole cannot be programmed, and why (``finding``, for its Dataplane condition)."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.message)
        self.finding = finding


class PeerProblem(BaseModel):
    """A binding the agent skipped, and why: reported on that peer, the other peers keep working."""

    model_config = ConfigDict(frozen=True)

    binding: str
    """Name of the binding Secret."""

    peer_namespace: str = ""
    peer_name: str = ""
    finding: Finding
    """Why it was skipped, for the peer's Dataplane condition and the log."""


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
    """Enabled peers with a valid key, sorted by first address; destinations already limited to the routes
    and to the peer's ceiling (spec.peerCeilings).

    Out of repr: a PeerBinding's repr shows its preshared key.
    """

    problems: tuple[PeerProblem, ...] = ()

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(str(ipaddress.ip_interface(a).network) for a in self.addresses)


def interface_name(namespace: str, name: str) -> str:
    """``kvgw-`` and a digest of namespace/name: unique on the node, stable, within IFNAMSIZ.

    A readable ``kvgw-<name>`` would collide for equally named servers of two namespaces and would
    not fit most names; the agent logs the mapping instead.
    """
    return _named(GATEWAY_PREFIX, namespace, name)


def legacy_interface_name(namespace: str, name: str) -> str:
    """The server's interface as agents before GATEWAY_PREFIX named it: removed on upgrade."""
    return _named(LEGACY_PREFIX, namespace, name)


def _named(prefix: str, namespace: str, name: str) -> str:
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()
    return prefix + digest[: IFNAMSIZ - len(prefix)]


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
    cache: BindingCache | None = None,
) -> DesiredServer:
    """The desired state of one server from the objects of the operator→agent contract.

    ``server`` is the VpnServer, ``key_secret`` the Secret ``kvpn-server-<name>``, ``bindings`` the
    peer binding Secrets, all as the API returns them. Raises DesiredStateError when the server
    itself is unusable; a bad binding only lands in ``problems``. ``cache`` keeps parsed bindings
    for the next build; without it they are parsed afresh.
    """
    meta = server.get("metadata") or {}
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    try:
        spec = VpnServerSpec.model_validate(server.get("spec") or {})
        status = VpnServerStatus.model_validate(server.get("status") or {})
    except ValidationError as exc:
        raise DesiredStateError(Finding(Reason.INVALID_SPEC, f"VpnServer {namespace}/{name}: {exc}")) from None

    private_key = clamped(_server_private_key(key_secret))
    pools = [ipaddress.ip_network(p) for p in spec.address_pool]
    addresses = _server_addresses(status.addresses, pools)
    routes = _collapse(status.routes or spec.routes)
    route_nets = [ipaddress.ip_network(r) for r in routes]
    dns = tuple(status.dns_nameserver.split(",")) if spec.dns.enabled and status.dns_nameserver else ()
    public_key = public_key_of(private_key)
    server_ips = {ipaddress.ip_interface(a).ip for a in addresses}
    peers, problems = _peers(
        bindings, pools, route_nets, public_key, server_ips, cache=cache or BindingCache(), judged=judged, server=spec
    )
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
        raise DesiredStateError(
            Finding(Reason.SERVER_KEY_MISSING, f"the server key Secret has no {SERVER_KEY_DATA!r} yet")
        )
    try:
        key = base64.b64decode(encoded, validate=True).decode().strip()
        decode_key(key)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DesiredStateError(
            Finding(Reason.INVALID_SERVER_KEY, f"the server's private key is unusable: {exc}")
        ) from None
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
            raise DesiredStateError(
                Finding(Reason.ADDRESS_OUTSIDE_POOL, f"server address {ip} is outside its pool {pool}")
            )
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


class BindingCache:
    """Parsed bindings and addresses, kept by the owner of the desired state across builds.

    A running agent rebuilds a server's peers on every binding change; at 10,000 peers parsing
    dominates that, so parsed bindings and addresses are kept, and so is what a ceiling leaves of
    each binding (a hundred microseconds a peer, a second a rebuild). A binding is keyed by its
    resourceVersion, which the API server changes on every write. Not thread-safe: one owner, one
    thread (the sync loop).
    """

    SIZE = 1 << 17

    def __init__(self, size: int = SIZE) -> None:
        self._size = size
        self._bindings: OrderedDict[tuple[str, str, str], PeerBinding] = OrderedDict()
        self._servers: dict[tuple[str, str], VpnServerSpec] = {}
        self._limited: OrderedDict[tuple[Any, ...], Limited] = OrderedDict()
        self.ip = functools.lru_cache(maxsize=size)(ipaddress.ip_address)

    def binding(self, secret: Mapping[str, Any]) -> PeerBinding:
        key = _version_key(secret)
        if key is None:
            return PeerBinding.from_secret(dict(secret))
        binding = self._bindings.get(key)
        if binding is None:
            binding = self._bindings[key] = PeerBinding.from_secret(dict(secret))
            if len(self._bindings) > self._size:
                self._bindings.popitem(last=False)
        return binding

    def limited(
        self,
        secret: Mapping[str, Any],
        ceiling: PeerCeiling,
        routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
        compute: Callable[[], Limited],
    ) -> Limited:
        """What `compute` says of the binding under `ceiling` and `routes`, kept while all three stay.

        Kept, the narrowed binding is also the same object at the next build: the planner sees no change.
        """
        version = _version_key(secret)
        if version is None:
            return compute()
        key = (*version, ceiling.model_dump_json(), tuple(routes))
        found = self._limited.get(key)
        if found is None:
            found = self._limited[key] = compute()
            if len(self._limited) > self._size:
                self._limited.popitem(last=False)
        return found

    def address_key(self, address: str) -> tuple[int, int]:
        """The order of peers in a server: by their first address, IPv4 first."""
        ip = self.ip(address)
        return (ip.version, int(ip))


def _version_key(secret: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """A binding Secret's namespace, name and resourceVersion; None without a version (nothing to key on)."""
    meta = secret.get("metadata") or {}
    version = str(meta.get("resourceVersion") or "")
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""), version) if version else None


Limited = tuple[PeerBinding | None, PeerProblem | None]
"""A binding with its destinations limited to the routes and its ceiling (None: left out), and what went."""


def _peers(
    secrets: Iterable[Mapping[str, Any]],
    pools: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    server_public_key: str,
    server_ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address],
    *,
    cache: BindingCache,
    judged: dict[str, Judged] | None = None,
    server: VpnServerSpec,
) -> tuple[tuple[PeerBinding, ...], tuple[PeerProblem, ...]]:
    """The accepted peers and the problems; ``judged`` gets each binding's outcome by Secret name."""
    peers: list[PeerBinding] = []
    problems: list[PeerProblem] = []
    keys: set[str] = {server_public_key}
    taken = set(server_ips)
    for secret in sorted(secrets, key=binding_age):
        peer, problem = judge_binding(secret, pools, routes, keys, taken, cache=cache, server=server)
        if judged is not None:
            judged[str((secret.get("metadata") or {}).get("name", ""))] = (binding_age(secret), peer, problem)
        if problem is not None:
            problems.append(problem)
        if peer is not None:
            peers.append(peer)
    peers.sort(key=lambda p: cache.address_key(p.addresses[0]))
    return tuple(peers), tuple(problems)


def judge_binding(
    secret: Mapping[str, Any],
    pools: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    keys: set[str],
    taken: set[ipaddress.IPv4Address | ipaddress.IPv6Address],
    *,
    cache: BindingCache,
    server: VpnServerSpec,
) -> tuple[PeerBinding | None, PeerProblem | None]:
    """One binding against the keys and addresses older bindings hold (both updated when it is accepted);
    ``server`` is the server's spec, for the ceiling that holds the peer."""
    secret_name = str((secret.get("metadata") or {}).get("name", ""))
    try:
        binding = cache.binding(secret)
    except (ValidationError, ValueError, UnicodeDecodeError) as exc:
        return None, PeerProblem(binding=secret_name, finding=Finding(Reason.INVALID_BINDING, _short(exc)))
    reject = _check(binding, pools, keys, taken, cache)
    if reject is not None:
        return None, _problem(secret_name, binding, reject)
    if not binding.enabled or not binding.public_key:
        return None, None  # not an error: disabled, expired, or the key is still being set up
    keys.add(binding.public_key)
    taken.update(cache.ip(a) for a in binding.addresses)
    held_by = ceiling_for(server, binding.peer_namespace)
    if held_by is None:
        return _limited(secret_name, binding, routes, None)
    return cache.limited(secret, held_by, routes, lambda: _limited(secret_name, binding, routes, held_by))


def _problem(secret_name: str, binding: PeerBinding, finding: Finding) -> PeerProblem:
    return PeerProblem(
        binding=secret_name, peer_namespace=binding.peer_namespace, peer_name=binding.peer_name, finding=finding
    )


def _limited(
    secret_name: str,
    binding: PeerBinding,
    routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    held_by: PeerCeiling | None,
) -> Limited:
    """The binding with its destinations limited to the routes, then to its ceiling; what went, as a problem.

    The operator writes bindings already narrowed, so in the steady state nothing goes here; this holds
    a binding that is stale (the ceiling changed, the operator has yet to re-render it) or hand-edited to
    what the ceiling does not allow. A peer left nothing is left out: an empty list would be every route.
    """
    kept = [d for d in binding.allowed_destinations if _inside(d.cidr, routes)]
    dropped = [d.cidr for d in binding.allowed_destinations if not _inside(d.cidr, routes)]
    findings = []
    if dropped:
        outside = f"allowedDestinations outside the server's routes: {', '.join(dropped)}"
        findings.append(Finding(Reason.DESTINATION_OUTSIDE_ROUTES, outside))
        if not kept:
            return None, _problem(secret_name, binding, findings[0])  # never widen the peer to all routes
    narrowing = effective_destinations(kept, [str(r) for r in routes] if held_by else [], held_by)
    if narrowing.nothing_left:
        left_out = f"{nothing_left_message(narrowing, binding.peer_namespace)}: the peer is left out"
        return None, _problem(secret_name, binding, Finding(Reason.DESTINATION_OUTSIDE_CEILING, left_out))
    if narrowing.narrowed:
        findings.append(Finding(Reason.DESTINATION_OUTSIDE_CEILING, cuts_message(narrowing, binding.peer_namespace)))
    if not findings:
        return binding, None
    # One problem per binding: the first reason, with every message.
    problem = _problem(secret_name, binding, Finding(findings[0].reason, "; ".join(f.message for f in findings)))
    return binding.model_copy(update={"allowed_destinations": narrowing.destinations}), problem


def _check(
    binding: PeerBinding,
    pools: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    keys: set[str],
    taken: set[ipaddress.IPv4Address | ipaddress.IPv6Address],
    cache: BindingCache,
) -> Finding | None:
    """Why the binding is refused, given what older bindings hold; None when nothing is wrong with it."""
    for key, what in ((binding.public_key, "publicKey"), (binding.preshared_key, "presharedKey")):
        if key:
            try:
                decode_key(key)
            except ValueError as exc:
                return Finding(
                    Reason.INVALID_PUBLIC_KEY if what == "publicKey" else Reason.INVALID_PRESHARED_KEY,
                    f"{what} {exc}",
                )
    try:
        ips = [cache.ip(a) for a in binding.addresses]
    except ValueError as exc:
        return Finding(Reason.INVALID_ADDRESS, str(exc))
    for ip in ips:
        if not any(ip in pool for pool in pools):
            return Finding(Reason.ADDRESS_OUTSIDE_POOL, f"address {ip} is outside the server's pool")
        if ip in taken:
            return Finding(Reason.ADDRESS_CONFLICT, f"address {ip} is the server's own or an older binding's")
    if binding.public_key and binding.enabled and binding.public_key in keys:
        return Finding(
            Reason.DUPLICATE_PUBLIC_KEY, "publicKey is already used by another peer of this server (or the server)"
        )
    return None


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()
    return text[0] if text else type(exc).__name__


Judged = tuple[tuple[str, str], PeerBinding | None, PeerProblem | None]
"""A binding's sort key (its age), the peer it became (or None) and its problem (or None)."""

PeerChange = tuple[tuple[PeerBinding, ...], tuple[PeerBinding, ...]]
"""The peers only the old desired state has, and those only the new one has."""


def changed_peers(old: DesiredServer | None, new: DesiredServer | None) -> PeerChange:
    """The peers only ``old`` has and those only ``new`` has, by identity, each in its server's order.

    A peer kept by a DesiredBuilder is the same object in both; an equal but rebuilt one counts as
    changed, which costs planning it again and nothing else.
    """
    old_peers, new_peers = (old.peers if old else ()), (new.peers if new else ())
    # Set operations over ids run in C: at 10,000 peers a Python loop over them is most of the cost.
    before, after = (
        dict(zip(map(id, old_peers), old_peers, strict=True)),
        dict(zip(map(id, new_peers), new_peers, strict=True)),
    )
    gone = sorted((before[i] for i in before.keys() - after.keys()), key=_first_address)
    added = sorted((after[i] for i in after.keys() - before.keys()), key=_first_address)
    return tuple(gone), tuple(added)


def _first_address(peer: PeerBinding) -> tuple[int, int]:
    ip = ipaddress.ip_address(peer.addresses[0])
    return (ip.version, int(ip))


class PeerChanges:
    """``changed_peers`` that keeps its latest answer: one sync pass asks it three times per server
    (plan, assumed state, ruleset). Made per pass by its caller, so nothing outlives the pass.
    """

    def __init__(self) -> None:
        self._last: tuple[DesiredServer | None, DesiredServer | None, PeerChange] | None = None

    def __call__(self, old: DesiredServer | None, new: DesiredServer | None) -> PeerChange:
        if self._last is not None and self._last[0] is old and self._last[1] is new:
            return self._last[2]
        result = changed_peers(old, new)
        self._last = (old, new, result)
        return result
