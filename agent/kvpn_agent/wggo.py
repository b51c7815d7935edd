"""The userspace backend: starts and supervises one wireguard-go per interface, netlink for the rest."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from kvpn_agent.netlink import Netlink, NetlinkConfigured
from kvpn_agent.uapi import SOCKET_DIR

log = logging.getLogger(__name__)


class WireGuardGoError(Exception):
    pass


class WireGuardGo:
    """wireguard-go processes, one per interface, in the foreground so the agent sees them die.

    ``prefix`` runs them elsewhere (``ip netns exec NS`` in tests). They are started in their own
    session so that a signal to the agent's process group (a rolling update) leaves tunnels up;
    an agent that restarts finds them again by their sockets.
    """

    def __init__(
        self,
        prefix: Sequence[str] = (),
        binary: str = "wireguard-go",
        socket_dir: Path = SOCKET_DIR,
        log_dir: Path | None = None,
        start_timeout: float = 5.0,
    ) -> None:
        self.argv = [*prefix, binary, "-f"]
        self.socket_dir = socket_dir
        self.log_dir = log_dir
        self.start_timeout = start_timeout
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

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

    def start(self, interface: str) -> None:
        proc = self.procs.get(interface)
        if proc is not None and proc.poll() is None and self.answers(interface):
            return
        self.stop(interface)
        with contextlib.suppress(FileNotFoundError):
            self.socket(interface).unlink()  # left by a killed process; wireguard-go refuses to start over it
        out: int | object = subprocess.DEVNULL
        log_file = None
        if self.log_dir is not None:
            log_file = (self.log_dir / f"{interface}.log").open("ab")
            out = log_file
        try:
            proc = subprocess.Popen(
                [*self.argv, interface],
                stdin=subprocess.DEVNULL,
                stdout=out,  # type: ignore[arg-type]
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "LOG_LEVEL": os.environ.get("WG_LOG_LEVEL", "error")},
            )
        finally:
            if log_file is not None:
                log_file.close()
        self.procs[interface] = proc
        deadline = time.monotonic() + self.start_timeout
        while not self.answers(interface):
            if proc.poll() is not None:
                raise WireGuardGoError(f"wireguard-go for {interface} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                self.stop(interface)
                raise WireGuardGoError(
                    f"wireguard-go for {interface} did not open its socket in {self.start_timeout} s"
                )
            time.sleep(0.02)
        log.info("wireguard-go started", extra={"interface": interface, "pid": proc.pid})

    def stop(self, interface: str, timeout: float = 5.0) -> None:
        proc = self.procs.pop(interface, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # wireguard-go removes its socket and TUN device on SIGTERM
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def stop_all(self) -> None:
        for interface in list(self.procs):
            self.stop(interface)


class UserspaceLink(NetlinkConfigured):
    """LinkBackend for wireguard-go: the process creates the TUN device, netlink configures it."""

    def __init__(self, netlink: Netlink, wggo: WireGuardGo) -> None:
        self.netlink = netlink
        self.wggo = wggo

    def create(self, interface: str) -> None:
        # A link without a live device is a leftover (or a kernel link of the same name): start clean.
        self.wggo.stop(interface)
        self.netlink.delete(interface)
        self.wggo.start(interface)

    def delete(self, interface: str) -> None:
        self.wggo.stop(interface)
        self.netlink.delete(interface)
        with contextlib.suppress(FileNotFoundError):
            self.wggo.socket(interface).unlink()
