"""The watch store: what a relist changed, and its index."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from typing import ClassVar

from kubernetes.client import ApiClient, Configuration

from kvpn_agent.watch import Informer, Store, trim
from tests.unit.fakes import labelled_secret


def test_the_store_reports_what_a_relist_changed_and_keeps_its_index() -> None:
    store = Store(index=lambda o: ("team", o["metadata"]["labels"]["kvpn.dev/server"]))  # type: ignore[index]
    store.replace([trim(labelled_secret("a")), trim(labelled_secret("b"))])
    assert "managedFields" not in store.get(("team", "a"))["metadata"]  # type: ignore[index]
    changed = store.replace(
        [trim(labelled_secret("a")), trim(labelled_secret("b", "2", server="other")), trim(labelled_secret("c"))]
    )
    assert sorted(o["metadata"]["name"] for o in changed) == ["b", "c"]  # type: ignore[index]
    assert sorted(o["metadata"]["name"] for o in store.indexed(("team", "office"))) == ["a", "c"]  # type: ignore[index]
    gone = store.replace([])
    assert len(gone) == 3
    assert store.indexed(("team", "office")) == []


class _SilentWatches(http.server.BaseHTTPRequestHandler):
    """An API server whose lists are empty and whose watches send nothing, as one behind a dead path."""

    protocol_version = "HTTP/1.1"
    watches: ClassVar[list[float]] = []
    lists: ClassVar[int] = 0
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        if "watch=1" not in self.path:
            type(self).lists += 1
            body = json.dumps({"items": [], "metadata": {"resourceVersion": "7"}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.watches.append(time.monotonic())
        self.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        with contextlib.suppress(OSError):
            while self.rfile.read(1):  # until the client goes
                pass

    def log_message(self, *_: object) -> None:
        pass


def test_reconnect_ends_a_silent_watch_at_once_and_resumes_it_without_a_relist() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SilentWatches)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    informer = Informer(ApiClient(config), "/apis/kvpn.dev/v1alpha1/vpnservers", lambda _obj: None)
    try:
        informer.start()
        assert informer.synced.wait(5)
        deadline = time.monotonic() + 5
        while not _SilentWatches.watches and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(_SilentWatches.watches) == 1
        while informer._response is None and time.monotonic() < deadline:
            time.sleep(0.02)
        asked = time.monotonic()
        informer.reconnect()
        while len(_SilentWatches.watches) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(_SilentWatches.watches) == 2, "no new watch after reconnect"
        assert _SilentWatches.watches[1] - asked < 1.0  # not the read timeout's minutes
        assert "resourceVersion=7" in _SilentWatches.paths[-1]  # resumed where it was
        assert _SilentWatches.lists == 1  # ended on purpose: no failure, no relist in between
    finally:
        informer.stop()
        informer.reconnect()
        server.shutdown()
        server.server_close()
