"""One sync pass against recording fakes: batching, ordering, the firewall fallback."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import SecretStr

from kvpn_agent.desired import DesiredServer
from kvpn_agent.nft import NftError
from kvpn_agent.observed import ObservedDevice, ObservedLink
from kvpn_agent.ruleset import ObservedRuleset, PeerUpdate, Ruleset, build_ruleset
from kvpn_agent.sync import sync
from kvpn_agent.wire import DeviceConfig, PeerConfig
from kvpn_core.contract import PeerBinding
from kvpn_core.keys import public_key_of

PRIVATE = base64.b64encode(hashlib.sha256(b"server").digest()).decode()


def server(n: int, interface: str = "kvgw-aaaaaaaaaa") -> DesiredServer:
    peers = tuple(
        PeerBinding(
            peer_namespace="t",
            peer_name=f"p{i}",
            peer_uid=f"u{i}",
            public_key=base64.b64encode(hashlib.sha256(f"{interface}{i}".encode()).digest()).decode(),
            addresses=[f"10.8.0.{i + 2}"],
        )
        for i in range(n)
    )
    return DesiredServer(
        namespace="t",
        name=interface,
        interface=interface,
        private_key=SecretStr(PRIVATE),
        public_key=public_key_of(PRIVATE),
        listen_port=51820,
        mtu=1420,
        addresses=("10.8.0.1/24",),
        routes=("10.96.0.0/12",),
        masquerade=True,
        peers=peers,
    )


class Recorder:
    """Link, WireGuard and firewall backends in one, recording every call."""

    def __init__(self, fail_update: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.links: dict[str, ObservedLink] = {}
        self.fail_update = fail_update

    def observe(self, interface: str) -> ObservedLink | None:
        return self.links.get(interface)

    def create(self, interface: str) -> None:
        self.calls.append(("create", interface))

    def delete(self, interface: str) -> None:
        self.calls.append(("delete", interface))

    def set_mtu(self, interface: str, mtu: int) -> None:
        self.calls.append(("mtu", interface, mtu))

    def add_address(self, interface: str, address: str) -> None:
        self.calls.append(("addr", interface, address))

    def remove_address(self, interface: str, address: str) -> None:
        self.calls.append(("unaddr", interface, address))

    def set_up(self, interface: str) -> None:
        self.calls.append(("up", interface))

    def get(self, interface: str) -> ObservedDevice | None:
        return None

    def set(self, interface: str, device: DeviceConfig | None, peers: Sequence[PeerConfig]) -> None:
        self.calls.append(("wg", interface, device is not None, len(peers)))

    def list_table(self) -> ObservedRuleset | None:
        return ObservedRuleset(fingerprint=build_ruleset([server(0)]).fingerprint, peer_chains={}, peer_map={})

    def replace(self, ruleset: Ruleset) -> None:
        self.calls.append(("nft-replace",))

    def update(self, ruleset: Ruleset, update: PeerUpdate) -> None:
        self.calls.append(("nft-update", len(update.add_elements)))
        if self.fail_update:
            raise NftError("element exists")


def test_wireguard_changes_of_an_interface_go_out_in_one_transaction() -> None:
    rec = Recorder()
    result = sync([server(50), server(3, "kvgw-bbbbbbbbbb")], rec, rec, rec)
    wg_calls = [c for c in rec.calls if c[0] == "wg"]
    assert wg_calls == [("wg", "kvgw-aaaaaaaaaa", True, 50), ("wg", "kvgw-bbbbbbbbbb", True, 3)]
    assert rec.calls[:5] == [
        ("create", "kvgw-aaaaaaaaaa"),
        ("mtu", "kvgw-aaaaaaaaaa", 1420),
        ("addr", "kvgw-aaaaaaaaaa", "10.8.0.1/24"),
        ("up", "kvgw-aaaaaaaaaa"),
        ("wg", "kvgw-aaaaaaaaaa", True, 50),
    ]
    assert len(result.actions) == 2 * 4 + 2 + 53 + 1
    assert result.seconds > 0


def test_failed_element_update_falls_back_to_replacing_the_table() -> None:
    rec = Recorder(fail_update=True)
    sync([server(2)], rec, rec, rec)
    assert rec.calls[-2:] == [("nft-update", 2), ("nft-replace",)]


def test_interfaces_of_servers_no_longer_served_are_deleted_first() -> None:
    rec = Recorder()
    rec.links["kvgw-gone000000"] = ObservedLink(mtu=1420, up=True)
    sync([], rec, rec, rec, gone=["kvgw-gone000000", "kvgw-neverthere"])
    assert rec.calls[0] == ("delete", "kvgw-gone000000")
    assert ("delete", "kvgw-neverthere") not in rec.calls


def test_a_failing_replace_is_not_swallowed() -> None:
    class Broken(Recorder):
        def list_table(self) -> ObservedRuleset | None:
            return None

        def replace(self, ruleset: Ruleset) -> None:
            raise NftError("no nft")

    rec = Broken()
    with pytest.raises(NftError):
        sync([server(1)], rec, rec, rec)
