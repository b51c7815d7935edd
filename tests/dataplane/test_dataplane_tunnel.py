"""A stock wg-quick laptop reaches a service through a node configured by the agent's backends and nft module.

Each case runs on both WireGuard backends (wireguard-go over UAPI, kernel WireGuard over generic
netlink: the ``kernel`` cases in the VM tier), unless it is about wireguard-go itself.
"""

from __future__ import annotations

import re
import time

import pytest

from harness.commands import run
from harness.factories import keypair
from harness.netlab import wait_for
from harness.traffic import curl
from kvpn_agent.plan import AddPeer, RemovePeer, ReplaceFirewall, UpdateFirewall
from kvpn_agent.wire import DeviceConfig, PeerConfig
from kvpn_core.api import AllowedDestination
from kvpn_core.contract import PeerBinding
from tests.dataplane.conftest import NODE_SIDE, OTHER_PORT, OTHER_SERVICE, PORT, SERVICE, Site, both_backends

pytestmark = [pytest.mark.root]

URL = f"http://{SERVICE}:{PORT}/"


def reach(site: Site, url: str = URL) -> str | None:
    """The answer through the tunnel; 5 s leaves room for a handshake."""
    return curl(site.laptop_ns, url, max_time=5)


def kinds(result: object) -> list[str]:
    return [type(a).__name__ for a in getattr(result, "actions", [])]


@both_backends
def test_laptop_reaches_the_service_masqueraded_to_the_node(site: Site) -> None:
    site.add_laptop()
    assert reach(site) == NODE_SIDE, site.diagnose()


@both_backends
def test_without_masquerade_the_service_sees_the_peer(site: Site) -> None:
    site.masquerade = False
    laptop = site.add_laptop()
    assert reach(site) == laptop.address


@both_backends
def test_second_sync_changes_nothing(site: Site) -> None:
    """Read-back fidelity: what the UAPI client and the nft parser read equals what was written."""
    site.add_peer()
    site.add_peer(3, [AllowedDestination(cidr=f"{SERVICE}/32", protocol="TCP", ports=[{"port": PORT}])])
    first = site.sync()
    assert "ReplaceFirewall" in kinds(first)
    again = site.sync()
    assert again.actions == []


@both_backends
def test_forbidden_destinations_do_not_answer(site: Site) -> None:
    only_web = AllowedDestination.model_validate(
        {"cidr": f"{SERVICE}/32", "protocol": "TCP", "ports": [{"port": PORT}]}
    )
    site.add_laptop(destinations=[only_web])
    assert reach(site) == NODE_SIDE, site.diagnose()
    assert curl(site.laptop_ns, f"http://{SERVICE}:{OTHER_PORT}/") is None
    assert curl(site.laptop_ns, f"http://{OTHER_SERVICE}:{PORT}/") is None


# Userspace only, as the other cases about the table or the desired state alone: the WireGuard
# backend plays no part in them, and the VM tier's time goes to the cases where it does.
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


@both_backends
def test_removing_the_peer_cuts_it_off_within_two_seconds(site: Site) -> None:
    laptop = site.add_laptop()
    assert reach(site) == NODE_SIDE

    del site.bindings[laptop.binding.secret_name("office")]
    started = time.monotonic()
    result = site.sync()
    cut = time.monotonic() - started
    assert kinds(result) == ["RemovePeer", "UpdateFirewall"]
    assert laptop.public_key not in site.device().peers
    assert cut < 2, f"the sync that removes the peer took {cut:.2f} s"
    assert curl(site.laptop_ns, URL, max_time=2) is None


@both_backends
def test_disabling_the_peer_cuts_it_off(site: Site) -> None:
    laptop = site.add_laptop()
    assert reach(site) == NODE_SIDE
    site.bind(laptop.binding.model_copy(update={"enabled": False}))
    started = time.monotonic()
    result = site.sync()
    cut = time.monotonic() - started
    assert isinstance(result.actions[0], RemovePeer)
    assert laptop.public_key not in site.device().peers
    assert cut < 2, f"the sync that removes the peer took {cut:.2f} s"
    assert curl(site.laptop_ns, URL, max_time=2) is None


@both_backends
def test_one_new_peer_touches_only_that_peer(site: Site) -> None:
    first = site.add_laptop()
    assert reach(site) == NODE_SIDE
    before = site.device().peers[first.public_key]
    second = site.add_peer(3)
    result = site.sync()
    assert kinds(result) == ["AddPeer", "UpdateFirewall"]
    add = result.actions[0]
    assert isinstance(add, AddPeer)
    assert add.peer.public_key == second.public_key
    assert reach(site) == NODE_SIDE  # the first laptop's tunnel is untouched
    after = site.device().peers[first.public_key]
    assert after.last_handshake == before.last_handshake  # the same session, no new handshake
    assert (after.endpoint, after.allowed_ips, after.preshared_key) == (
        before.endpoint,
        before.allowed_ips,
        before.preshared_key,
    )
    assert after.rx_bytes > before.rx_bytes
    assert set(site.device().peers) == {first.public_key, second.public_key}
    assert site.sync().actions == []


@both_backends
def test_a_full_replace_leaves_exactly_the_peers_given(site: Site) -> None:
    """DeviceConfig(replace_peers=True): WGDEVICE_F_REPLACE_PEERS, `replace_peers=true` in UAPI."""
    laptop = site.add_laptop()
    assert reach(site) == NODE_SIDE
    others = [keypair()[1] for _ in range(3)]
    site.wireguard.set(
        site.interface,
        None,
        [PeerConfig(public_key=k, allowed_ips=(f"10.237.0.{50 + i}/32",)) for i, k in enumerate(others)],
    )
    assert set(site.device().peers) == {laptop.public_key, *others}
    site.wireguard.set(
        site.interface,
        DeviceConfig(replace_peers=True),
        [PeerConfig(public_key=others[0], allowed_ips=("10.237.0.60/32",))],
    )
    assert set(site.device().peers) == {others[0]}
    # Replaced, not merged: the peer starts again from what this message gives it.
    assert site.device().peers[others[0]].allowed_ips == ("10.237.0.60/32",)
    site.wireguard.set(site.interface, DeviceConfig(replace_peers=True), [])
    assert site.device().peers == {}
    # The next sync puts the laptop back, and only it.
    assert kinds(site.sync()) == ["AddPeer"]
    assert set(site.device().peers) == {laptop.public_key}


@both_backends
def test_drift_is_repaired(site: Site) -> None:
    laptop = site.add_laptop()
    assert reach(site) == NODE_SIDE

    # A peer removed by hand comes back, and only it.
    run("ip", "netns", "exec", site.node, "wg", "set", site.interface, "peer", laptop.public_key, "remove")
    assert kinds(site.sync()) == ["AddPeer"]
    restored = site.device().peers[laptop.public_key]
    assert restored.allowed_ips == (f"{laptop.address}/32",)
    assert restored.preshared_key == laptop.preshared_key
    # Traffic resumes on WireGuard's own timers (~15 s: the laptop's session died with the peer).

    # A deleted table is put back whole.
    run("ip", "netns", "exec", site.node, "nft", "delete", "table", "inet", "kvpn")
    result = site.sync()
    assert kinds(result) == ["ReplaceFirewall"]
    assert isinstance(result.actions[0], ReplaceFirewall)
    assert result.actions[0].reason == "table missing"

    # A flushed table (chains, sets and maps emptied) too.
    run("ip", "netns", "exec", site.node, "nft", "flush", "table", "inet", "kvpn")
    result = site.sync()
    assert kinds(result) == ["ReplaceFirewall"]

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

    # A deleted interface is made again, whole: link, key, port, peers (the table needs nothing).
    run("ip", "-n", site.node, "link", "del", site.interface)
    if site.wggo is not None:
        wait_for(lambda: site.interface not in site.wggo.devices(), 5, "wireguard-go to exit with its device")
    result = site.sync()
    assert kinds(result) == ["CreateInterface", "SetMtu", "AddAddress", "SetLinkUp", "ConfigureDevice", "AddPeer"]
    assert site.sync().actions == []
    assert set(site.device().peers) == {laptop.public_key}


def test_killed_wireguard_go_is_restarted_and_the_laptop_recovers(site: Site) -> None:
    """Userspace only: a kernel device has no process to die (its deletion is in test_drift_is_repaired)."""
    site.add_laptop()
    assert reach(site) == NODE_SIDE
    assert site.wggo is not None
    proc = site.wggo.procs[site.interface]
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
    assert [p.finding.reason for p in desired.problems] == ["AddressOutsidePool"]
    site.sync()
    assert reach(site) == NODE_SIDE
