"""Network namespaces, wireguard-go and wg-quick for dataplane tests, with cleanup that survives failures."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from kvpn_agent.uapi import SOCKET_DIR
from kvpn_core.contract import PeerBinding, encode_data

TIMEOUT = 30.0 if os.environ.get("KVPN_IN_VM") else 10.0
"""Per command; the VM tier runs everything 10-20 times slower."""


def run(*argv: str, check: bool = True, timeout: float = TIMEOUT, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    proc = subprocess.run(argv, text=True, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {(proc.stderr or '').strip()}")
    return proc


def keypair() -> tuple[str, str]:
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    pub = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode(), base64.b64encode(pub).decode()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Lab:
    """Everything a test created; ``close`` removes it all, whatever state it is in."""

    token: str = field(default_factory=lambda: secrets.token_hex(4))
    namespaces: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def netns(self, role: str) -> str:
        name = f"kvt-{self.token}-{role}"
        run("ip", "netns", "add", name)
        self.namespaces.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def ifname(self, role: str) -> str:
        """Unique on the machine: the UAPI socket folder is shared by every namespace."""
        name = f"kvt{self.token}{role}"
        assert len(name) <= 15
        self.interfaces.append(name)
        return name

    def veth(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str) -> None:
        a, b = f"kvt{secrets.token_hex(4)}", f"kvt{secrets.token_hex(4)}"
        run("ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, a, addr_a), (ns_b, b, addr_b)):
            run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")

    def spawn(self, ns: str, *argv: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        out = log.open("ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def close(self) -> None:
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
            # Daemons started inside (wg-quick's wireguard-go) are ours too: end them by pid.
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGTERM)
            deadline = time.monotonic() + 3
            while pids and time.monotonic() < deadline:
                pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
                time.sleep(0.05)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns, check=False)
        for name in self.interfaces:
            with contextlib.suppress(FileNotFoundError):
                (SOCKET_DIR / f"{name}.sock").unlink()


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


def binding_secret(server: str, pb: PeerBinding, created: str = "2024-01-01T00:00:00Z") -> dict[str, Any]:
    """A peer binding Secret as the API returns it."""
    return {
        "metadata": {"name": pb.secret_name(server), "creationTimestamp": created, "labels": {}},
        "type": "kvpn.dev/peer-binding",
        "data": encode_data(pb.to_string_data()),
    }


def wg_quick_config(
    private_key: str,
    address: str,
    server_public_key: str,
    preshared_key: str | None,
    endpoint: str,
    allowed: Sequence[str],
) -> str:
    lines = [
        "[Interface]",
        f"PrivateKey = {private_key}",
        f"Address = {address}",
        "MTU = 1420",
        "",
        "[Peer]",
        f"PublicKey = {server_public_key}",
        *([f"PresharedKey = {preshared_key}"] if preshared_key else []),
        f"Endpoint = {endpoint}",
        f"AllowedIPs = {', '.join(allowed)}",
        "PersistentKeepalive = 25",
    ]
    return "\n".join(lines) + "\n"


def curl(ns: str, url: str, max_time: float = 2) -> str | None:
    """The body, or None when nothing answered within ``max_time``."""
    proc = run(
        "ip", "netns", "exec", ns, "curl", "-s", "--max-time", str(max_time), url, check=False, timeout=max_time + 5
    )
    return proc.stdout if proc.returncode == 0 else None


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

# Keeps one TCP connection busy (a line every 50 ms) until SIGTERM, then prints what became of it.
PROBE = """
import json, signal, socket, sys, threading, time
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
conn.settimeout(None)
print(json.dumps({"connected": True}), flush=True)
opened = time.monotonic()
echoes, result = [], {"broken": None}
def reader():
    try:
        while chunk := conn.recv(4096):
            echoes.extend(time.monotonic() for _ in range(chunk.count(b"\\n")))
        result["broken"] = result["broken"] or "closed by the other end"
    except OSError as error:
        result["broken"] = result["broken"] or f"recv: {error}"
    stop.set()
threading.Thread(target=reader, daemon=True).start()
sent = 0
while not stop.is_set():
    try:
        conn.sendall(b"%d\\n" % sent)
        sent += 1
    except OSError as error:
        result["broken"] = f"send: {error}"
        break
    stop.wait(0.05)
ended = time.monotonic()
time.sleep(0.5)  # the echoes still in flight
marks = sorted([opened, *echoes, ended])
gaps = [b - a for a, b in zip(marks, marks[1:])]
result.update(sent=sent, received=len(echoes), max_gap_s=round(max(gaps, default=0), 3))
print(json.dumps(result), flush=True)
"""


@dataclass
class TcpProbe:
    """One TCP connection from ``ns`` to an echo server, kept busy while something happens."""

    lab: Lab
    ns: str
    host: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TcpProbe:
        self.proc = self.lab.spawn(self.ns, sys.executable, "-c", PROBE, self.host, str(self.port), log=self.log)
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


def echo_server(lab: Lab, ns: str, address: str, port: int) -> None:
    lab.spawn(ns, sys.executable, "-c", ECHO, address, str(port))
    probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=1).close()"
    wait_for(
        lambda: run("ip", "netns", "exec", ns, sys.executable, "-c", probe, check=False).returncode == 0,
        5,
        f"echo server {address}:{port}",
    )
