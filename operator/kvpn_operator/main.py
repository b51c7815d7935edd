"""kvpn-operator: the command line that starts the kopf operator."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import threading
from collections.abc import Collection, Mapping

import kopf
import kubernetes

# kopf.run takes identity= and insights=, but kopf 1.45 does not export their types.
from kopf._cogs.structs.references import Insights
from kopf._core.engines.peering import Identity

from kvpn_core.kube import Kube
from kvpn_operator import handlers, readiness
from kvpn_operator.gateway_watch import GatewayWatch, scope
from kvpn_operator.server import ClusterFacts
from kvpn_operator.storage import KubeStorage

log = logging.getLogger("kvpn.operator")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvpn-operator", description="Reconciles VpnServers and VpnPeers.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch only this namespace (repeatable; globs allowed)",
    )
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=8080,
        help="serve /healthz on this port (0 turns it off; default 8080)",
    )
    parser.add_argument(
        "--readiness-port",
        type=int,
        default=8081,
        help="serve /readyz on this port: 200 only while the operator can reconcile (0 turns it off; default 8081)",
    )
    parser.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain")
    parser.add_argument(
        "--dns-service", default="kube-system/kube-dns", help="namespace/name of the cluster DNS Service"
    )
    return parser.parse_args(argv)


def _load_config() -> None:
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
        except (kubernetes.config.ConfigException, OSError) as exc:
            raise SystemExit(f"kvpn-operator: no cluster to talk to (in-cluster or KUBECONFIG): {exc}") from exc


def _api_client() -> kubernetes.client.ApiClient:
    configuration = kubernetes.client.Configuration.get_default_copy()
    # One pooled connection per handler thread: a smaller pool drops and re-opens TLS connections.
    configuration.connection_pool_maxsize = handlers.WORKER_THREADS + 4
    return kubernetes.client.ApiClient(configuration)


def _probe_client() -> kubernetes.client.ApiClient:
    """A client of its own for the readiness reads: no retries, so an API server that does not answer
    costs a probe one read timeout, not four (urllib3 retries a timed-out GET three times)."""
    configuration = kubernetes.client.Configuration.get_default_copy()
    configuration.retries = False
    configuration.connection_pool_maxsize = 2
    return kubernetes.client.ApiClient(configuration)


def identity(environ: Mapping[str, str] = os.environ) -> Identity:
    """Who this operator is to kopf: the pod's name (POD_NAME, from the downward API), else host/pid.

    Never the login name: kopf's own default asks getpass.getuser(), which raises for a uid without a
    passwd entry, such as the image's 65532 (the pod then crash-loops with "getpwuid(): uid not found").
    """
    return Identity(environ.get("POD_NAME") or f"{socket.gethostname()}/{os.getpid()}")


def _readiness(insights: Insights, started: threading.Event, clusterwide: bool) -> readiness.Readiness:
    """The readiness verdict over kopf's own view of what it watches.

    kopf changes these sets in its event loop while the probe reads them in another thread: frozenset()
    of a set copies it in one step under the GIL, so the probe never iterates a set that changes.
    """

    def watching() -> Collection[str]:
        return {f"{r.plural}.{r.group}" for r in frozenset(insights.watched_resources)}

    def namespaces() -> Collection[str] | None:
        return None if clusterwide else {ns for ns in frozenset(insights.namespaces) if ns is not None}

    kube = Kube(_probe_client(), timeout=readiness.READ_TIMEOUT_SECONDS)
    return readiness.Readiness(KubeStorage(kube), started=started.is_set, watching=watching, namespaces=namespaces)


def _watch_for_a_stall(probe: readiness.Readiness, done: threading.Event, stalled: list[str]) -> None:
    """Stops kopf when it has not watched a kind the API server serves for a while (see STALL_SECONDS).

    The process then exits non-zero and the kubelet starts it again, which makes kopf scan afresh: its
    /healthz stays 200 all along, so nothing else would restart it. SIGTERM to itself, not kopf's
    stop_flag: kopf waits for a threading.Event in an executor thread that asyncio.run then waits for.
    """
    while not done.wait(readiness.CACHE_SECONDS):
        if found := probe.stalled():
            stalled.extend(found)
            log.error(
                "kopf has not started watching %s, which the API server serves: a CRD created after kopf's "
                "last scan (kopf rescans on CRD events, when it may watch CRDs, and can miss one); "
                "stopping, so that a restart scans again",
                ", ".join(found),
            )
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _fewer_malloc_arenas() -> None:
    """glibc gives each thread its own malloc arena; with 16 handler threads that is most of the RSS.

    Two arenas keep the memory of a 1,000-peer burst under 250 MiB at no measurable cost in speed.
    """
    m_arena_max = -8
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, 2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.readiness_port and args.readiness_port == args.liveness_port:
        raise SystemExit(f"kvpn-operator: --readiness-port and --liveness-port are both {args.readiness_port}")
    _fewer_malloc_arenas()
    dns_ns, _, dns_name = args.dns_service.partition("/")
    if not dns_name:
        raise SystemExit(f"kvpn-operator: --dns-service wants namespace/name; got {args.dns_service!r}")
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    # Our own clients' request lines would drown the operator's log at debug level.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    # One line per probe of /healthz (kopf's aiohttp server) would be most of the log.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _load_config()
    memo = handlers.Services(
        storage=KubeStorage(Kube(_api_client())),
        facts=ClusterFacts(
            cluster_domain=args.cluster_domain,
            dns_service=(dns_ns, dns_name),
        ),
    )
    clusterwide = not args.namespace
    insights = Insights()
    started = threading.Event()  # kopf raises it once the startup handlers have run
    done = threading.Event()
    probe = _readiness(insights, started, clusterwide)
    stalled: list[str] = []
    threading.Thread(target=_watch_for_a_stall, args=(probe, done, stalled), name="stall watch", daemon=True).start()
    gateway_watch = GatewayWatch(memo.storage, scope(args.namespace)).start()
    endpoint = None
    if args.readiness_port:
        try:
            endpoint = readiness.serve(probe, port=args.readiness_port)
        except OSError as exc:
            # Reconciling goes on; a probe of this port fails, so the pod shows as not Ready, and this says why.
            log.error("/readyz not served on port %d: %s", args.readiness_port, exc)  # noqa: TRY400 - not a bug
    try:
        kopf.run(
            identity=identity(),
            standalone=True,  # one replica (the Deployment uses Recreate): no peering objects needed
            clusterwide=clusterwide,
            namespaces=args.namespace,
            # kopf's /healthz answers from its event loop, touching no API: a restart fixes what it reports.
            liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
            insights=insights,
            ready_flag=started,
            memo=memo,
        )
    finally:
        done.set()
        gateway_watch.stop()
        if endpoint is not None:
            endpoint.shutdown()
    if stalled:
        raise SystemExit(f"kvpn-operator: kopf does not watch {', '.join(stalled)}; exiting to scan again")


if __name__ == "__main__":
    main()
