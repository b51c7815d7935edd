"""/healthz: the kubelet sees the relay as ready only while it knows where the gateways are."""

from __future__ import annotations

import http.client

from kvpn_relay.health import serve


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_healthz_is_ok_only_while_the_gateways_are_known() -> None:
    ready = [False]
    server = serve(lambda: ready[0], "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        assert get(port, "/healthz") == (503, "the VpnServers have not been listed lately\n")
        ready[0] = True
        assert get(port, "/healthz") == (200, "ok\n")
        assert get(port, "/metrics")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
