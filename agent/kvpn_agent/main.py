"""kvpn-agent: the command line of the node agent (`run`, the default, `cleanup`, and `wireguard-go`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from kvpn_agent.linux import SOCKET_DIR
from kvpn_agent.supervisor_api import READY_FILE, SUPERVISOR_SOCKET
from kvpn_core import logs

if TYPE_CHECKING:
    import kubernetes

# Each command imports what it runs when it runs: `wireguard-go` is a long-lived process that needs
# neither the Kubernetes client, nor pydantic, nor pyroute2 (a third of the memory, and of the start).

log = logging.getLogger("kvpn_agent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    parser = argparse.ArgumentParser(prog="kvpn-agent", description="The kvpn node agent.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="make this node's dataplane match its VpnServers (the default)")
    run.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""), help="this node (default: $NODE_NAME)")
    run.add_argument(
        "--pod-namespace",
        default=os.environ.get("POD_NAMESPACE", ""),
        help="this agent's pod's namespace (default: $POD_NAMESPACE)",
    )
    run.add_argument(
        "--pod-name",
        default=os.environ.get("POD_NAME", ""),
        help="read at a stop: a pod being deleted hands its leases over for its replacement (default: $POD_NAME)",
    )
    run.add_argument(
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="serve the VpnServers of this namespace (repeatable; default: every namespace it may list)",
    )
    run.add_argument(
        "--metrics-port", type=int, default=9586, help="/metrics, /healthz, /readyz (default 9586; 0: off)"
    )
    run.add_argument("--metrics-address", default="0.0.0.0", help="address to serve them on (default 0.0.0.0)")  # noqa: S104 - a DaemonSet pod is scraped from the network
    run.add_argument("--resync-seconds", type=float, default=30.0, help="full read-back and repair (default 30)")
    run.add_argument(
        "--report-seconds", type=float, default=5.0, help="read peer handshakes and bytes this often (default 5)"
    )
    run.add_argument(
        "--start-timeout",
        type=float,
        default=10.0,
        help="wait this long for the API server at start before serving the state file (default 10)",
    )
    run.add_argument("--backend", choices=["auto", "kernel", "userspace"], default="auto")
    clean = commands.add_parser("cleanup", help="remove every interface, process, table and file it made")
    for sub in (run, clean):
        sub.add_argument("--state-dir", type=Path, default=Path("/var/lib/kvpn"), help="default /var/lib/kvpn")
        sub.add_argument(
            "--netns",
            metavar="NAME",
            help="TEST AND DEMO AID: put the dataplane (WireGuard links, wireguard-go, nftables) in this existing "
            "network namespace; the agent itself, its API connection and its metrics stay where it runs",
        )
        sub.add_argument(
            "--wireguard-go-supervisor",
            type=Path,
            metavar="SOCKET",
            help="userspace backend: have `kvpn-agent wireguard-go` listening on SOCKET start and stop wireguard-go "
            "(they then outlive this agent, as in a pod they must); default: start them as children",
        )
    supervise = commands.add_parser(
        "wireguard-go",
        help="start and supervise wireguard-go processes on the agent's request (the userspace dataplane's own pod)",
    )
    supervise.add_argument(
        "--socket", type=Path, default=SUPERVISOR_SOCKET, help=f"where the agent asks (default {SUPERVISOR_SOCKET})"
    )
    supervise.add_argument("--binary", default="wireguard-go", help="the wireguard-go to run (default: on PATH)")
    supervise.add_argument(
        "--uapi-dir", type=Path, default=SOCKET_DIR, help=f"where wireguard-go opens its sockets (default {SOCKET_DIR})"
    )
    supervise.add_argument(
        "--start-timeout", type=float, default=5.0, help="wait this long for a device's socket (default 5)"
    )
    for sub in (run, clean, supervise):
        sub.add_argument("--log-format", choices=["plain", "json"], default="plain")
        sub.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def setup_logging(fmt: str, verbose: bool) -> None:
    logs.setup_logging(fmt, verbose)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def api_client() -> kubernetes.client.ApiClient | None:
    import kubernetes  # noqa: PLC0415 -- see the imports

    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
        except (kubernetes.config.ConfigException, OSError) as exc:
            log.warning(
                "no cluster to talk to (in-cluster or KUBECONFIG): serving the state file only",
                extra={"error": str(exc)},
            )
            return None
    return kubernetes.client.ApiClient()


def run(args: argparse.Namespace) -> None:
    from kvpn_agent.dataplane import build_dataplane  # noqa: PLC0415
    from kvpn_agent.metrics import serve  # noqa: PLC0415 -- see the imports
    from kvpn_agent.processes import LOG_FOLDER  # noqa: PLC0415
    from kvpn_agent.runner import Agent, Settings  # noqa: PLC0415
    from kvpn_agent.state import StateFile  # noqa: PLC0415

    # auto: the kernel where `ip link add type wireguard` works, with wireguard-go (the supervisor's,
    # when given) for any server whose kernel link is refused later on; userspace elsewhere.
    supervised = args.wireguard_go_supervisor if args.backend != "kernel" else None
    dataplane = build_dataplane(args.backend, args.netns, args.state_dir / LOG_FOLDER, supervised)
    log.info(
        "starting",
        extra={
            "backend": dataplane.backend,
            "requested": args.backend,
            "node": args.node_name,
            "netns": args.netns or "",
            "wireguard_go": "" if dataplane.wggo is None else str(supervised or "children of the agent"),
        },
    )
    settings = Settings(
        node_name=args.node_name,
        pod_namespace=args.pod_namespace,
        pod_name=args.pod_name,
        namespaces=tuple(args.namespace),
        resync_seconds=args.resync_seconds,
        report_seconds=args.report_seconds,
        start_timeout=args.start_timeout,
        ready_file=args.wireguard_go_supervisor.parent / READY_FILE if args.wireguard_go_supervisor else None,
    )
    agent = Agent(settings, dataplane, StateFile(args.state_dir), api_client())
    if args.metrics_port:
        serve(agent.metrics, args.metrics_address, args.metrics_port, agent.healthy, agent.readiness)
    agent.run(stop_on_signals("stopping; the dataplane stays in place"))


def run_supervisor(args: argparse.Namespace) -> None:
    from kvpn_agent import supervisor  # noqa: PLC0415 -- see the imports
    from kvpn_agent.processes import WireGuardGo  # noqa: PLC0415

    # Its wireguard-go stay in its process group, as in its container: whatever ends the
    # supervisor's group ends them, and nothing outlives it unseen.
    wggo = WireGuardGo(
        binary=args.binary,
        socket_dir=args.uapi_dir,
        start_timeout=args.start_timeout,
        inherit_output=True,
        new_session=False,
    )
    log.info("starting", extra={"socket": str(args.socket), "uapi_dir": str(args.uapi_dir)})
    supervisor.run(args.socket, wggo, stop_on_signals("stopping, and the wireguard-go processes with it"))


def stop_on_signals(message: str) -> threading.Event:
    """An event set by SIGTERM (a pod's stop) or SIGINT."""
    stop = threading.Event()
    pid = os.getpid()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != pid:
            # A forked helper (pyroute2 enters a network namespace in one) inherits this handler; it
            # should die of the signal as it would by default, not log our stop.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.info(message, extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_format, args.verbose)
    if args.command == "cleanup":
        from kvpn_agent.cleanup import cleanup  # noqa: PLC0415 -- see the imports
        from kvpn_agent.state import StateFile  # noqa: PLC0415

        for line in cleanup(args.netns, StateFile(args.state_dir), supervisor=args.wireguard_go_supervisor):
            log.info(line)
        return
    if args.command == "wireguard-go":
        run_supervisor(args)
        return
    run(args)


if __name__ == "__main__":
    main()
