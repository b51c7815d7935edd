"""A stand-in for CoreDNS in the test cluster (CoreDNS is not packaged here), run as a pod: thin on purpose.

It answers what kvpn's users ask the cluster DNS for: A records of `<service>.<namespace>.svc.<domain>`
(the Service's ClusterIP, from a list of Services every second through the API, as CoreDNS's
kubernetes plugin would watch them), NODATA for other record types of those names, NXDOMAIN for
everything else (no upstream here). UDP and TCP on --port. Not kvpn: test harness only.
"""

from __future__ import annotations

import argparse
import signal
import socket
import socketserver
import struct
import sys
import threading
import time

from kubernetes import client, config

NOERROR, NXDOMAIN, FORMERR = 0, 3, 1
TYPE_A, CLASS_IN = 1, 1


class Records:
    """name (lower case, no trailing dot) -> IPv4 address, refreshed from the API."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.names: dict[str, str] = {}
        self.lock = threading.Lock()

    def refresh_forever(self, period: float) -> None:
        config.load_incluster_config()
        core = client.CoreV1Api()
        while True:
            try:
                services = core.list_service_for_all_namespaces(_request_timeout=10).items
                names = {
                    f"{s.metadata.name}.{s.metadata.namespace}.svc.{self.domain}": s.spec.cluster_ip
                    for s in services
                    if s.spec.cluster_ip and s.spec.cluster_ip != "None" and ":" not in s.spec.cluster_ip
                }
                with self.lock:
                    self.names = names
            except Exception as error:  # the API server away for a moment: keep the names known
                print(f"dns stand-in: list services failed: {error}", flush=True)
            time.sleep(period)

    def lookup(self, name: str) -> str | None:
        with self.lock:
            return self.names.get(name)


def answer(query: bytes, records: Records) -> bytes | None:
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:
        return struct.pack("!HHHHHH", ident, 0x8180 | FORMERR, 0, 0, 0, 0)
    labels, offset = [], 12
    while offset < len(query) and (length := query[offset]):
        labels.append(query[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    qtype, _qclass = struct.unpack("!HH", query[offset + 1 : offset + 5])
    question = query[12 : offset + 5]
    name = ".".join(labels).lower()
    address = records.lookup(name)
    rd = flags & 0x0100
    if address is None:
        return struct.pack("!HHHHHH", ident, 0x8480 | rd | NXDOMAIN, 1, 0, 0, 0) + question
    if qtype != TYPE_A:  # the name exists, with no record of this type
        return struct.pack("!HHHHHH", ident, 0x8480 | rd, 1, 0, 0, 0) + question
    record = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 5, 4) + socket.inet_aton(address)
    return struct.pack("!HHHHHH", ident, 0x8480 | rd, 1, 1, 0, 0) + question + record


def main() -> None:
    # As PID 1 of its container, a process that sets no handler ignores SIGTERM: the pod would wait out
    # its grace period (30 s) on every deletion, eviction and drain.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=5353)
    parser.add_argument("--domain", default="cluster.local")
    args = parser.parse_args()
    records = Records(args.domain)
    threading.Thread(target=records.refresh_forever, args=(1.0,), daemon=True).start()

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            if (reply := answer(data, records)) is not None:
                sock.sendto(reply, self.client_address)

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while header := self.rfile.read(2):
                (length,) = struct.unpack("!H", header)
                if (reply := answer(self.rfile.read(length), records)) is None:
                    return
                self.wfile.write(struct.pack("!H", len(reply)) + reply)

    socketserver.ThreadingUDPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    udp = socketserver.ThreadingUDPServer(("0.0.0.0", args.port), Udp)  # noqa: S104 - a pod's own address
    tcp = socketserver.ThreadingTCPServer(("0.0.0.0", args.port), Tcp)  # noqa: S104
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    print(f"dns stand-in: serving *.svc.{args.domain} on port {args.port}", flush=True)
    udp.serve_forever()


if __name__ == "__main__":
    main()
