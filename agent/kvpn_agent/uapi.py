"""A client of WireGuard's cross-platform UAPI: the text protocol `wg` speaks to wireguard-go's socket."""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

from kvpn_agent.linux import SOCKET_DIR
from kvpn_agent.observed import ObservedDevice, ObservedPeer
from kvpn_agent.wire import DeviceConfig, PeerConfig, sort_networks
from kvpn_core.keys import KEY_BYTES, decode_key

_ZERO_KEY = "0" * (2 * KEY_BYTES)
_CHUNK = 1 << 16


class UapiError(Exception):
    """The device refused an operation (``errno``) or the socket failed; never carries key material."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


def key_to_hex(key: str) -> str:
    return decode_key(key).hex()


def key_from_hex(value: str) -> str:
    return base64.b64encode(bytes.fromhex(value)).decode()


def render_set(device: DeviceConfig | None, peers: Iterable[PeerConfig]) -> str:
    """The body of one ``set=1`` transaction (without the trailing blank line)."""
    lines = ["set=1"]
    if device is not None:
        if device.private_key is not None:
            lines.append(f"private_key={key_to_hex(device.private_key) if device.private_key else _ZERO_KEY}")
        if device.listen_port is not None:
            lines.append(f"listen_port={device.listen_port}")
        if device.fwmark is not None:
            lines.append(f"fwmark={device.fwmark}")
        if device.replace_peers:
            lines.append("replace_peers=true")
    for peer in peers:
        lines.append(f"public_key={key_to_hex(peer.public_key)}")
        if peer.remove:
            lines.append("remove=true")
            continue
        if peer.update_only:
            lines.append("update_only=true")
        if peer.preshared_key is not None:
            psk = key_to_hex(peer.preshared_key) if peer.preshared_key else _ZERO_KEY
            lines.append(f"preshared_key={psk}")
        if peer.endpoint is not None:
            lines.append(f"endpoint={peer.endpoint}")
        if peer.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        if peer.replace_allowed_ips:
            lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={ip}" for ip in peer.allowed_ips)
    return "\n".join(lines) + "\n"


class _PeerReader:
    """Collects one peer's lines; the reply lists a peer's keys after its public_key line."""

    __slots__ = ("allowed", "fields", "public_key")

    def __init__(self, public_key: str) -> None:
        self.public_key = public_key
        self.allowed: list[str] = []
        self.fields: dict[str, str] = {}

    def build(self) -> ObservedPeer:
        f = self.fields
        psk = f.get("preshared_key", _ZERO_KEY)
        seconds = int(f.get("last_handshake_time_sec", "0"))
        return ObservedPeer(
            public_key=self.public_key,
            preshared_key=None if psk == _ZERO_KEY else key_from_hex(psk),
            endpoint=f.get("endpoint"),
            allowed_ips=sort_networks(self.allowed),
            persistent_keepalive=int(f.get("persistent_keepalive_interval", "0")),
            last_handshake=seconds + int(f.get("last_handshake_time_nsec", "0")) / 1e9 if seconds else None,
            rx_bytes=int(f.get("rx_bytes", "0")),
            tx_bytes=int(f.get("tx_bytes", "0")),
        )


def parse_get(text: str) -> ObservedDevice:
    """Parses the reply to ``get=1`` (everything before ``errno=``) into the observed device.

    Keys this client does not know (protocol_version, later additions) are kept and ignored.
    """
    device: dict[str, str] = {}
    peers: dict[str, ObservedPeer] = {}
    current: _PeerReader | None = None
    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(f"malformed UAPI line {key[:40]!r}")
        if key == "public_key":
            if current is not None:
                peers[current.public_key] = current.build()
            current = _PeerReader(key_from_hex(value))
        elif current is None:
            device[key] = value
        elif key == "allowed_ip":
            current.allowed.append(value)
        else:
            current.fields[key] = value
    if current is not None:
        peers[current.public_key] = current.build()
    private_key = device.get("private_key")
    return ObservedDevice(
        private_key=key_from_hex(private_key) if private_key and private_key != _ZERO_KEY else None,
        listen_port=int(device.get("listen_port", "0")),
        fwmark=int(device.get("fwmark", "0")),
        peers=peers,
    )


class UapiClient:
    """Talks to one interface's socket, one connection per operation as `wg` does.

    wireguard-go would serve several operations on one connection, but after a failed ``set`` it
    reads the rest of that transaction as garbage and hangs up; a fresh connection costs ~20 µs.
    """

    def __init__(self, interface: str, socket_dir: Path = SOCKET_DIR, timeout: float = 10.0) -> None:
        self.interface = interface
        self.path = socket_dir / f"{interface}.sock"
        self.timeout = timeout

    def exists(self) -> bool:
        return self.path.is_socket()

    def get(self) -> ObservedDevice:
        body = self._call("get=1\n\n")
        return parse_get(body)

    def set(self, device: DeviceConfig | None = None, peers: Sequence[PeerConfig] = ()) -> None:
        """Applies device settings and peer changes in one transaction (one lock on the device)."""
        self._call(render_set(device, peers) + "\n")

    def _call(self, request: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
                sock.sendall(request.encode())
                reply = _read_reply(sock)
            except OSError as exc:
                raise UapiError(f"UAPI socket {self.path}: {exc.strerror or exc}", exc.errno or 0) from None
        body, _, status = reply.rpartition("errno=")
        errno = abs(int(status.strip() or "0"))  # wireguard-go answers -22 where the kernel's tools say 22
        if errno:
            op = request.split("\n", 1)[0]
            raise UapiError(f"UAPI {op} on {self.interface} failed with errno {errno} ({os.strerror(errno)})", errno)
        return body


def _read_reply(sock: socket.socket) -> str:
    """Reads up to the blank line that ends every reply (``errno=N\\n\\n``); no blank line comes earlier."""
    chunks: list[bytes] = []
    last = b""
    while True:
        chunk = sock.recv(_CHUNK)
        if not chunk:
            raise ConnectionResetError(0, "connection closed before the end of the reply")
        chunks.append(chunk)
        last = (last + chunk)[-2:]
        if last == b"\n\n":
            return b"".join(chunks).decode()
