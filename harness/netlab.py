"""Network namespaces, veths and processes for dataplane tests and benchmarks, removed at the end whatever happens.

Every name starts with the lab's prefix (``kvt`` for tests, ``kvb-`` for benchmarks) and carries a random
token, so two runs (or a test run and a benchmark) never share a namespace, an interface or a UAPI socket
(/var/run/wireguard is shared by all namespaces). ``close`` runs from ``finally``, from ``atexit`` and after
SIGTERM/SIGHUP/SIGALRM (turned into exceptions by ``guard``), and is idempotent: the closers first, then
processes (by pid), then the namespaces (which takes their links, TUN devices and sockets with them), then
the UAPI socket files.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from harness.commands import run
from kvpn_agent.linux import SOCKET_DIR

CLONE_NEWNET = 0x40000000
IFNAMSIZ = 15


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Interrupted(BaseException):
    """A signal that ends the run; BaseException so that no ``except Exception`` swallows it."""


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"{signal.Signals(signum).name}")


@contextlib.contextmanager
def guard(max_seconds: int) -> Iterator[None]:
    """SIGTERM/SIGHUP end the run like Ctrl-C does (through ``finally``); SIGALRM bounds its duration."""
    old = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)}
    signal.alarm(max_seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        for s, handler in old.items():
            signal.signal(s, handler)


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class Lab:
    """Everything one test or benchmark created; ``close`` removes it all, whatever state it is in.

    Namespaces are ``<prefix without its dash>-<token>-<role>`` and interfaces ``<prefix><token><role>``:
    ``Lab("kvt")`` makes ``kvt-1a2b3c4d-node`` and ``kvt1a2b3c4dn``, ``Lab("kvb-")`` makes
    ``kvb-1a2b3c4d-node`` and ``kvb-1a2b3c4dn``, the names each side has always used.
    """

    prefix: str
    token: str = field(default_factory=lambda: secrets.token_hex(4))
    namespaces: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    _home: int | None = None
    _closed: bool = False

    def __post_init__(self) -> None:
        atexit.register(self.close)

    def netns(self, role: str) -> str:
        name = f"{self.prefix.rstrip('-')}-{self.token}-{role}"
        self.namespaces.append(name)  # before creating it: a half-made namespace is removed too
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def ifname(self, role: str) -> str:
        """Unique on the machine: the UAPI socket folder is shared by every namespace."""
        name = f"{self.prefix}{self.token}{role}"
        if len(name) > IFNAMSIZ:
            raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")
        self.interfaces.append(name)
        return name

    def veth(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str, role: str | None = None) -> tuple[str, str]:
        """A veth pair from ``ns_a`` to ``ns_b``, addressed and up: ``<role>a``/``<role>b`` interfaces, or
        without a role two fresh random names on every call (a lab may link many namespaces)."""
        if role is None:
            a, b = f"{self.prefix}{secrets.token_hex(4)}", f"{self.prefix}{secrets.token_hex(4)}"
        else:
            a, b = self.ifname(f"{role}a"), self.ifname(f"{role}b")
        run("ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, a, addr_a), (ns_b, b, addr_b)):
            run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        return a, b

    def spawn(
        self, ns: str, *argv: str, log: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A process inside ``ns``, in its own session (a Ctrl-C reaches only us; ``close`` ends it)."""
        out = log.open("ab") if log else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        finally:
            if log is not None and not isinstance(out, int):
                out.close()
        self.processes.append(proc)
        return proc

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """This thread (and what it starts) in ``ns``, as the agent runs in the node's namespace."""
        if self._home is None:
            self._home = os.open("/proc/self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            _setns(self._home)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._home is not None:
            with contextlib.suppress(OSError):
                _setns(self._home)  # out of the namespaces before they go
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception as exc:  # cleanup goes on whatever one step does
                print(f"cleanup: {exc}", file=sys.stderr)
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        for ns in self.namespaces:
            self._empty(ns)
            run("ip", "netns", "del", ns, check=False)
        for name in self.interfaces:
            with contextlib.suppress(FileNotFoundError):
                (SOCKET_DIR / f"{name}.sock").unlink()
        if self._home is not None:
            os.close(self._home)
            self._home = None

    @staticmethod
    def _empty(ns: str) -> None:
        """Ends the processes still inside a namespace we created (daemons such as wg-quick's wireguard-go,
        started by tools in it), by pid."""
        me = os.getpid()

        def pids() -> list[int]:
            out = run("ip", "netns", "pids", ns, check=False).stdout.split()
            return [int(p) for p in out if int(p) != me]

        left = pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = pids()
            if not left:
                return
