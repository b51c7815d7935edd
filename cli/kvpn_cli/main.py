"""kubectl-vpn: parse the command line, run one command, turn every failure into one line and exit 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kvpn_cli import follow, join, peers, tunnel, viaapi, wgquick
from kvpn_cli.cluster import CliError, Cluster, connect
from kvpn_core import wgquick as wgfile


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kubectl vpn", description="Join a kvpn VPN and see your tunnels.")
    top.add_argument("--context", help="the kubeconfig context to use (default: the current one)")
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, namespaced: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if namespaced:
            cmd.add_argument("-n", "--namespace", help="namespace (default: the context's)")
        cmd.add_argument("--context", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return cmd

    def route_options(cmd: argparse.ArgumentParser, what: str = "write the config") -> None:
        cmd.add_argument("--force", action="store_true", help=f"{what} even if it overlaps local routes")
        # Tests (and a check on behalf of another machine) feed `ip -j route` output instead of this host's.
        cmd.add_argument("--routes-from", type=Path, help=argparse.SUPPRESS)

    j = command(
        "join",
        "Create a VpnPeer with a key made here and write its wg-quick file (mode 0600); run it again to refresh "
        "the file after the server changed.",
    )
    j.add_argument("server", metavar="SERVER", help="the VpnServer: NAME in the peer's namespace, or NAMESPACE/NAME")
    j.add_argument("--name", default=None, help="VpnPeer name (default: user-host)")
    j.add_argument(
        "--dns",
        choices=[m.value for m in wgquick.DnsMode],
        help="split (default), full (the default for ios, android and windows, whose apps cannot split) or none; "
        "a re-run keeps the file's",
    )
    j.add_argument(
        "--platform",
        choices=[p.value for p in wgquick.Platform],
        help="the machine that will read the file (default: this one; a re-run keeps the file's): linux gets "
        "wg-quick's DNS hooks, the others only what the WireGuard apps read",
    )
    j.add_argument(
        "-o",
        "--output",
        type=Path,
        help="file to write (default: ~/.config/kvpn/kvpn-SERVER.conf); a re-run for the peer whose key it holds "
        "refreshes it",
    )
    j.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for Ready (default 60)")
    route_options(j, "write the config (over an existing file, too)")

    c = command("config", "Write the config of a peer whose key the cluster generated.")
    c.add_argument("peer", metavar="PEER")
    c.add_argument("-o", "--output", type=Path, help="file to write (mode 0600); standard output by default")
    route_options(c)

    q = command("qr", "Show a peer's config as a QR code for the WireGuard mobile apps.")
    q.add_argument("peer", metavar="PEER")
    q.add_argument("--png", type=Path, help="write a PNG instead of printing to the terminal")

    s = command(
        "status", "List VpnPeers: address, handshake, traffic, readiness; and whether this machine's files are current."
    )
    s.add_argument("-A", "--all-namespaces", action="store_true")
    s.add_argument("-o", "--output", choices=["json", "yaml"])
    s.add_argument(
        "-f",
        "--file",
        dest="files",
        metavar="FILE",
        type=Path,
        action="append",
        help="a config file to check against its server (repeatable; default: those in ~/.config/kvpn)",
    )

    for name, text in (("up", "Bring a tunnel up with wg-quick (Linux)."), ("down", "Take a tunnel down (Linux).")):
        t = command(name, text, namespaced=False)
        t.add_argument("target", nargs="?", metavar="SERVER|FILE", help="a config file, or the server it was joined to")
        if name == "up":
            route_options(t, "bring it up")
            t.add_argument(
                "--follow",
                action="store_true",
                help="stay in the foreground and keep the tunnel on a healthy gateway of its server (Ctrl-C stops, "
                "the tunnel stays up)",
            )
            t.add_argument(
                "--server",
                dest="follow_server",
                metavar="[NAMESPACE/]NAME",
                help="with --follow or --via api: the VpnServer, for a file that does not name its VpnPeer",
            )
            t.add_argument(
                "--via",
                choices=["udp", "api"],
                default=None,
                help="api: carry the tunnel through the Kubernetes API server (no UDP needed; stays in the "
                "foreground, Ctrl-C takes it down). Default: api for a server that exposes no UDP port, else udp",
            )
            t.add_argument(
                "--relay-namespace",
                default=viaapi.RELAY_NAMESPACE,
                help=f"with --via api: the namespace of the relay pods (default {viaapi.RELAY_NAMESPACE})",
            )
    return top


def run(args: argparse.Namespace) -> None:
    if args.command == "up" and _via_api(args):
        if args.follow:
            raise CliError("--via api keeps the tunnel on a healthy gateway by itself: leave out --follow")
        force, routes_from = args.force, args.routes_from
        viaapi.up_via_api(
            args.context,
            args.target,
            args.follow_server,
            args.relay_namespace,
            lambda path: tunnel.wg_quick("up", str(path), force, routes_from),
        )
        return
    if args.command == "up" and args.follow:
        tunnel.require_linux("up --follow")
        force, routes_from = args.force, args.routes_from
        follow.up_and_follow(
            args.context,
            args.target,
            args.follow_server,
            lambda path: tunnel.wg_quick("up", str(path), force, routes_from),
        )
        return
    if getattr(args, "follow_server", None):
        raise CliError("--server goes with --follow or --via api")
    if args.command in ("up", "down"):
        tunnel.wg_quick(args.command, args.target, getattr(args, "force", False), getattr(args, "routes_from", None))
        return
    cluster, default_namespace = connect(args.context)
    namespace: str = args.namespace or default_namespace
    if args.command == "join":
        join.join(cluster, _join_request(args, namespace))
    elif args.command in ("config", "qr"):
        config = peers.peer_config(cluster, namespace, args.peer)
        if args.command == "qr":
            peers.show_qr(config, args.png)
        elif args.output is None:
            print(config, end="")
        else:
            join.check_routes(wgfile.allowed_ips(config), args.output.stem, args.force, args.routes_from)
            wgquick.write_private(args.output, config)
            print(f"wrote {args.output}")
    elif args.command == "status":
        _status(cluster, namespace, args)


def _status(cluster: Cluster, namespace: str, args: argparse.Namespace) -> None:
    """The peers; under the table, this machine's config files (current or stale) and its tunnels via the API."""
    if args.files and args.output:
        raise CliError("--file checks files for the table: leave out -o")
    peers.show_status(cluster, None if args.all_namespaces else namespace, args.output)
    if args.output is not None:
        return
    if files := peers.local_file_lines(cluster, args.files, args.context):
        print("\nConfig files on this machine:\n" + "\n".join(f"  {line}" for line in files))
    if tunnels := viaapi.health_lines():
        print("\nTunnels on this machine:\n" + "\n".join(f"  {line}" for line in tunnels))


def _via_api(args: argparse.Namespace) -> bool:
    """--via as given; without it, api for a file with no Endpoint (its server exposes no UDP port)."""
    if args.via is not None:
        return bool(args.via == "api")
    try:
        return viaapi.wants_api(tunnel.resolve_file(args.target).read_text())
    except (CliError, OSError):
        return False  # wg_quick says what is wrong with the target


def _join_request(args: argparse.Namespace, namespace: str) -> join.JoinRequest:
    return join.JoinRequest(
        server=args.server,
        name=args.name or join.default_peer_name(),
        namespace=namespace,
        dns_mode=wgquick.DnsMode(args.dns) if args.dns else None,
        output=args.output or join.config_dir() / f"{wgquick.interface_name(args.server.rpartition('/')[2])}.conf",
        timeout=args.timeout,
        force=args.force,
        routes_file=args.routes_from,
        platform=wgquick.Platform(args.platform) if args.platform else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # files we were told to read or write
        print(f"error: {error.strerror}: {error.filename}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
