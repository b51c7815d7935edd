"""WireGuard's generic netlink family spoken directly: many peers per SET_DEVICE message, the dump parsed whole.

pyroute2's ``WireGuard.set`` sends one peer per call (~10 ms each in a slow guest: minutes for
10,000 peers) and cannot send WGDEVICE_F_REPLACE_PEERS; its nla classes encode ~10,000 peers a
second on a fast machine. So the requests are built here with ``struct`` (the layout of
include/uapi/linux/wireguard.h, the constants taken from pyroute2), split the way `wg` splits
them: peers go into a message until its peers nest would pass the 16-bit attribute length, and a
peer with more allowed IPs than fit is continued in the next message without
WGPEER_F_REPLACE_ALLOWEDIPS. The socket is pyroute2's (``netns.create_socket`` opens it inside a
named network namespace); the family id is resolved with pyroute2's ``ctrlmsg``.
"""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink import (
    CTRL_CMD_GETFAMILY,
    GENL_ID_CTRL,
    NETLINK_EXT_ACK,
    NETLINK_GENERIC,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
    ctrlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import wireguard as wg

from kvpn_agent.observed import ObservedDevice, ObservedPeer
from kvpn_agent.wire import DeviceConfig, PeerConfig, sort_networks

KEY_LEN = wg.WG_KEY_LEN
NETLINK_CAP_ACK = 10
"""An error ACK without a copy of the request (up to 64 KiB each here); not among pyroute2's constants."""

NLMSGERR_ATTR_MSG = 1
NLA_HEADER = 4
NLMSG_HEADER = struct.Struct("=IHHII")
GENL_HEADER = struct.Struct("=BBH")
NLA = struct.Struct("=HH")
NLA_TYPE_MASK = ~(NLA_F_NESTED | 0x4000) & 0xFFFF

MAX_NEST = 0xFFFF
"""The most an attribute can hold (its length is 16 bits): the bound of one message's peers nest."""

MESSAGE_BUDGET = MAX_NEST - 256
"""What one message's peers may take: its nest, less room for the device's own attributes."""

BUFFER = 1 << 20
DUMP_RETRIES = 10
"""A dump the kernel marks interrupted (the device changed meanwhile) is read again, as `wg` does."""

# Attribute numbers as pyroute2's message classes define them (it names the peer's only in its nla maps).
_PEER = {name: i for i, (name, _) in enumerate(wg.wgmsg.wgdevice_peer.nla_map)}
WGPEER_A_PUBLIC_KEY = _PEER["WGPEER_A_PUBLIC_KEY"]
WGPEER_A_PRESHARED_KEY = _PEER["WGPEER_A_PRESHARED_KEY"]
WGPEER_A_FLAGS = _PEER["WGPEER_A_FLAGS"]
WGPEER_A_ENDPOINT = _PEER["WGPEER_A_ENDPOINT"]
WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = _PEER["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"]
WGPEER_A_LAST_HANDSHAKE_TIME = _PEER["WGPEER_A_LAST_HANDSHAKE_TIME"]
WGPEER_A_RX_BYTES = _PEER["WGPEER_A_RX_BYTES"]
WGPEER_A_TX_BYTES = _PEER["WGPEER_A_TX_BYTES"]
WGPEER_A_ALLOWEDIPS = _PEER["WGPEER_A_ALLOWEDIPS"]

_ZERO = bytes(KEY_LEN)
_U16, _U32, _U64 = struct.Struct("=H"), struct.Struct("=I"), struct.Struct("=Q")
_TIMESPEC = struct.Struct("=qq")


class WireGuardMissingError(NetlinkError):  # type: ignore[misc]  # pyroute2 is untyped
    """The kernel has no WireGuard family (the module is not loaded and cannot be): no device exists."""


# --- encoding ----------------------------------------------------------------------------------


def _nla(kind: int, payload: bytes) -> bytes:
    size = NLA_HEADER + len(payload)
    return NLA.pack(size, kind) + payload + bytes(-size & 3)


def _nest(kind: int, parts: Sequence[bytes]) -> bytes:
    body = b"".join(parts)
    if NLA_HEADER + len(body) > MAX_NEST:
        raise ValueError(f"netlink attribute of {len(body)} bytes does not fit")
    return NLA.pack(NLA_HEADER + len(body), kind | NLA_F_NESTED) + body


def key_bytes(key: str) -> bytes:
    """A base64 key as its 32 bytes; "" is the all-zero key, which clears it."""
    if not key:
        return _ZERO
    try:
        raw = base64.b64decode(key, validate=True)
    except binascii.Error:
        raise ValueError("key is not base64") from None
    if len(raw) != KEY_LEN:
        raise ValueError(f"key is {len(raw)} bytes, not {KEY_LEN}")
    return raw


def _sockaddr(endpoint: str) -> bytes:
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if ":" in host:
        return (
            struct.pack("=H", socket.AF_INET6)
            + struct.pack(">HI", int(port), 0)
            + socket.inet_pton(socket.AF_INET6, host)
            + bytes(4)
        )
    return struct.pack("=H", socket.AF_INET) + struct.pack(">H", int(port)) + socket.inet_aton(host) + bytes(8)


def _allowed_ip(cidr: str) -> bytes:
    address, _, prefix = cidr.partition("/")
    if ":" in address:
        family, raw = socket.AF_INET6, socket.inet_pton(socket.AF_INET6, address)
    else:
        family, raw = socket.AF_INET, socket.inet_aton(address)
    return _nest(
        0,
        (
            _nla(wg.WGALLOWEDIP_A_FAMILY, _U16.pack(family)),
            _nla(wg.WGALLOWEDIP_A_IPADDR, raw),
            _nla(wg.WGALLOWEDIP_A_CIDR_MASK, bytes((int(prefix or (128 if family == socket.AF_INET6 else 32)),))),
        ),
    )


def peer_nests(peer: PeerConfig, budget: int = MESSAGE_BUDGET) -> list[bytes]:
    """One peer as WGDEVICE_A_PEERS elements: the first carries everything, any further one more allowed IPs.

    Each element fits ``budget``: a peer with more allowed IPs than that is continued, without
    WGPEER_F_REPLACE_ALLOWEDIPS (which would drop what the previous part added).
    """
    public = _nla(WGPEER_A_PUBLIC_KEY, key_bytes(peer.public_key))
    if peer.remove:
        return [_nest(0, (public, _nla(WGPEER_A_FLAGS, _U32.pack(wg.WGPEER_F_REMOVE_ME))))]
    flags = (wg.WGPEER_F_UPDATE_ONLY if peer.update_only else 0) | (
        wg.WGPEER_F_REPLACE_ALLOWEDIPS if peer.replace_allowed_ips else 0
    )
    head = [public, _nla(WGPEER_A_FLAGS, _U32.pack(flags))]
    if peer.preshared_key is not None:
        head.append(_nla(WGPEER_A_PRESHARED_KEY, key_bytes(peer.preshared_key)))
    if peer.endpoint is not None:
        head.append(_nla(WGPEER_A_ENDPOINT, _sockaddr(peer.endpoint)))
    if peer.persistent_keepalive is not None:
        head.append(_nla(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, _U16.pack(peer.persistent_keepalive)))
    ips = [_allowed_ip(c) for c in peer.allowed_ips]
    continued = [public, _nla(WGPEER_A_FLAGS, _U32.pack(flags & ~wg.WGPEER_F_REPLACE_ALLOWEDIPS))]
    nests: list[bytes] = []
    parts, size = head, NLA_HEADER + sum(map(len, head)) + NLA_HEADER
    chunk: list[bytes] = []
    for ip in ips:
        if chunk and size + len(ip) > budget:
            nests.append(_nest(0, (*parts, _nest(WGPEER_A_ALLOWEDIPS, chunk))))
            parts, size, chunk = continued, NLA_HEADER + sum(map(len, continued)) + NLA_HEADER, []
        chunk.append(ip)
        size += len(ip)
    nests.append(_nest(0, (*parts, _nest(WGPEER_A_ALLOWEDIPS, chunk))) if chunk else _nest(0, parts))
    return nests


def _ifname(interface: str) -> bytes:
    return _nla(wg.WGDEVICE_A_IFNAME, interface.encode() + b"\0")


def set_messages(
    interface: str, device: DeviceConfig | None, peers: Sequence[PeerConfig], budget: int = MESSAGE_BUDGET
) -> list[bytes]:
    """The SET_DEVICE payloads (generic netlink header and attributes) for one change, in order.

    The first carries the device's settings (WGDEVICE_F_REPLACE_PEERS among them: the peers of the
    later messages are added to those of the first); nothing to change, no message.
    """
    first = [_ifname(interface)]
    if device is not None:
        if device.private_key is not None:
            first.append(_nla(wg.WGDEVICE_A_PRIVATE_KEY, key_bytes(device.private_key)))
        if device.listen_port is not None:
            first.append(_nla(wg.WGDEVICE_A_LISTEN_PORT, _U16.pack(device.listen_port)))
        if device.fwmark is not None:
            first.append(_nla(wg.WGDEVICE_A_FWMARK, _U32.pack(device.fwmark)))
        if device.replace_peers:
            first.append(_nla(wg.WGDEVICE_A_FLAGS, _U32.pack(wg.WGDEVICE_F_REPLACE_PEERS)))
    header = GENL_HEADER.pack(wg.WG_CMD_SET_DEVICE, wg.WG_GENL_VERSION, 0)
    messages: list[bytes] = []
    attrs, batch, size = first, list[bytes](), 0
    for peer in peers:
        for nest in peer_nests(peer, budget):
            if batch and size + len(nest) > budget:
                messages.append(header + b"".join(attrs) + _nest(wg.WGDEVICE_A_PEERS, batch))
                attrs, batch, size = [_ifname(interface)], [], 0
            batch.append(nest)
            size += len(nest)
    if batch:
        messages.append(header + b"".join(attrs) + _nest(wg.WGDEVICE_A_PEERS, batch))
    elif len(attrs) > 1:
        messages.append(header + b"".join(attrs))
    return messages


def get_message(interface: str) -> bytes:
    return GENL_HEADER.pack(wg.WG_CMD_GET_DEVICE, wg.WG_GENL_VERSION, 0) + _ifname(interface)


# --- decoding ----------------------------------------------------------------------------------


def _attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in buf[start:end]."""
    unpack = NLA.unpack_from
    while start + NLA_HEADER <= end:
        size, kind = unpack(buf, start)
        if size < NLA_HEADER:
            return
        yield kind & NLA_TYPE_MASK, start + NLA_HEADER, start + size
        start += (size + 3) & ~3


def _b64(raw: bytes) -> str | None:
    return None if raw == _ZERO else base64.b64encode(raw).decode()


def _endpoint(buf: bytes, start: int, end: int) -> str | None:
    (family,) = _U16.unpack_from(buf, start)
    (port,) = struct.unpack_from(">H", buf, start + 2)
    if family == socket.AF_INET and end - start >= 8:
        return f"{socket.inet_ntop(socket.AF_INET, buf[start + 4 : start + 8])}:{port}"
    if family == socket.AF_INET6 and end - start >= 24:
        return f"[{ipaddress.IPv6Address(buf[start + 8 : start + 24])}]:{port}"
    return None


def _allowed_ips(buf: bytes, start: int, end: int, into: list[str]) -> None:
    for _, s, e in _attrs(buf, start, end):
        family = prefix = 0
        raw = b""
        for kind, a, b in _attrs(buf, s, e):
            if kind == wg.WGALLOWEDIP_A_FAMILY:
                (family,) = _U16.unpack_from(buf, a)
            elif kind == wg.WGALLOWEDIP_A_IPADDR:
                raw = buf[a:b]
            elif kind == wg.WGALLOWEDIP_A_CIDR_MASK:
                prefix = buf[a]
        if family == socket.AF_INET:
            into.append(f"{socket.inet_ntop(socket.AF_INET, raw)}/{prefix}")
        elif family == socket.AF_INET6:
            # ipaddress's spelling, which the desired state uses (inet_ntop writes some forms otherwise).
            into.append(f"{ipaddress.IPv6Address(raw)}/{prefix}")


class DumpReader:
    """Merges the messages of one GET_DEVICE dump: the kernel splits the peers, and one peer's
    allowed IPs, across messages; the device's own attributes come in the first."""

    def __init__(self) -> None:
        self.private_key: str | None = None
        self.listen_port = 0
        self.fwmark = 0
        self.fields: dict[str, dict[str, Any]] = {}
        self.allowed: dict[str, list[str]] = {}

    def feed(self, payload: bytes, offset: int = 0, end: int | None = None) -> None:
        """One message: its generic netlink header at ``offset``, its attributes up to ``end``."""
        end = len(payload) if end is None else end
        for kind, s, e in _attrs(payload, offset + GENL_HEADER.size, end):
            if kind == wg.WGDEVICE_A_PRIVATE_KEY:
                self.private_key = _b64(payload[s:e])
            elif kind == wg.WGDEVICE_A_LISTEN_PORT:
                (self.listen_port,) = _U16.unpack_from(payload, s)
            elif kind == wg.WGDEVICE_A_FWMARK:
                (self.fwmark,) = _U32.unpack_from(payload, s)
            elif kind == wg.WGDEVICE_A_PEERS:
                for _, ps, pe in _attrs(payload, s, e):
                    self._peer(payload, ps, pe)

    def _peer(self, buf: bytes, start: int, end: int) -> None:
        found: dict[str, Any] = {}
        ips: list[str] = []
        for kind, s, e in _attrs(buf, start, end):
            if kind == WGPEER_A_PUBLIC_KEY:
                found["public_key"] = base64.b64encode(buf[s:e]).decode()
            elif kind == WGPEER_A_PRESHARED_KEY:
                found["preshared_key"] = _b64(buf[s:e])
            elif kind == WGPEER_A_ENDPOINT:
                found["endpoint"] = _endpoint(buf, s, e)
            elif kind == WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL:
                (found["persistent_keepalive"],) = _U16.unpack_from(buf, s)
            elif kind == WGPEER_A_LAST_HANDSHAKE_TIME:
                seconds, nanoseconds = _TIMESPEC.unpack_from(buf, s)
                found["last_handshake"] = seconds + nanoseconds / 1e9 if seconds else None
            elif kind == WGPEER_A_RX_BYTES:
                (found["rx_bytes"],) = _U64.unpack_from(buf, s)
            elif kind == WGPEER_A_TX_BYTES:
                (found["tx_bytes"],) = _U64.unpack_from(buf, s)
            elif kind == WGPEER_A_ALLOWEDIPS:
                _allowed_ips(buf, s, e, ips)
        key = found.pop("public_key", None)
        if key is None:
            return
        self.fields.setdefault(key, {}).update(found)
        self.allowed.setdefault(key, []).extend(ips)

    def device(self) -> ObservedDevice:
        peers = {}
        for key, f in self.fields.items():
            ips = self.allowed[key]
            # The kernel keeps allowed IPs masked and spelled as above: only several need sorting.
            allowed = tuple(ips) if len(ips) < 2 else sort_networks(ips)
            peers[key] = ObservedPeer(public_key=key, allowed_ips=allowed, **f)
        return ObservedDevice(
            private_key=self.private_key, listen_port=self.listen_port, fwmark=self.fwmark, peers=peers
        )


def parse_dump(payloads: Sequence[bytes]) -> ObservedDevice:
    """The device from a dump's message payloads (each starting at its generic netlink header)."""
    reader = DumpReader()
    for payload in payloads:
        reader.feed(payload)
    return reader.device()


# --- the socket --------------------------------------------------------------------------------


class WireGuardSocket:
    """A generic netlink socket bound to the WireGuard family, in ``netns`` (a name under /run/netns) if given.

    Opened on first use and again after any failure (a reloaded module has a new family id, a
    timed-out request may have left replies behind). Not thread-safe: one per thread.
    """

    def __init__(self, netns: str | None = None, timeout: float = 10.0) -> None:
        self.netns = netns
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._family = 0
        self._seq = 0
        self._buf = bytearray(BUFFER)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _open(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock: socket.socket
        if self.netns:
            sock = pyroute2_netns.create_socket(
                netns=self.netns, family=socket.AF_NETLINK, socket_type=socket.SOCK_RAW, proto=NETLINK_GENERIC
            )
        else:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            sock.settimeout(self.timeout)
            sock.bind((0, 0))
            self._sock = sock
            self._family = self._resolve()
        except BaseException:
            sock.close()
            self._sock = None
            raise
        return sock

    def _resolve(self) -> int:
        msg = ctrlmsg()
        msg["cmd"] = CTRL_CMD_GETFAMILY
        msg["version"] = 1
        msg["attrs"].append(["CTRL_ATTR_FAMILY_NAME", wg.WG_GENL_NAME])
        msg.encode()
        body = bytes(msg.data[NLMSG_HEADER.size :])
        try:
            (reply,) = self._exchange(GENL_ID_CTRL, NLM_F_REQUEST, body)
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                raise WireGuardMissingError(errno.ENOENT, "the kernel has no WireGuard (module not loaded)") from None
            raise
        parsed = ctrlmsg(NLMSG_HEADER.pack(NLMSG_HEADER.size + len(reply), 0, 0, 0, 0) + reply)
        parsed.decode()
        return int(parsed.get_attr("CTRL_ATTR_FAMILY_ID"))

    def request(self, payload: bytes) -> None:
        """One request the kernel acknowledges; NetlinkError with its errno when it refuses."""
        self._call(NLM_F_REQUEST | NLM_F_ACK, payload)

    def dump(self, payload: bytes) -> list[bytes]:
        """The payloads of a dump's messages, read again while the kernel marks it interrupted."""
        for _ in range(DUMP_RETRIES):
            try:
                return self._call(NLM_F_REQUEST | NLM_F_DUMP, payload)
            except _InterruptedError:
                continue
        raise NetlinkError(errno.EINTR, "the device kept changing during the dump")

    def _call(self, flags: int, payload: bytes) -> list[bytes]:
        try:
            self._open()
            return self._exchange(self._family, flags, payload)
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.EBADF):  # the family went away (a module reload): resolve again
                self.close()
            raise
        except OSError:
            self.close()
            raise

    def _exchange(self, kind: int, flags: int, payload: bytes) -> list[bytes]:
        if self._sock is None:
            raise OSError(errno.EBADF, "socket closed")
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        self._sock.send(NLMSG_HEADER.pack(NLMSG_HEADER.size + len(payload), kind, flags, seq, 0) + payload)
        replies: list[bytes] = []
        interrupted = False
        buf, view = self._buf, memoryview(self._buf)
        while True:
            size = self._sock.recv_into(buf, len(buf), socket.MSG_TRUNC)
            if size > len(buf):
                raise NetlinkError(errno.EMSGSIZE, f"netlink reply of {size} bytes truncated")
            data = bytes(view[:size])
            offset = 0
            while offset + NLMSG_HEADER.size <= size:
                length, msg_type, msg_flags, msg_seq, _ = NLMSG_HEADER.unpack_from(data, offset)
                if length < NLMSG_HEADER.size:
                    raise NetlinkError(errno.EBADMSG, "malformed netlink reply")
                start, end = offset + NLMSG_HEADER.size, offset + length
                offset += (length + 3) & ~3
                if msg_seq != seq:
                    continue  # left over from an earlier request
                if msg_type == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, start)
                    if code:
                        raise NetlinkError(-code, _ext_ack(data, start, end) or _strerror(-code))
                    return replies  # the ACK
                if msg_type == NLMSG_DONE:
                    (code,) = struct.unpack_from("=i", data, start) if end - start >= 4 else (0,)
                    if code < 0:
                        raise NetlinkError(-code, _strerror(-code))
                    if interrupted:
                        raise _InterruptedError
                    return replies
                interrupted = interrupted or bool(msg_flags & NLM_F_DUMP_INTR)
                replies.append(data[start:end])
                if not flags & NLM_F_DUMP and not flags & NLM_F_ACK:
                    return replies  # a plain request: its one answer


class _InterruptedError(Exception):
    pass


def _strerror(code: int) -> str:
    return os.strerror(code)


def _ext_ack(data: bytes, start: int, end: int) -> str:
    """The kernel's extended ACK message, if it sent one (after the error code and the request's header)."""
    for kind, s, e in _attrs(data, start + 4 + NLMSG_HEADER.size, end):
        if kind == NLMSGERR_ATTR_MSG:
            return data[s:e].rstrip(b"\0").decode(errors="replace")
    return ""
