"""A port-forward to one pod's TCP port through the API server: a websocket of our own (asyncio).

The API server upgrades GET .../pods/POD/portforward?ports=PORT to a websocket speaking
v4.channel.k8s.io: every message starts with its channel, 0 for the port's data and 1 for its errors,
and the first message on each channel is the port number (2 bytes, little endian). kubelet and the
container runtime join channel 0 to a TCP connection to PORT inside the pod's network namespace.

Why not `kubectl port-forward`: it exits on the first stream error. Why not the Python client's
`portforward`: it copies its receive buffer per frame, and downloads collapse. This client reads each
message once and masks what it sends with one integer XOR per message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import ssl
import struct
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from kubernetes.client import Configuration

SUBPROTOCOL = "v4.channel.k8s.io"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DATA, ERROR = 0, 1

_OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x2, 0x8, 0x9, 0xA
_MAX_MESSAGE = 16 << 20
"""A message larger than this from the API server is a broken stream, not something to buffer."""


class PortForwardError(Exception):
    """The port-forward could not be opened or ended; `status` is the HTTP status of a refused upgrade."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    namespace: str
    pod: str
    port: int


def ssl_context(config: Configuration) -> ssl.SSLContext | None:
    """TLS as the kubeconfig says: its CA, its client certificate, or no verification when it says so."""
    if not config.host.startswith("https:"):
        return None
    context = ssl.create_default_context(cafile=config.ssl_ca_cert or None)
    if config.cert_file:
        context.load_cert_chain(config.cert_file, config.key_file or None)
    if not config.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def mask(key: bytes, data: bytes) -> bytes:
    """RFC 6455 masking of a whole message at once: one XOR of two integers, not a loop per byte."""
    if not data:
        return data
    stream = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(len(data), "little")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked frame (a client must mask)."""
    key = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = struct.pack(">BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        header = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, size)
    return header + key + mask(key, payload)


def refusal(status: int, body: bytes) -> str:
    """The API server's reason for refusing the upgrade, from its Status object when it sent one."""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        message = json.loads(body.decode()).get("message")
        if message:
            return str(message)
    return body.decode(errors="replace").strip()[:300] or f"HTTP {status}"


class PortForward:
    """One open port-forward stream: `send` bytes to the pod's port, `recv` what it sends back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target) -> None:
        self.reader, self.writer, self.target = reader, writer, target
        self._port_seen: set[int] = set()
        self.closed = False

    @classmethod
    async def open(
        cls, config: Configuration, headers: dict[str, str], target: Target, seconds: float = 10.0
    ) -> PortForward:
        """Connects and upgrades; raises PortForwardError with the API server's reason (403: RBAC)."""
        url = urlsplit(config.host)
        tls = ssl_context(config)
        host = url.hostname or "localhost"
        port = url.port or (443 if tls else 80)
        path = (
            f"{url.path.rstrip('/')}/api/v1/namespaces/{quote(target.namespace)}/pods/{quote(target.pod)}"
            f"/portforward?ports={target.port}"
        )
        key = base64.b64encode(os.urandom(16)).decode()
        request = [
            f"GET {path} HTTP/1.1",
            f"Host: {url.netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Protocol: {SUBPROTOCOL}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        try:
            async with asyncio.timeout(seconds):
                server_name = getattr(config, "tls_server_name", None) or host
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=server_name if tls else None, limit=1 << 20
                )
                writer.write(("\r\n".join(request) + "\r\n\r\n").encode())
                head = await reader.readuntil(b"\r\n\r\n")
                status, answer = _parse_head(head)
                if status != 101:
                    length = int(answer.get("content-length", "0") or 0)
                    body = await reader.readexactly(min(length, 65536)) if length else b""
                    writer.close()
                    raise PortForwardError(refusal(status, body), status)
        except TimeoutError:
            raise PortForwardError(f"no answer from the API server at {config.host} in {seconds:.0f} s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise PortForwardError(f"API server at {config.host} unreachable: {exc}") from None
        accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324 - RFC 6455
        if answer.get("sec-websocket-accept") != accept:
            writer.close()
            raise PortForwardError("the API server's websocket answer does not match the request")
        if answer.get("sec-websocket-protocol") != SUBPROTOCOL:
            writer.close()
            raise PortForwardError(f"the API server does not speak {SUBPROTOCOL} for port-forward")
        return cls(reader, writer, target)

    def send(self, data: bytes) -> None:
        """Queues `data` for the pod's port, as one websocket message (never split, never copied twice)."""
        self.writer.write(client_frame(_OP_BINARY, bytes([DATA]) + data))

    @property
    def backlog(self) -> int:
        """Bytes written but not yet sent: what a sender that would rather drop than queue looks at."""
        transport = self.writer.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    async def drain(self) -> None:
        await self.writer.drain()

    async def recv(self) -> bytes:
        """The next bytes from the pod's port; raises PortForwardError when the stream ends (with the
        error channel's message when kubelet sent one)."""
        while True:
            opcode, message = await self._message()
            if opcode == _OP_CLOSE:
                self.closed = True
                code = struct.unpack(">H", message[:2])[0] if len(message) >= 2 else 1005
                raise PortForwardError(f"the API server closed the port-forward (code {code})")
            if not message:
                continue
            channel, data = message[0], message[1:]
            if channel not in self._port_seen:  # the port number, once per channel
                self._port_seen.add(channel)
                data = data[2:]
            if channel == ERROR and data:
                raise PortForwardError(data.decode(errors="replace").strip())
            if channel == DATA and data:
                return data

    async def _message(self) -> tuple[int, bytes]:
        """One whole message (continuations joined); pings answered on the way."""
        parts: list[bytes] = []
        first_opcode = None
        try:
            while True:
                head = await self.reader.readexactly(2)
                fin, opcode, size = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x7F
                if size == 126:
                    (size,) = struct.unpack(">H", await self.reader.readexactly(2))
                elif size == 127:
                    (size,) = struct.unpack(">Q", await self.reader.readexactly(8))
                if size > _MAX_MESSAGE:
                    raise PortForwardError(f"a {size}-byte websocket frame from the API server")
                key = await self.reader.readexactly(4) if head[1] & 0x80 else b""
                payload = await self.reader.readexactly(size)
                if key:
                    payload = mask(key, payload)
                if opcode == _OP_PING:
                    self.writer.write(client_frame(_OP_PONG, payload))
                    continue
                if opcode == _OP_PONG:
                    continue
                if opcode == _OP_CLOSE:
                    return opcode, payload
                if first_opcode is None:
                    first_opcode = opcode
                parts.append(payload)
                if fin:
                    return first_opcode, parts[0] if len(parts) == 1 else b"".join(parts)
        except (asyncio.IncompleteReadError, OSError) as exc:
            self.closed = True
            raise PortForwardError(f"the port-forward broke: {exc or type(exc).__name__}") from None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write(client_frame(_OP_CLOSE, struct.pack(">H", 1000)))
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode(errors="replace").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise PortForwardError(f"not an HTTP answer from the API server: {lines[0][:80]!r}") from None
    fields = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return status, fields
