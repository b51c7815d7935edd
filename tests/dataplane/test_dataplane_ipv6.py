"""IPv6 through a kvpn tunnel: a stock wg-quick laptop of a dual-stack server reaches an IPv6 service.

The server has an IPv4 and an IPv6 pool and route (``dual_stack_site``); the tunnel itself runs over the
IPv4 underlay, which changes nothing for what travels inside it. Each case runs on both WireGuard
backends (the ``kernel`` cases in the VM tier) unless it is about the table alone.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from harness.commands import run
from harness.traffic import curl, echo_answered, http_url, whoami_servers_any_family
from kvpn_core.api import AllowedDestination
from tests.dataplane.conftest import (
    NODE_SIDE,
    NODE_SIDE6,
    OTHER_PORT,
    OTHER_SERVICE,
    OTHER_SERVICE6,
    POOL6,
    PORT,
    SERVER_ADDRESS6,
    SERVICE,
    SERVICE6,
    LabLaptop,
    Site,
    both_backends,
)

pytestmark = [pytest.mark.root]

URL = http_url(SERVICE, PORT)
URL6 = http_url(SERVICE6, PORT)
PROBE_TABLE = "kvtprobe"
"""The test's own table in the node's namespace (the agent never touches another table)."""


def reach(site: Site, url: str = URL6, source: str | None = None, max_time: float = 5) -> str | None:
    """The answer through the tunnel, from ``source`` if given; 5 s leaves room for a handshake."""
    if source is None:
        return curl(site.laptop_ns, url, max_time=max_time)
    proc = run(
        "ip", "netns", "exec", site.laptop_ns, "curl", "-s", "--max-time", str(max_time), "--interface", source, url,
        check=False, timeout=max_time + 5,
    )  # fmt: skip
    return proc.stdout if proc.returncode == 0 else None


def only(address: str, port: int) -> AllowedDestination:
    """TCP to one port of one host."""
    host = ipaddress.ip_network(address)
    return AllowedDestination.model_validate({"cidr": str(host), "protocol": "TCP", "ports": [{"port": port}]})


@both_backends
def test_laptop_reaches_the_ipv6_service_masqueraded_to_the_node(dual_stack_site: Site) -> None:
    site = dual_stack_site
    site.add_laptop()
    assert reach(site) == NODE_SIDE6, site.diagnose()
    assert reach(site, URL) == NODE_SIDE  # both families through the one tunnel


@both_backends
def test_without_masquerade_the_ipv6_service_sees_the_peer(dual_stack_site: Site) -> None:
    site = dual_stack_site
    site.masquerade = False
    laptop = site.add_laptop()
    assert reach(site) == laptop.address6, site.diagnose()
    assert reach(site, URL) == laptop.address


@both_backends
def test_a_dual_stack_server_reads_back_as_written(dual_stack_site: Site) -> None:
    """IPv6 addresses, AllowedIPs, routes and map elements, read back from netlink, the backend and nft,
    equal what was written: the second sync changes nothing."""
    site = dual_stack_site
    plain = site.add_peer()
    site.add_peer(3, [only(SERVICE6, PORT), only(SERVICE, OTHER_PORT)])
    first = site.sync()
    assert "ReplaceFirewall" in [type(a).__name__ for a in first.actions]
    assert site.sync().actions == []
    assert site.device().peers[plain.public_key].allowed_ips == (f"{plain.address}/32", f"{plain.address6}/128")
    link = site.link.observe(site.interface)
    assert link is not None
    assert f"{SERVER_ADDRESS6}/64" in link.addresses


@both_backends
def test_ipv6_destinations_are_enforced_and_the_ipv4_half_keeps_its_own(dual_stack_site: Site) -> None:
    """A peer allowed TCP to one port of the IPv6 service and to another port of an IPv4 one: each family
    gets exactly what its own destination says, neither the other's port nor the other's addresses."""
    site = dual_stack_site
    site.add_laptop(destinations=[only(SERVICE6, PORT), only(OTHER_SERVICE, OTHER_PORT)])
    assert reach(site) == NODE_SIDE6, site.diagnose()
    assert reach(site, http_url(OTHER_SERVICE, OTHER_PORT)) == NODE_SIDE
    forbidden = [
        http_url(SERVICE6, OTHER_PORT),  # another port
        http_url(OTHER_SERVICE6, PORT),  # another IPv6 address
        http_url(OTHER_SERVICE6, OTHER_PORT),  # the IPv4 destination's port, on IPv6
        http_url(SERVICE, PORT),  # the IPv6 destination's port, on IPv4
        http_url(OTHER_SERVICE, PORT),
    ]
    assert {url: reach(site, url, max_time=2) for url in forbidden} == dict.fromkeys(forbidden)


def test_a_peer_allowed_only_ipv6_reaches_no_ipv4(dual_stack_site: Site) -> None:
    """Destinations of one family only leave the other family nothing, not every route (which an empty list
    would mean). Userspace only, as the IPv4 file's cases about the table alone."""
    site = dual_stack_site
    site.add_laptop(destinations=[only(SERVICE6, PORT)])
    assert reach(site) == NODE_SIDE6, site.diagnose()
    assert reach(site, URL, max_time=2) is None


@contextmanager
def counting(site: Site, sources: dict[str, str]) -> Iterator[dict[str, str]]:
    """Named counters in the node's namespace on what leaves the server's WireGuard interface with each
    source (prerouting, before conntrack and kvpn's filter): what WireGuard let out of the tunnel."""
    lines = [f"  counter {name} {{ }}" for name in sources]
    rules = [
        f'    iifname "{site.interface}" ip6 saddr {source} counter name "{name}"' for name, source in sources.items()
    ]
    script = "\n".join(
        [
            f"table inet {PROBE_TABLE} {{",
            *lines,
            "  chain seen {",
            "    type filter hook prerouting priority -400;",
            *rules,
            "  }",
            "}",
        ]
    )
    nft = ("ip", "netns", "exec", site.node, "nft")
    run(*nft, "-f", "-", input=script + "\n")
    try:
        yield sources
    finally:
        run(*nft, "delete", "table", "inet", PROBE_TABLE, check=False)


def counted(site: Site, name: str) -> int:
    out = run("ip", "netns", "exec", site.node, "nft", "-j", "list", "counter", "inet", PROBE_TABLE, name).stdout
    found = next(i["counter"] for i in json.loads(out)["nftables"] if "counter" in i)
    return int(found["packets"])


DISHONEST_SYN = 32 + 40 + 40
"""The least a TCP SYN over IPv6 adds to wireguard-go's rx_bytes: the transport message's overhead, the IPv6
and TCP headers. More than the 32 bytes of a keepalive, which may come in meanwhile."""


def dishonest(site: Site, laptop: LabLaptop) -> int:
    """What the node's WireGuard received from the laptop's key and dropped for its source, as each backend
    shows it: wireguard-go counts every authenticated message in the peer's rx_bytes before it checks the
    source, kernel WireGuard counts such packets as the interface's rx_frame_errors, not as bytes."""
    if site.wggo is not None:
        return site.device().peers[laptop.public_key].rx_bytes
    path = f"/sys/class/net/{site.interface}/statistics/rx_frame_errors"
    return int(run("ip", "netns", "exec", site.node, "cat", path).stdout)


@both_backends
def test_an_ipv6_source_the_peer_does_not_own_never_passes_wireguard(dual_stack_site: Site) -> None:
    """The laptop adds to its tunnel interface another peer's IPv6 address and a free one of the pool, and
    sends from them: the node's WireGuard takes only the laptop's own address from its key. The other
    peer's address is one the node's table would let through: only WireGuard stands in the way."""
    site = dual_stack_site
    other = site.add_peer(3)
    laptop = site.add_laptop()
    assert other.address6 is not None
    assert laptop.address6 is not None
    assert reach(site) == NODE_SIDE6, site.diagnose()
    spoofed = {"other_peer": other.address6, "free": str(ipaddress.ip_network(POOL6)[200])}
    addr = ("ip", "-n", site.laptop_ns, "addr")
    with counting(site, {"own": laptop.address6, **spoofed}):
        try:
            for source in spoofed.values():
                run(*addr, "add", f"{source}/128", "dev", laptop.interface, "nodad")
            assert reach(site, source=laptop.address6) == NODE_SIDE6
            before = dishonest(site, laptop)
            for source in spoofed.values():
                assert reach(site, source=source, max_time=2) is None, source
            assert counted(site, "own") > 0
            assert {name: counted(site, name) for name in spoofed} == dict.fromkeys(spoofed, 0)
            # The spoofed packets did reach the node, encrypted with the laptop's key: WireGuard dropped them.
            assert dishonest(site, laptop) - before >= len(spoofed) * (DISHONEST_SYN if site.wggo else 1)
        finally:
            # Else the laptop's own connections may pick one of them as their source.
            for source in spoofed.values():
                run(*addr, "del", f"{source}/128", "dev", laptop.interface, check=False)
    assert reach(site) == NODE_SIDE6


def route_into_tunnel(site: Site, laptop: LabLaptop, cidr: str) -> None:
    """What a user may do to her own machine: send ``cidr`` into the tunnel (and accept it from there)."""
    ns = ("ip", "netns", "exec", site.laptop_ns)
    allowed = run(*ns, "wg", "show", laptop.interface, "allowed-ips").stdout.split()[1:]
    run(*ns, "wg", "set", laptop.interface, "peer", site.server_public_key, "allowed-ips", ",".join([*allowed, cidr]))
    run(*ns, "ip", "route", "add", cidr, "dev", laptop.interface)


def in_chain_drops(site: Site) -> int:
    """What the server's input chain counted and dropped."""
    sid = site.interface.replace("-", "_")
    out = run("ip", "netns", "exec", site.node, "nft", "-j", "list", "chain", "inet", "kvpn", f"in_{sid}").stdout
    total = 0
    for item in json.loads(out)["nftables"]:
        expr = item.get("rule", {}).get("expr", [])
        if len(expr) == 2 and "counter" in expr[0] and "drop" in expr[1]:
            total += int(expr[0]["counter"]["packets"])
    return total


def test_the_node_itself_is_no_ipv6_destination(dual_stack_site: Site) -> None:
    """A listener on the node's IPv6 tunnel address and on its IPv6 address inside the routes answers on the
    node, not through the tunnel; the tunnel address answers an echo request, and that is all.

    Userspace only: it is the table's input chain, whichever backend made the interface.
    """
    site = dual_stack_site
    laptop = site.add_laptop()
    assert reach(site) == NODE_SIDE6, site.diagnose()
    # The laptop's routes hold the service networks, not the server's tunnel address.
    route_into_tunnel(site, laptop, f"{SERVER_ADDRESS6}/128")
    whoami_servers_any_family(site.lab, site.node, [(SERVER_ADDRESS6, PORT), (NODE_SIDE6, PORT)])
    node_urls = [http_url(SERVER_ADDRESS6, PORT), http_url(NODE_SIDE6, PORT)]
    assert all(curl(site.node, url) is not None for url in node_urls)  # they do listen
    dropped = in_chain_drops(site)
    assert echo_answered(site.laptop_ns, SERVER_ADDRESS6)
    assert {url: reach(site, url, max_time=2) for url in node_urls} == dict.fromkeys(node_urls)
    assert not echo_answered(site.laptop_ns, NODE_SIDE6)
    assert in_chain_drops(site) > dropped  # it was kvpn's input chain that dropped them
