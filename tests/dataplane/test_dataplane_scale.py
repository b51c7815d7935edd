"""Thousands of peers on a real wireguard-go: every one read back, a one-peer change stays cheap."""

from __future__ import annotations

import base64
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvpn_agent import nft
from kvpn_agent.model import DeviceConfig, PeerConfig, build_desired
from kvpn_agent.netlink import Netlink
from kvpn_agent.plan import AddPeer, UpdateFirewall
from kvpn_agent.sync import UapiBackend, sync
from kvpn_agent.uapi import UapiClient
from kvpn_agent.wggo import UserspaceLink, WireGuardGo
from kvpn_operator.contract import PeerBinding, encode_data
from tests.dataplane.kit import Lab, binding_secret, keypair, run

pytestmark = [pytest.mark.root, pytest.mark.slow]

FIGURES: dict[str, float] = {}


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


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


@pytest.fixture
def node(lab: Lab, tmp_path: Path) -> Iterator[tuple[str, UserspaceLink, str]]:
    ns = lab.netns("node")
    link = UserspaceLink(Netlink(netns=ns), WireGuardGo(prefix=("ip", "netns", "exec", ns), log_dir=tmp_path))
    interface = lab.ifname("n")
    link.create(interface)
    try:
        yield ns, link, interface
    finally:
        link.wggo.stop_all()
        link.netlink.close()


@pytest.mark.parametrize("peers", [10, 1_000, 10_000])
def test_adding_one_peer_stays_flat(node: tuple[str, UserspaceLink, str], peers: int) -> None:
    ns, _, interface = node
    client = UapiClient(interface)
    client.set(DeviceConfig(private_key=key(), listen_port=51820))
    client.set(None, [PeerConfig(public_key=key(), allowed_ips=(address(i),)) for i in range(peers)])

    extra = iter(range(peers, peers + 1000))
    add_ms = timed(lambda: client.set(None, [PeerConfig(public_key=key(), allowed_ips=(address(next(extra)),))]), 25)
    FIGURES[f"uapi add 1 peer at {peers} peers"] = add_ms
    assert add_ms < 50

    read_ms = timed(client.get)
    FIGURES[f"uapi read back {peers} peers"] = read_ms
    device = client.get()
    # Every peer, not the first ~20 (pyroute2 #1212): compare with what `wg` itself lists.
    assert len(device.peers) == peers + 25
    listed = run("ip", "netns", "exec", ns, "wg", "show", interface, "peers").stdout.split()
    assert set(listed) == set(device.peers)


def test_full_sync_of_ten_thousand_peers_then_one_more(node: tuple[str, UserspaceLink, str]) -> None:
    ns, link, interface = node
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
    desired = build_desired(server, key_secret, secrets, interface=interface)
    FIGURES["build desired state from 10000 binding Secrets"] = (time.perf_counter() - started) * 1000
    assert len(desired.peers) == 10_000

    firewall = nft.Nft(prefix=("ip", "netns", "exec", ns))
    backend = UapiBackend()
    cold = sync([desired], link, backend, firewall)
    FIGURES["cold sync of 10000 peers (wireguard-go + nft)"] = cold.seconds * 1000
    assert len(UapiClient(interface).get().peers) == 10_000
    observed = firewall.list_table()
    assert observed is not None
    assert len(observed.peer_map) == 10_000

    steady = sync([desired], link, backend, firewall)
    FIGURES["no-op sync at 10000 peers (full read-back)"] = steady.seconds * 1000
    assert steady.actions == []

    secrets.append(binding(10_000))
    desired = build_desired(server, key_secret, secrets, interface=interface)
    one = sync([desired], link, backend, firewall)
    FIGURES["sync of a one-peer change at 10000 peers (full read-back)"] = one.seconds * 1000
    assert [type(a) for a in one.actions] == [AddPeer, UpdateFirewall]

    # The apply part alone, as an event-driven update would do it without re-reading everything.
    extra = binding(10_001)
    pb = PeerBinding.from_secret(extra)
    assert pb.public_key
    apply_ms = timed(
        lambda: UapiClient(interface).set(
            None,
            [
                PeerConfig(
                    public_key=pb.public_key or "", preshared_key=pb.preshared_key, allowed_ips=("10.64.39.19/32",)
                )
            ],
        )
    )
    FIGURES["apply one peer via UAPI at 10000 peers"] = apply_ms
    secrets.append(extra)
    desired = build_desired(server, key_secret, secrets, interface=interface)
    ruleset = nft.build_ruleset([desired])
    update = nft.PeerUpdate(add_elements=((("peers4_" + interface, "10.64.39.19"), f"routes_{interface}"),))
    FIGURES["apply one peer's nft elements at 10000 peers"] = timed(lambda: firewall.update(ruleset, update))
    FIGURES["nft list + parse table at 10000 peers"] = timed(firewall.list_table)
