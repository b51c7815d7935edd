"""The test cluster's workload, run as pods: an HTTP server that names itself and its client, and a TCP echo.

GET / answers "hello from pod <pod IP> on <node> (client <address>)"; port 9000 echoes every line back,
on IPv4 and, in a dual-stack cluster, IPv6 alike (a socket bound to "::" takes both),
for a connection that the tests keep open across a gateway's restarts. For the benchmarks' throughput,
GET /bytes/N sends N bytes and POST /sink reads its body away. Test harness only, not kvpn.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import socketserver
import sys
import threading

CHUNK = b"\0" * (256 << 10)


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):
            self._send_bytes(int(self.path.rsplit("/", 1)[1]))
            return
        pod, node = os.environ.get("POD_IP", "?"), os.environ.get("NODE_NAME", "?")
        client = self.client_address[0].removeprefix("::ffff:")  # an IPv4 client, as the IPv4 socket names it
        body = f"hello from pod {pod} on {node} (client {client})\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        left = int(self.headers.get("Content-Length", "0"))
        while left > 0 and (piece := self.rfile.read(min(left, len(CHUNK)))):
            left -= len(piece)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_bytes(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        while size > 0:
            self.wfile.write(CHUNK[: min(size, len(CHUNK))])
            size -= len(CHUNK)

    def log_message(self, *args: object) -> None:
        pass


class Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        while line := self.rfile.readline():
            self.wfile.write(line)


class EchoServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6  # "::" takes IPv4 too (IPV6_V6ONLY is off by default)
    allow_reuse_address = True
    daemon_threads = True


class HelloServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def main() -> None:
    # As PID 1 of its container, a process that sets no handler ignores SIGTERM: the pod would wait out
    # its grace period (30 s) on every deletion, eviction and drain.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    http_port, echo_port = int(sys.argv[1]), int(sys.argv[2])
    echo = EchoServer(("::", echo_port), Echo)  # a pod's own addresses
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    HelloServer(("::", http_port), Hello).serve_forever()


if __name__ == "__main__":
    main()
