"""`up --via api`, the laptop's end: the file wg-quick runs, the order of relay pods, the status line, and
the relay between wg's datagrams and the stream (a recording stream stands in for the port-forward)."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from kvpn_cli import viaapi
from kvpn_cli.follow import ServerName
from kvpn_core.relaywire import FrameReader, Welcome, frames, ping

CONFIG = """# kvpn: WireGuard tunnel of VpnPeer dev/uma to VpnServer kvpn-system/api
[Interface]
PrivateKey = cHJpdmF0ZQ==
Address = 10.13.0.2/32

[Peer]
PublicKey = c2VydmVy
AllowedIPs = 10.96.0.0/16
PersistentKeepalive = 25
"""

INITIATION = b"\1\0\0\0" + b"i" * 144
DATA = b"\4\0\0\0" + b"d" * 60


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The health file goes under ~/.config/kvpn: a home of the test's own."""
    monkeypatch.setenv("HOME", str(tmp_path))


def test_the_local_file_dials_the_local_relay_with_an_mtu_the_pod_network_carries() -> None:
    local = viaapi.local_config(CONFIG, 40000)
    assert "[Peer]\nEndpoint = 127.0.0.1:40000\n" in local
    assert f"[Interface]\nMTU = {viaapi.MTU}\n" in local
    assert viaapi.local_config(CONFIG.replace("[Interface]\n", "[Interface]\nMTU = 1280\n"), 1).count("MTU") == 1
    assert viaapi.wants_api(CONFIG)  # no Endpoint: its server exposes no UDP port
    assert not viaapi.wants_api(local)


def test_relay_pods_are_tried_in_an_order_fixed_per_laptop_and_spread_over_laptops() -> None:
    pods = ["relay-a", "relay-b", "relay-c"]
    assert viaapi.rendezvous(pods, "key-1") == viaapi.rendezvous(list(reversed(pods)), "key-1")
    firsts = {viaapi.rendezvous(pods, f"key-{i}")[0] for i in range(30)}
    assert firsts == set(pods)


def test_the_status_line_says_how_the_tunnel_runs_or_why_not() -> None:
    health = viaapi.Health(interface="kvpn-api", server="kvpn-system/api", relay_namespace="kvpn-relay", pid=42)
    health.updated = 100.0
    health.relay_pod, health.gateway, health.connected_since = "relay-a", "node-b", 40.0
    alive = lambda _pid: True  # noqa: E731
    line = health.line(101.0, alive)
    assert "via the API server: relay kvpn-relay/relay-a to gateway node-b, connected 61 s" in line
    health.connected_since, health.last_error = None, "stream ended: pod gone"
    assert health.line(101.0, alive).endswith("reconnecting (stream ended: pod gone)")
    assert "not running" in health.line(101.0, lambda _pid: False)
    assert "not running" in health.line(100.0 + 4 * viaapi.HEALTH_SECONDS, alive)  # stale


class RecordingStream:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False
        self.backlog = 0

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def test_datagrams_queued_in_one_turn_go_in_one_message_and_a_backlog_drops_them() -> None:
    relay, stream = make_relay()

    async def run() -> None:
        relay.stream = stream  # type: ignore[assignment]
        for _ in range(5):
            relay.from_wg(DATA, ("127.0.0.1", 5555))
        relay.from_wg(b"not wireguard", ("127.0.0.1", 5555))
        await asyncio.sleep(0)
        stream.backlog = viaapi.BACKLOG_BYTES + 1
        relay.from_wg(INITIATION, ("127.0.0.1", 5555))
        await asyncio.sleep(0)

    asyncio.run(run())
    assert len(stream.sent) == 1
    assert FrameReader().feed(stream.sent[0]) == [DATA] * 5
    assert (relay.health.sent, relay.health.dropped) == (5, 2)  # the stranger, and the one over the backlog
    assert relay.wg_addr == ("127.0.0.1", 5555)


def test_a_welcome_naming_another_gateway_starts_a_new_session_once() -> None:
    moved = threading.Event()
    relay, _ = make_relay(on_move=moved.set)

    async def run() -> None:
        relay.health.gateway = "node-a"
        relay._to_wg(Welcome(gateway="node-a").encode()[2:])
        assert not moved.is_set()
        relay._to_wg(Welcome(gateway="node-b").encode()[2:])
        await asyncio.sleep(0.2)

    asyncio.run(run())
    assert moved.wait(2)
    assert (relay.health.gateway, relay.health.gateway_moves) == ("node-b", 1)


def test_datagrams_from_the_stream_go_to_wg_and_wgs_go_out_together() -> None:
    wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wg.bind(("127.0.0.1", 0))
    wg.settimeout(2)
    local = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    local.bind(("127.0.0.1", 0))
    local.setblocking(False)
    relay, stream = make_relay(sock=local)

    async def run() -> None:
        relay.stream = stream  # type: ignore[assignment]
        for _ in range(3):  # queued before the relay reads: one read, one message
            wg.sendto(DATA, local.getsockname())
        await asyncio.sleep(0.05)
        relay.read_wg()
        await asyncio.sleep(0)
        for payload in FrameReader().feed(frames([DATA, INITIATION])):
            relay._to_wg(payload)

    try:
        asyncio.run(run())
        assert [wg.recv(2048), wg.recv(2048)] == [DATA, INITIATION]
        assert relay.wg_addr == wg.getsockname()
    finally:
        wg.close()
        local.close()
    assert [FrameReader().feed(m) for m in stream.sent] == [[DATA] * 3]
    assert (relay.health.sent, relay.health.received) == (3, 2)


def test_a_stream_that_brings_nothing_back_is_given_up_and_pinged_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream through a node that lost its network: nothing breaks, nothing comes back."""
    monkeypatch.setattr(viaapi, "DEAD_SECONDS", 0.3)
    monkeypatch.setattr(viaapi, "PING_SECONDS", 0.1)
    relay, _ = make_relay()

    class Silent(RecordingStream):
        async def recv(self) -> bytes:
            await asyncio.sleep(3600)
            return b""

    silent = Silent()

    async def run() -> None:
        with pytest.raises(viaapi.PortForwardError, match="nothing came back"):
            await asyncio.wait_for(relay.pump(silent), 5)  # type: ignore[arg-type]

    asyncio.run(run())
    assert [FrameReader().feed(m) for m in silent.sent[:2]] == [[ping(1)[2:]], [ping(2)[2:]]]


def make_relay(on_move: Any = None, sock: socket.socket | None = None) -> tuple[viaapi.Relay, RecordingStream]:
    health = viaapi.Health(interface="kvpn-api", server="kvpn-system/api", relay_namespace="kvpn-relay")
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.close()
    relay = viaapi.Relay(
        None,  # type: ignore[arg-type]
        ServerName("kvpn-system", "api"),
        public_key="key",
        sock=sock,
        health=health,
        on_move=on_move or (lambda: None),
    )
    return relay, RecordingStream()
