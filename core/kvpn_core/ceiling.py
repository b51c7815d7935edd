"""A server's ceiling on what its peers may reach: which one holds a peer, and what of its ask is left under it.

Written once, for the operator (which writes the narrowed destinations into the peer's binding and says
what was cut) and for the agents (which narrow a binding again, so a stale or hand-edited one cannot
exceed the ceiling).

A destination is read as a set of packets: a network, a set of protocols (one when ``protocol`` is set,
TCP and UDP when only ``ports`` are, any when neither) and a set of destination ports (all when none are
given; ICMP has none, as the gateways' firewall ignores ports on ICMP). Two destinations meet in the
smaller network when one holds the other, in the protocols both allow and in the ports both allow.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvpn_core.api import AllowedDestination, PeerCeiling, PortRange, Protocol, VpnServerSpec

Ports = tuple[tuple[int, int], ...]
"""Inclusive port ranges, sorted, none overlapping or touching another: one way to write each set of ports."""

ALL_NAMESPACES = "*"
_TCP_UDP = frozenset({Protocol.TCP, Protocol.UDP})
_MAX_RANGES = 32
"""As many port ranges as an AllowedDestination holds; more are written as several destinations."""
_LISTED = 8
"""Destinations a message names before it says how many more there are: an Event stays readable."""


def ceiling_for(spec: VpnServerSpec, namespace: str) -> PeerCeiling | None:
    """The ceiling that holds the server's peers of `namespace`: the first naming it, else the first naming "*".

    None when no ceiling names it: such a peer is limited only by the routes.
    """
    named = next((c for c in spec.peer_ceilings if namespace in c.namespaces), None)
    return named or next((c for c in spec.peer_ceilings if ALL_NAMESPACES in c.namespaces), None)


@dataclass(frozen=True)
class Cut:
    """One destination the ceiling narrowed: as asked (a route, when the ask was empty), and what is left of it."""

    asked: AllowedDestination
    left: tuple[AllowedDestination, ...]
    """Empty when the ceiling leaves nothing of it."""


@dataclass(frozen=True)
class Narrowing:
    """What a peer may reach under its ceiling, and what the ceiling cut from its ask.

    `destinations` is what a binding carries. With a ceiling it is never empty by accident: an empty
    list means *every route*, so when nothing is left `nothing_left` says so, and the caller must not
    write the list.
    """

    destinations: list[AllowedDestination]
    ceiling: PeerCeiling | None = None
    cuts: tuple[Cut, ...] = ()
    every_route: bool = False
    """The ask was empty (every route), and was read as one destination per route."""

    @property
    def nothing_left(self) -> bool:
        return self.ceiling is not None and not self.destinations

    @property
    def narrowed(self) -> bool:
        return bool(self.cuts)


def effective_destinations(
    asked: Sequence[AllowedDestination], routes: Sequence[str], ceiling: PeerCeiling | None
) -> Narrowing:
    """What a peer asking for `asked` may reach under `ceiling`, among the server's `routes`.

    Without a ceiling the ask stands as written. With one, an empty ask is every route (any protocol),
    and each asked destination is met with each of the ceiling's. The result is canonical (ports merged,
    TCP-and-UDP written as ports without a protocol), holds no destination that another one holds,
    and is sorted by network: narrowing it again under the same ceiling gives it back unchanged.

    An asked destination counts as cut unless one destination of the ceiling holds all of it: one that
    only several of them cover together is reported as cut to its pieces, which is still what is left.
    """
    if ceiling is None:
        return Narrowing(destinations=list(asked))
    every_route = not asked
    wanted = (
        [AllowedDestination(cidr=str(ipaddress.ip_network(r, strict=False))) for r in routes]
        if every_route
        else list(asked)
    )
    limits = [_Destination.of(d) for d in ceiling.destinations]
    cuts, pieces = [], []
    for destination in wanted:
        mine = _Destination.of(destination)
        if any(mine.within(limit) for limit in limits):
            pieces.append(mine)  # the common case, and the agents' in the steady state: nothing cut
            continue
        left = _maximal(m for limit in limits if (m := mine.meet(limit)) is not None)
        pieces.extend(left)
        cuts.append(Cut(destination, tuple(d for piece in _in_order(left) for d in piece.written())))
    kept = [d for piece in _in_order(_maximal(pieces)) for d in piece.written()]
    return Narrowing(destinations=kept, ceiling=ceiling, cuts=tuple(cuts), every_route=every_route)


@dataclass(frozen=True)
class _Span:
    """A network as the range of addresses it holds: two CIDRs nest or share nothing, so ranges say it all,
    and compare as integers (ipaddress's subnet_of costs more than the rest of a meet)."""

    version: int
    first: int
    prefixlen: int
    last: int

    @classmethod
    def of(cls, cidr: str) -> _Span:
        net = ipaddress.ip_network(cidr, strict=False)
        first = int(net.network_address)
        return cls(net.version, first, net.prefixlen, first + net.num_addresses - 1)

    def within(self, other: _Span) -> bool:
        return self.version == other.version and other.first <= self.first and self.last <= other.last

    def __str__(self) -> str:
        network = ipaddress.IPv4Network if self.version == 4 else ipaddress.IPv6Network
        return str(network((self.first, self.prefixlen)))


@dataclass(frozen=True)
class _Destination:
    """An AllowedDestination as the set of packets it lets through, in the one form each set has."""

    network: _Span
    protocols: frozenset[Protocol] | None
    """None: any protocol, not only these three."""
    ports: Ports | None
    """None: every port (and every packet without one); set only with TCP, UDP or both."""

    @classmethod
    def of(cls, destination: AllowedDestination) -> _Destination:
        network = _Span.of(destination.cidr)
        ranges = _merged((p.port, max(p.port, p.end_port or p.port)) for p in destination.ports)
        if destination.protocol is Protocol.ICMP:
            return cls(network, frozenset({Protocol.ICMP}), None)
        if destination.protocol is not None:
            return cls(network, frozenset({destination.protocol}), ranges or None)
        return cls(network, _TCP_UDP, ranges) if ranges else cls(network, None, None)

    def meet(self, other: _Destination) -> _Destination | None:
        """The packets both let through; None when there are none."""
        if self.network.within(other.network):
            network = self.network
        elif other.network.within(self.network):
            network = other.network
        else:
            return None  # disjoint, or another family
        if self.protocols is None or other.protocols is None:
            protocols = self.protocols if other.protocols is None else other.protocols
        else:
            protocols = self.protocols & other.protocols
        if protocols is not None and not protocols:
            return None
        if self.ports is None or other.ports is None:
            ports = self.ports if other.ports is None else other.ports
        else:
            ports = _common(self.ports, other.ports)
            if not ports:
                return None
        return _Destination(network, protocols, ports)

    def within(self, other: _Destination) -> bool:
        """Whether `other` lets through every packet this one does."""
        if not self.network.within(other.network):
            return False
        if other.protocols is not None and (self.protocols is None or not self.protocols <= other.protocols):
            return False
        if other.ports is None:
            return True
        return self.ports is not None and all(any(a <= lo and hi <= b for a, b in other.ports) for lo, hi in self.ports)

    def order(self) -> tuple[int, int, int, tuple[str, ...], Ports]:
        """Where it goes in a result: by network (IPv4 first), then protocols, then ports."""
        net = self.network
        protocols = () if self.protocols is None else tuple(sorted(self.protocols))
        return (net.version, net.first, net.prefixlen, protocols, self.ports or ())

    def breadth(self) -> tuple[int, bool, int, bool, int]:
        """Sorts every destination before those it holds: the wider network, protocols and ports first."""
        protocols = 0 if self.protocols is None else len(self.protocols)
        ports = 0 if self.ports is None else sum(hi - lo + 1 for lo, hi in self.ports)
        return (self.network.prefixlen, self.protocols is not None, -protocols, self.ports is not None, -ports)

    def written(self) -> list[AllowedDestination]:
        """As AllowedDestinations: one, or several when the ports do not fit one (or TCP and UDP lack ports).

        Built without validation: every value comes from validated destinations, and the agents build
        these for every peer under a ceiling.
        """
        cidr = str(self.network)
        if self.protocols is None:
            return [_written(cidr, None, ())]
        if self.ports is None:
            return [_written(cidr, p, ()) for p in sorted(self.protocols)]
        protocols = [None] if self.protocols == _TCP_UDP else sorted(self.protocols)
        chunks = [self.ports[i : i + _MAX_RANGES] for i in range(0, len(self.ports), _MAX_RANGES)]
        return [_written(cidr, protocol, chunk) for protocol in protocols for chunk in chunks]


def _written(cidr: str, protocol: Protocol | None, ports: Ports) -> AllowedDestination:
    ranges = [PortRange.model_construct(port=lo, end_port=hi if hi != lo else None) for lo, hi in ports]
    return AllowedDestination.model_construct(cidr=cidr, protocol=protocol, ports=ranges)


def _merged(ranges: Iterable[tuple[int, int]]) -> Ports:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return tuple(merged)


def _common(a: Ports, b: Ports) -> Ports:
    return _merged((max(x, y), min(p, q)) for x, p in a for y, q in b if max(x, y) <= min(p, q))


def _maximal(destinations: Iterable[_Destination]) -> list[_Destination]:
    """The destinations no other one holds, each once (a wider one is seen before those it holds)."""
    kept: list[_Destination] = []
    for candidate in sorted(set(destinations), key=lambda d: (d.breadth(), d.order())):
        if not any(candidate.within(k) for k in kept):
            kept.append(candidate)
    return kept


def _in_order(destinations: Iterable[_Destination]) -> list[_Destination]:
    return sorted(destinations, key=_Destination.order)


# --- in a person's words: conditions, Events and the agents' problems -------------------------------------


def describe(destination: AllowedDestination) -> str:
    """One destination the way a person reads it: 10.96.0.0/12, 10.96.5.0/24 tcp/80, 10.0.0.0/8 tcp+udp/53."""
    if destination.protocol is Protocol.ICMP:
        return f"{destination.cidr} icmp"
    protocol = destination.protocol.value.lower() if destination.protocol else ""
    if not destination.ports:
        return f"{destination.cidr} {protocol}".strip()
    ports = ",".join(
        str(p.port) if not p.end_port or p.end_port == p.port else f"{p.port}-{p.end_port}" for p in destination.ports
    )
    return f"{destination.cidr} {protocol or 'tcp+udp'}/{ports}"


def listing(destinations: Sequence[AllowedDestination]) -> str:
    """Destinations in a message: the first few, and how many more."""
    named = ", ".join(describe(d) for d in destinations[:_LISTED])
    more = len(destinations) - _LISTED
    return named + (f" and {more} more" if more > 0 else "")


def whose(ceiling: PeerCeiling | None, namespace: str) -> str:
    """Which ceiling holds the peer, in the words of a message; it names no one but the peer's namespace."""
    if ceiling is None:
        return f"no ceiling of the server holds namespace {namespace}"
    if namespace in ceiling.namespaces:
        return f"the server's ceiling for namespace {namespace}"
    return f'the server\'s ceiling for every namespace ("*"), which holds namespace {namespace}'


def _asked(narrowing: Narrowing) -> str:
    return "the server's routes (allowedDestinations is empty)" if narrowing.every_route else "allowedDestinations"


def cuts_message(narrowing: Narrowing, namespace: str) -> str:
    """What the ceiling cut, exactly: "the server's ceiling for namespace team-a cuts allowedDestinations
    10.96.0.0/12 to 10.96.5.0/24 tcp/80; 10.244.0.0/16 to nothing"."""
    cuts = narrowing.cuts[:_LISTED]
    parts = [f"{describe(c.asked)} to {listing(c.left) if c.left else 'nothing'}" for c in cuts]
    more = len(narrowing.cuts) - len(cuts)
    tail = f" (and {more} more cut)" if more > 0 else ""
    return f"{whose(narrowing.ceiling, namespace)} cuts {_asked(narrowing)} {'; '.join(parts)}{tail}"


def within_message(narrowing: Narrowing, namespace: str) -> str:
    """That the ceiling cut nothing, and what it is, so a user knows the bound they are under."""
    limit = listing(narrowing.ceiling.destinations) if narrowing.ceiling else "none"
    return f"{_asked(narrowing)} lie within {whose(narrowing.ceiling, namespace)} ({limit})"


def nothing_left_message(narrowing: Narrowing, namespace: str) -> str:
    """Why a peer gets nothing at all: the ceiling's destinations, and that none of the ask lies inside them."""
    limit = listing(narrowing.ceiling.destinations) if narrowing.ceiling else "none"
    asked = listing([c.asked for c in narrowing.cuts])
    return f"{whose(narrowing.ceiling, namespace)} ({limit}) leaves nothing of {_asked(narrowing)} {asked}"
