"""The byte stream between `kubectl vpn up --via api` and the in-cluster relay, carried by a port-forward.

A stream is a run of frames: a 2-byte big-endian length, then that many bytes (1 to MAX_PAYLOAD).
A frame's first byte says what it is:

- 1 to 4, then three zero bytes: one WireGuard message (initiation, response, cookie reply, data), of
  the size its type has. The relay hands it to a gateway's WireGuard port, or the laptop's relay to its
  wg interface; neither can read it.
- 0: a control message, the rest UTF-8 JSON. The laptop's first frame is its Hello; the relay answers
  with a Welcome (one with an error when it refuses the stream, and closes), sends a Welcome again when
  it moves the stream to another gateway, and one with an error when it ends a stream, saying why.
  The laptop sends a Ping every PING_SECONDS; the relay answers each with a Pong of the same number.

Anything else (another first byte, a WireGuard message of the wrong size, a length of 0 or above
MAX_PAYLOAD, a control message that does not parse) is a FrameError: the stream is closed, and only it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

RELAY_PORT = 51900
"""The relay pods' TCP port, the one a port-forward reaches."""

RELAY_COMPONENT = "relay"
"""app.kubernetes.io/component of the relay pods: what `kubectl vpn up --via api` looks for."""

MAX_PAYLOAD = 4096
"""The largest frame: a WireGuard message of an interface MTU up to 4000 bytes, or a control message."""

HELLO_SECONDS = 10.0
"""How long the relay waits for a new stream's Hello."""

PING_SECONDS = 2.0
"""How often the laptop asks the relay whether its stream still carries: a stream through a node that
lost its network breaks no connection the laptop can see, it only goes silent."""

DEAD_SECONDS = 3 * PING_SECONDS
"""A stream that brought nothing back for this long, pongs included, is given up and opened again."""

IDLE_SECONDS = 120.0
"""A stream with nothing from the laptop for this long is closed (WireGuard's keepalive is 25 s)."""

PROTOCOL = 1

CONTROL = 0
_LENGTH = struct.Struct(">H")

# WireGuard's messages: type -> exact size (None: data, 32 bytes at least: a 16-byte header and a 16-byte
# tag around the packet, which is padded to a multiple of 16 but never beyond the interface's MTU, so a
# full-sized packet through an MTU such as 1420 makes a data message of any length).
_WIREGUARD_SIZES: dict[int, int | None] = {1: 148, 2: 92, 3: 64, 4: None}


class FrameError(ValueError):
    """The stream broke the framing; the message says how (never any of the frame's bytes)."""


def is_wireguard(payload: bytes) -> bool:
    """Whether ``payload`` has the shape of a WireGuard message (type, reserved zeros, size)."""
    if len(payload) < 4 or payload[1:4] != b"\0\0\0" or payload[0] not in _WIREGUARD_SIZES:
        return False
    size = _WIREGUARD_SIZES[payload[0]]
    if size is not None:
        return len(payload) == size
    return len(payload) >= 32


def frame(payload: bytes) -> bytes:
    if not 0 < len(payload) <= MAX_PAYLOAD:
        raise FrameError(f"a frame holds 1 to {MAX_PAYLOAD} bytes, not {len(payload)}")
    return _LENGTH.pack(len(payload)) + payload


def frames(payloads: list[bytes]) -> bytes:
    """Several frames in one buffer: what one write (or one websocket message) carries."""
    return b"".join(frame(p) for p in payloads)


def control(message: dict[str, Any]) -> bytes:
    """A control frame, ready to send."""
    return frame(bytes([CONTROL]) + json.dumps(message, separators=(",", ":")).encode())


def read_control(payload: bytes) -> dict[str, Any]:
    """The JSON object of a control frame's payload."""
    try:
        message = json.loads(payload[1:].decode())
    except (UnicodeDecodeError, ValueError):
        raise FrameError("a control frame that is not JSON") from None
    if not isinstance(message, dict):
        raise FrameError("a control frame that is not a JSON object")
    return message


class FrameReader:
    """Frames out of a byte stream, fed as it arrives in pieces of any size."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The complete frames' payloads so far; raises FrameError on a length out of bounds or a
        payload that is neither a WireGuard message nor a control message."""
        self._buffer += data
        found: list[bytes] = []
        offset, end = 0, len(self._buffer)
        while end - offset >= 2:
            (length,) = _LENGTH.unpack_from(self._buffer, offset)
            if not 0 < length <= MAX_PAYLOAD:
                raise FrameError(f"a frame of {length} bytes (1 to {MAX_PAYLOAD} allowed)")
            if end - offset - 2 < length:
                break
            payload = bytes(self._buffer[offset + 2 : offset + 2 + length])
            if payload[0] != CONTROL and not is_wireguard(payload):
                raise FrameError(f"a {length}-byte frame that is not a WireGuard message")
            found.append(payload)
            offset += 2 + length
        del self._buffer[:offset]
        return found

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buffer)


@dataclass(frozen=True)
class Hello:
    """The laptop's first frame: the VpnServer its tunnel goes to, and the gateway it used last (kept
    when still healthy, so a new stream needs no new WireGuard session)."""

    server: str
    """NAMESPACE/NAME."""

    public_key: str = ""
    """The peer's public key: the same laptop gets the same gateway from every relay pod."""

    gateway: str = ""

    def encode(self) -> bytes:
        return control({"v": PROTOCOL, "hello": self.server, "key": self.public_key, "gateway": self.gateway})

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        if payload[:1] != bytes([CONTROL]):
            raise FrameError("the first frame must be a Hello")
        message = read_control(payload)
        server, key, gateway = message.get("hello"), message.get("key", ""), message.get("gateway", "")
        if message.get("v") != PROTOCOL:
            raise FrameError(f"protocol version {message.get('v')!r}; this relay speaks {PROTOCOL}")
        if not isinstance(server, str) or server.count("/") != 1 or not all(server.split("/")):
            raise FrameError("a Hello must name the server as NAMESPACE/NAME")
        if not isinstance(key, str) or not isinstance(gateway, str):
            raise FrameError("a Hello's key and gateway are strings")
        return cls(server, key, gateway)


@dataclass(frozen=True)
class Welcome:
    """The relay's answer: the stream is open, to this gateway node (again after a move), or refused."""

    gateway: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def encode(self) -> bytes:
        if self.error:
            return control({"v": PROTOCOL, "error": self.error})
        return control({"v": PROTOCOL, "gateway": self.gateway})

    @classmethod
    def decode(cls, payload: bytes) -> Welcome:
        if payload[:1] != bytes([CONTROL]):
            raise FrameError("the relay's first frame must be a Welcome")
        message = read_control(payload)
        error, gateway = message.get("error", ""), message.get("gateway", "")
        if not isinstance(error, str) or not isinstance(gateway, str) or not (error or gateway):
            raise FrameError("a Welcome names a gateway or an error")
        return cls(gateway=gateway, error=error)


def ping(number: int) -> bytes:
    """The laptop's question whether the stream still carries; the relay answers pong(number)."""
    return control({"v": PROTOCOL, "ping": number})


def pong(number: int) -> bytes:
    return control({"v": PROTOCOL, "pong": number})


def ping_number(message: dict[str, Any], key: str) -> int | None:
    """The number of a Ping (key "ping") or a Pong ("pong") control message; None for another message."""
    number = message.get(key)
    return number if isinstance(number, int) and not isinstance(number, bool) else None
