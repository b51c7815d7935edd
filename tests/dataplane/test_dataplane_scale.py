"""Thousands of peers on either backend: every one read back (equal to `wg show dump`), a one-peer change cheap.

wireguard-go over UAPI on the host; kernel WireGuard over generic netlink in the VM tier (the
``kernel`` params), where the batched SET_DEVICE messages are what makes 10,000 peers take seconds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.commands import run
from harness.factories import binding_secret, key, keypair
from harness.netlab import Lab
from kvpn_agent.builder import DesiredBuilder
from kvpn_agent.kernel import KernelLink, KernelWireGuard
from kvpn_agent.netlink import Netlink
from kvpn_agent.nft import Nft
from kvpn_agent.observed import ObservedDevice
from kvpn_agent.plan import AddPeer, AllowedIps, UpdateFirewall
from kvpn_agent.processes import WireGuardGo
from kvpn_agent.ruleset import PeerUpdate, build_ruleset
from kvpn_agent.sync import LinkBackend, UapiBackend, WireGuardBackend, sync
from kvpn_agent.wggo import UserspaceLink
from kvpn_agent.wire import DeviceConfig, PeerConfig
from kvpn_core.contract import PeerBinding, encode_data
from tests.dataplane.conftest import BACKENDS

pytestmark = [pytest.mark.root, pytest.mark.slow]

FIGURES: dict[str, float] = {}


def address(i: int) -> str:
    return f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}/32"


def timed(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Median wall time in ms."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    # Figures, not pass/fail: shown with -s and in the captured output of a failure.
    for name, value in FIGURES.items():
        print(f"{name}: {value:.2f} ms")


@dataclass
class Node:
    ns: str
    interface: str
    backend: str
    link: LinkBackend
    wireguard: WireGuardBackend


@pytest.fixture(params=BACKENDS)
def node(request: pytest.FixtureRequest, lab: Lab, tmp_path: Path) -> Iterator[Node]:
    ns, interface, backend = lab.netns("node"), lab.ifname("n"), str(request.param)
    netlink = Netlink(netns=ns)
    wggo = None
    if backend == "kernel":
        link: LinkBackend = KernelLink(netlink)
        wireguard: WireGuardBackend = KernelWireGuard(ns)
    else:
        wggo = WireGuardGo(prefix=("ip", "netns", "exec", ns), log_dir=tmp_path)
        link, wireguard = UserspaceLink(netlink, wggo), UapiBackend()
    link.create(interface)
    try:
        yield Node(ns, interface, backend, link, wireguard)
    finally:
        # Before the namespace goes: a kernel link is deleted fast only when emptied first (KernelLink
        # does that); the namespace's own teardown would take minutes in the guest, and hold up the next.
        link.delete(interface)
        if wggo is not None:
            wggo.stop_all()
        if isinstance(wireguard, KernelWireGuard):
            wireguard.close()
        netlink.close()


def wg_dump(ns: str, interface: str) -> dict[str, tuple[object, ...]]:
    """`wg show <if> dump` per peer: (preshared key, endpoint, allowed IPs, keepalive), as the tool prints them."""
    lines = run("ip", "netns", "exec", ns, "wg", "show", interface, "dump", timeout=120).stdout.splitlines()
    peers = {}
    for line in lines[1:]:
        public, psk, endpoint, ips, _, _, _, keepalive = line.split("\t")
        peers[public] = (psk, endpoint, tuple(sorted(ips.split(","))) if ips != "(none)" else (), keepalive)
    return peers


def as_dump(device: ObservedDevice) -> dict[str, tuple[object, ...]]:
    """The read-back in `wg show dump`'s spelling."""
    return {
        k: (
            p.preshared_key or "(none)",
            p.endpoint or "(none)",
            tuple(sorted(p.allowed_ips)),
            str(p.persistent_keepalive or "off"),
        )
        for k, p in device.peers.items()
    }


@pytest.mark.parametrize("peers", [10, 1_000, 10_000])
def test_adding_one_peer_stays_flat(node: Node, peers: int) -> None:
    wireguard, interface = node.wireguard, node.interface
    wireguard.set(interface, DeviceConfig(private_key=key(), listen_port=51820), [])
    batch = [PeerConfig(public_key=key(), preshared_key=key(), allowed_ips=(address(i),)) for i in range(peers)]
    FIGURES[f"{node.backend}: set {peers} peers in one call"] = timed(lambda: wireguard.set(interface, None, batch))

    extra = iter(range(peers, peers + 1000))
    add_ms = timed(
        lambda: wireguard.set(interface, None, [PeerConfig(public_key=key(), allowed_ips=(address(next(extra)),))]), 25
    )
    FIGURES[f"{node.backend}: add 1 peer at {peers} peers"] = add_ms
    assert add_ms < 50

    read_ms = timed(lambda: wireguard.get(interface))
    FIGURES[f"{node.backend}: read back {peers} peers"] = read_ms
    device = wireguard.get(interface)
    assert device is not None
    # Every peer, not the first ~20 (pyroute2 #1212), and each as `wg` itself shows it.
    assert len(device.peers) == peers + 25
    assert as_dump(device) == wg_dump(node.ns, interface)

    # One peer changed among them: only it changes.
    first, last = batch[0].public_key, batch[-1].public_key
    wireguard.set(
        interface,
        None,
        [PeerConfig(public_key=first, update_only=True, replace_allowed_ips=True, allowed_ips=("10.99.0.1/32",))],
    )
    again = wireguard.get(interface)
    assert again is not None
    assert again.peers[first].allowed_ips == ("10.99.0.1/32",)
    assert {k: p for k, p in again.peers.items() if k != first} == {k: p for k, p in device.peers.items() if k != first}
    wireguard.set(interface, None, [PeerConfig(public_key=last, remove=True)])
    gone = wireguard.get(interface)
    assert gone is not None
    assert set(gone.peers) == set(again.peers) - {last}


def test_full_sync_of_ten_thousand_peers_then_one_more(node: Node) -> None:
    ns, link, interface = node.ns, node.link, node.interface
    server_key, _ = keypair()
    server = {
        "metadata": {"namespace": "team", "name": "big"},
        "spec": {"addressPool": ["10.64.0.0/16"], "routes": ["10.96.0.0/12"]},
        "status": {"addresses": ["10.64.0.1"]},
    }
    key_secret = {"data": encode_data({"privateKey": server_key})}

    def binding(i: int) -> dict[str, Any]:
        pb = PeerBinding(
            peer_namespace="team",
            peer_name=f"p{i}",
            peer_uid=f"u{i}",
            public_key=key(),
            preshared_key=key(),
            addresses=[f"10.64.{(i + 2) // 256}.{(i + 2) % 256}"],
        )
        return binding_secret("big", pb)

    secrets = [binding(i) for i in range(10_000)]
    started = time.perf_counter()
    builder = DesiredBuilder(server, key_secret, secrets, interface=interface)
    desired = builder.desired
    FIGURES[f"{node.backend}: build desired state from 10000 binding Secrets"] = (time.perf_counter() - started) * 1000
    assert len(desired.peers) == 10_000

    firewall = Nft(prefix=("ip", "netns", "exec", ns))
    backend = node.wireguard
    memo = AllowedIps()  # one across the syncs, as the agent's loop keeps it
    cold = sync([desired], link, backend, firewall, memo=memo)
    FIGURES[f"{node.backend}: cold sync of 10000 peers (WireGuard + nft)"] = cold.seconds * 1000
    assert not cold.errors
    device = backend.get(interface)
    assert device is not None
    assert len(device.peers) == 10_000
    observed = firewall.list_table()
    assert observed is not None
    assert len(observed.peer_map) == 10_000

    steady = sync([desired], link, backend, firewall, memo=memo)
    FIGURES[f"{node.backend}: no-op sync at 10000 peers (full read-back)"] = steady.seconds * 1000
    assert steady.actions == []  # what was written (keys, preshared keys, allowed IPs) reads back the same

    extra = binding(10_000)
    desired = builder.apply({extra["metadata"]["name"]: extra})
    one = sync([desired], link, backend, firewall, memo=memo)
    FIGURES[f"{node.backend}: sync of a one-peer change at 10000 peers (full read-back)"] = one.seconds * 1000
    assert [type(a) for a in one.actions] == [AddPeer, UpdateFirewall]

    # The apply part alone, as an event-driven update does it without re-reading everything.
    extra = binding(10_001)
    pb = PeerBinding.from_secret(extra)
    assert pb.public_key
    apply_ms = timed(
        lambda: backend.set(
            interface,
            None,
            [
                PeerConfig(
                    public_key=pb.public_key or "", preshared_key=pb.preshared_key, allowed_ips=("10.64.39.19/32",)
                )
            ],
        )
    )
    FIGURES[f"{node.backend}: apply one peer at 10000 peers"] = apply_ms
    desired = builder.apply({extra["metadata"]["name"]: extra})
    ruleset = build_ruleset([desired])
    update = PeerUpdate(add_elements=((("peers4_" + interface, "10.64.39.19"), f"routes_{interface}"),))
    FIGURES[f"{node.backend}: apply one peer's nft elements at 10000 peers"] = timed(
        lambda: firewall.update(ruleset, update)
    )
    FIGURES[f"{node.backend}: nft list + parse table at 10000 peers"] = timed(firewall.list_table)
