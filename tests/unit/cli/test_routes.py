"""The route conflict check: which tunnelled ranges collide with the laptop's own routes."""

from __future__ import annotations

import json
import shutil

import pytest

from kvpn_cli.routes import conflict_message, find_conflicts, parse_ip_routes, read_routes

# `ip -j route` of a laptop on a home LAN, with Docker and another VPN.
IP_ROUTE = json.dumps(
    [
        {"dst": "default", "gateway": "192.168.1.1", "dev": "wlan0", "protocol": "dhcp"},
        {"dst": "10.96.0.0/12", "dev": "tun0", "protocol": "static", "scope": "link"},
        {"dst": "172.17.0.0/16", "dev": "docker0", "protocol": "kernel", "prefsrc": "172.17.0.1"},
        {"dst": "192.168.1.0/24", "dev": "wlan0", "protocol": "kernel", "scope": "link"},
        {"dst": "10.8.0.0/24", "dev": "kvpn-dev", "protocol": "static", "scope": "link"},
        {"type": "unreachable", "dst": "10.200.0.0/16"},
    ]
)


def test_parse_leaves_out_default_and_unreachable_routes() -> None:
    routes = parse_ip_routes(IP_ROUTE)
    assert [str(r) for r in routes] == [
        "10.96.0.0/12 dev tun0",
        "172.17.0.0/16 dev docker0",
        "192.168.1.0/24 dev wlan0",
        "10.8.0.0/24 dev kvpn-dev",
    ]


def test_an_overlap_with_another_vpn_is_a_conflict_naming_the_route() -> None:
    conflicts = find_conflicts(["10.96.0.0/16", "10.244.0.0/16"], parse_ip_routes(IP_ROUTE), "kvpn-dev")
    assert [(t, str(r)) for t, r in conflicts] == [("10.96.0.0/16", "10.96.0.0/12 dev tun0")]
    message = conflict_message(conflicts)
    assert "10.96.0.0/16" in message
    assert "10.96.0.0/12 dev tun0" in message
    assert "--force" in message


def test_a_narrower_lan_route_inside_a_tunnelled_range_is_a_conflict() -> None:
    conflicts = find_conflicts(["192.168.0.0/16"], parse_ip_routes(IP_ROUTE), "kvpn-dev")
    assert [str(route) for _, route in conflicts] == ["192.168.1.0/24 dev wlan0"]


def test_our_own_interface_and_disjoint_ranges_are_no_conflict() -> None:
    assert find_conflicts(["10.8.0.0/24", "10.32.0.0/16"], parse_ip_routes(IP_ROUTE), "kvpn-dev") == []


def test_ipv6_ranges_compare_only_with_ipv6_routes() -> None:
    routes = parse_ip_routes('[{"dst": "fd00::/8", "dev": "wg1"}, {"dst": "10.0.0.0/8", "dev": "eth0"}]')
    assert [(t, r.dev) for t, r in find_conflicts(["fd00:10::/64"], routes, "kvpn-dev")] == [("fd00:10::/64", "wg1")]


def test_this_machines_routes_parse() -> None:
    if shutil.which("ip") is None:
        pytest.fail("needs iproute2's ip (make setup)", pytrace=False)
    assert all(r.network.prefixlen > 0 for r in read_routes())
