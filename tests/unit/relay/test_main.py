"""The relay's command line and log lines."""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

from kvpn_core.api import API_VERSION
from kvpn_core.logs import JsonFormatter, PlainFormatter
from kvpn_core.relaywire import RELAY_PORT, FrameReader, Hello, Welcome, frames
from kvpn_relay.main import parse_args

INITIATION = b"\x01\0\0\0" + bytes(144)


def test_the_defaults_are_the_ones_the_cli_and_the_chart_expect() -> None:
    args = parse_args([])
    assert (args.port, args.health_port) == (RELAY_PORT, 8080)
    assert (args.poll_seconds, args.max_streams, args.log_format) == (1.0, 1024, "plain")
    assert parse_args(["--log-format", "json", "--max-streams", "8"]).max_streams == 8


def test_log_lines_carry_their_fields() -> None:
    record = logging.LogRecord("kvpn_relay.relay", logging.INFO, "", 0, "stream closed", None, None)
    record.peer, record.reason = "127.0.0.1:40000", "no Hello within 10 s"
    assert json.loads(JsonFormatter().format(record))["reason"] == "no Hello within 10 s"
    assert PlainFormatter().format(record).endswith("stream closed peer=127.0.0.1:40000 reason=no Hello within 10 s")


class _VpnServers(http.server.BaseHTTPRequestHandler):
    """An API server that knows one thing: the cluster's VpnServers."""

    items: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in (f"/apis/{API_VERSION}/vpnservers", "/apis/coordination.k8s.io/v1/leases"):
            self.send_error(404)
            return
        items = self.items if "vpnservers" in path else []  # no gateway lease: the status alone judges
        body = json.dumps({"items": items, "metadata": {"resourceVersion": "1"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # the stdlib's signature, names included
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_program_carries_a_stream_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """The whole program, as its pod runs it: KUBECONFIG, the list, /healthz, one stream, SIGTERM."""
    gateway = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gateway.settimeout(3)
    gateway.bind(("127.0.0.1", 0))
    listen_port = gateway.getsockname()[1]
    _VpnServers.items = [
        {
            "metadata": {"namespace": "team", "name": "office"},
            "spec": {"listenPort": listen_port},
            "status": {"gateways": [{"node": "node-a", "ready": True, "reason": "Serving", "address": "127.0.0.1"}]},
        }
    ]
    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _VpnServers)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{api.server_address[1]}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")} | {"KUBECONFIG": str(kubeconfig)}
    health_port = _free_port()
    command = [sys.executable, "-m", "kvpn_relay.main", "--port", "0", "--health-port", str(health_port)]
    relay = subprocess.Popen(
        [*command, "--poll-seconds", "0.1", "--log-format", "json"], env=env, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    log: list[dict[str, Any]] = []
    reading = threading.Thread(target=lambda: [lines.put(line) for line in relay.stderr or ()], daemon=True)
    reading.start()

    def logged(message: str) -> dict[str, Any]:
        """The first line of this message, logged already or the next to come."""
        while not (found := [entry for entry in log if entry["message"] == message]):
            log.append(json.loads(lines.get(timeout=10)))  # a bound, not the wait: it starts in about a second
        return found[0]

    try:
        port = logged("relay listening")["port"]
        logged("listed the VpnServers")
        with socket.create_connection(("127.0.0.1", port), timeout=3) as laptop:
            laptop.sendall(Hello("team/office", "key").encode())
            reader = FrameReader()
            received: list[bytes] = []
            while not received:
                received += reader.feed(laptop.recv(65536))
            assert Welcome.decode(received.pop(0)) == Welcome(gateway="node-a")
            laptop.sendall(frames([INITIATION]))
            assert gateway.recvfrom(65536)[0] == INITIATION
            health = http.client.HTTPConnection("127.0.0.1", health_port, timeout=2)
            health.request("GET", "/healthz")
            assert health.getresponse().status == 200
            health.close()
            relay.send_signal(signal.SIGTERM)
            assert relay.wait(timeout=4) == 0
            while chunk := laptop.recv(65536):
                received += reader.feed(chunk)
            assert [Welcome.decode(p) for p in received] == [Welcome(error="the relay is stopping")]
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
        api.shutdown()
        api.server_close()
        gateway.close()
    reading.join(timeout=2)
    if relay.stderr is not None:
        relay.stderr.close()
    while not lines.empty():
        log.append(json.loads(lines.get()))
    messages = [entry["message"] for entry in log]
    assert messages[-1] == "relay stopped"
    assert "stopping" in messages
    assert not [entry for entry in log if entry["level"] in ("warning", "error") or "exception" in entry]
