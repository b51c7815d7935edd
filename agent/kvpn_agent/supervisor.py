"""`kvpn-agent wireguard-go`: the long-lived program that starts and supervises wireguard-go for the agent.

It runs in a DaemonSet of its own, which a `helm upgrade` does not roll, so the userspace dataplane
outlives every restart and update of the agent's pod (a process cannot outlive its container, and
a new container cannot adopt the old one's children). It does what the agent asks on its socket
(supervisor_api: start, stop, list) and nothing else: it never talks to the API server and holds no
configuration; the agent configures each device over its UAPI socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from kvpn_agent.processes import WireGuardGo, WireGuardGoError
from kvpn_agent.supervisor_api import (
    MAX_LINE,
    ProtocolError,
    Request,
    encode_error,
    encode_reply,
    parse_request,
)

log = logging.getLogger(__name__)

CLIENT_TIMEOUT = 10.0
"""A client that sends nothing for this long is dropped: it holds a thread, not the supervisor."""

MAX_CLIENTS = 16
POLL = 0.5
"""How often exited wireguard-go processes are noticed (and logged) when nobody asks."""


class Supervisor:
    """The server: one thread per client, one request at a time on the processes (a lock)."""

    def __init__(
        self,
        path: Path,
        wggo: WireGuardGo,
        *,
        client_timeout: float = CLIENT_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.path = path
        self.wggo = wggo
        self.client_timeout = client_timeout
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_clients)
        self._listener: socket.socket | None = None

    # --- the protocol's meaning ------------------------------------------------------------------

    def respond(self, line: bytes) -> bytes:
        """The reply to one request line; never raises for anything a client can send."""
        try:
            request = parse_request(line)
        except ProtocolError as exc:
            log.warning("request refused", extra={"error": str(exc)})
            return encode_error(str(exc))
        return self.handle(request)

    def handle(self, request: Request) -> bytes:
        with self._lock:
            self._reap()
            try:
                if request.op == "list":
                    return encode_reply(devices=self.wggo.devices())
                interface = request.interface or ""  # parse_request names one for start and stop
                if request.op == "start":
                    return encode_reply(pid=self.wggo.start(interface))
                pid = self.wggo.stop(interface)
                if pid is not None:
                    log.info("wireguard-go stopped", extra={"interface": interface, "pid": pid})
                return encode_reply(pid=pid)
            except (WireGuardGoError, OSError, subprocess.SubprocessError) as exc:
                error = str(exc) or type(exc).__name__
                log.error(  # noqa: TRY400 - the agent is told and retries: no traceback
                    "request failed", extra={"op": request.op, "interface": request.interface, "error": error}
                )
                return encode_error(error)

    def _reap(self) -> None:
        for interface, pid in sorted(self.wggo.reap().items()):
            log.warning("wireguard-go exited", extra={"interface": interface, "pid": pid})

    # --- the socket ------------------------------------------------------------------------------

    def bind(self, stop: threading.Event) -> bool:
        """Listens on ``path`` (0600 in a 0700 folder); False when stopped before that was possible.

        A supervisor that still answers there (a replacement pod that starts before the old one has
        gone) is waited for rather than pushed aside: two would fight over the same devices.
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.parent.chmod(0o700)
        waiting = False
        while not stop.is_set():
            if _answers(self.path):
                if not waiting:
                    log.warning(
                        "another supervisor answers on the socket: waiting for it to go", extra={"path": str(self.path)}
                    )
                    waiting = True
                stop.wait(POLL)
                continue
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a socket left by a killed supervisor: nobody answers on it
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)
            try:
                listener.bind(str(self.path))
            except OSError as exc:
                listener.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue  # another one bound it between our check and our bind: look again
            finally:
                os.umask(old_umask)
            listener.listen(MAX_CLIENTS)
            listener.settimeout(POLL)
            self._listener = listener
            log.info("listening", extra={"path": str(self.path)})
            return True
        return False

    def serve(self, stop: threading.Event) -> None:
        """Accepts clients until ``stop``; notices exited processes every POLL seconds meanwhile."""
        listener = self._listener
        if listener is None:
            raise RuntimeError("bind first")
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if self._lock.acquire(blocking=False):  # a start in progress holds it: next time
                    try:
                        self._reap()
                    finally:
                        self._lock.release()
                continue
            except OSError as exc:
                log.error("accept failed", extra={"error": str(exc)})  # noqa: TRY400 - retried, no traceback
                time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                with contextlib.suppress(OSError):
                    conn.sendall(encode_error(f"busy: {MAX_CLIENTS} clients connected"))
                conn.close()
                continue
            threading.Thread(target=self._client, args=(conn,), name="client", daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(self.client_timeout)
                uid = _peer_uid(conn)
                if uid not in (0, os.getuid()):
                    log.warning("client refused", extra={"uid": uid})
                    conn.sendall(encode_error("permission denied"))
                    return
                buffer = b""
                while True:
                    while b"\n" not in buffer:
                        if len(buffer) > MAX_LINE:
                            conn.sendall(encode_error(f"request longer than {MAX_LINE} bytes"))
                            return
                        chunk = conn.recv(4096)
                        if not chunk:
                            return
                        buffer += chunk
                    line, _, buffer = buffer.partition(b"\n")
                    conn.sendall(self.respond(line))
        except OSError:
            pass  # the client went away or stalled: its business, not ours
        except Exception:
            # A bug met by one request must not take the devices of every other down with the process.
            log.exception("client handler failed")
        finally:
            self._slots.release()

    def close(self, stop_devices: bool = True) -> None:
        """Stops listening; with ``stop_devices`` (a SIGTERM), ends every wireguard-go it runs.

        In a pod they would die with the container anyway; ended cleanly, each removes its socket
        from the node's /var/run/wireguard and the agent sees the device gone at once.
        """
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if stop_devices:
            with self._lock:
                for interface, pid in sorted(self.wggo.devices().items()):
                    self.wggo.stop(interface)
                    log.info("wireguard-go stopped", extra={"interface": interface, "pid": pid})


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _peer_uid(conn: socket.socket) -> int:
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(uid)


def run(path: Path, wggo: WireGuardGo, stop: threading.Event) -> None:
    """The program: bind, serve until ``stop``, then end the devices it runs."""
    supervisor = Supervisor(path, wggo)
    if not supervisor.bind(stop):
        return
    try:
        supervisor.serve(stop)
    finally:
        supervisor.close()
