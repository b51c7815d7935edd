"""A stock wg-quick laptop reaches a service through a node configured by the agent's UAPI client and nft module."""

from __future__ import annotations

import re
import time

import pytest

from kvpn_agent.plan import AddPeer, RemovePeer, ReplaceFirewall, UpdateFirewall
from kvpn_agent.uapi import UapiClient
from kvpn_operator.api import AllowedDestination
from kvpn_operator.contract import PeerBinding
from tests.dataplane.conftest import NODE_SIDE, OTHER_PORT, OTHER_SERVICE, PORT, SERVICE, Site
from tests.dataplane.kit import curl, run, wait_for

pytestmark = [pytest.mark.root]

URL = f"http://{SERVICE}:{PORT}/"


def reach(site: Site, url: str = URL) -> str | None:
    """The answer through the tunnel; 5 s leaves room for a handshake."""
    return curl(site.laptop_ns, url, max_time=5)


def kinds(result: object) -> list[str]:
    return [type(a).__name__ for a in getattr(result, "actions", [])]


def test_laptop_reaches_the_service_masqueraded_to_the_node(site: Site) -> None:
    site.add_laptop()
    assert reach(site) == NODE_SIDE, site.diagnose()


def test_without_masquerade_the_service_sees_the_peer(site: Site) -> None:
    site.masquerade = False
    laptop = site.add_laptop()
    assert reach(site) == laptop.address


def test_second_sync_changes_nothing(site: Site) -> None:
    """Read-back fidelity: what the UAPI client and the nft parser read equals what was written."""
    site.add_peer()
    site.add_peer(3, [AllowedDestination(cidr=f"{SERVICE}/32", protocol="TCP", ports=[{"port": PORT}])])
    first = site.sync()
    assert "ReplaceFirewall" in kinds(first)
    again = site.sync()
    assert again.actions == []


def test_forbidden_destinations_do_not_answer(site: Site) -> None:
    only_web = AllowedDestination.model_validate(
        {"cidr": f"{SERVICE}/32", "protocol": "TCP", "ports": [{"port": PORT}]}
    )
    site.add_laptop(destinations=[only_web])
    assert reach(site) == NODE_SIDE, site.diagnose()
    assert curl(site.laptop_ns, f"http://{SERVICE}:{OTHER_PORT}/") is None
    assert curl(site.laptop_ns, f"http://{OTHER_SERVICE}:{PORT}/") is None


def test_widening_a_peers_destinations_is_an_element_update(site: Site) -> None:
    only_web = AllowedDestination.model_validate(
        {"cidr": f"{SERVICE}/32", "protocol": "TCP", "ports": [{"port": PORT}]}
    )
    laptop = site.add_laptop(destinations=[only_web])
    assert reach(site) == NODE_SIDE  # the tunnel is up, so what follows is the policy, not a handshake
    assert curl(site.laptop_ns, f"http://{OTHER_SERVICE}:{PORT}/") is None

    site.bind(laptop.binding.model_copy(update={"allowed_destinations": []}))
    result = site.sync()
    assert kinds(result) == ["UpdateFirewall"]
    (update,) = result.actions
    assert isinstance(update, UpdateFirewall)
    assert [addr for (_, addr) in update.update.delete_elements] == [laptop.address]
    assert curl(site.laptop_ns, f"http://{OTHER_SERVICE}:{PORT}/", max_time=5) == NODE_SIDE


def test_removing_the_peer_cuts_it_off_within_two_seconds(site: Site) -> None:
    laptop = site.add_laptop()
    assert reach(site) == NODE_SIDE

    del site.bindings[laptop.binding.secret_name("office")]
    started = time.monotonic()
    result = site.sync()
    assert kinds(result) == ["RemovePeer", "UpdateFirewall"]
    assert curl(site.laptop_ns, URL, max_time=2) is None
    assert time.monotonic() - started < 2 + 1  # the sync itself plus one bounded attempt


def test_disabling_the_peer_cuts_it_off(site: Site) -> None:
    laptop = site.add_laptop()
    assert reach(site) == NODE_SIDE
    site.bind(laptop.binding.model_copy(update={"enabled": False}))
    result = site.sync()
    assert isinstance(result.actions[0], RemovePeer)
    assert curl(site.laptop_ns, URL, max_time=2) is None


def test_one_new_peer_touches_only_that_peer(site: Site) -> None:
    first = site.add_laptop()
    assert reach(site) == NODE_SIDE
    second = site.add_peer(3)
    result = site.sync()
    assert kinds(result) == ["AddPeer", "UpdateFirewall"]
    add = result.actions[0]
    assert isinstance(add, AddPeer)
    assert add.peer.public_key == second.public_key
    assert reach(site) == NODE_SIDE  # the first laptop's tunnel is untouched
    assert first.public_key in UapiClient(site.interface).get().peers


def test_drift_is_repaired(site: Site) -> None:
    laptop = site.add_laptop()
    assert reach(site) == NODE_SIDE

    # A peer removed by hand comes back, and only it.
    run("ip", "netns", "exec", site.node, "wg", "set", site.interface, "peer", laptop.public_key, "remove")
    assert kinds(site.sync()) == ["AddPeer"]
    restored = UapiClient(site.interface).get().peers[laptop.public_key]
    assert restored.allowed_ips == (f"{laptop.address}/32",)
    assert restored.preshared_key == laptop.preshared_key
    # Traffic resumes on WireGuard's own timers (~15 s: the laptop's session died with the peer).

    # A deleted table is put back whole.
    run("ip", "netns", "exec", site.node, "nft", "delete", "table", "inet", "kvpn")
    result = site.sync()
    assert kinds(result) == ["ReplaceFirewall"]
    assert isinstance(result.actions[0], ReplaceFirewall)
    assert result.actions[0].reason == "table missing"

    # A hand-deleted map element is restored as an element.
    run(
        "ip", "netns", "exec", site.node, "nft", "delete", "element", "inet", "kvpn",
        f"peers4_{site.interface}", "{", laptop.address, "}",
    )  # fmt: skip
    assert kinds(site.sync()) == ["UpdateFirewall"]

    # A foreign rule in our table means the table is no longer ours as written: replaced.
    run("ip", "netns", "exec", site.node, "nft", "insert", "rule", "inet", "kvpn", "forward", "accept")
    assert kinds(site.sync()) == ["ReplaceFirewall"]
    assert site.sync().actions == []


def test_killed_wireguard_go_is_restarted_and_the_laptop_recovers(site: Site) -> None:
    site.add_laptop()
    assert reach(site) == NODE_SIDE
    proc = site.link.wggo.procs[site.interface]
    proc.kill()
    proc.wait(timeout=5)
    wait_for(lambda: site.link.observe(site.interface) is None, 5, "the TUN device to go with its process")
    result = site.sync()
    assert kinds(result)[0] == "CreateInterface"
    assert "AddPeer" in kinds(result)
    # The laptop keeps its session keys for a while; its next handshake attempt rebuilds the tunnel.
    deadline = time.monotonic() + 30
    answer = None
    while answer is None and time.monotonic() < deadline:
        answer = curl(site.laptop_ns, URL, max_time=3)
    assert answer == NODE_SIDE


def test_other_tables_are_never_touched(site: Site) -> None:
    run(
        "ip", "netns", "exec", site.node, "nft", "-f", "-",
        input="table inet other {\n chain c {\n type filter hook forward priority 10; policy accept;\n counter\n }\n}",
    )  # fmt: skip
    before = run("ip", "netns", "exec", site.node, "nft", "list", "table", "inet", "other").stdout
    site.add_laptop()
    run("ip", "netns", "exec", site.node, "nft", "delete", "table", "inet", "kvpn")
    site.sync()
    after = run("ip", "netns", "exec", site.node, "nft", "list", "table", "inet", "other").stdout
    assert _without_counter(before) == _without_counter(after)


def _without_counter(listing: str) -> str:
    return re.sub(r"packets \d+ bytes \d+", "", listing)


def test_a_bad_binding_does_not_stop_the_others(site: Site) -> None:
    site.add_laptop()
    bad = PeerBinding(peer_namespace="team", peer_name="bad", peer_uid="x", public_key=None, addresses=["10.99.0.5"])
    site.bind(bad)
    desired = site.desired()
    assert [p.reason for p in desired.problems] == ["AddressOutsidePool"]
    site.sync()
    assert reach(site) == NODE_SIDE
