"""The kernel backend's generic netlink messages, checked against pyroute2's own WireGuard message classes.

What the kernel makes of them is the VM tier's job (tests/dataplane, the ``kernel`` params); here the
bytes: what is encoded decodes with pyroute2's ``wgmsg`` to what was meant, a dump pyroute2 encodes
parses to the device, and the requests are split the way the kernel needs.
"""

from __future__ import annotations

import base64
import errno
import socket
import struct
from typing import Any

import pytest
from pyroute2.netlink import NLM_F_DUMP_INTR, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import wireguard as wg
from pyroute2.netlink.generic.wireguard import wgmsg

from kvpn_agent import wgnetlink
from kvpn_agent.kernel import KernelLink, KernelWireGuard, kernel_available
from kvpn_agent.wgnetlink import (
    MAX_NEST,
    NLMSG_HEADER,
    WireGuardMissingError,
    WireGuardSocket,
    parse_dump,
    peer_nests,
    set_messages,
)
from kvpn_agent.wire import DeviceConfig, PeerConfig
from tests.unit.fakes import random_key

FAMILY = 0x1B


def decoded(payload: bytes) -> Any:
    """A payload as pyroute2 reads it (with the netlink header the kernel would see before it)."""
    msg = wgmsg(NLMSG_HEADER.pack(NLMSG_HEADER.size + len(payload), FAMILY, 5, 1, 0) + payload)
    msg.decode()
    return msg


def peer_of(nla: Any) -> dict[str, Any]:
    value = {k: nla.get_attr(f"WGPEER_A_{k.upper()}") for k in ("public_key", "preshared_key", "flags", "endpoint")}
    value["keepalive"] = nla.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
    value["ips"] = [ip["addr"] for ip in nla.get_attr("WGPEER_A_ALLOWEDIPS") or []]
    if value["endpoint"] is not None:
        value["endpoint"] = {k: value["endpoint"][k] for k in ("family", "port", "addr")}
    for k in ("public_key", "preshared_key"):
        if value[k] is not None:
            raw = value[k]["value"] if isinstance(value[k], dict) else value[k]
            value[k] = raw.decode()
    return value


def test_a_change_is_one_set_device_message_as_pyroute2_reads_it() -> None:
    priv, pub, psk, other = random_key(), random_key(), random_key(), random_key()
    (payload,) = set_messages(
        "kvgw-0123456789",
        DeviceConfig(private_key=priv, listen_port=51820, fwmark=7),
        [
            PeerConfig(
                public_key=pub,
                preshared_key=psk,
                endpoint="192.0.2.1:40000",
                persistent_keepalive=25,
                replace_allowed_ips=True,
                allowed_ips=("10.8.0.2/32", "fd00:8::2/128"),
            ),
            PeerConfig(public_key=other, update_only=True, preshared_key="", endpoint="[2001:db8::1]:51820"),
            PeerConfig(public_key=random_key(), remove=True, allowed_ips=("10.8.0.9/32",)),
        ],
    )
    msg = decoded(payload)
    assert (msg["cmd"], msg["version"]) == (wg.WG_CMD_SET_DEVICE, wg.WG_GENL_VERSION)
    assert msg.get_attr("WGDEVICE_A_IFNAME") == "kvgw-0123456789"
    assert msg.get_attr("WGDEVICE_A_PRIVATE_KEY").decode() == priv
    assert (msg.get_attr("WGDEVICE_A_LISTEN_PORT"), msg.get_attr("WGDEVICE_A_FWMARK")) == (51820, 7)
    assert msg.get_attr("WGDEVICE_A_FLAGS") is None  # no REPLACE_PEERS unless asked for
    first, second, third = (peer_of(p) for p in msg.get_attr("WGDEVICE_A_PEERS"))
    assert first == {
        "public_key": pub,
        "preshared_key": psk,
        "flags": wg.WGPEER_F_REPLACE_ALLOWEDIPS,
        "endpoint": {"family": socket.AF_INET, "port": 40000, "addr": "192.0.2.1"},
        "keepalive": 25,
        "ips": ["10.8.0.2/32", "fd00:8::2/128"],
    }
    assert second["flags"] == wg.WGPEER_F_UPDATE_ONLY
    assert second["preshared_key"] == base64.b64encode(bytes(32)).decode()  # "" clears the key
    assert (second["endpoint"]["addr"], second["endpoint"]["port"]) == ("2001:db8::1", 51820)
    assert second["ips"] == []
    assert third["flags"] == wg.WGPEER_F_REMOVE_ME
    assert third["ips"] == []  # a removal carries nothing else


def test_a_full_replace_sets_replace_peers_on_the_first_message_only() -> None:
    peers = [PeerConfig(public_key=random_key(), allowed_ips=(f"10.8.{i // 256}.{i % 256}/32",)) for i in range(2_000)]
    messages = set_messages("wg0", DeviceConfig(private_key=random_key(), replace_peers=True), peers)
    assert len(messages) > 1
    flags = [decoded(m).get_attr("WGDEVICE_A_FLAGS") for m in messages]
    assert flags == [wg.WGDEVICE_F_REPLACE_PEERS] + [None] * (len(messages) - 1)
    assert [decoded(m).get_attr("WGDEVICE_A_PRIVATE_KEY") is not None for m in messages] == [True] + [False] * (
        len(messages) - 1
    )
    # Replacing with no peers at all is one message that only says so.
    (empty,) = set_messages("wg0", DeviceConfig(replace_peers=True), [])
    assert decoded(empty).get_attr("WGDEVICE_A_FLAGS") == wg.WGDEVICE_F_REPLACE_PEERS
    assert decoded(empty).get_attr("WGDEVICE_A_PEERS") is None
    assert set_messages("wg0", None, []) == []
    assert set_messages("wg0", DeviceConfig(), []) == []


def test_ten_thousand_peers_are_split_to_fit_the_sixteen_bit_nest_in_order() -> None:
    peers = [
        PeerConfig(
            public_key=random_key(),
            preshared_key=random_key(),
            replace_allowed_ips=True,
            allowed_ips=(f"10.{i // 256}.{i % 256}.1/32",),
        )
        for i in range(10_000)
    ]
    messages = set_messages("wg0", None, peers)
    assert 10 < len(messages) < 40  # hundreds per message, not one each (pyroute2's set)
    seen = []
    for m in messages:
        assert len(m) < MAX_NEST + 64
        seen.extend(peer_of(p)["public_key"] for p in decoded(m).get_attr("WGDEVICE_A_PEERS"))
    assert seen == [p.public_key for p in peers]


def test_a_peer_with_more_allowed_ips_than_fit_is_continued_without_replacing_them_again() -> None:
    ips = tuple(f"10.{i // 256}.{i % 256}.0/24" for i in range(6_000))
    pub = random_key()
    nests = peer_nests(
        PeerConfig(public_key=pub, preshared_key=random_key(), replace_allowed_ips=True, allowed_ips=ips)
    )
    assert len(nests) > 1
    messages = set_messages("wg0", None, [PeerConfig(public_key=pub, replace_allowed_ips=True, allowed_ips=ips)])
    parts = [peer_of(p) for m in messages for p in decoded(m).get_attr("WGDEVICE_A_PEERS")]
    assert {p["public_key"] for p in parts} == {pub}
    assert [p["flags"] for p in parts] == [wg.WGPEER_F_REPLACE_ALLOWEDIPS] + [0] * (len(parts) - 1)
    assert [ip for p in parts for ip in p["ips"]] == list(ips)
    # The dump parser merges such parts back into one peer (the kernel splits its dumps the same way).
    assert parse_dump(messages).peers[pub].allowed_ips == tuple(
        sorted(ips, key=lambda c: tuple(map(int, c[:-3].split("."))))
    )


def test_bad_keys_and_endpoints_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="not 32"):
        set_messages("wg0", None, [PeerConfig(public_key=base64.b64encode(b"short").decode())])
    with pytest.raises(ValueError, match="base64"):
        set_messages("wg0", DeviceConfig(private_key="not base64!"), [])


def dump_message(attrs: list[Any], *, header: bool = True) -> bytes:
    """A GET_DEVICE reply as pyroute2 encodes it, without the netlink header (as the socket hands it on)."""
    msg = wgmsg()
    msg["cmd"] = wg.WG_CMD_GET_DEVICE
    msg["version"] = wg.WG_GENL_VERSION
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data[NLMSG_HEADER.size :])


def test_a_dump_split_across_messages_is_merged_whole() -> None:
    priv, a, b = random_key(), random_key(), random_key()
    zero = base64.b64encode(bytes(32))
    ip = {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", socket.AF_INET],
            ["WGALLOWEDIP_A_IPADDR", socket.inet_aton("10.8.0.2")],
            ["WGALLOWEDIP_A_CIDR_MASK", 32],
        ]
    }
    ip6 = {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", socket.AF_INET6],
            ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(socket.AF_INET6, "fd00:8::2")],
            ["WGALLOWEDIP_A_CIDR_MASK", 128],
        ]
    }
    first = dump_message(
        [
            ["WGDEVICE_A_PRIVATE_KEY", {"value": priv.encode()}],
            ["WGDEVICE_A_LISTEN_PORT", 51820],
            ["WGDEVICE_A_FWMARK", 0],
            [
                "WGDEVICE_A_PEERS",
                [
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", {"value": a.encode()}],
                            ["WGPEER_A_PRESHARED_KEY", {"value": zero}],
                            ["WGPEER_A_ENDPOINT", {"addr": "192.0.2.1", "port": 40000}],
                            ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
                            ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1_700_000_000, "tv_nsec": 500_000_000}],
                            ["WGPEER_A_RX_BYTES", 5],
                            ["WGPEER_A_TX_BYTES", 6],
                            ["WGPEER_A_ALLOWEDIPS", [ip]],
                        ]
                    }
                ],
            ],
        ]
    )
    # The dump goes on: the rest of peer a's allowed IPs, then peer b (never handshaken, no endpoint).
    psk = random_key()
    second = dump_message(
        [
            [
                "WGDEVICE_A_PEERS",
                [
                    {"attrs": [["WGPEER_A_PUBLIC_KEY", {"value": a.encode()}], ["WGPEER_A_ALLOWEDIPS", [ip6]]]},
                    {
                        "attrs": [
                            ["WGPEER_A_PUBLIC_KEY", {"value": b.encode()}],
                            ["WGPEER_A_PRESHARED_KEY", {"value": psk.encode()}],
                            ["WGPEER_A_ENDPOINT", {"addr": "2001:db8::1", "port": 51820}],
                            ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 0, "tv_nsec": 0}],
                        ]
                    },
                ],
            ]
        ]
    )
    device = parse_dump([first, second])
    assert (device.private_key, device.listen_port, device.fwmark) == (priv, 51820, 0)
    assert set(device.peers) == {a, b}
    pa, pb = device.peers[a], device.peers[b]
    assert pa.allowed_ips == ("10.8.0.2/32", "fd00:8::2/128")
    assert (pa.preshared_key, pa.endpoint, pa.persistent_keepalive) == (None, "192.0.2.1:40000", 25)
    assert (pa.last_handshake, pa.rx_bytes, pa.tx_bytes) == (1_700_000_000.5, 5, 6)
    assert (pb.preshared_key, pb.endpoint, pb.last_handshake, pb.allowed_ips) == (psk, "[2001:db8::1]:51820", None, ())


def test_what_is_set_reads_back_the_same() -> None:
    """A SET_DEVICE and a GET_DEVICE reply share their layout: the parser reads back what was encoded."""
    peers = [
        PeerConfig(
            public_key=random_key(), preshared_key=random_key(), persistent_keepalive=0, allowed_ips=(f"10.9.0.{i}/32",)
        )
        for i in range(1, 200)
    ]
    device = parse_dump(set_messages("wg0", DeviceConfig(private_key=random_key(), listen_port=1), peers))
    assert [(p.public_key, p.preshared_key, p.allowed_ips) for p in device.peers.values()] == [
        (p.public_key, p.preshared_key, p.allowed_ips) for p in peers
    ]


# --- the socket, against a stand-in for the kernel's side --------------------------------------------


class FakeKernel:
    """Answers WireGuardSocket's datagrams as the kernel would: scripted replies per request."""

    def __init__(self, *replies: list[tuple[int, int, bytes]]) -> None:
        self.replies = list(replies)
        self.sent: list[bytes] = []
        self.queue: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        (seq,) = struct.unpack_from("=I", data, 8)
        answer = self.replies.pop(0)
        self.queue.append(b"".join(_nlmsg(kind, flags, seq, body) for kind, flags, body in answer))
        return len(data)

    def recv_into(self, buf: bytearray, size: int, flags: int) -> int:
        data = self.queue.pop(0)
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


def _nlmsg(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    size = NLMSG_HEADER.size + len(body)
    return NLMSG_HEADER.pack(size, kind, flags, seq, 0) + body + bytes(-size & 3)


def _error(code: int) -> bytes:
    return struct.pack("=i", -code) + NLMSG_HEADER.pack(0, 0, 0, 0, 0)


def connected(kernel: FakeKernel) -> WireGuardSocket:
    sock = WireGuardSocket()
    sock._sock = kernel  # type: ignore[assignment]  # the stand-in speaks send/recv_into
    sock._family = FAMILY
    return sock


def test_an_error_ack_is_a_netlink_error_with_its_errno() -> None:
    sock = connected(FakeKernel([(NLMSG_ERROR, 0, struct.pack("=i", 0))], [(NLMSG_ERROR, 0, _error(errno.EINVAL))]))
    sock.request(b"")
    with pytest.raises(NetlinkError) as caught:
        sock.request(b"")
    assert caught.value.code == errno.EINVAL


def test_an_interrupted_dump_is_read_again_and_stale_replies_are_skipped() -> None:
    body = dump_message([["WGDEVICE_A_LISTEN_PORT", 51820]])
    kernel = FakeKernel(
        [(FAMILY, NLM_F_DUMP_INTR, body), (NLMSG_DONE, 0, struct.pack("=i", 0))],
        [(FAMILY, 0, body), (NLMSG_DONE, 0, struct.pack("=i", 0))],
    )
    sock = connected(kernel)
    kernel.queue.append(_nlmsg(FAMILY, 0, 999, b"left over"))  # a reply to an earlier, timed-out request
    replies = sock.dump(b"")
    assert len(kernel.sent) == 2
    assert parse_dump(replies).listen_port == 51820


class Refusing:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def dump(self, payload: bytes) -> list[bytes]:
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        NetlinkError(errno.ENODEV, "No such device"),  # the first sync of a new server: nothing there yet
        NetlinkError(errno.EOPNOTSUPP, "Operation not supported"),  # a link of that name, not WireGuard
        WireGuardMissingError(errno.ENOENT, "no WireGuard"),  # no module, so no device either
    ],
)
def test_a_missing_device_reads_as_none(exc: Exception) -> None:
    """Before: get() caught OSError, which pyroute2's NetlinkError is not; the first sync of a new server
    died with (19, 'No such device') outside the sync's error handling."""
    backend = KernelWireGuard()
    backend.socket = Refusing(exc)  # type: ignore[assignment]
    assert backend.get("kvgw-0123456789") is None


def test_other_netlink_errors_are_raised() -> None:
    backend = KernelWireGuard()
    backend.socket = Refusing(NetlinkError(errno.EPERM, "Operation not permitted"))  # type: ignore[assignment]
    with pytest.raises(NetlinkError):
        backend.get("kvgw-0123456789")


def test_the_socket_is_opened_in_the_interfaces_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the link was made in the namespace, the WireGuard socket in the agent's own."""
    asked: list[dict[str, Any]] = []

    def create_socket(**kwargs: Any) -> socket.socket:
        asked.append(kwargs)
        raise OSError(errno.EPERM, "stop here")

    monkeypatch.setattr(wgnetlink.pyroute2_netns, "create_socket", create_socket)
    with pytest.raises(OSError, match="stop here"):
        KernelWireGuard("node-ns").get("wg0")
    assert asked == [{"netns": "node-ns", "family": socket.AF_NETLINK, "socket_type": socket.SOCK_RAW, "proto": 16}]


def test_kernel_available_looks_for_the_module(tmp_path: Any) -> None:
    assert not kernel_available(tmp_path / "wireguard")
    (tmp_path / "wireguard").mkdir()
    assert kernel_available(tmp_path / "wireguard")


def test_a_kernel_link_is_emptied_in_one_message_before_it_is_deleted() -> None:
    """Found in the VM tier: a link deleted with 10,000 peers took 180 s, emptied first 0.3 s in all."""
    calls: list[str] = []

    class Links:
        netns = None

        def index(self, interface: str) -> int | None:
            return 7

        def delete(self, interface: str) -> None:
            calls.append(f"delete {interface}")

    class Devices:
        def set(self, interface: str, device: DeviceConfig | None, peers: Any) -> None:
            calls.append(f"set {interface} replace_peers={device.replace_peers if device else None} peers={len(peers)}")

    KernelLink(Links(), Devices()).delete("kvgw-0123456789")  # type: ignore[arg-type]
    assert calls == ["set kvgw-0123456789 replace_peers=True peers=0", "delete kvgw-0123456789"]
