"""A server's ceiling on what its peers reach: which ceiling holds a peer, and what of its ask it leaves."""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Sequence
from typing import Any

import pytest

from kvpn_core.api import AllowedDestination, PeerCeiling, Protocol, VpnServerSpec
from kvpn_core.ceiling import (
    ceiling_for,
    cuts_message,
    describe,
    effective_destinations,
    nothing_left_message,
    within_message,
)

ROUTES = ["10.96.0.0/12", "10.244.0.0/16"]


def dest(cidr: str, protocol: str | None = None, *ports: int | tuple[int, int]) -> AllowedDestination:
    ranges = [{"port": p} if isinstance(p, int) else {"port": p[0], "endPort": p[1]} for p in ports]
    return AllowedDestination.model_validate({"cidr": cidr, "protocol": protocol, "ports": ranges})


def ceiling(*destinations: AllowedDestination, namespaces: Sequence[str] = ("team-a",)) -> PeerCeiling:
    return PeerCeiling(namespaces=list(namespaces), destinations=list(destinations))


def narrowed(asked: Sequence[AllowedDestination], *limits: AllowedDestination) -> list[str]:
    """The result in a person's words, which is also the shortest way to compare it."""
    return [describe(d) for d in effective_destinations(list(asked), ROUTES, ceiling(*limits)).destinations]


def spec(*ceilings: PeerCeiling) -> VpnServerSpec:
    return VpnServerSpec.model_validate(
        {"addressPool": ["10.8.0.0/24"], "peerCeilings": [c.to_api() for c in ceilings]}
    )


# --- which ceiling holds a peer ---------------------------------------------------------------------------


def test_the_first_ceiling_naming_the_namespace_holds_it_even_after_a_star() -> None:
    star = ceiling(dest("10.96.0.0/12"), namespaces=["*"])
    first, second = ceiling(dest("10.96.1.0/24"), namespaces=["team-a"]), ceiling(dest("10.96.2.0/24"))
    server = spec(star, first, second)
    assert ceiling_for(server, "team-a") == first
    assert ceiling_for(server, "team-b") == star


def test_the_first_star_holds_a_namespace_no_ceiling_names() -> None:
    one, two = ceiling(dest("10.96.1.0/24"), namespaces=["*"]), ceiling(dest("10.96.2.0/24"), namespaces=["*"])
    assert ceiling_for(spec(ceiling(dest("10.96.0.0/12")), one, two), "team-b") == one


def test_no_ceiling_holds_a_namespace_none_names() -> None:
    assert ceiling_for(spec(ceiling(dest("10.96.0.0/12"), namespaces=["team-a", "team-b"])), "team-c") is None
    assert ceiling_for(spec(), "team-a") is None


def test_the_api_refuses_an_empty_ceiling_and_a_bad_namespace() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        PeerCeiling(namespaces=["team-a"], destinations=[])
    with pytest.raises(ValueError, match="at least 1"):
        PeerCeiling(namespaces=[], destinations=[dest("10.0.0.0/8")])
    with pytest.raises(ValueError, match="pattern"):
        PeerCeiling(namespaces=["Team_A"], destinations=[dest("10.0.0.0/8")])
    many = {"addressPool": ["10.8.0.0/24"], "peerCeilings": [ceiling(dest("10.0.0.0/8")).to_api()] * 33}
    with pytest.raises(ValueError, match="at most 32"):
        VpnServerSpec.model_validate(many)


# --- the rules, one at a time ---------------------------------------------------------------------------


def test_without_a_ceiling_the_ask_stands_as_written() -> None:
    asked = [dest("10.96.0.10/32", None, 81, 80), dest("10.96.0.0/12", "ICMP", 7)]
    result = effective_destinations(asked, ROUTES, None)
    assert result.destinations == asked
    assert (result.narrowed, result.nothing_left, result.ceiling) == (False, False, None)
    assert effective_destinations([], ROUTES, None).destinations == []  # still every route
    assert not effective_destinations([], ROUTES, None).nothing_left


def test_an_empty_ask_under_a_ceiling_is_every_route_met_with_it() -> None:
    result = effective_destinations([], ROUTES, ceiling(dest("10.96.5.0/24", "TCP", 80), dest("10.0.0.0/8", "UDP")))
    assert [describe(d) for d in result.destinations] == [
        "10.96.0.0/12 udp",
        "10.96.5.0/24 tcp/80",
        "10.244.0.0/16 udp",
    ]
    assert result.every_route
    assert [describe(c.asked) for c in result.cuts] == ROUTES


def test_networks_meet_in_the_smaller_when_one_holds_the_other() -> None:
    assert narrowed([dest("10.96.0.0/12")], dest("10.96.5.0/24")) == ["10.96.5.0/24"]
    assert narrowed([dest("10.96.5.0/24")], dest("10.96.0.0/12")) == ["10.96.5.0/24"]
    assert narrowed([dest("10.96.5.0/24")], dest("10.96.6.0/24")) == []
    assert narrowed([dest("10.96.0.0/12")], dest("fd00::/8")) == []  # another family shares nothing


def test_protocols_meet_in_what_both_allow() -> None:
    assert narrowed([dest("10.96.0.0/12", "TCP")], dest("10.96.0.0/12")) == ["10.96.0.0/12 tcp"]
    assert narrowed([dest("10.96.0.0/12")], dest("10.96.0.0/12", "UDP")) == ["10.96.0.0/12 udp"]
    assert narrowed([dest("10.96.0.0/12", "TCP")], dest("10.96.0.0/12", "UDP")) == []


def test_ports_without_a_protocol_mean_tcp_and_udp() -> None:
    assert narrowed([dest("10.96.0.0/12", None, 53)], dest("10.96.0.0/12", "UDP")) == ["10.96.0.0/12 udp/53"]
    assert narrowed([dest("10.96.0.0/12", "TCP")], dest("10.96.0.0/12", None, 53)) == ["10.96.0.0/12 tcp/53"]
    assert narrowed([dest("10.96.0.0/12")], dest("10.96.0.0/12", None, 53)) == ["10.96.0.0/12 tcp+udp/53"]
    [both] = effective_destinations(
        [dest("10.96.0.0/12")], ROUTES, ceiling(dest("10.96.0.0/12", None, 53))
    ).destinations
    assert (both.protocol, [p.port for p in both.ports]) == (None, [53])  # written as the API reads it


def test_no_ports_is_every_port_and_ranges_meet_pairwise() -> None:
    asked = dest("10.96.0.0/12", "TCP", (80, 90), 100, (8000, 8100))
    assert narrowed([asked], dest("10.96.0.0/12", "TCP")) == ["10.96.0.0/12 tcp/80-90,100,8000-8100"]
    limit = dest("10.96.0.0/12", None, (85, 100), 8080)
    assert narrowed([asked], limit) == ["10.96.0.0/12 tcp/85-90,100,8080"]
    assert narrowed([dest("10.96.0.0/12", "TCP", 22)], dest("10.96.0.0/12", "TCP", 80)) == []


def test_icmp_has_no_ports() -> None:
    assert narrowed([dest("10.96.0.0/12", "ICMP")], dest("10.96.0.0/12", "TCP", 80)) == []
    assert narrowed([dest("10.96.0.0/12", "ICMP")], dest("10.96.0.0/12", None, 80)) == []
    assert narrowed([dest("10.96.0.0/12", "ICMP")], dest("10.96.0.0/12")) == ["10.96.0.0/12 icmp"]
    # The firewall ignores ports on ICMP: so does the ceiling, either side.
    assert narrowed([dest("10.96.0.0/12", "ICMP", 80)], dest("10.96.0.0/12", "ICMP")) == ["10.96.0.0/12 icmp"]
    assert narrowed([dest("10.96.0.0/12")], dest("10.96.0.0/12", "ICMP", 80)) == ["10.96.0.0/12 icmp"]


def test_results_are_canonical_without_duplicates_and_in_order() -> None:
    asked = [
        dest("fd00::/64"),
        dest("10.244.0.0/16", "TCP", 81, 80),
        dest("10.96.0.10/32"),
        dest("10.96.0.0/12"),  # holds the one above: that one goes
        dest("10.244.0.0/16", "TCP", (80, 81)),  # the same as the second, written otherwise
    ]
    limits = (dest("10.0.0.0/8"), dest("fd00::/8"))
    assert narrowed(asked, *limits) == ["10.96.0.0/12", "10.244.0.0/16 tcp/80-81", "fd00::/64"]
    for shuffled in itertools.islice(itertools.permutations(asked), 0, None, 7):
        assert narrowed(shuffled, *limits) == narrowed(asked, *limits)


def test_a_result_with_many_port_ranges_is_split_where_the_api_would_refuse_it() -> None:
    """32 ranges met with 32 others that each overlap two of them: 63 ranges, more than one destination holds."""
    asked = dest("10.96.0.0/12", "TCP", *((10 * i, 10 * i + 5) for i in range(1, 33)))
    limit = dest("10.96.0.0/12", "TCP", *((10 * i + 3, 10 * i + 11) for i in range(1, 33)))
    result = effective_destinations([asked], ROUTES, ceiling(limit))
    assert [len(d.ports) for d in result.destinations] == [32, 31]
    assert [(p.port, p.end_port) for p in result.destinations[0].ports[:3]] == [(13, 15), (20, 21), (23, 25)]


def test_dual_stack_each_family_meets_its_own() -> None:
    routes = [*ROUTES, "fd00:96::/108"]
    limits = ceiling(dest("10.96.0.0/16", "TCP", 443), dest("fd00:96::/112"))
    result = effective_destinations([], routes, limits)
    assert [describe(d) for d in result.destinations] == ["10.96.0.0/16 tcp/443", "fd00:96::/112"]
    asked = [dest("fd00:96::/108", "UDP", 53), dest("10.96.0.0/12", "ICMP")]
    assert [describe(d) for d in effective_destinations(asked, routes, limits).destinations] == ["fd00:96::/112 udp/53"]


# --- what is left, and what is said -----------------------------------------------------------------------


def test_nothing_left_is_said_and_is_never_an_empty_ask() -> None:
    result = effective_destinations([dest("10.244.0.0/16")], ROUTES, ceiling(dest("10.96.0.0/12")))
    assert result.destinations == []
    assert result.nothing_left
    assert result.narrowed
    assert not effective_destinations([dest("10.96.0.10/32")], ROUTES, ceiling(dest("10.96.0.0/12"))).nothing_left


def test_an_ask_inside_one_ceiling_destination_is_not_cut() -> None:
    result = effective_destinations([dest("10.96.5.0/24", "TCP", 80)], ROUTES, ceiling(dest("10.96.0.0/12", "TCP")))
    assert not result.narrowed
    assert result.cuts == ()


def test_the_cut_message_says_exactly_what_was_cut() -> None:
    limits = ceiling(dest("10.96.5.0/24", "TCP", 80), dest("10.96.6.0/24"))
    asked = [dest("10.96.0.0/12"), dest("10.96.6.1/32", "UDP"), dest("10.244.0.0/16")]
    result = effective_destinations(asked, ROUTES, limits)
    assert cuts_message(result, "team-a") == (
        "the server's ceiling for namespace team-a cuts allowedDestinations "
        "10.96.0.0/12 to 10.96.5.0/24 tcp/80, 10.96.6.0/24; 10.244.0.0/16 to nothing"
    )
    every = effective_destinations([], ROUTES, ceiling(dest("10.96.0.0/12"), namespaces=["*"]))
    assert cuts_message(every, "team-b") == (
        "the server's ceiling for every namespace (\"*\"), which holds namespace team-b cuts the server's routes "
        "(allowedDestinations is empty) 10.244.0.0/16 to nothing"
    )


def test_the_other_messages_name_the_ceiling() -> None:
    limits = ceiling(dest("10.96.5.0/24", "TCP", 80))
    nothing = effective_destinations([dest("10.244.0.0/16")], ROUTES, limits)
    assert nothing_left_message(nothing, "team-a") == (
        "the server's ceiling for namespace team-a (10.96.5.0/24 tcp/80) leaves nothing of allowedDestinations "
        "10.244.0.0/16"
    )
    within = effective_destinations([dest("10.96.5.0/24", "TCP", 80)], ROUTES, limits)
    assert within_message(within, "team-a") == (
        "allowedDestinations lie within the server's ceiling for namespace team-a (10.96.5.0/24 tcp/80)"
    )


def test_long_messages_name_the_first_few_and_count_the_rest() -> None:
    asked = [dest(f"10.96.{i}.0/24") for i in range(20)]
    result = effective_destinations(asked, ROUTES, ceiling(dest("10.97.0.0/16")))
    assert result.nothing_left
    message = nothing_left_message(result, "team-a")
    assert message.endswith("10.96.7.0/24 and 12 more")


# --- properties over a grid of small examples -------------------------------------------------------------

NETWORKS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.2.0.0/16", "fd00::/8", "fd00:1::/32"]
PROTOCOLS: list[str | None] = [None, "TCP", "UDP", "ICMP"]
PORTS: list[tuple[int | tuple[int, int], ...]] = [(), (80,), ((80, 443),), (53, 8080), ((1, 79), (444, 65535))]
GRID = [dest(n, p, *ports) for n in NETWORKS for p in PROTOCOLS for ports in PORTS]
# Packets as (address, protocol, port): SCTP stands for every protocol the API cannot name.
SAMPLE_PORTS = [
    ("TCP", (1, 53, 79, 80, 81, 443, 444, 8080)),
    ("UDP", (53, 80, 444)),
    ("ICMP", (None,)),
    ("SCTP", (80,)),
]
PACKETS = [
    (ipaddress.ip_address(ip), proto, port)
    for ip in ["10.1.2.3", "10.1.3.3", "10.2.0.1", "10.3.0.1", "fd00:1::1", "fd00:2::1", "192.168.0.1"]
    for proto, ports in SAMPLE_PORTS
    for port in ports
]
ROUTES_OF_THE_GRID = ["10.0.0.0/8", "fd00::/8"]


def lets_through(d: AllowedDestination, packet: tuple[Any, str, int | None]) -> bool:
    """The gateways' firewall, as kvpn_agent.ruleset writes it: the reference the results are held to."""
    ip, proto, port = packet
    if ip not in ipaddress.ip_network(d.cidr):
        return False
    if d.protocol is Protocol.ICMP:
        return proto == "ICMP"
    if d.ports:
        in_ports = any(p.port <= (port or 0) <= (p.end_port or p.port) for p in d.ports)
        return proto in ((d.protocol.value,) if d.protocol else ("TCP", "UDP")) and in_ports
    return d.protocol is None or proto == d.protocol.value


def reach(destinations: Sequence[AllowedDestination], packet: tuple[Any, str, int | None]) -> bool:
    return any(lets_through(d, packet) for d in destinations)


Case = tuple[list[AllowedDestination], list[AllowedDestination]]


def cases() -> list[Case]:
    """Asks (some empty: every route) and ceilings drawn from the grid, the same ones at every run."""
    rng = random.Random(20240501)  # noqa: S311 - repeatable examples, not secrets
    return [
        (rng.sample(GRID, rng.choice([0, 1, 1, 2, 3])), rng.sample(GRID, rng.choice([1, 1, 2, 3]))) for _ in range(400)
    ]


def words(case: Case) -> str:
    return f"asked {[describe(d) for d in case[0]]}, ceiling {[describe(d) for d in case[1]]}"


def test_the_result_lets_through_exactly_what_both_sides_do() -> None:
    for asked, limits in cases():
        result = effective_destinations(asked, ROUTES_OF_THE_GRID, ceiling(*limits))
        wanted = asked or [dest(r) for r in ROUTES_OF_THE_GRID]
        for packet in PACKETS:
            expected = reach(wanted, packet) and reach(limits, packet)
            assert reach(result.destinations, packet) == expected, (words((asked, limits)), packet)
        # Never wider than either side, destination by destination.
        for d in result.destinations:
            assert all(reach(wanted, p) and reach(limits, p) for p in PACKETS if lets_through(d, p)), describe(d)
        assert len({d.model_dump_json() for d in result.destinations}) == len(result.destinations)
        assert result.nothing_left == (not result.destinations)


def test_narrowing_again_under_the_same_ceiling_changes_nothing() -> None:
    for asked, limits in cases():
        once = effective_destinations(asked, ROUTES_OF_THE_GRID, ceiling(*limits))
        if once.nothing_left:
            continue
        twice = effective_destinations(once.destinations, ROUTES_OF_THE_GRID, ceiling(*limits))
        assert twice.destinations == once.destinations, words((asked, limits))
        assert not twice.narrowed, words((asked, limits))


def test_what_is_not_reported_cut_was_not_cut() -> None:
    for asked, limits in cases():
        result = effective_destinations(asked, ROUTES_OF_THE_GRID, ceiling(*limits))
        cut = [c.asked for c in result.cuts]
        for d in asked or [dest(r) for r in ROUTES_OF_THE_GRID]:
            if d not in cut:
                assert all(reach(limits, p) for p in PACKETS if lets_through(d, p)), words((asked, limits))
        for c in result.cuts:  # and what is said to be left of a cut one is inside both
            assert all(reach(limits, p) and lets_through(c.asked, p) for p in PACKETS if reach(c.left, p))
