"""`up --follow`: keep a running tunnel's endpoint on a healthy gateway of its VpnServer (Linux only)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from kvpn_cli import join, tunnel, wgquick
from kvpn_cli.cluster import CliError, Cluster, connect
from kvpn_core import wgquick as wgfile
from kvpn_core.api import Kind, VpnServerStatus
from kvpn_core.kube import KubeError

# A session is rekeyed every 120 s while traffic flows and a lost handshake is retried every 5 s, so a
# handshake older than this with traffic sent since means the gateway stopped answering.
STALE_AFTER_SECONDS = 135.0
POLL_SECONDS = 2.0

HEADER = re.compile(r"^# kvpn: WireGuard tunnel of VpnPeer (?P<namespace>[^/\s]+)/(?P<name>\S+) ", re.MULTILINE)
ENDPOINT_LINE = re.compile(r"^Endpoint\s*=.*$", re.MULTILINE)


@dataclass(frozen=True)
class ServerName:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- deciding (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """The latest sign that the current endpoint answers: a handshake, or the moment it was set (by
    wg-quick up or a move), whichever is later; with the bytes the tunnel had sent by then."""

    at: float
    """Unix time."""

    tx: int

    def after(self, handshake: float, tx: int) -> Mark:
        """The mark once `wg show` reports this latest handshake and these bytes sent."""
        return Mark(handshake, tx) if handshake > self.at else self


@dataclass(frozen=True)
class Tunnel:
    """What `wg show` says about the tunnel's one peer, against the latest Mark."""

    endpoint: str | None
    """The peer's endpoint, spelled as the server's status spells it when it is one of those; None for none."""

    silent_for: float
    """Seconds since the Mark."""

    sent_since: bool
    """Whether the tunnel sent anything (data, keepalives, handshake attempts) since the Mark."""


def tunnel_of(endpoint: str | None, mark: Mark, tx: int, now: float) -> Tunnel:
    return Tunnel(endpoint=endpoint, silent_for=now - mark.at, sent_since=tx > mark.tx)


@dataclass(frozen=True)
class Move:
    old: str | None
    new: str
    why: str

    def line(self) -> str:
        return f"moved from {self.old or '(no endpoint)'} to {self.new}: {self.why}"


def decide(status: VpnServerStatus, tunnel: Tunnel, server: ServerName) -> Move | None:
    """Where the tunnel should dial now, and why; None to stay where it is."""
    healthy = status.endpoints
    current = tunnel.endpoint
    if healthy and current not in healthy:
        preferred = status.endpoint if status.endpoint in healthy else healthy[0]
        if current is None:
            return Move(None, preferred, f"the tunnel had no endpoint; {preferred} is a healthy gateway of {server}")
        return Move(current, preferred, f"{current} is no longer a healthy gateway of {server}")
    if tunnel.sent_since and tunnel.silent_for > STALE_AFTER_SECONDS:
        target = next_endpoint(status, current)
        if target is not None:
            why = f"{current} has not answered for {tunnel.silent_for:.0f} s (no handshake while sending)"
            return Move(current, target, why)
    return None


def next_endpoint(status: VpnServerStatus, current: str | None) -> str | None:
    """The endpoint to try after `current` stopped answering: status.endpoint, or when that is the
    current one the next of status.endpoints; None when there is no other.

    The order is status.endpoints rotated to start at status.endpoint, and a silent endpoint gives way
    to the one after it in that order: with three gateways and two of them silent, going back to
    status.endpoint each time would swing between the two silent ones and never try the third.
    """
    # An endpoint that is not among non-empty endpoints is not a healthy gateway's: never a target.
    order = list(status.endpoints) or ([status.endpoint] if status.endpoint else [])
    if status.endpoint in order:
        start = order.index(status.endpoint)
        order = order[start:] + order[:start]
    if not order:
        return None
    target = order[(order.index(current) + 1) % len(order)] if current in order else order[0]
    return None if target == current else target


def spelled_as(endpoint: str | None, candidates: list[str], resolve: Callable[[str], set[str]]) -> str | None:
    """The candidate that `endpoint` (as `wg show` prints it: an IP address and port) stands for, or
    `endpoint` itself: wg resolves a DNS name (a load balancer's) once, so it shows the address."""
    if endpoint is None or endpoint in candidates:
        return endpoint
    return next((c for c in candidates if endpoint in resolve(c)), endpoint)


def with_endpoint(config: str, endpoint: str) -> str:
    """The wg-quick file with its [Peer] Endpoint line set to `endpoint`, everything else as it was."""
    line = f"Endpoint = {endpoint}"
    if ENDPOINT_LINE.search(config):
        return ENDPOINT_LINE.sub(lambda _: line, config, count=1)
    return config.replace("[Peer]\n", f"[Peer]\n{line}\n", 1)


def peer_named_in(config: str) -> tuple[str, str] | None:
    """(namespace, name) of the VpnPeer whose file this is, from the header line the operator writes."""
    match = HEADER.search(config)
    return (match["namespace"], match["name"]) if match else None


def peer_value(output: str, public_key: str) -> list[str] | None:
    """The fields after the peer's key in `wg show IFACE endpoints|latest-handshakes|transfer` output."""
    for line in output.splitlines():
        key, *values = line.split("\t")
        if key == public_key:
            return values
    return None


# --- finding the server ------------------------------------------------------------------------


def server_of(cluster: Cluster, path: Path, config: str, given: str | None, default_namespace: str) -> ServerName:
    """The VpnServer the file's tunnel goes to: as given, else the server of the VpnPeer the file names."""
    if given:
        namespace, _, name = given.rpartition("/")
        return ServerName(namespace or default_namespace, name)
    named = peer_named_in(config)
    if named is None:
        raise CliError(
            f"{path} does not say which VpnServer it belongs to (its `# kvpn: WireGuard tunnel of VpnPeer ...` "
            "line is missing): pass --server NAMESPACE/NAME"
        )
    peer = cluster.get_kvpn(Kind.VPN_PEER, *named)
    if peer is None:
        raise CliError(
            f"VpnPeer {named[0]}/{named[1]}, named in {path}, no longer exists: join again, "
            "or pass --server NAMESPACE/NAME"
        )
    ref = (peer.get("spec") or {}).get("serverRef") or {}
    return ServerName(ref.get("namespace") or named[0], ref.get("name", ""))


def check_server(cluster: Cluster, server: ServerName, path: Path, config: str) -> None:
    """Refuses a server that does not exist, or whose key is not the one the file dials."""
    obj = cluster.get_kvpn(Kind.VPN_SERVER, server.namespace, server.name)
    if obj is None:
        raise CliError(join.missing_server_message(cluster, server.namespace, server.name))
    key = (obj.get("status") or {}).get("publicKey")
    if key and key != wgfile.field(config, "PublicKey"):
        raise CliError(f"{path} is not a tunnel to VpnServer {server} (its [Peer] PublicKey is not the server's)")


# --- the loop ----------------------------------------------------------------------------------


def rewrite_endpoint(path: Path, endpoint: str) -> None:
    """Sets the file's Endpoint line in place (mode 0600), so that the next `wg-quick up` dials it."""
    text = path.read_text()
    if (updated := with_endpoint(text, endpoint)) != text:
        wgquick.write_private(path, updated)


def say(line: str, err: bool = False) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr if err else sys.stdout, flush=True)


class ServerWatch:
    """The latest status of one VpnServer, kept by a get-then-watch in a thread that reconnects forever."""

    WATCH_SECONDS = 300
    BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0

    def __init__(self, cluster: Cluster, server: ServerName) -> None:
        self.cluster, self.server = cluster, server
        self._lock = threading.Lock()
        self._status: VpnServerStatus | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch {server}", daemon=True)

    @property
    def status(self) -> VpnServerStatus | None:
        with self._lock:
            return self._status

    def start(self) -> None:
        self._thread.start()

    def _set(self, obj: dict[str, object] | None) -> None:
        status = None
        if obj is not None:
            try:
                status = VpnServerStatus.model_validate(obj.get("status") or {})
            except ValidationError as exc:
                say(f"VpnServer {self.server} has a status this version cannot read: {exc.errors()[0]['msg']}", True)
        with self._lock:
            self._status = status

    def _run(self) -> None:
        delay, failing = self.BACKOFF_FIRST, False
        while True:
            try:
                obj = self.cluster.get_kvpn(Kind.VPN_SERVER, self.server.namespace, self.server.name)
                if obj is None and self.status is not None:
                    say(f"VpnServer {self.server} is gone: the tunnel stays where it is", err=True)
                self._set(obj)
                if failing:
                    say(f"watching VpnServer {self.server} again", err=True)
                delay, failing = self.BACKOFF_FIRST, False
                version = str((obj or {}).get("metadata", {}).get("resourceVersion") or "")
                events = self.cluster.watch_kvpn(
                    Kind.VPN_SERVER, self.server.namespace, self.server.name, version, self.WATCH_SECONDS
                )
                for event in events:
                    if event.get("type") == "DELETED":
                        say(f"VpnServer {self.server} was deleted: the tunnel stays where it is", err=True)
                        self._set(None)
                    elif event.get("type") in ("ADDED", "MODIFIED"):
                        self._set(event.get("object") or {})
                continue  # the API server ended the watch: get and watch again
            except KubeError as exc:
                if exc.status == 410:  # our version is too old to watch from: get it afresh
                    continue
                error = f"watch failed ({exc.status}): {exc}" if exc.status else str(exc)
            except (CliError, OSError, ValueError) as exc:
                error = str(exc)
            except Exception as exc:  # a watch thread that died would leave the loop blind, and silently
                error = f"{type(exc).__name__}: {exc}"
            if not failing:  # once per outage, not once per retry
                say(f"VpnServer {self.server}: {error}; retrying (the tunnel stays where it is)", err=True)
            failing = True
            time.sleep(delay)
            delay = min(delay * 2, self.BACKOFF_MAX)


def strip(path: Path) -> str:
    """The file as `wg` takes it: `wg-quick strip` (wg-quick's own keys left out)."""
    try:
        result = subprocess.run(
            ["wg-quick", "strip", str(path)], capture_output=True, text=True, check=False, timeout=10
        )
    except FileNotFoundError:
        raise CliError("wg-quick is not installed (Debian/Ubuntu: apt install wireguard-tools)") from None
    if result.returncode != 0:
        raise CliError(f"`wg-quick strip {path}` failed: {result.stderr.strip() or f'exit {result.returncode}'}")
    return result.stdout


def wg(*args: str, input: str | None = None) -> str:
    """Output of `wg ARGS`, through sudo -n when not root: `up` has just asked for the password."""
    command = ["wg", *args]
    if os.geteuid() != 0:
        command = ["sudo", "-n", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10, input=input)
    except FileNotFoundError:
        raise CliError("wg is not installed (Debian/Ubuntu: apt install wireguard-tools)") from None
    except subprocess.TimeoutExpired:
        raise CliError(f"`{' '.join(command)}` did not finish in 10 s") from None
    if result.returncode != 0:
        raise CliError(f"`{' '.join(command)}` failed: {result.stderr.strip() or f'exit {result.returncode}'}")
    return result.stdout


def fresh_peer(interface: str, key: str, path: Path) -> None:
    """The server's peer on `interface` removed and added back from the file: a new session."""
    wg("set", interface, "peer", key, "remove")
    wg("addconf", interface, "/dev/stdin", input=strip(path))


def is_up(interface: str) -> bool:
    return Path("/sys/class/net", interface).exists()


class Resolver:
    """host:port of a status endpoint to the address:port forms wg shows; looked up at most once a minute."""

    TTL = 60.0

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, set[str]]] = {}

    def __call__(self, endpoint: str) -> set[str]:
        now = time.monotonic()
        if (hit := self._cache.get(endpoint)) and now - hit[0] < self.TTL:
            return hit[1]
        host, _, port = endpoint.rpartition(":")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)
        except (OSError, ValueError):
            found: set[str] = set()
        else:
            found = {f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}" for i in infos}
        self._cache[endpoint] = (now, found)
        return found


class Follower:
    """One tunnel, its server's watch, and the moves: what `follow` runs every POLL_SECONDS."""

    def __init__(self, path: Path, server: ServerName, watch: ServerWatch, fresh: bool) -> None:
        self.path, self.server, self.watch = path, server, watch
        self.interface = path.stem
        config = path.read_text()
        key = wgfile.field(config, "PublicKey")
        if not key:
            raise CliError(f"{path} has no [Peer] PublicKey")
        self.key = key
        self.resolve = Resolver()
        _, handshake, tx = self.read()
        # A tunnel just brought up gets the full wait for its first handshake; one already up is judged
        # by its latest handshake.
        self.mark = Mark(time.time() if fresh else handshake, tx)
        self.last_error = ""

    def read(self) -> tuple[str | None, float, int]:
        """(endpoint, latest handshake as unix time, bytes sent) of the server's peer on the interface."""
        endpoints = peer_value(wg("show", self.interface, "endpoints"), self.key)
        handshakes = peer_value(wg("show", self.interface, "latest-handshakes"), self.key)
        transfer = peer_value(wg("show", self.interface, "transfer"), self.key)
        if endpoints is None or handshakes is None or transfer is None:
            raise CliError(f"interface {self.interface} has no peer {self.key}: is it the tunnel of {self.path}?")
        endpoint = endpoints[0] if endpoints and endpoints[0] != "(none)" else None
        return endpoint, float(handshakes[0]), int(transfer[1])

    def step(self) -> None:
        endpoint, handshake, tx = self.read()
        now = time.time()
        self.mark = self.mark.after(handshake, tx)
        status = self.watch.status
        if status is None:
            return
        candidates = list(dict.fromkeys([*([status.endpoint] if status.endpoint else []), *status.endpoints]))
        current = spelled_as(endpoint, candidates, self.resolve)
        move = decide(status, tunnel_of(current, self.mark, tx, now), self.server)
        if move is None:
            return
        try:
            rewrite_endpoint(self.path, move.new)
        except OSError as exc:
            say(f"could not write the new endpoint into {self.path}: {exc.strerror}", err=True)
            wg("set", self.interface, "peer", self.key, "endpoint", move.new)
        else:
            self.fresh_peer()
        self.mark = Mark(now, tx)
        say(move.line())

    def fresh_peer(self) -> None:
        """The server's peer removed and added back from the file, at its new endpoint. A session cannot
        move between gateways: the old one's keys would be sent to the new gateway, which knows none of
        them, until WireGuard gives up on them (15 s). A new peer starts a handshake at once (its
        PersistentKeepalive, or the next packet)."""
        fresh_peer(self.interface, self.key, self.path)

    def run(self) -> None:
        while True:
            if not is_up(self.interface):
                say(f"tunnel {self.interface} is down: stopped following")
                return
            try:
                self.step()
                self.last_error = ""
            except CliError as exc:
                if not is_up(self.interface):
                    continue  # taken down between the check and `wg show`: said above, next round
                if str(exc) != self.last_error:  # once, not every 2 s
                    say(f"{exc}; trying again", err=True)
                self.last_error = str(exc)
            time.sleep(POLL_SECONDS)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def up_and_follow(context: str | None, target: str | None, given: str | None, up: Callable[[Path], None]) -> None:
    """`kubectl vpn up --follow`: the server checked first, then `up` (unless the tunnel is up already),
    then `follow`."""
    path = tunnel.resolve_file(target)
    config = path.read_text()
    cluster, namespace = connect(context)
    server = server_of(cluster, path, config, given, namespace)
    check_server(cluster, server, path, config)
    fresh = not is_up(path.stem)
    if fresh:
        up(path)
    else:
        print(f"{path.stem} is up already: following it")
    follow(cluster, path, server, fresh)


def follow(cluster: Cluster, path: Path, server: ServerName, fresh: bool) -> None:
    """Runs in the foreground until Ctrl-C or SIGTERM, which leave the tunnel up."""
    if os.geteuid() != 0:
        subprocess.run(["sudo", "-v"], check=False)  # the password now, not a failing `sudo -n` later
    previous = signal.signal(signal.SIGTERM, _stop)
    watch = ServerWatch(cluster, server)
    try:
        try:
            follower = Follower(path, server, watch, fresh)
        except CliError as exc:
            raise CliError(f"{exc} (the tunnel is up: `kubectl vpn down {path}` takes it down)") from None
        watch.start()
        say(f"following VpnServer {server}: {path.stem} moves to a healthy gateway when its own goes (Ctrl-C stops)")
        follower.run()
    except KeyboardInterrupt:
        print(f"\nstopped following; {path.stem} stays up (take it down with: kubectl vpn down {path})")
    finally:
        signal.signal(signal.SIGTERM, previous)
