"""The relay's TCP server: one stream per laptop's port-forward, each with a UDP socket of its own toward
one gateway's WireGuard port. It carries ciphertext both ways and reads none of it."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol, cast

from kvpn_core.relaywire import (
    CONTROL,
    HELLO_SECONDS,
    IDLE_SECONDS,
    MAX_PAYLOAD,
    FrameError,
    FrameReader,
    Hello,
    Welcome,
    frame,
    is_wireguard,
    ping_number,
    pong,
    read_control,
)
from kvpn_relay.gateways import ServerGateways

log = logging.getLogger(__name__)

WRITE_HIGH_WATER = 1 << 20
"""Bytes waiting to go to a laptop above which its gateway's datagrams are dropped, as a congested UDP
path drops them: queueing them would only delay the ones after (WireGuard's handshakes, and TCP inside
the tunnel, resend what is lost)."""

READ_BATCH = 64
"""Datagrams read from one stream's socket in one turn of the event loop, all written to the laptop in
one write; any more wait a turn, so that a busy stream cannot starve the others."""

CLOSE_GRACE_SECONDS = 5.0
"""How long a closing stream may take to deliver its last frames (the Welcome that says why) before
the connection is cut: a laptop that reads nothing must not keep it open."""

REASON_CHARS = 300
"""The most of a reason a closing stream's Welcome carries: JSON's escapes make it 1,800 bytes at most."""

TOTALS_SECONDS = 60.0
"""How often the counters are logged, when they changed."""


class GatewaySource(Protocol):
    """What the relay reads of the cluster (kvpn_relay.gateways.Gateways; a fixed snapshot in tests)."""

    @property
    def snapshot(self) -> Mapping[str, ServerGateways]: ...

    @property
    def listed(self) -> bool: ...


@dataclass(frozen=True)
class Settings:
    hello_seconds: float = HELLO_SECONDS
    idle_seconds: float = IDLE_SECONDS
    poll_seconds: float = 1.0
    """How often every stream checks that its gateway is still ready."""

    max_streams: int = 1024
    """Connections beyond this many are refused at once: each stream holds a socket and its buffers."""

    write_high_water: int = WRITE_HIGH_WATER


@dataclass
class Counters:
    """Totals since the relay started, for its log."""

    streams: int = 0
    """Streams welcomed."""

    refused: int = 0
    """Streams answered with an error: an unknown server, no ready gateway, the relay full."""

    moves: int = 0
    """Streams moved to another gateway."""

    frames_up: int = 0
    """Datagrams sent on from laptops to gateways."""

    frames_down: int = 0
    """Datagrams sent on from gateways to laptops."""

    writes_down: int = 0
    """Writes that carried them: fewer than frames_down when datagrams arrived together."""

    dropped: int = 0
    """Datagrams dropped: from anyone but a gateway, not WireGuard-shaped, or a stream (or socket) full."""


@dataclass
class _Route:
    """Where a welcomed stream's datagrams go, and whom they may come from."""

    sock: socket.socket
    version: int
    """The socket's IP version: a move goes only to a gateway of the same family."""

    servers: ServerGateways
    """Its server's gateways as last listed."""

    node: str
    address: str

    @property
    def target(self) -> tuple[str, int]:
        return (self.address, self.servers.listen_port)


def _udp_socket(version: int) -> socket.socket:
    """A stream's own socket: non-blocking, on a port of its own, so that each gateway sees each laptop
    as a peer endpoint of its own."""
    sock = socket.socket(socket.AF_INET6 if version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        # Any address: the gateways answer to wherever the pod network says this pod is.
        sock.bind(("::" if version == 6 else "0.0.0.0", 0))  # noqa: S104 - see the line above
    except OSError:
        sock.close()
        raise
    return sock


class Stream(asyncio.Protocol):
    """One laptop's TCP connection, and after its Hello the UDP socket toward its gateway.

    Every callback runs in the event loop and none blocks: the socket is non-blocking, and whatever
    does not fit (the socket's buffer, or WRITE_HIGH_WATER toward the laptop) is dropped, never queued.
    """

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._settings = relay.settings
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader()
        self._peer = "?"
        self._hello: Hello | None = None
        self._route: _Route | None = None
        self._heard = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._up = self._down = 0

    def _fields(self, **extra: Any) -> dict[str, Any]:
        """A log line's fields: which stream, never any of its bytes."""
        hello = self._hello
        fields = {"peer": self._peer, "server": hello.server if hello else "", "key": hello.public_key if hello else ""}
        return {**fields, **extra}

    @property
    def queued(self) -> int:
        """Bytes waiting to go to the laptop: at most about write_high_water."""
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None and not self._closed else 0

    # --- the laptop's side ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self._relay.admit(self):
            self._refuse(f"this relay carries its maximum of {self._settings.max_streams} streams")
            return
        self._timer = self._loop.call_later(self._settings.hello_seconds, self._no_hello)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            payloads = self._reader.feed(data)
            if payloads:
                self._heard = self._loop.time()
            for payload in payloads:
                if self._route is None:
                    self._route = self._greet(Hello.decode(payload))
                    if self._route is None:  # refused, and closed
                        return
                elif payload[0] != CONTROL:
                    self._to_gateway(self._route, payload)
                elif (number := ping_number(read_control(payload), "ping")) is not None:
                    self._write(pong(number))
                # Any other control frame after the Hello means nothing to this relay; it still counts
                # as the laptop being there.
        except FrameError as exc:
            self.close(str(exc))

    def eof_received(self) -> bool:
        self.close("the laptop ended the stream")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close("the laptop ended the stream" if exc is None else f"the connection broke: {exc}")

    def _greet(self, hello: Hello) -> _Route | None:
        """Welcomes the stream to a gateway of the server it names (its route), or refuses it (None)."""
        self._hello = hello
        gateways = self._relay.gateways
        servers = gateways.snapshot.get(hello.server)
        if not gateways.listed:
            self._refuse("this relay has not listed the VpnServers yet; try again in a moment")
            return None
        if servers is None:
            self._refuse(f"no VpnServer {hello.server}")
            return None
        picked = servers.pick(hello.public_key, hello.gateway)
        if picked is None:
            self._refuse(f"VpnServer {hello.server} has no ready gateway")
            return None
        node, address = picked
        version = ipaddress.ip_address(address).version
        try:
            sock = _udp_socket(version)
        except OSError as exc:  # out of file descriptors, or no IPv6 in this pod
            self._refuse(f"the relay could not open a socket: {exc.strerror}")
            return None
        route = _Route(sock, version, servers, node, address)
        self._loop.add_reader(sock.fileno(), self._from_gateway)
        self._relay.counters.streams += 1
        self._write(Welcome(gateway=node).encode())
        log.info("stream opened", extra=self._fields(gateway=node, preferred=hello.gateway))
        self._restart_timer(self._settings.idle_seconds, self._check_idle)
        return route

    def _to_gateway(self, route: _Route, payload: bytes) -> None:
        counters = self._relay.counters
        try:
            route.sock.sendto(payload, route.target)
        except OSError:  # the socket's buffer is full (EAGAIN), or the path is down: lost, as UDP loses it
            counters.dropped += 1
            return
        counters.frames_up += 1
        self._up += 1

    # --- the gateway's side --------------------------------------------------------------------

    def _from_gateway(self) -> None:
        """Every datagram queued on the socket now (up to READ_BATCH), in one write to the laptop.

        Read here rather than through asyncio's datagram transport, which takes one datagram per turn
        of the loop: each would then be a write, and a websocket message, of its own.
        """
        route, transport = self._route, self._transport
        if route is None or transport is None:
            return
        room = self._settings.write_high_water - transport.get_write_buffer_size()
        chunks: list[bytes] = []
        dropped = 0
        for _ in range(READ_BATCH):
            try:
                data, source = route.sock.recvfrom(MAX_PAYLOAD + 1)
            except OSError:  # nothing more queued (EAGAIN)
                break
            if (
                (source[0], source[1]) not in route.servers.known
                or len(data) > MAX_PAYLOAD
                or not is_wireguard(data)
                or len(data) + 2 > room
            ):
                dropped += 1
                continue
            chunks.append(frame(data))
            room -= len(data) + 2
        counters = self._relay.counters
        counters.dropped += dropped
        if chunks:
            transport.write(b"".join(chunks))
            counters.frames_down += len(chunks)
            counters.writes_down += 1
            self._down += len(chunks)

    def follow(self, snapshot: Mapping[str, ServerGateways]) -> None:
        """Takes its server's gateways as last listed, and moves to another gateway when its own is no
        longer ready. With none ready it stays where it is, and moves as soon as one is."""
        route, hello = self._route, self._hello
        if route is None or hello is None or self._closed:
            return
        servers = snapshot.get(hello.server)
        if servers is None:  # the server is gone: nothing better to send to; the idle timeout ends it
            return
        route.servers = servers
        picked = servers.pick(hello.public_key, route.node, route.version)
        if picked is None:
            return
        old = route.node
        route.node, route.address = picked
        if route.node != old:
            self._relay.counters.moves += 1
            self._write(Welcome(gateway=route.node).encode())
            log.info("stream moved", extra=self._fields(gateway=route.node, previous=old))

    # --- timers and the end --------------------------------------------------------------------

    def _restart_timer(self, delay: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, callback)

    def _no_hello(self) -> None:
        self.close(f"no Hello within {self._settings.hello_seconds:g} s")

    def _check_idle(self) -> None:
        # One timer per idle period, not one per frame: it looks at when the laptop was last heard.
        quiet = self._loop.time() - self._heard
        if quiet >= self._settings.idle_seconds:
            self.close(f"nothing from the laptop for {self._settings.idle_seconds:g} s")
        else:
            self._restart_timer(self._settings.idle_seconds - quiet, self._check_idle)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _refuse(self, reason: str) -> None:
        self._relay.counters.refused += 1
        self._end(reason, "stream refused")

    def close(self, reason: str) -> None:
        """Ends the stream (once), telling the laptop why: a Welcome with the error, which its client shows."""
        self._end(reason, "stream closed")

    def _end(self, reason: str, message: str) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._route is not None:
            self._loop.remove_reader(self._route.sock.fileno())
            self._route.sock.close()
        self._relay.streams.discard(self)
        log.info(message, extra=self._fields(reason=reason, up=self._up, down=self._down))
        transport = self._transport
        if transport is not None and not transport.is_closing():
            # Cut: a reason may quote the Hello's server, which can fill a frame of its own.
            transport.write(Welcome(error=reason[:REASON_CHARS]).encode())
            transport.close()
            self._loop.call_later(CLOSE_GRACE_SECONDS, transport.abort)


class Relay:
    """The listener, its streams, and the poll that keeps every stream on a ready gateway."""

    def __init__(self, gateways: GatewaySource, settings: Settings | None = None) -> None:
        self.gateways = gateways
        self.settings = settings or Settings()
        self.counters = Counters()
        self.streams: set[Stream] = set()
        self._server: asyncio.Server | None = None
        self._poller: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        """Listens; returns the port (the one chosen when `port` is 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Stream(self), host, port)
        self._poller = loop.create_task(self._poll())
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    def admit(self, stream: Stream) -> bool:
        """Counts a new connection in, unless the relay already carries max_streams."""
        if len(self.streams) >= self.settings.max_streams:
            return False
        self.streams.add(stream)
        return True

    def follow(self) -> None:
        """One poll's worth of moves: every stream to a ready gateway of its server."""
        snapshot = self.gateways.snapshot
        for stream in list(self.streams):
            stream.follow(snapshot)

    def totals(self) -> dict[str, int]:
        """The counters, and what is open and queued now."""
        queued = sum(stream.queued for stream in self.streams)
        return {"streams_open": len(self.streams), "queued_bytes": queued, **asdict(self.counters)}

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        logged, logged_at = self.totals(), loop.time()
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            self.follow()
            if loop.time() - logged_at >= TOTALS_SECONDS and (totals := self.totals()) != logged:
                log.info("relay totals", extra=totals)
                logged, logged_at = totals, loop.time()

    async def close(self) -> None:
        """Stops listening and ends every stream (each laptop is told the relay is stopping)."""
        if self._poller is not None:
            self._poller.cancel()
        if self._server is not None:
            self._server.close()
        for stream in list(self.streams):
            stream.close("the relay is stopping")
        if self._server is not None:
            await self._server.wait_closed()
        if self._poller is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        log.info("relay stopped", extra=self.totals())
