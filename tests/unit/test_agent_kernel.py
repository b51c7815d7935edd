"""The kernel backend's requests and read-back parsing (its socket calls cannot run here: no module)."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest

from kvpn_agent.kernel import device_request, kernel_available, parse_info, peer_request
from kvpn_agent.model import DeviceConfig, PeerConfig

ZERO = base64.b64encode(bytes(32)).decode()


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


class Nla(dict[str, Any]):
    """Enough of pyroute2's nla for the parser: attributes by name."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(attrs=attrs)

    def get_attr(self, name: str) -> Any:
        return self["attrs"].get(name)


def test_device_request_only_carries_what_changes() -> None:
    priv = key()
    assert device_request(DeviceConfig(private_key=priv, listen_port=51820)) == {
        "private_key": priv,
        "listen_port": 51820,
    }
    assert device_request(DeviceConfig()) == {}
    with pytest.raises(NotImplementedError):
        device_request(DeviceConfig(replace_peers=True))


def test_peer_request_mirrors_the_uapi_meaning() -> None:
    pub, psk = key(), key()
    assert peer_request(PeerConfig(public_key=pub, remove=True, allowed_ips=("10.8.0.2/32",))) == {
        "public_key": pub,
        "remove": True,
    }
    assert peer_request(
        PeerConfig(
            public_key=pub,
            update_only=True,
            preshared_key=psk,
            endpoint="[2001:db8::1]:51820",
            persistent_keepalive=0,
            replace_allowed_ips=True,
            allowed_ips=("10.8.0.2/32",),
        )
    ) == {
        "public_key": pub,
        "update_only": True,
        "preshared_key": psk,
        "endpoint_addr": "2001:db8::1",
        "endpoint_port": 51820,
        "persistent_keepalive": 0,
        "replace_allowed_ips": True,
        "allowed_ips": ["10.8.0.2/32"],
    }
    assert peer_request(PeerConfig(public_key=pub, preshared_key=""))["preshared_key"] == ZERO


def test_parse_info_merges_peers_split_across_messages() -> None:
    priv, a, b = key(), key(), key()
    first = Nla(
        WGDEVICE_A_PRIVATE_KEY={"value": priv.encode()},
        WGDEVICE_A_LISTEN_PORT=51820,
        WGDEVICE_A_PEERS=[
            Nla(
                WGPEER_A_PUBLIC_KEY={"value": a.encode()},
                WGPEER_A_PRESHARED_KEY={"value": ZERO.encode()},
                WGPEER_A_ENDPOINT={"addr": "192.0.2.1", "port": 40000},
                WGPEER_A_LAST_HANDSHAKE_TIME={"tv_sec": 1700000000, "tv_nsec": 0},
                WGPEER_A_RX_BYTES=5,
                WGPEER_A_TX_BYTES=6,
                WGPEER_A_ALLOWEDIPS=[{"addr": "10.8.0.2/32"}],
            )
        ],
    )
    # The dump goes on: the rest of peer a's allowed IPs, then peer b.
    second = Nla(
        WGDEVICE_A_PEERS=[
            Nla(WGPEER_A_PUBLIC_KEY={"value": a.encode()}, WGPEER_A_ALLOWEDIPS=[{"addr": "fd00:8::2/128"}]),
            Nla(WGPEER_A_PUBLIC_KEY={"value": b.encode()}, WGPEER_A_ALLOWEDIPS=[{"addr": "10.8.0.3/32"}]),
        ]
    )
    device = parse_info([first, second])
    assert device.private_key == priv
    assert device.listen_port == 51820
    assert set(device.peers) == {a, b}
    assert device.peers[a].allowed_ips == ("10.8.0.2/32", "fd00:8::2/128")
    assert device.peers[a].preshared_key is None
    assert device.peers[a].endpoint == "192.0.2.1:40000"
    assert device.peers[a].last_handshake == 1700000000
    assert device.peers[b].endpoint is None


def test_kernel_available_looks_for_the_module(tmp_path: Any) -> None:
    assert not kernel_available(tmp_path / "wireguard")
    (tmp_path / "wireguard").mkdir()
    assert kernel_available(tmp_path / "wireguard")
