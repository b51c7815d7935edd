"""Prometheus metrics of the agent and its peers, and the HTTP endpoint for /metrics, /healthz and /readyz."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

PEER_LABELS = ["server_namespace", "server", "peer_namespace", "peer"]
"""Whose namespace each label means is in its name, as in the conditions' and logs' keys."""


@dataclass(frozen=True)
class PeerStats:
    """One peer as a gateway sees it (read from the device), named as in the API."""

    server_namespace: str
    server: str
    peer_namespace: str
    peer: str
    public_key: str
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    endpoint: str | None


class PeerCollector:
    """Per-peer series from the latest device read: a peer that goes away takes its series with it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: tuple[PeerStats, ...] = ()

    def update(self, stats: Iterable[PeerStats]) -> None:
        with self._lock:
            self._stats = tuple(stats)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            stats = self._stats
        handshake = GaugeMetricFamily(
            "kvpn_peer_last_handshake_seconds", "Unix time of the peer's last handshake (0: never).", labels=PEER_LABELS
        )
        rx = CounterMetricFamily("kvpn_peer_rx_bytes", "Bytes received from the peer.", labels=PEER_LABELS)
        tx = CounterMetricFamily("kvpn_peer_tx_bytes", "Bytes sent to the peer.", labels=PEER_LABELS)
        for s in stats:
            labels = [s.server_namespace, s.server, s.peer_namespace, s.peer]
            handshake.add_metric(labels, s.last_handshake or 0.0)
            rx.add_metric(labels, s.rx_bytes)
            tx.add_metric(labels, s.tx_bytes)
        yield from (handshake, rx, tx)


class Metrics:
    """Every metric of one agent, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sync_duration = Histogram(
            "kvpn_agent_sync_duration_seconds",
            "Time to bring the node to the desired state: full (with read-back) or incremental.",
            ["mode"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.sync_errors = Counter(
            "kvpn_agent_sync_errors", "Syncs, or servers within a sync, that failed.", ["mode"], registry=self.registry
        )
        self.backend = Info("kvpn_agent_backend", "The WireGuard implementation in use.", registry=self.registry)
        self.api_reachable = Gauge(
            "kvpn_agent_api_reachable", "1 while every watch on the API server is connected.", registry=self.registry
        )
        self.problems = Gauge(
            "kvpn_agent_desired_state_problems",
            "Peers or servers left out of the dataplane because their desired state is unusable.",
            ["server_namespace", "server", "reason"],
            registry=self.registry,
        )
        self.peers = PeerCollector()
        self.registry.register(self.peers)

    def set_problems(self, counts: dict[tuple[str, str, str], int]) -> None:
        self.problems.clear()
        for labels, count in counts.items():
            self.problems.labels(*labels).set(count)


def serve(
    metrics: Metrics,
    address: str,
    port: int,
    healthy: Callable[[], bool],
    ready: Callable[[], tuple[bool, str]],
) -> ThreadingHTTPServer:
    """Starts the HTTP endpoint in a daemon thread.

    /healthz: the loop is alive (a liveness probe restarts the pod otherwise). /readyz: the
    dataplane is as desired; when not, the body says why ("not ready: ...").
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = healthy()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"loop stalled\n", "text/plain")
            elif path == "/readyz":
                ok, reason = ready()
                body = b"ok\n" if ok else f"not ready: {reason}\n".encode()
                self._reply(200 if ok else 503, body, "text/plain; charset=utf-8")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass  # a scrape every few seconds is not news

    server = ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
