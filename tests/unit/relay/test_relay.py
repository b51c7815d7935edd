"""The relay over real loopback sockets: laptops' streams in, a stand-in gateway's UDP port out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from kvpn_core.relaywire import FrameReader, Hello, Welcome, frames, ping, pong
from kvpn_relay.gateways import Address, ServerGateways
from kvpn_relay.relay import Relay, Settings

INITIATION = b"\x01\0\0\0" + bytes(144)
RESPONSE = b"\x02\0\0\0" + bytes(88)
COOKIE = b"\x03\0\0\0" + bytes(60)
KEEPALIVE = b"\x04\0\0\0" + bytes(28)


def data_message(n: int) -> bytes:
    """A 1440-byte data message whose bytes say which it is (n < 2**16)."""
    return b"\x04\0\0\0" + n.to_bytes(2, "big") + bytes(1434)


SERVER = "team/office"


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    """Runs a scenario in an event loop of its own, bounded well within pytest's timeout."""

    async def bounded() -> None:
        async with asyncio.timeout(4):
            await scenario()

    asyncio.run(bounded())


@dataclass
class FakeGateways:
    """What the relay reads of the cluster, set by the test (replaced whole, as Gateways replaces it)."""

    snapshot: Mapping[str, ServerGateways] = field(default_factory=dict)
    listed: bool = True


class Gateway:
    """A stand-in for one gateway node's WireGuard port: a UDP socket on a loopback address."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((address, port))
        self.port: int = self.sock.getsockname()[1]

    async def recv(self) -> tuple[bytes, Address]:
        data, source = await asyncio.get_running_loop().sock_recvfrom(self.sock, 65535)
        return data, (source[0], source[1])

    def send(self, data: bytes, to: Address) -> None:
        self.sock.sendto(data, to)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def gateways_of(listen_port: int, ready: dict[str, str], standing_by: dict[str, str] | None = None) -> ServerGateways:
    """A server's gateways: `ready` and `standing_by` (listed, not ready), node -> address."""
    every = {**ready, **(standing_by or {})}
    return ServerGateways(
        listen_port, tuple(sorted(ready.items())), frozenset((address, listen_port) for address in every.values())
    )


class Laptop:
    """`kubectl vpn up --via api` as far as the relay can tell: a TCP stream of frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames = FrameReader()
        self.received: list[bytes] = []

    @classmethod
    async def connect(cls, port: int) -> Laptop:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, *payloads: bytes) -> None:
        self.writer.write(frames(list(payloads)))

    def hello(self, server: str = SERVER, key: str = "laptop-key", gateway: str = "") -> None:
        self.writer.write(Hello(server, key, gateway).encode())

    async def next(self) -> bytes:
        """The next frame's payload (raises EOFError when the relay closes first)."""
        while not self.received:
            data = await self.reader.read(65536)
            if not data:
                raise EOFError
            self.received += self.frames.feed(data)
        return self.received.pop(0)

    async def welcome(self) -> Welcome:
        return Welcome.decode(await self.next())

    async def closed(self) -> list[bytes]:
        """Every frame until the relay closes the stream."""
        got = []
        with contextlib.suppress(EOFError, ConnectionResetError):
            while True:
                got.append(await self.next())
        return got

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def relay_of(gateways: FakeGateways, **settings: Any) -> AsyncIterator[tuple[Relay, int]]:
    relay = Relay(gateways, Settings(**settings))
    port = await relay.start("127.0.0.1", 0)
    try:
        yield relay, port
    finally:
        await relay.close()


@contextlib.asynccontextmanager
async def laptops(port: int, count: int = 1) -> AsyncIterator[list[Laptop]]:
    connected = [await Laptop.connect(port) for _ in range(count)]
    try:
        yield connected
    finally:
        for laptop in connected:
            laptop.close()


@contextlib.contextmanager
def gateway_sockets(*addresses: str) -> Iterator[list[Gateway]]:
    """One stand-in gateway per address, all on the port of the first (a server has one listen port)."""
    first = Gateway(addresses[0])
    made = [first]
    try:
        made += [Gateway(address, first.port) for address in addresses[1:]]
        yield made
    finally:
        for gateway in made:
            gateway.close()


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_a_laptops_datagram_reaches_its_gateway_and_the_answer_comes_back_framed(address: str) -> None:
    async def scenario() -> None:
        with gateway_sockets(address) as (gateway,):
            fake = FakeGateways({SERVER: gateways_of(gateway.port, {"node-a": address})})
            async with relay_of(fake) as (relay, port), laptops(port) as (laptop,):
                laptop.hello()
                assert await laptop.welcome() == Welcome(gateway="node-a")
                laptop.send(INITIATION)
                data, relay_address = await gateway.recv()
                assert data == INITIATION
                gateway.send(RESPONSE, relay_address)
                assert await laptop.next() == RESPONSE
                assert (relay.counters.streams, relay.counters.frames_up, relay.counters.frames_down) == (1, 1, 1)

    run(scenario)


def test_only_the_servers_gateways_and_only_wireguard_messages_are_heard() -> None:
    async def scenario() -> None:
        # node-b is listed but not ready: one taking over starts its handshake before it reports ready.
        with gateway_sockets("127.0.0.1", "127.0.0.2") as (gateway, standby), Gateway("127.0.0.1") as stranger:
            fake = FakeGateways({SERVER: gateways_of(gateway.port, {"node-a": "127.0.0.1"}, {"node-b": "127.0.0.2"})})
            async with relay_of(fake) as (relay, port), laptops(port) as (laptop,):
                laptop.hello()
                await laptop.welcome()
                laptop.send(INITIATION)
                _, relay_address = await gateway.recv()
                stranger.send(RESPONSE, relay_address)  # WireGuard-shaped, but from no gateway of the server
                gateway.send(b"not WireGuard", relay_address)
                gateway.send(RESPONSE[:-1], relay_address)
                standby.send(COOKIE, relay_address)
                gateway.send(RESPONSE, relay_address)
                assert [await laptop.next(), await laptop.next()] == [COOKIE, RESPONSE]
                assert relay.counters.dropped == 3

    run(scenario)


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (b"\0\x10" + b"GET / HTTP/1.1\r\n", "a 16-byte frame that is not a WireGuard message"),
        (b"\xff\xff", "a frame of 65535 bytes (1 to 4096 allowed)"),
        (b"\0\0", "a frame of 0 bytes (1 to 4096 allowed)"),
        (frames([INITIATION[:-4]]), "a 144-byte frame that is not a WireGuard message"),
    ],
    ids=["garbage", "oversized", "empty", "wrong size"],
)
def test_a_stream_that_breaks_the_framing_is_closed_and_the_others_go_on(
    broken: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        with gateway_sockets("127.0.0.1") as (gateway,):
            fake = FakeGateways({SERVER: gateways_of(gateway.port, {"node-a": "127.0.0.1"})})
            async with relay_of(fake) as (relay, port), laptops(port, 2) as (bad, good):
                for laptop in (bad, good):
                    laptop.hello()
                    await laptop.welcome()
                bad.writer.write(broken)
                assert [Welcome.decode(p) for p in await bad.closed()] == [Welcome(error=reason)]
                good.send(INITIATION)
                data, relay_address = await gateway.recv()
                assert data == INITIATION
                gateway.send(RESPONSE, relay_address)
                assert await good.next() == RESPONSE
                assert len(relay.streams) == 1

    with caplog.at_level(logging.INFO, logger="kvpn_relay"):
        run(scenario)
    (line,) = [r for r in caplog.records if r.getMessage() == "stream closed" and r.reason == reason]  # type: ignore[attr-defined]
    assert line.peer.startswith("127.0.0.1:")  # type: ignore[attr-defined]
    assert line.server == SERVER  # type: ignore[attr-defined]
    assert "GET" not in str(vars(line))


def test_a_first_frame_that_is_not_a_hello_closes_the_stream() -> None:
    async def scenario() -> None:
        async with relay_of(FakeGateways()) as (_, port), laptops(port) as (laptop,):
            laptop.send(KEEPALIVE)
            assert [Welcome.decode(p) for p in await laptop.closed()] == [
                Welcome(error="the first frame must be a Hello")
            ]

    run(scenario)


def test_a_stream_without_a_hello_in_time_is_closed() -> None:
    async def scenario() -> None:
        async with relay_of(FakeGateways(), hello_seconds=0.2) as (relay, port), laptops(port) as (laptop,):
            started = asyncio.get_running_loop().time()
            assert [Welcome.decode(p) for p in await laptop.closed()] == [Welcome(error="no Hello within 0.2 s")]
            assert 0.15 < asyncio.get_running_loop().time() - started < 1.5
            assert not relay.streams

    run(scenario)


def test_a_silent_laptop_is_closed_and_one_that_keeps_sending_is_not() -> None:
    async def scenario() -> None:
        with gateway_sockets("127.0.0.1") as (gateway,):
            fake = FakeGateways({SERVER: gateways_of(gateway.port, {"node-a": "127.0.0.1"})})
            async with relay_of(fake, idle_seconds=0.3) as (_, port), laptops(port, 2) as (silent, talking):
                for laptop in (silent, talking):
                    laptop.hello()
                    await laptop.welcome()
                for _ in range(6):
                    talking.send(KEEPALIVE)
                    await asyncio.sleep(0.1)
                assert [Welcome.decode(p) for p in await silent.closed()] == [
                    Welcome(error="nothing from the laptop for 0.3 s")
                ]
                talking.send(INITIATION)
                while (await gateway.recv())[0] != INITIATION:
                    pass

    run(scenario)


@pytest.mark.parametrize(
    ("fake", "error"),
    [
        (FakeGateways({}), "no VpnServer team/office"),
        (
            FakeGateways({SERVER: gateways_of(51820, {}, {"node-a": "127.0.0.1"})}),
            "VpnServer team/office has no ready gateway",
        ),
        (FakeGateways({}, listed=False), "this relay has not listed the VpnServers yet; try again in a moment"),
    ],
    ids=["unknown server", "no ready gateway", "not listed yet"],
)
def test_a_stream_the_relay_cannot_carry_is_refused_with_the_reason(fake: FakeGateways, error: str) -> None:
    async def scenario() -> None:
        async with relay_of(fake) as (relay, port), laptops(port) as (laptop,):
            laptop.hello()
            assert [Welcome.decode(p) for p in await laptop.closed()] == [Welcome(error=error)]
            assert (relay.counters.refused, relay.counters.streams, len(relay.streams)) == (1, 0, 0)

    run(scenario)


def test_a_long_server_name_is_refused_in_a_frame_that_fits() -> None:
    async def scenario() -> None:
        async with relay_of(FakeGateways()) as (relay, port), laptops(port) as (laptop,):
            laptop.hello(server="team/" + "\u00e9" * 600)
            (refusal,) = await laptop.closed()
            assert Welcome.decode(refusal).error.startswith("no VpnServer team/\u00e9\u00e9")
            assert not relay.streams

    run(scenario)


def test_the_preferred_gateway_is_kept_and_a_stream_moves_when_its_gateway_is_no_longer_ready() -> None:
    async def scenario() -> None:
        with gateway_sockets("127.0.0.1", "127.0.0.2") as (a, b):
            both = {"node-a": "127.0.0.1", "node-b": "127.0.0.2"}
            fake = FakeGateways({SERVER: gateways_of(a.port, both)})
            async with relay_of(fake, poll_seconds=0.05) as (relay, port), laptops(port) as (laptop,):
                laptop.hello(gateway="node-a")
                assert await laptop.welcome() == Welcome(gateway="node-a")
                # None ready: the stream stays, its datagrams still go to node-a.
                fake.snapshot = {SERVER: gateways_of(a.port, {}, both)}
                await asyncio.sleep(0.2)
                laptop.send(INITIATION)
                assert (await a.recv())[0] == INITIATION
                # node-b ready again: the stream moves there, and says so.
                fake.snapshot = {SERVER: gateways_of(a.port, {"node-b": "127.0.0.2"}, both)}
                assert await laptop.welcome() == Welcome(gateway="node-b")
                laptop.send(INITIATION)
                data, relay_address = await b.recv()
                assert data == INITIATION
                # node-a, listed still, may finish what it had in flight.
                a.send(RESPONSE, relay_address)
                assert await laptop.next() == RESPONSE
                # node-a ready again: the stream stays on node-b, where its session now lives.
                fake.snapshot = {SERVER: gateways_of(a.port, both)}
                await asyncio.sleep(0.2)
                assert relay.counters.moves == 1
                assert not laptop.received

    run(scenario)


def test_datagrams_that_queue_together_go_to_the_laptop_in_one_write() -> None:
    async def scenario() -> None:
        with gateway_sockets("127.0.0.1") as (gateway,):
            fake = FakeGateways({SERVER: gateways_of(gateway.port, {"node-a": "127.0.0.1"})})
            async with relay_of(fake) as (relay, port), laptops(port) as (laptop,):
                laptop.hello()
                await laptop.welcome()
                laptop.send(INITIATION)
                _, relay_address = await gateway.recv()
                # No await in between: all five are queued on the relay's socket when it next reads.
                for n in range(5):
                    gateway.send(data_message(n), relay_address)
                assert [await laptop.next() for _ in range(5)] == [data_message(n) for n in range(5)]
                assert (relay.counters.frames_down, relay.counters.writes_down) == (5, 1)

    run(scenario)


def test_a_laptop_that_does_not_read_has_its_datagrams_dropped_not_queued() -> None:
    high_water = 64 << 10
    sent = 6000
    """8.6 MB: more than the kernel's buffers on both ends of the stream hold (4 MiB at most for the
    relay's, and the laptop's is held at its minimum), so the relay's own buffer fills."""

    async def scenario() -> None:
        with gateway_sockets("127.0.0.1") as (gateway,):
            fake = FakeGateways({SERVER: gateways_of(gateway.port, {"node-a": "127.0.0.1"})})
            async with relay_of(fake, write_high_water=high_water) as (relay, port):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", port))
                laptop = Laptop(*await asyncio.open_connection(sock=sock))
                try:
                    laptop.hello()
                    await laptop.welcome()
                    laptop.send(INITIATION)
                    _, relay_address = await gateway.recv()
                    most = 0
                    for n in range(sent):
                        gateway.send(data_message(n), relay_address)
                        if n % 50 == 49:
                            await asyncio.sleep(0)  # the relay reads; the laptop does not
                            most = max(most, relay.totals()["queued_bytes"])
                    assert relay.counters.dropped > 0
                    assert 0 < most <= high_water
                    # What was kept arrives whole and in order.
                    kept = relay.counters.frames_down
                    numbers = [int.from_bytes((await laptop.next())[4:6], "big") for _ in range(kept)]
                    assert numbers == sorted(numbers)
                    assert len(numbers) == kept < sent
                finally:
                    laptop.close()

    run(scenario)


def test_connections_beyond_max_streams_are_refused_at_once() -> None:
    async def scenario() -> None:
        async with relay_of(FakeGateways(), max_streams=1) as (relay, port), laptops(port) as (first,):
            async with laptops(port) as (second,):
                error = "this relay carries its maximum of 1 streams"
                assert [Welcome.decode(p) for p in await second.closed()] == [Welcome(error=error)]
            first.close()
            await asyncio.sleep(0.05)
            async with laptops(port) as (third,):
                await asyncio.sleep(0.05)
                assert len(relay.streams) == 1
                third.hello()
                assert not (await third.welcome()).ok  # carried this far: refused for its server, not for room

    run(scenario)


def test_stopping_the_relay_ends_every_stream_with_the_reason() -> None:
    async def scenario() -> None:
        with gateway_sockets("127.0.0.1") as (gateway,):
            fake = FakeGateways({SERVER: gateways_of(gateway.port, {"node-a": "127.0.0.1"})})
            relay = Relay(fake, Settings())
            port = await relay.start("127.0.0.1", 0)
            async with laptops(port, 2) as both:
                for laptop in both:
                    laptop.hello()
                    await laptop.welcome()
                await relay.close()
                for laptop in both:
                    assert [Welcome.decode(p) for p in await laptop.closed()] == [
                        Welcome(error="the relay is stopping")
                    ]
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection("127.0.0.1", port)

    run(scenario)


def test_a_ping_after_the_hello_gets_a_pong_of_the_same_number() -> None:
    async def scenario() -> None:
        with gateway_sockets("127.0.0.1") as (gateway,):
            fake = FakeGateways({SERVER: gateways_of(gateway.port, {"node-a": "127.0.0.1"})})
            async with relay_of(fake) as (_relay, port), laptops(port) as (laptop,):
                laptop.hello()
                await laptop.welcome()
                laptop.writer.write(ping(7) + ping(8))
                assert [await laptop.next(), await laptop.next()] == [pong(7)[2:], pong(8)[2:]]

    run(scenario)
