"""A stand-in for a cloud UDP load balancer (none can run here): one network namespace on the node network.

What it keeps of the real thing: one virtual address (the namespace's own address on the node network),
each new UDP flow to VIP:port DNATed to one of the port's backends, picked at random, and SNATed to the
VIP, so that replies come back through it (a full-NAT load balancer, as many cloud UDP load balancers
are). Changing a port's backends replaces the whole table in one `nft -f` transaction, then deletes the
conntrack entries of flows to a removed backend, as a cloud load balancer stops sending to a failed
backend and kube-proxy drops stale UDP entries: a client's next datagram starts a new flow. `follow`
keeps the backends in step with a callable (the Nodes behind a Service, say). Nothing of it is health
checking, session affinity or a cloud API.

Its namespace comes from the network's `add_host` (the Cluster's, so that it is in the cluster's Manifest
and a killed run's sweep removes it) and goes with `close`.
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from harness.commands import run

TABLE = "kvpn-lb-standin"


class HostNetwork(Protocol):
    """Where the stand-in is plugged in: harness.cluster.Cluster, or a test's own bridge."""

    def add_host(self, role: str) -> tuple[str, str]:
        """A new namespace on the network with an address on it: (namespace, address)."""
        ...

    def remove_host(self, ns: str) -> None: ...


def parse_backend(backend: str) -> tuple[str, int]:
    """'10.0.0.2:51820' -> ('10.0.0.2', 51820), or ValueError."""
    host, sep, port = backend.rpartition(":")
    if not sep:
        raise ValueError(f"backend {backend!r} is not ip:port")
    return str(ipaddress.IPv4Address(host)), int(port)


def ruleset(vip: str, ports: dict[int, list[str]]) -> str:
    """The whole table for `ports` (port -> backends), replacing any table of the name in one transaction."""
    lines = [
        f"table ip {TABLE} {{}}",  # so that the delete below always has something to delete
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        '  comment "test harness: a stand-in for a cloud UDP load balancer"',
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
    ]
    for port, backends in sorted(ports.items()):
        match = f"ip daddr {vip} udp dport {port}"
        if not backends:
            lines.append(f"    {match} drop")  # no backend: a cloud load balancer drops, it does not answer
            continue
        targets = ", ".join(f"{i} : {host} . {p}" for i, (host, p) in enumerate(map(parse_backend, backends)))
        lines.append(f"    {match} dnat to numgen random mod {len(backends)} map {{ {targets} }}")
    lines += [
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f"    ct status dnat ct original ip daddr {vip} snat to {vip}",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


class LoadBalancer:
    """`lb = LoadBalancer(cluster, "wg")`, `lb.forward(51820, ["172.31.5.11:51820", ...])`, then clients
    send to `lb.vip`; `close()` removes it. See the module docstring."""

    def __init__(self, network: HostNetwork, name: str) -> None:
        self.network = network
        self.name = name
        self.netns, self.vip = network.add_host(f"lb-{name}")
        self.ports: dict[int, list[str]] = {}
        self.errors: list[str] = []  # what the followers could not do (a fetch failing while a node is cut)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._followers: list[threading.Thread] = []
        self._closed = False
        try:
            # Packets leave by the port they came in by: no ICMP redirect telling clients to bypass it.
            for setting in ("ip_forward=1", "conf.all.send_redirects=0", "conf.eth0.send_redirects=0"):
                self._in_ns("sysctl", "-qw", f"net.ipv4.{setting}")
            self._apply()
        except BaseException:
            self.close()
            raise

    def endpoint(self, port: int) -> str:
        return f"{self.vip}:{port}"

    def forward(self, port: int, backends: Iterable[str]) -> None:
        """New UDP flows to VIP:port go to one of `backends` ("ip:port"; none: dropped); flows to a backend
        no longer among them are forgotten, so that their next datagram picks a remaining one."""
        wanted = list(dict.fromkeys(backends))
        for backend in wanted:
            parse_backend(backend)
        with self._lock:
            removed = [b for b in self.ports.get(port, []) if b not in wanted]
            self.ports[port] = wanted
            self._apply()
            for backend in removed:
                self._forget(port, backend)

    def follow(
        self, fetch_backends: Callable[[], Sequence[str]], period: float = 0.2, *, port: int | None = None
    ) -> None:
        """A daemon thread polling `fetch_backends` every `period` s and calling `forward` when the list
        changes, until `close`. `port` defaults to the one port forwarded so far. A fetch that fails
        leaves the backends as they were (noted in `errors`)."""
        if port is None:
            if len(self.ports) != 1:
                raise ValueError(f"follow: say which port (forwarded so far: {sorted(self.ports)})")
            (port,) = self.ports

        def loop(port: int = port) -> None:
            while not self._stop.is_set():
                try:
                    backends = list(dict.fromkeys(fetch_backends()))
                    if backends != self.ports.get(port):
                        self.forward(port, backends)
                except Exception as error:  # the next poll tries again, as a load balancer's controller would
                    self.errors.append(f"port {port}: {error}")
                    del self.errors[:-20]
                self._stop.wait(period)

        thread = threading.Thread(target=loop, name=f"lb-{self.name}-{port}", daemon=True)
        self._followers.append(thread)
        thread.start()

    def conntrack(self) -> str:
        """The namespace's UDP conntrack entries (what a failing assertion shows)."""
        return self._in_ns("conntrack", "-L", "-p", "udp", check=False).stdout

    def close(self) -> None:
        """Stops the followers and removes the namespace (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for thread in self._followers:
            thread.join(timeout=5)
        self.network.remove_host(self.netns)

    def __enter__(self) -> LoadBalancer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the namespace -----------------------------------------------------------------------------

    def _in_ns(self, *argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.netns, *argv, check=check, input=input)

    def _apply(self) -> None:
        self._in_ns("nft", "-f", "-", input=ruleset(self.vip, self.ports))

    def _forget(self, port: int, backend: str) -> None:
        host, backend_port = parse_backend(backend)
        # conntrack exits 1 when no entry matched: nothing to forget is fine.
        proc = self._in_ns(
            "conntrack", "-D", "-p", "udp", "--orig-dst", self.vip, "--orig-port-dst", str(port),
            "--reply-src", host, "--reply-port-src", str(backend_port), check=False,
        )  # fmt: skip
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"lb {self.name}: conntrack -D for {backend} failed: {proc.stderr.strip()}")
