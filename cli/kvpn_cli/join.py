"""`kubectl vpn join`: a key pair made here, a VpnPeer with only its public key, a wg-quick file back."""

from __future__ import annotations

import base64
import getpass
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpn_cli import dns, routes, wgquick
from kvpn_cli.cluster import CliError, Cluster
from kvpn_core import keys
from kvpn_core import wgquick as wgfile
from kvpn_core.api import Kind

Obj = dict[str, Any]


@dataclass(frozen=True)
class JoinRequest:
    server: str
    """The VpnServer: NAME in the peer's namespace, or NAMESPACE/NAME (servers often have a namespace of their own)."""

    name: str
    namespace: str
    dns_mode: wgquick.DnsMode
    output: Path
    timeout: float
    force: bool
    routes_file: Path | None = None

    @property
    def server_namespace(self) -> str:
        return self.server.partition("/")[0] if "/" in self.server else self.namespace

    @property
    def server_name(self) -> str:
        return self.server.rpartition("/")[2]


def default_peer_name() -> str:
    """user-host as a DNS label, so a second laptop of the same person gets its own peer."""
    raw = f"{getpass.getuser()}-{socket.gethostname().split('.')[0]}".lower()
    return re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")[:63].rstrip("-") or "laptop"


def config_dir() -> Path:
    return Path.home() / ".config" / "kvpn"


def ready_condition(peer: Obj | None) -> Obj:
    return next((c for c in ((peer or {}).get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"), {})


def missing_server_message(cluster: Cluster, namespace: str, name: str) -> str:
    try:
        names = [s["metadata"]["name"] for s in cluster.list_kvpn(Kind.VPN_SERVER, namespace)]
    except CliError:  # may get but not list: the missing name is still the news
        return f"no VpnServer {name!r} in namespace {namespace}"
    there = ", ".join(sorted(names)) if names else "none"
    return f"no VpnServer {name!r} in namespace {namespace} (VpnServers there: {there}); pick one, or use -n"


def check_routes(tunnelled: list[str], interface: str, force: bool, routes_file: Path | None) -> None:
    conflicts = routes.find_conflicts(tunnelled, routes.read_routes(routes_file), interface)
    if not conflicts:
        return
    if not force:
        raise CliError(routes.conflict_message(conflicts))
    print(f"warning: {routes.conflict_message(conflicts)} (--force given: writing it anyway)", file=sys.stderr)


def join(cluster: Cluster, req: JoinRequest) -> None:
    server = cluster.get_kvpn(Kind.VPN_SERVER, req.server_namespace, req.server_name)
    if server is None:
        raise CliError(missing_server_message(cluster, req.server_namespace, req.server_name))
    status = server.get("status") or {}
    if status.get("dnsNameserver"):  # a server that pushes no DNS needs no DNS handling here
        dns.check_mode(req.dns_mode)
    interface = req.output.stem
    tunnelled = [*status.get("routes", []), *([status["dnsNameserver"]] if status.get("dnsNameserver") else [])]
    check_routes(tunnelled, interface, req.force, req.routes_file)
    if req.output.exists() and not req.force:
        raise CliError(f"{req.output} exists (from an earlier join?): choose another -o, delete it, or use --force")
    if cluster.get_kvpn(Kind.VPN_PEER, req.namespace, req.name) is not None:
        raise CliError(
            f"VpnPeer {req.name!r} already exists in namespace {req.namespace}: choose another --name, "
            f"or delete it first (kubectl delete vpnpeer {req.name} -n {req.namespace})"
        )

    private_key = keys.generate_private_key()  # stays in this process and the file it writes
    public_key = keys.public_key_of(private_key)
    ref = {"name": req.server_name}
    if req.server_namespace != req.namespace:
        ref["namespace"] = req.server_namespace
    spec = {"serverRef": ref, "publicKey": public_key}
    cluster.create_kvpn(Kind.VPN_PEER, req.namespace, req.name, spec)
    try:
        peer = wait_ready(cluster, req, public_key)
        config = fetch_config(cluster, req, peer, private_key)
        check_routes(wgfile.allowed_ips(config), interface, req.force, req.routes_file)
        wgquick.write_private(req.output, config)
    except (CliError, OSError, KeyboardInterrupt) as error:
        # The private key dies with this process, so a peer left behind could never be used.
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
        raise CliError(f"{reason}; {abandon(cluster, req)}") from None
    print(f"wrote {req.output} for VpnPeer {req.namespace}/{req.name} (address {peer['status'].get('address')})")
    nameservers = [status["dnsNameserver"]] if status.get("dnsNameserver") else []
    dns.print_followup(req.dns_mode, wgfile.Dns(nameservers, status.get("dnsSearch", [])))
    print(f"bring the tunnel up with: kubectl vpn up {req.output}")


def fetch_config(cluster: Cluster, req: JoinRequest, peer: Obj, private_key: str) -> str:
    secret = cluster.secret(req.namespace, peer["status"]["configSecretName"]) or {}
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    if "wg0.conf" not in data:
        raise CliError(f"the config Secret of VpnPeer {req.name} holds no wg0.conf yet")
    return wgquick.assemble(data["wg0.conf"], private_key, req.dns_mode, data.get("presharedKey"))


def abandon(cluster: Cluster, req: JoinRequest) -> str:
    """Deletes a peer join gives up on: its private key dies with this process, so the peer is useless."""
    try:
        cluster.delete_kvpn(Kind.VPN_PEER, req.namespace, req.name)
    except CliError as error:
        return f"could not delete it ({error}): delete it yourself, its private key is gone"
    return "deleted it, since its private key existed only in this process"


def wait_ready(cluster: Cluster, req: JoinRequest, public_key: str) -> Obj:
    """Polls the peer until Ready with our key and a config Secret, with a progress line on stderr."""
    started = time.monotonic()
    tty = sys.stderr.isatty()
    last_line = ""
    while True:
        peer = cluster.get_kvpn(Kind.VPN_PEER, req.namespace, req.name)
        condition = ready_condition(peer)
        status = (peer or {}).get("status") or {}
        done = condition.get("status") == "True" and status.get("configSecretName")
        if done and status.get("publicKey") == public_key:
            if tty:
                print("\r\033[K", end="", file=sys.stderr)
            return peer or {}
        elapsed = time.monotonic() - started
        what = condition.get("reason") or "waiting for the operator"
        line = f"waiting for VpnPeer {req.namespace}/{req.name} to be Ready: {what}"
        if tty:
            print(f"\r\033[K{line} ({elapsed:.0f}s)", end="", file=sys.stderr, flush=True)
        elif line != last_line:
            print(line, file=sys.stderr)
        last_line = line
        if elapsed >= req.timeout:
            if tty:
                print(file=sys.stderr)
            detail = f"{condition.get('reason')}: {condition.get('message')}" if condition else "no Ready condition yet"
            raise CliError(
                f"timed out after {req.timeout:.0f}s waiting for VpnPeer {req.namespace}/{req.name} to be Ready "
                f"({detail})"
            )
        time.sleep(0.5)
