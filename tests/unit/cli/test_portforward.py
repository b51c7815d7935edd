"""The port-forward websocket client against a loopback server that speaks the API server's side of it
(a stand-in for kube-apiserver's upgrade and framing only; the e2e tier runs the real one)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
from collections.abc import Awaitable, Callable

import pytest
from kubernetes.client import Configuration

from kvpn_cli.portforward import SUBPROTOCOL, PortForward, PortForwardError, Target, mask

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PORT = 51900


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A server's frame: unmasked."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        return struct.pack(">BB", first, size) + payload
    if size < 1 << 16:
        return struct.pack(">BBH", first, 126, size) + payload
    return struct.pack(">BBQ", first, 127, size) + payload


async def read_client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(2)
    assert head[1] & 0x80, "a client frame must be masked"
    size = head[1] & 0x7F
    if size == 126:
        (size,) = struct.unpack(">H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack(">Q", await reader.readexactly(8))
    key = await reader.readexactly(4)
    return head[0] & 0x0F, mask(key, await reader.readexactly(size))


Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def with_server(session: Session, status: int = 101, body: bytes = b"") -> tuple[asyncio.Server, Configuration]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        assert f"/pods/relay-0/portforward?ports={PORT}" in head.splitlines()[0]
        assert f"Sec-WebSocket-Protocol: {SUBPROTOCOL}" in head
        assert "Authorization: Bearer t0ken" in head
        if status != 101:
            writer.write(f"HTTP/1.1 {status} No\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            writer.close()
            return
        key = next(line.split(": ", 1)[1] for line in head.split("\r\n") if line.startswith("Sec-WebSocket-Key"))
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()  # noqa: S324
        writer.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
            ).encode()
        )
        # The port number first, on each channel, as kubelet sends it.
        writer.write(server_frame(0x2, b"\0" + struct.pack("<H", PORT)))
        writer.write(server_frame(0x2, b"\1" + struct.pack("<H", PORT)))
        await session(reader, writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    config = Configuration()
    config.host = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    return server, config


def open_stream(config: Configuration) -> Awaitable[PortForward]:
    return PortForward.open(config, {"Authorization": "Bearer t0ken"}, Target("kvpn-relay", "relay-0", PORT), 5)


def test_data_goes_both_ways_whole_through_fragments_pings_and_64_bit_lengths() -> None:
    big = bytes(range(256)) * 1024  # 256 KiB: a 64-bit length each way

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opcode, message = await read_client_frame(reader)
        assert (opcode, message[:1]) == (0x2, b"\0")
        writer.write(server_frame(0x9, b"are you there"))
        # The answer in two fragments, a ping between them.
        half = len(message) // 2
        writer.write(server_frame(0x2, message[:half], fin=False))
        writer.write(server_frame(0x0, message[half:]))
        opcode, pong = await read_client_frame(reader)
        assert (opcode, pong) == (0xA, b"are you there")
        await asyncio.sleep(0.1)

    async def run() -> bytes:
        server, config = await with_server(echo)
        async with server:
            stream = await open_stream(config)
            stream.send(big)
            got = await stream.recv()
            stream.close()
            return got

    assert asyncio.run(asyncio.wait_for(run(), 10)) == big


def test_the_error_channel_ends_the_stream_with_kubelets_words() -> None:
    async def refuse(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(server_frame(0x2, b"\1dial tcp4 127.0.0.1:10248: connect: connection refused"))
        await asyncio.sleep(0.1)

    async def run() -> str:
        server, config = await with_server(refuse)
        async with server:
            stream = await open_stream(config)
            with pytest.raises(PortForwardError) as raised:
                await stream.recv()
            stream.close()
            return str(raised.value)

    assert "connection refused" in asyncio.run(asyncio.wait_for(run(), 10))


def test_a_refused_upgrade_says_the_api_servers_reason_and_status() -> None:
    status = {"kind": "Status", "message": 'pods "relay-0" is forbidden: cannot create resource "pods/portforward"'}

    async def never(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        raise AssertionError("not upgraded")

    async def run() -> PortForwardError:
        server, config = await with_server(never, status=403, body=json.dumps(status).encode())
        async with server:
            with pytest.raises(PortForwardError) as raised:
                await open_stream(config)
            return raised.value

    error = asyncio.run(asyncio.wait_for(run(), 10))
    assert error.status == 403
    assert str(error) == status["message"]


def test_a_stream_cut_short_is_an_error_not_a_hang() -> None:
    async def cut(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(server_frame(0x2, b"\0half")[:4])

    async def run() -> None:
        server, config = await with_server(cut)
        async with server:
            stream = await open_stream(config)
            with pytest.raises(PortForwardError, match="broke"):
                await stream.recv()

    asyncio.run(asyncio.wait_for(run(), 10))


def test_masking_is_its_own_inverse_for_any_length() -> None:
    key = b"\x01\x80\xff\x10"
    for size in (0, 1, 3, 4, 5, 1000):
        data = bytes(i % 251 for i in range(size))
        assert mask(key, mask(key, data)) == data
        if size:
            assert mask(key, data)[0] == data[0] ^ key[0]
