"""Traffic inside a Lab's namespaces: whoami HTTP servers, curl, an echo server and a TcpProbe against it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.commands import run
from harness.netlab import Lab, wait_for

TCP_PROBE = Path(__file__).with_name("tcp_probe.py")

# A reply that names the client's address, so a test can see whether it was masqueraded. One process
# serves every ADDRESS:PORT given (in the VM tier each Python start costs seconds).
WHOAMI = """
import http.server, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
servers = [http.server.ThreadingHTTPServer((a, int(p)), H) for a, _, p in (x.rpartition(":") for x in sys.argv[1:])]
for s in servers[1:]:
    threading.Thread(target=s.serve_forever, daemon=True).start()
servers[0].serve_forever()
"""

# An echo server for one long-lived TCP connection (TcpProbe): a line in, the same line out.
ECHO = """
import socketserver, sys
class H(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
class S(socketserver.ThreadingTCPServer):
    daemon_threads = allow_reuse_address = True
S((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


def whoami_server(lab: Lab, ns: str, address: str, port: int) -> None:
    whoami_servers(lab, ns, [(address, port)])


def whoami_servers(lab: Lab, ns: str, listen: Sequence[tuple[str, int]]) -> None:
    lab.spawn(ns, sys.executable, "-c", WHOAMI, *(f"{address}:{port}" for address, port in listen))
    address, port = listen[-1]  # bound last, after the others
    wait_for(
        lambda: (
            run(
                "ip", "netns", "exec", ns, "curl", "-s", "--max-time", "1", f"http://{address}:{port}/", check=False
            ).returncode
            == 0
        ),
        30,
        f"http server {address}:{port}",
    )


def curl(ns: str, url: str, max_time: float = 2) -> str | None:
    """The body, or None when nothing answered within ``max_time``."""
    proc = run(
        "ip", "netns", "exec", ns, "curl", "-s", "--max-time", str(max_time), url, check=False, timeout=max_time + 5
    )
    return proc.stdout if proc.returncode == 0 else None


class RequestLoop:
    """New requests from ``ns`` to ``url`` in a thread while something happens: `with RequestLoop(...) as r:`;
    then ``attempts`` and ``failures`` (when each request that did not get ``expect`` ended)."""

    def __init__(self, ns: str, url: str, expect: str, max_time: float = 2, pause: float = 0.1) -> None:
        self.ns, self.url, self.expect, self.max_time, self.pause = ns, url, expect, max_time, pause
        self.attempts = 0
        self.failures: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.attempts += 1
            if curl(self.ns, self.url, max_time=self.max_time) != self.expect:
                self.failures.append(time.monotonic())
            self._stop.wait(self.pause)

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.max_time + 30)


def echo_server(lab: Lab, ns: str, address: str, port: int) -> None:
    lab.spawn(ns, sys.executable, "-c", ECHO, address, str(port))
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=1).close()"
    wait_for(
        lambda: run("ip", "netns", "exec", ns, sys.executable, "-c", probe, check=False).returncode == 0,
        5,
        f"echo server {address}:{port}",
    )


@dataclass
class TcpProbe:
    """One TCP connection from ``ns`` to an echo server, kept busy (a line every 50 ms, harness/tcp_probe.py)
    while something happens."""

    lab: Lab
    ns: str
    host: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    DRAIN_S = 0.5
    """How long the probe still reads after SIGTERM: the echoes in flight count as received."""

    def __enter__(self) -> TcpProbe:
        argv = [sys.executable, str(TCP_PROBE), self.host, str(self.port), "--drain", str(self.DRAIN_S)]
        self.proc = self.lab.spawn(self.ns, *argv, log=self.log)
        wait_for(lambda: '"connected"' in self.log.read_text(), 5, f"a TCP connection to {self.host}:{self.port}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def result(self) -> dict[str, Any]:
        """After the block: broken (the error that ended it, or None), sent, received, max_gap_s."""
        lines = [line for line in self.log.read_text().splitlines() if line.startswith("{")]
        found: dict[str, Any] = json.loads(lines[-1])
        return found


# WHOAMI for either family: an address with a colon listens on an AF_INET6 socket (http.server's own
# servers are AF_INET only).
ANY_FAMILY = """
import http.server, socket
class AnyFamily(http.server.ThreadingHTTPServer):
    def __init__(self, address, handler):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)
http.server.ThreadingHTTPServer = AnyFamily
"""


def http_url(address: str, port: int, path: str = "/") -> str:
    """``http://address:port/``, the address bracketed when it is IPv6."""
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{path}"


def whoami_servers_any_family(lab: Lab, ns: str, listen: Sequence[tuple[str, int]]) -> None:
    """``whoami_servers`` whose addresses may be IPv6 too: one process for all of them."""
    lab.spawn(ns, sys.executable, "-c", ANY_FAMILY + WHOAMI, *(f"{address}:{port}" for address, port in listen))
    last = http_url(*listen[-1])  # bound last, after the others
    wait_for(lambda: curl(ns, last, max_time=1) is not None, 30, f"http server {last}")


# One ICMP echo, answered or not, from a raw socket: the machines need no ping binary (iputils is not
# among the dataplane tier's prerequisites). The kernel fills in an ICMPv6 checksum itself, an ICMP one
# is ours to compute; an IPv4 raw socket receives the IP header too.
ECHO_REQUEST = """
import ipaddress, os, select, socket, struct, sys, time
dst, timeout = sys.argv[1], float(sys.argv[2])
v6 = ":" in dst
family, proto, request, reply = (
    (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP, 8, 0)
)
ident, payload = os.getpid() & 0xFFFF, b"kvpn-test echo"
def checksum(data):
    data += b"\\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
packet = struct.pack("!BBHHH", request, 0, 0, ident, 1) + payload
if not v6:
    packet = packet[:2] + struct.pack("!H", checksum(packet)) + packet[4:]
with socket.socket(family, socket.SOCK_RAW, proto) as sock:
    sock.sendto(packet, (dst, 0))
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data, source = sock.recvfrom(4096)
        if not v6:
            data = data[(data[0] & 0x0F) * 4 :]
        kind, _, _, got_ident, _ = struct.unpack_from("!BBHHH", data)
        if kind == reply and got_ident == ident and ipaddress.ip_address(source[0]) == ipaddress.ip_address(dst):
            print("reply")
            break
"""


def echo_answered(ns: str, address: str, timeout: float = 2) -> bool:
    """Whether ``address`` answers one ICMP (or ICMPv6) echo request sent from ``ns`` within ``timeout``."""
    proc = run(
        "ip", "netns", "exec", ns, sys.executable, "-c", ECHO_REQUEST, address, str(timeout),
        check=False, timeout=timeout + 10,
    )  # fmt: skip
    return proc.stdout.strip() == "reply"
