"""The relay's /healthz: 200 while it knows where the gateways are, 503 before its first list and once
its last one is stale."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)


def serve(ready: Callable[[], bool], host: str, port: int) -> ThreadingHTTPServer:
    """Serves GET /healthz from a daemon thread; the caller shuts it down.

    A thread of its own, not the relay's event loop: a probe must be answered however busy the streams
    are, and `ready` reads only what the gateways' thread last stored.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/healthz":
                self.send_error(404)
                return
            ok = ready()
            body = b"ok\n" if ok else b"the VpnServers have not been listed lately\n"
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # the stdlib's signature, names included
            log.debug("health probe from %s: %s", self.address_string(), format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health endpoint", daemon=True).start()
    return server
