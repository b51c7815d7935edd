"""The UAPI client: what it writes, what it reads, and how it fails, against a fake socket peer."""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvpn_agent.uapi import UapiClient, UapiError, key_from_hex, key_to_hex, parse_get, render_set
from kvpn_agent.wire import DeviceConfig, PeerConfig
from tests.unit.fakes import random_key

ZERO = "0" * 64


def test_keys_travel_as_hex() -> None:
    k = random_key()
    assert key_to_hex(k) == base64.b64decode(k).hex()
    assert key_from_hex(key_to_hex(k)) == k


def test_render_device_and_peers_in_protocol_order() -> None:
    priv, pub, psk = random_key(), random_key(), random_key()
    text = render_set(
        DeviceConfig(private_key=priv, listen_port=51820, replace_peers=True),
        [
            PeerConfig(
                public_key=pub,
                preshared_key=psk,
                endpoint="192.0.2.1:51820",
                persistent_keepalive=0,
                replace_allowed_ips=True,
                allowed_ips=("10.8.0.2/32", "fd00:8::2/128"),
            )
        ],
    )
    assert text.splitlines() == [
        "set=1",
        f"private_key={key_to_hex(priv)}",
        "listen_port=51820",
        "replace_peers=true",
        f"public_key={key_to_hex(pub)}",
        f"preshared_key={key_to_hex(psk)}",
        "endpoint=192.0.2.1:51820",
        "persistent_keepalive_interval=0",
        "replace_allowed_ips=true",
        "allowed_ip=10.8.0.2/32",
        "allowed_ip=fd00:8::2/128",
    ]


def test_render_remove_update_only_and_clearing_a_preshared_key() -> None:
    a, b = random_key(), random_key()
    text = render_set(
        None,
        [
            PeerConfig(public_key=a, remove=True, allowed_ips=("10.8.0.9/32",)),
            PeerConfig(b, update_only=True, preshared_key=""),
        ],
    )
    assert text.splitlines() == [
        "set=1",
        f"public_key={key_to_hex(a)}",
        "remove=true",
        f"public_key={key_to_hex(b)}",
        "update_only=true",
        f"preshared_key={ZERO}",
    ]


def test_render_leaves_unset_fields_out() -> None:
    pub = random_key()
    assert render_set(DeviceConfig(), [PeerConfig(public_key=pub)]) == f"set=1\npublic_key={key_to_hex(pub)}\n"


def get_reply(peers: int, private_key: str | None = None) -> str:
    lines = [f"private_key={key_to_hex(private_key)}"] if private_key else []
    lines += ["listen_port=51820"]
    for i in range(peers):
        lines += [
            f"public_key={key_to_hex(random_key())}",
            f"preshared_key={ZERO}",
            "protocol_version=1",
            f"endpoint=192.0.2.{i % 250 + 1}:{40000 + i % 20000}",
            "last_handshake_time_sec=0",
            "last_handshake_time_nsec=0",
            "tx_bytes=0",
            "rx_bytes=0",
            "persistent_keepalive_interval=0",
            f"allowed_ip=10.{8 + i // 65536}.{i // 256 % 256}.{i % 256}/32",
        ]
    return "\n".join(lines) + "\n"


def test_parse_get_reads_device_and_peer_fields() -> None:
    priv, pub, psk = random_key(), random_key(), random_key()
    text = (
        f"private_key={key_to_hex(priv)}\nlisten_port=51820\nfwmark=7\n"
        f"public_key={key_to_hex(pub)}\npreshared_key={key_to_hex(psk)}\nprotocol_version=1\n"
        "endpoint=[2001:db8::1]:51820\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n"
        "tx_bytes=1234\nrx_bytes=5678\npersistent_keepalive_interval=25\n"
        "allowed_ip=fd00:8::2/128\nallowed_ip=10.8.0.2/32\nsome_future_key=whatever\n"
    )
    device = parse_get(text)
    assert device.private_key == priv
    assert (device.listen_port, device.fwmark) == (51820, 7)
    peer = device.peers[pub]
    assert peer.preshared_key == psk
    assert peer.endpoint == "[2001:db8::1]:51820"
    assert peer.last_handshake == 1700000000.5
    assert (peer.tx_bytes, peer.rx_bytes, peer.persistent_keepalive) == (1234, 5678, 25)
    assert peer.allowed_ips == ("10.8.0.2/32", "fd00:8::2/128")


def test_parse_get_zero_keys_and_no_handshake_mean_unset() -> None:
    pub = random_key()
    device = parse_get(f"private_key={ZERO}\nlisten_port=0\npublic_key={key_to_hex(pub)}\npreshared_key={ZERO}\n")
    assert device.private_key is None
    assert device.peers[pub].preshared_key is None
    assert device.peers[pub].last_handshake is None
    assert device.peers[pub].allowed_ips == ()


def test_parse_get_empty_device() -> None:
    device = parse_get("listen_port=0\n")
    assert device.peers == {}
    assert device.private_key is None


def test_malformed_line_is_an_error() -> None:
    with pytest.raises(UapiError):
        parse_get("listen_port\n")


def test_repr_of_configs_and_observed_hides_keys() -> None:
    priv, psk = random_key(), random_key()
    assert priv not in repr(DeviceConfig(private_key=priv))
    assert psk not in repr(PeerConfig(public_key=random_key(), preshared_key=psk))
    device = parse_get(
        f"private_key={key_to_hex(priv)}\npublic_key={key_to_hex(random_key())}\npreshared_key={key_to_hex(psk)}\n"
    )
    assert priv not in repr(device)
    assert psk not in repr(device)


# --- Against a fake device on a unix socket ---------------------------------------------------

Handler = Callable[[str], bytes | None]


@pytest.fixture
def fake_device(tmp_path: Path) -> Iterator[Callable[[Handler], UapiClient]]:
    """A unix socket that answers each connection's request with ``handler(request)``."""
    servers: list[socket.socket] = []
    requests: list[str] = []

    def start(handler: Handler) -> UapiClient:
        path = tmp_path / "kvt0.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        srv.listen(8)
        servers.append(srv)

        def serve() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    data = b""
                    while not data.endswith(b"\n\n"):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    requests.append(data.decode())
                    reply = handler(data.decode())
                    if reply is not None:
                        conn.sendall(reply)

        threading.Thread(target=serve, daemon=True).start()
        client = UapiClient("kvt0", socket_dir=tmp_path, timeout=2)
        client.requests = requests  # type: ignore[attr-defined]
        return client

    yield start
    for srv in servers:
        srv.close()


def test_get_reads_every_one_of_ten_thousand_peers(fake_device: Callable[[Handler], UapiClient]) -> None:
    reply = (get_reply(10_000) + "errno=0\n\n").encode()
    client = fake_device(lambda _: reply)
    device = client.get()
    assert len(device.peers) == 10_000
    assert client.requests == ["get=1\n\n"]  # type: ignore[attr-defined]


def test_set_sends_one_transaction_ending_in_a_blank_line(fake_device: Callable[[Handler], UapiClient]) -> None:
    client = fake_device(lambda _: b"errno=0\n\n")
    pub = random_key()
    client.set(DeviceConfig(listen_port=51820), [PeerConfig(public_key=pub, allowed_ips=("10.8.0.2/32",))])
    assert client.requests == [  # type: ignore[attr-defined]
        f"set=1\nlisten_port=51820\npublic_key={key_to_hex(pub)}\nallowed_ip=10.8.0.2/32\n\n"
    ]


@pytest.mark.parametrize("errno", ["-22", "22"])
def test_errno_reply_raises_without_key_material(fake_device: Callable[[Handler], UapiClient], errno: str) -> None:
    client = fake_device(lambda _: f"errno={errno}\n\n".encode())
    priv, psk = random_key(), random_key()
    with pytest.raises(UapiError) as caught:
        client.set(DeviceConfig(private_key=priv), [PeerConfig(public_key=random_key(), preshared_key=psk)])
    assert caught.value.errno == 22
    for secret in (priv, psk, key_to_hex(priv), key_to_hex(psk)):
        assert secret not in str(caught.value)


def test_connection_closed_mid_reply_is_an_error(fake_device: Callable[[Handler], UapiClient]) -> None:
    client = fake_device(lambda _: b"listen_port=1\n")
    with pytest.raises(UapiError):
        client.get()


def test_missing_socket(tmp_path: Path) -> None:
    client = UapiClient("kvt-none", socket_dir=tmp_path)
    assert not client.exists()
    with pytest.raises(UapiError):
        client.get()
