"""wireguard-go processes, one per interface: started, adopted by their sockets, watched, stopped.

Two implementations of WireGuardGoProcesses start them: ``WireGuardGo`` spawns them itself (tests,
the demo's host-process agents, and the supervisor program, which this module keeps light: no
pydantic, no pyroute2), ``supervisor_api.SupervisorClient`` asks the long-lived supervisor to (in a
pod, children of the agent's container would die with it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvpn_agent.linux import SOCKET_DIR

log = logging.getLogger(__name__)

LOG_FOLDER = "wireguard-go"
"""The folder of the state directory where an agent that starts wireguard-go itself keeps its logs."""


class WireGuardGoError(Exception):
    pass


class WireGuardGoProcesses(Protocol):
    """Who runs the wireguard-go processes: the agent itself, or the supervisor on its behalf."""

    def socket(self, interface: str) -> Path:
        """The device's UAPI socket."""
        ...

    def start(self, interface: str) -> int:
        """Makes a wireguard-go serve the interface (an answering one is kept, not restarted); its pid."""
        ...

    def stop(self, interface: str) -> int | None:
        """Ends the interface's wireguard-go, if any (it removes its socket and TUN device); its pid."""
        ...

    def devices(self) -> dict[str, int]:
        """The live devices and their pids: a device that died, or was replaced, shows here."""
        ...


def socket_owner(path: Path) -> int | None:
    """The pid of the process serving a UAPI socket (SO_PEERCRED): exactly that process, no guessing."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        try:
            sock.connect(str(path))
            pid, _, _ = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            )
        except OSError:
            return None
    return int(pid) or None


def process_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie.

    Tells a process from a later one that reuses its pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def terminate(pid: int, timeout: float) -> None:
    """SIGTERM (wireguard-go then removes its socket and TUN device), SIGKILL after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_start_time(pid) is None:
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class Adopted:
    """A wireguard-go this object did not start (a previous agent's or supervisor's), found by its socket."""

    pid: int
    started: int

    def alive(self) -> bool:
        return process_start_time(self.pid) == self.started


class WireGuardGo:
    """wireguard-go processes, one per interface, in the foreground so their death is seen at once.

    ``prefix`` runs them elsewhere (``ip netns exec NS`` in tests). ``new_session`` starts each in a
    session of its own, so that a signal to the starter's process group (an agent's restart outside
    a pod) leaves tunnels up; a starter that restarts adopts them by their sockets.
    """

    def __init__(
        self,
        prefix: Sequence[str] = (),
        binary: str = "wireguard-go",
        socket_dir: Path = SOCKET_DIR,
        log_dir: Path | None = None,
        start_timeout: float = 5.0,
        *,
        inherit_output: bool = False,
        new_session: bool = True,
    ) -> None:
        self.argv = [*prefix, binary, "-f"]
        self.socket_dir = socket_dir
        self.log_dir = log_dir
        self.start_timeout = start_timeout
        self.inherit_output = inherit_output
        """Without a log_dir: wireguard-go writes to our stdout (the supervisor's container log)."""
        self.new_session = new_session
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.adopted: dict[str, Adopted] = {}

    def socket(self, interface: str) -> Path:
        return self.socket_dir / f"{interface}.sock"

    def answers(self, interface: str) -> bool:
        """Whether a wireguard-go (ours or one a previous agent started) serves the interface."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            try:
                sock.connect(str(self.socket(interface)))
            except OSError:
                return False
        return True

    def pid(self, interface: str) -> int | None:
        """The pid of the live wireguard-go of the interface that this object knows, if any."""
        proc = self.procs.get(interface)
        if proc is not None and proc.poll() is None:
            return proc.pid
        adopted = self.adopted.get(interface)
        return adopted.pid if adopted is not None and adopted.alive() else None

    def start(self, interface: str) -> int:
        pid = self.pid(interface)
        if pid is not None and self.answers(interface):
            return pid
        if pid is None and (owner := self._adopt(interface)) is not None:
            return owner
        self.stop(interface)
        with contextlib.suppress(FileNotFoundError):
            self.socket(interface).unlink()  # left by a killed process; wireguard-go refuses to start over it
        out: int | object = subprocess.DEVNULL
        log_file = None
        if self.log_dir is not None:
            log_file = (self.log_dir / f"{interface}.log").open("ab")
            out = log_file
        elif self.inherit_output:
            out = None
        try:
            proc = subprocess.Popen(
                [*self.argv, interface],
                stdin=subprocess.DEVNULL,
                stdout=out,  # type: ignore[arg-type]
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
                env={
                    **os.environ,
                    "LOG_LEVEL": os.environ.get("WG_LOG_LEVEL", "error"),
                    # The userspace backend runs where the kernel module is missing (or by choice):
                    # wireguard-go's banner urging the module would only be noise in the log.
                    "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1",
                },
            )
        finally:
            if log_file is not None:
                log_file.close()
        self.procs[interface] = proc
        deadline = time.monotonic() + self.start_timeout
        while not self.answers(interface):
            if proc.poll() is not None:
                del self.procs[interface]
                raise WireGuardGoError(f"wireguard-go for {interface} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                self.stop(interface)
                raise WireGuardGoError(
                    f"wireguard-go for {interface} did not open its socket in {self.start_timeout} s"
                )
            time.sleep(0.01)
        log.info("wireguard-go started", extra={"interface": interface, "pid": proc.pid})
        return proc.pid

    def _adopt(self, interface: str) -> int | None:
        """Takes over the live wireguard-go that serves the interface's socket, if one does."""
        owner = socket_owner(self.socket(interface))
        started = process_start_time(owner) if owner is not None else None
        if owner is None or started is None:
            return None
        self.procs.pop(interface, None)
        self.adopted[interface] = Adopted(owner, started)
        log.info("wireguard-go adopted", extra={"interface": interface, "pid": owner})
        return owner

    def stop(self, interface: str, timeout: float = 5.0) -> int | None:
        proc = self.procs.pop(interface, None)
        adopted = self.adopted.pop(interface, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()  # wireguard-go removes its socket and TUN device on SIGTERM
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
            return proc.pid
        if adopted is None or not adopted.alive():
            # Not known here: still make sure nothing serves the interface (what `stop` promises).
            owner = socket_owner(self.socket(interface))
            started = process_start_time(owner) if owner is not None else None
            adopted = Adopted(owner, started) if owner is not None and started is not None else None
        if adopted is None:
            return None
        terminate(adopted.pid, timeout)
        return adopted.pid

    def reap(self) -> dict[str, int]:
        """Forgets the processes that ended since the last call; their pids, per interface."""
        dead = {i: p.pid for i, p in self.procs.items() if p.poll() is not None}
        dead |= {i: a.pid for i, a in self.adopted.items() if not a.alive()}
        for interface in dead:
            self.procs.pop(interface, None)
            self.adopted.pop(interface, None)
        return dead

    def devices(self) -> dict[str, int]:
        self.reap()
        return {i: p.pid for i, p in self.procs.items()} | {i: a.pid for i, a in self.adopted.items()}

    def stop_all(self) -> None:
        for interface in sorted(set(self.procs) | set(self.adopted)):
            self.stop(interface)
