"""`up --via api`: the tunnel's datagrams carried through the API server to an in-cluster relay (Linux).

wg-quick runs the tunnel as always, from a copy of the file whose Endpoint is 127.0.0.1:PORT: this
process listens there, and carries each WireGuard datagram, framed (kvpn_core.relaywire), over a
port-forward to a relay pod, which hands it to a gateway's WireGuard port. The API server and kubelet
see WireGuard's ciphertext only; the gateway sees the same peer, key and policy as over UDP.

It runs in the foreground: Ctrl-C (or SIGTERM) takes the tunnel down. A stream that breaks (a relay
pod gone, the API server restarted) is opened again at once, to another relay pod when there is one;
when the relay moves the stream to another gateway (its own went), the server's peer is re-added so
that WireGuard starts a new session there at once. `kubectl vpn status` reads what this process
writes into ~/.config/kvpn/via-api/IFACE.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvpn_cli import follow, join, tunnel, wgquick
from kvpn_cli.cluster import CliError, Cluster, connect
from kvpn_cli.portforward import PortForward, PortForwardError, Target
from kvpn_core import wgquick as wgfile
from kvpn_core.kube import ForbiddenError, KubeError, core_path
from kvpn_core.relaywire import (
    CONTROL,
    DEAD_SECONDS,
    PING_SECONDS,
    RELAY_COMPONENT,
    RELAY_PORT,
    FrameError,
    FrameReader,
    Hello,
    Welcome,
    frames,
    is_wireguard,
    ping,
    ping_number,
    read_control,
)

RELAY_NAMESPACE = "kvpn-relay"
"""Where the chart puts the relay pods by default (relay.namespace)."""

MTU = 1380
"""The tunnel's MTU when the file sets none. wg-quick would derive it from the route to 127.0.0.1 (the
loopback's 64 KiB); the relay's datagrams cross the pod network, VXLAN overlays included."""

MESSAGE_BYTES = 256 << 10
"""The most one websocket message carries: the datagrams that queued meanwhile, framed."""

READ_BATCH = 64
"""Datagrams read from wg's side in one turn of the event loop, sent on in one websocket message."""

BACKLOG_BYTES = 1 << 20
"""Above this much unsent, datagrams are dropped as a congested UDP path would, never queued."""

WELCOME_SECONDS = 10.0
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0
HEALTH_SECONDS = 5.0
"""How often the health file is rewritten; `status` calls a file older than three times this stale."""

SELECTOR = f"app.kubernetes.io/component={RELAY_COMPONENT}"


def state_dir() -> Path:
    return join.config_dir() / "via-api"


def health_file(interface: str) -> Path:
    return state_dir() / f"{interface}.json"


def local_config(config: str, port: int) -> str:
    """The file as wg-quick runs it via the API: Endpoint 127.0.0.1:PORT, and an MTU."""
    text = follow.with_endpoint(config, f"127.0.0.1:{port}")
    if not re.search(r"^MTU\s*=", text, re.MULTILINE):
        text = text.replace("[Interface]\n", f"[Interface]\nMTU = {MTU}\n", 1)
    return text


def wants_api(config: str) -> bool:
    """Whether a file is only usable via the API: its server exposes no UDP port (type ApiServer), so the
    operator wrote no Endpoint."""
    return not follow.ENDPOINT_LINE.search(config)


def rendezvous(names: list[str], key: str) -> list[str]:
    """`names` in the order this laptop tries them: the same on every run, spread over laptops."""
    return sorted(names, key=lambda n: hashlib.sha256(f"{key}/{n}".encode()).digest(), reverse=True)


def permission_message(namespace: str, what: str) -> str:
    return (
        f"you may not {what} in namespace {namespace}, which `--via api` needs "
        f"(RBAC: get and list pods, get and create pods/portforward there: the chart's relay-user ClusterRole, "
        f"bound in {namespace}); ask your platform team for it"
    )


def ready_relay_pods(cluster: Cluster, namespace: str) -> list[str]:
    try:
        pods = cluster.list(core_path("pods", namespace), label_selector=SELECTOR)
    except ForbiddenError:
        raise CliError(permission_message(namespace, "list pods")) from None
    except KubeError as exc:
        raise CliError(f"could not list the relay pods in {namespace}: {exc}") from None

    def ready(pod: dict[str, Any]) -> bool:
        status = pod.get("status") or {}
        conditions = status.get("conditions") or []
        return status.get("phase") == "Running" and any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
        )

    return sorted(str(p["metadata"]["name"]) for p in pods if ready(p) and not p["metadata"].get("deletionTimestamp"))


@dataclass
class Health:
    """What `status` shows of a tunnel via the API: written by the process that runs it."""

    interface: str
    server: str
    relay_namespace: str
    pid: int = field(default_factory=os.getpid)
    relay_pod: str = ""
    gateway: str = ""
    connected_since: float | None = None
    reconnects: int = 0
    gateway_moves: int = 0
    last_error: str = ""
    sent: int = 0
    received: int = 0
    dropped: int = 0
    updated: float = 0.0

    def write(self) -> None:
        self.updated = time.time()
        path = health_file(self.interface)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(json.dumps(asdict(self)))
        scratch.replace(path)

    @classmethod
    def read(cls, path: Path) -> Health | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def line(self, now: float, alive: Callable[[int], bool]) -> str:
        """One line for `status`: how the tunnel runs, or why it does not."""
        head = f"{self.interface} ({self.server}) via the API server"
        if not alive(self.pid) or now - self.updated > 3 * HEALTH_SECONDS:
            return f"{head}: not running (its `kubectl vpn up --via api`, pid {self.pid}, is gone)"
        if self.connected_since is None:
            return f"{head}: reconnecting ({self.last_error or 'no relay stream yet'})"
        since = int(now - self.connected_since)
        extra = f", {self.reconnects} reconnects" if self.reconnects else ""
        extra += f", last: {self.last_error}" if self.last_error and self.reconnects else ""
        return (
            f"{head}: relay {self.relay_namespace}/{self.relay_pod} to gateway {self.gateway}, "
            f"connected {since} s{extra}; {self.sent} datagrams out, {self.received} in, {self.dropped} dropped"
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's (root's, through sudo): alive
        return True
    return True


def health_lines(now: float | None = None) -> list[str]:
    when = time.time() if now is None else now
    found = (Health.read(p) for p in sorted(state_dir().glob("*.json")))
    return [h.line(when, pid_alive) for h in found if h is not None]


class Relay:
    """The laptop's end: datagrams from wg on 127.0.0.1:PORT into a stream, the stream's back to wg."""

    def __init__(
        self,
        cluster: Cluster,
        server: follow.ServerName,
        *,
        public_key: str,
        sock: socket.socket,
        health: Health,
        on_move: Callable[[], None],
    ) -> None:
        self.cluster, self.server, self.public_key, self.sock = cluster, server, public_key, sock
        self.health, self.on_move = health, on_move
        self.stream: PortForward | None = None
        self.wg_addr: tuple[str, int] | None = None
        self._pending: list[bytes] = []
        self._flushing = False
        self._failed_pods: dict[str, float] = {}
        self._reader = FrameReader()

    # --- wg -> stream ---------------------------------------------------------------------------

    def read_wg(self) -> None:
        """Every datagram wg queued on the socket now (up to READ_BATCH): read here rather than through
        asyncio's datagram transport, which takes one per turn of the loop, so that they go together."""
        for _ in range(READ_BATCH):
            try:
                data, addr = self.sock.recvfrom(65536)
            except OSError:  # nothing more queued (EAGAIN)
                return
            self.from_wg(data, addr)

    def from_wg(self, data: bytes, addr: tuple[str, int]) -> None:
        if not is_wireguard(data):  # nothing wg sends; whatever else reaches this port goes no further
            self.health.dropped += 1
            return
        self.wg_addr = addr
        self._pending.append(data)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Everything that queued in this turn of the loop, in as few websocket messages as it takes."""
        self._flushing = False
        batch, self._pending = self._pending, []
        stream = self.stream
        if stream is None or stream.closed or stream.backlog > BACKLOG_BYTES:
            self.health.dropped += len(batch)
            return
        chunk: list[bytes] = []
        size = 0
        for datagram in batch:
            if size + len(datagram) + 2 > MESSAGE_BYTES and chunk:
                stream.send(frames(chunk))
                chunk, size = [], 0
            chunk.append(datagram)
            size += len(datagram) + 2
        if chunk:
            stream.send(frames(chunk))
        self.health.sent += len(batch)

    # --- the stream ----------------------------------------------------------------------------

    async def open(self) -> tuple[PortForward, Welcome]:
        """A stream to a ready relay pod, welcomed; raises CliError for what the user must fix, and
        PortForwardError or FrameError for what another try may mend."""
        namespace = self.health.relay_namespace
        pods = await asyncio.to_thread(ready_relay_pods, self.cluster, namespace)
        if not pods:
            raise PortForwardError(f"no ready relay pod in namespace {namespace} (is the chart's relay enabled?)")
        now = time.monotonic()
        order = rendezvous(pods, self.public_key)
        # A pod that failed a moment ago goes last: it is probably going away.
        order.sort(key=lambda p: now - self._failed_pods.get(p, -1e9) < 30)
        pod = order[0]
        try:
            stream = await PortForward.open(
                self.cluster.configuration, self.cluster.auth_headers(), Target(namespace, pod, RELAY_PORT)
            )
        except PortForwardError as exc:
            self._failed_pods[pod] = now
            if exc.status == 403:
                raise CliError(permission_message(namespace, "create pods/portforward")) from None
            raise
        try:
            stream.send(Hello(str(self.server), self.public_key, self.health.gateway).encode())
            reader = FrameReader()
            async with asyncio.timeout(WELCOME_SECONDS):
                while True:
                    payloads = reader.feed(await stream.recv())
                    if payloads:
                        break
            welcome = Welcome.decode(payloads[0])
        except TimeoutError:
            stream.close()
            self._failed_pods[pod] = now
            raise PortForwardError(f"relay pod {pod} did not answer in {WELCOME_SECONDS:.0f} s") from None
        except (PortForwardError, FrameError):
            stream.close()
            self._failed_pods[pod] = now
            raise
        if not welcome.ok:
            stream.close()
            raise PortForwardError(f"relay pod {pod} refused the tunnel: {welcome.error}")
        self.health.relay_pod = pod
        self._reader = reader
        for payload in payloads[1:]:
            self._to_wg(payload)
        return stream, welcome

    def _to_wg(self, payload: bytes) -> None:
        if payload[0] == CONTROL:
            if ping_number(read_control(payload), "pong") is None:
                self._welcome(Welcome.decode(payload))
            return
        if self.wg_addr is None:
            return
        try:
            self.sock.sendto(payload, self.wg_addr)
        except OSError:  # wg's socket is full (EAGAIN): lost, as UDP loses it
            self.health.dropped += 1
            return
        self.health.received += 1

    def _welcome(self, welcome: Welcome) -> None:
        if not welcome.ok:
            raise PortForwardError(f"the relay ended the tunnel: {welcome.error}")
        moved = bool(self.health.gateway) and welcome.gateway != self.health.gateway
        self.health.gateway = welcome.gateway
        if moved:
            self.health.gateway_moves += 1
            follow.say(f"the relay moved the tunnel to gateway {welcome.gateway}: a new session starts there")
            asyncio.get_running_loop().run_in_executor(None, self.on_move)
        self.health.write()

    async def pump(self, stream: PortForward) -> None:
        """The stream's datagrams to wg until it ends (raises PortForwardError or FrameError), or until it
        brought nothing back, not even a Pong, for DEAD_SECONDS: a stream through a node that lost its
        network breaks nothing the laptop sees, it goes silent."""
        pings = asyncio.get_running_loop().create_task(self._ping(stream))
        try:
            while True:
                try:
                    async with asyncio.timeout(DEAD_SECONDS):
                        data = await stream.recv()
                except TimeoutError:
                    raise PortForwardError(f"nothing came back for {DEAD_SECONDS:g} s, not even a pong") from None
                for payload in self._reader.feed(data):
                    self._to_wg(payload)
        finally:
            pings.cancel()

    async def _ping(self, stream: PortForward) -> None:
        number = 0
        while not stream.closed:
            number += 1
            stream.send(ping(number))
            await asyncio.sleep(PING_SECONDS)

    async def run(self, first: tuple[PortForward, Welcome]) -> None:
        """Forever: the stream, and a new one whenever it ends."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self.read_wg)
        heartbeat = loop.create_task(self._heartbeat())
        delay = BACKOFF_FIRST
        opened: tuple[PortForward, Welcome] | None = first
        try:
            while True:
                if opened is None:
                    try:
                        opened = await self.open()
                    except (PortForwardError, FrameError) as exc:
                        self._lost(str(exc))
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, BACKOFF_MAX)
                        continue
                    follow.say(f"via the API again: relay pod {self.health.relay_pod}, gateway {opened[1].gateway}")
                stream, welcome = opened
                self.stream, delay = stream, BACKOFF_FIRST
                self.health.connected_since = time.time()
                self._welcome(welcome)
                try:
                    await self.pump(stream)
                except (PortForwardError, FrameError) as exc:
                    self._failed_pods[self.health.relay_pod] = time.monotonic()
                    self._lost(f"stream to relay pod {self.health.relay_pod} ended: {exc}")
                finally:
                    stream.close()
                    self.stream = opened = None
                    self.health.reconnects += 1
        finally:
            heartbeat.cancel()
            loop.remove_reader(self.sock.fileno())

    def _lost(self, why: str) -> None:
        if why != self.health.last_error:
            follow.say(f"{why}; reconnecting", err=True)
        self.health.connected_since = None
        self.health.last_error = why
        self.health.write()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_SECONDS)
            self.health.write()


def bind_local(interface: str) -> socket.socket:
    """The UDP socket wg sends to: the port the running tunnel already dials (this command run again),
    else a free one."""
    port = 0
    if follow.is_up(interface):
        endpoint = (follow.wg("show", interface, "endpoints").split() or ["", ""])[1:2]
        host, _, number = (endpoint[0] if endpoint else "").rpartition(":")
        if host != "127.0.0.1" or not number.isdigit():
            raise CliError(f"{interface} is up already, not via the API: `kubectl vpn down {interface}` first")
        port = int(number)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise CliError(f"{interface} is up via the API already, and its relay runs (127.0.0.1:{port})") from None
    sock.setblocking(False)
    return sock


def up_via_api(
    context: str | None, target: str | None, given: str | None, relay_namespace: str, up: Callable[[Path], None]
) -> None:
    """`kubectl vpn up --via api`: checks, the first stream, wg-quick up, then the relay until stopped."""
    tunnel.require_linux("up --via api")
    path = tunnel.resolve_file(target)
    config = path.read_text()
    key = wgfile.field(config, "PublicKey")
    if not key:
        raise CliError(f"{path} has no [Peer] PublicKey")
    cluster, namespace = connect(context)
    server = follow.server_of(cluster, path, config, given, namespace)
    follow.check_server(cluster, server, path, config)
    interface = path.stem
    sock = bind_local(interface)
    adopted = follow.is_up(interface)
    runtime = state_dir() / path.name
    health = Health(interface=interface, server=str(server), relay_namespace=relay_namespace)
    local = local_config(config, sock.getsockname()[1])

    def fresh_session() -> None:
        try:
            follow.fresh_peer(interface, key, runtime)
        except CliError as exc:
            follow.say(f"could not start a new session: {exc}", err=True)

    async def main() -> None:
        relay = Relay(cluster, server, public_key=key, sock=sock, health=health, on_move=fresh_session)
        first = await relay.open()  # what the user must fix fails here, before any tunnel exists
        wgquick.write_private(runtime, local)
        if not adopted:
            await asyncio.to_thread(up, runtime)
        follow.say(
            f"{interface} runs via the API server: relay pod {relay_namespace}/{health.relay_pod}, "
            f"gateway {first[1].gateway} (Ctrl-C takes it down)"
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        running = loop.create_task(relay.run(first))
        stopped = loop.create_task(stop.wait())
        await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running

    try:
        asyncio.run(main())
    except (PortForwardError, FrameError) as exc:
        raise CliError(f"no tunnel via the API: {exc}") from None
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            health_file(interface).unlink()
    if runtime.exists():
        down(runtime)
        with contextlib.suppress(OSError):
            runtime.unlink()


def down(runtime: Path) -> None:
    if not follow.is_up(runtime.stem):
        return
    command = ["wg-quick", "down", str(runtime)]
    if os.geteuid() != 0:
        command = ["sudo", *command]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode == 0:
        print(f"{runtime.stem} is down")
    else:
        print(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
