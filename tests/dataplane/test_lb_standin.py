"""The load-balancer stand-in (harness/lb.py) on a bridge of its own: flows reach a backend and come back,
and leave a backend the moment it is dropped."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator

import pytest

from harness.commands import run
from harness.lb import LoadBalancer
from harness.netlab import Lab, wait_for

NETWORK = "172.31.238"  # /24; addresses exist only inside the test's namespaces
PORT, BACKEND_PORT = 51820, 7000

# Answers each datagram with the backend's name and the source address it saw.
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(f"{sys.argv[1]} {peer[0]}".encode(), peer)
"""


class Bridge:
    """A node network of the test's own: a bridge namespace; hosts plugged into it as Cluster.add_host does."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.ns = lab.netns("br")
        self.hosts = 0
        run("ip", "-n", self.ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.ns, "link", "set", "br0", "up")

    def add_host(self, role: str) -> tuple[str, str]:
        self.hosts += 1
        ns, port, address = self.lab.netns(role), f"h{self.hosts}", f"{NETWORK}.{10 + self.hosts}"
        eth = self.lab.ifname(f"e{self.hosts}")
        run("ip", "link", "add", eth, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.ns)
        run("ip", "-n", ns, "link", "set", eth, "name", "eth0")
        run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", self.ns, "link", "set", port, "master", "br0", "up")
        return ns, address

    def remove_host(self, ns: str) -> None:
        run("ip", "netns", "del", ns, check=False)


def namespaces(lab: Lab) -> list[str]:
    return [ns for ns in run("ip", "netns", "list").stdout.split() if lab.token in ns]


@pytest.fixture
def client(lab: Lab, bridge: Bridge) -> Iterator[socket.socket]:
    """A UDP socket in a client namespace on the bridge (made there, used from here)."""
    ns, _ = bridge.add_host("client")
    with lab.inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.2)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def bridge(lab: Lab) -> Bridge:
    return Bridge(lab)


def ask(sock: socket.socket, vip: str) -> tuple[str, str] | None:
    """One datagram to VIP:PORT: (the backend that answered, the source address it saw), or None."""
    sock.sendto(b"hello", (vip, PORT))
    try:
        name, seen = sock.recv(2048).decode().split()
    except TimeoutError:
        return None
    return name, seen


def test_flows_reach_a_backend_and_move_when_it_is_dropped(lab: Lab, bridge: Bridge, client: socket.socket) -> None:
    began = time.monotonic()
    backends = {}
    for name in ("b1", "b2"):
        ns, address = bridge.add_host(name)
        lab.spawn(ns, sys.executable, "-c", ECHO, name, str(BACKEND_PORT))
        backends[name] = f"{address}:{BACKEND_PORT}"
    lb = LoadBalancer(bridge, "t")
    try:
        lb.forward(PORT, backends.values())

        def answer() -> tuple[str, str] | None:
            return ask(client, lb.vip)

        first = None

        def answered() -> bool:
            nonlocal first
            first = answer()
            return first is not None

        wait_for(answered, 5, "an answer through the load balancer")  # until the echoes listen
        assert first is not None
        name, seen = first
        assert seen == lb.vip, "full NAT: the backend sees the load balancer, not the client"
        assert [answer() for _ in range(5)] == [first] * 5, "one flow, one backend"

        other = next(n for n in backends if n != name)
        lb.forward(PORT, [backends[other]])
        moved = answer()
        assert moved == (other, lb.vip), f"the same socket's next datagram, {name} dropped\n{lb.conntrack()}"

        # Following a list: the backend put back and the other dropped, the flow moves again.
        current = [backends[name]]
        lb.follow(lambda: current, period=0.05)
        wait_for(lambda: answer() == (name, lb.vip), 3, f"the flow back on {name} once followed")
        current = []
        wait_for(lambda: answer() is None, 3, "nothing answering once no backend is left")
        assert not lb.errors
    finally:
        lb.close()
    assert lb.netns not in namespaces(lab)
    client.close()  # else its namespace outlives its name
    lab.close()
    assert namespaces(lab) == []
    assert time.monotonic() - began < 10
