"""kvpn-relay: the command line of the in-cluster relay behind `kubectl vpn up --via api`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import kubernetes

from kvpn_core.kube import Kube
from kvpn_core.logs import setup_logging
from kvpn_core.relaywire import RELAY_PORT
from kvpn_relay import health
from kvpn_relay.gateways import Gateways
from kvpn_relay.relay import Relay, Settings

log = logging.getLogger("kvpn_relay")

API_TIMEOUT_SECONDS = 10.0
"""A list that hangs longer than this is a failed one: the next poll tries again."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kvpn-relay",
        description="Carries the WireGuard datagrams of `kubectl vpn up --via api` port-forwards to the gateways.",
    )
    parser.add_argument("--port", type=int, default=RELAY_PORT, help=f"TCP port of the streams (default {RELAY_PORT})")
    parser.add_argument(
        "--address",
        default="0.0.0.0",  # noqa: S104 - where a port-forward arrives depends on the container runtime
        help="address to listen on (default 0.0.0.0; 127.0.0.1 admits port-forwards only)",
    )
    parser.add_argument("--health-port", type=int, default=8080, help="/healthz (default 8080; 0: off)")
    parser.add_argument(
        "--poll-seconds", type=float, default=1.0, help="list the VpnServers, and move streams, this often (default 1)"
    )
    parser.add_argument(
        "--max-streams", type=int, default=1024, help="refuse connections beyond this many (default 1024)"
    )
    parser.add_argument("--log-format", choices=["plain", "json"], default="plain")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def api_client() -> kubernetes.client.ApiClient:
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
        except (kubernetes.config.ConfigException, OSError) as exc:
            raise SystemExit(f"kvpn-relay: no cluster to talk to (in-cluster or KUBECONFIG): {exc}") from exc
    configuration = kubernetes.client.Configuration.get_default_copy()
    # No retries: a list that fails is tried again at the next poll, a second later, not four times in a row.
    configuration.retries = False
    return kubernetes.client.ApiClient(configuration)


async def serve(relay: Relay, address: str, port: int) -> None:
    """Runs the relay until SIGTERM (a pod's stop) or SIGINT, then ends every stream."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = await relay.start(address, port)
    log.info("relay listening", extra={"address": address, "port": bound, "max_streams": relay.settings.max_streams})
    await stop.wait()
    log.info("stopping")
    await relay.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_format, args.verbose)
    gateways = Gateways(Kube(api_client(), timeout=API_TIMEOUT_SECONDS), poll_seconds=args.poll_seconds).start()
    endpoint = None
    if args.health_port:
        # Any address: the kubelet probes from the node.
        endpoint = health.serve(lambda: gateways.ready, "0.0.0.0", args.health_port)  # noqa: S104 - see above
    settings = Settings(poll_seconds=args.poll_seconds, max_streams=args.max_streams)
    try:
        asyncio.run(serve(Relay(gateways, settings), args.address, args.port))
    finally:
        gateways.stop()
        if endpoint is not None:
            endpoint.shutdown()


if __name__ == "__main__":
    main()
