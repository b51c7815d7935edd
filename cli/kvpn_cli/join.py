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
    dns_mode: wgquick.DnsMode | None
    """As given; None: on a refresh the file's own, else the platform's default."""

    output: Path
    timeout: float
    force: bool
    routes_file: Path | None = None
    platform: wgquick.Platform | None = None
    """As given; None: on a refresh the file's own, else this machine."""

    @property
    def server_namespace(self) -> str:
        return self.server.partition("/")[0] if "/" in self.server else self.namespace

    @property
    def server_name(self) -> str:
        return self.server.rpartition("/")[2]

    @property
    def peer_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Rendering:
    """How the file is written: for which platform, with which DNS handling."""

    dns_mode: wgquick.DnsMode
    platform: wgquick.Platform


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
    """Creates the peer and writes its file; for a peer this machine joined before, rewrites the file.

    A second run is how a file follows its server (endpoint, routes, DNS, key): the key stays, the peer
    is not touched, and the file is replaced only once the operator has rendered the server's current
    revision.
    """
    server = cluster.get_kvpn(Kind.VPN_SERVER, req.server_namespace, req.server_name)
    if server is None:
        raise CliError(missing_server_message(cluster, req.server_namespace, req.server_name))
    existing = cluster.get_kvpn(Kind.VPN_PEER, req.namespace, req.name)
    private_key = own_key(req, existing) if existing is not None else None
    previous = req.output.read_text(errors="replace") if private_key is not None else None
    if previous is None and req.output.exists() and not req.force:
        raise CliError(f"{req.output} exists (from an earlier join?): choose another -o, delete it, or use --force")
    how = rendering(req, previous)
    status = server.get("status") or {}
    if status.get("dnsNameserver"):  # a server that pushes no DNS needs no DNS handling here
        dns.check_mode(how.dns_mode, how.platform)
    tunnelled = [*status.get("routes", []), *([status["dnsNameserver"]] if status.get("dnsNameserver") else [])]
    check_routes(tunnelled, req.output.stem, req.force, req.routes_file)

    revision = status.get("revision")
    if private_key is None:
        peer = create(cluster, req, how, revision)
        print(f"wrote {req.output} for VpnPeer {req.peer_id} (address {peer['status'].get('address')})")
    else:
        peer, changed = refresh(cluster, req, how, private_key=private_key, previous=previous or "", revision=revision)
        at = f"VpnServer {req.server_namespace}/{req.server_name} revision {peer['status'].get('serverRevision')}"
        if not changed:
            print(f"{req.output} is current for VpnPeer {req.peer_id} ({at}): nothing to change")
            return
        print(f"refreshed {req.output} for VpnPeer {req.peer_id} to {at}, with the same key")
    nameservers = [status["dnsNameserver"]] if status.get("dnsNameserver") else []
    dns.print_followup(how.dns_mode, how.platform, wgfile.Dns(nameservers, status.get("dnsSearch", [])))
    print(next_step(req.output, how.platform, refreshed=private_key is not None))


def own_key(req: JoinRequest, peer: Obj) -> str:
    """The private key of an existing peer, from the file this machine joined it with; else why it is not ours.

    The only proof of ownership there is: the key in the file at the output path (the only place join
    keeps it) is the one whose public key the peer carries.
    """
    taken = f"VpnPeer {req.peer_id} already exists"
    spec = peer.get("spec") or {}
    public_key = spec.get("publicKey")
    if not public_key:
        raise CliError(
            f"{taken} and its key was made by the cluster, not here: write its config with "
            f"`kubectl vpn config {req.name} -n {req.namespace} -o FILE`, or choose another --name"
        )
    private_key = local_private_key(req.output)
    if private_key is None:
        raise CliError(
            f"{taken} and is not this machine's (no key of it in {req.output}): choose another --name, "
            "or -o the file that joined it"
        )
    if keys.public_key_of(private_key) != public_key:
        raise CliError(
            f"{taken} and is not this machine's (the key in {req.output} is another one): choose another --name and -o"
        )
    ref = spec.get("serverRef") or {}
    joined = f"{ref.get('namespace') or req.namespace}/{ref.get('name')}"
    if joined != f"{req.server_namespace}/{req.server_name}":
        raise CliError(
            f"{taken} and joined VpnServer {joined}, not {req.server_namespace}/{req.server_name}: "
            f"run `kubectl vpn join {joined} -n {req.namespace} --name {req.name}` for it, or choose another --name"
        )
    return private_key


def local_private_key(path: Path) -> str | None:
    """The valid private key in a wg-quick file, or None (no file, no key, or not a key)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    if not (key := wgfile.field(text, "PrivateKey")):
        return None
    try:
        keys.decode_key(key, "PrivateKey")
    except keys.InvalidKeyError:
        return None
    return key


def rendering(req: JoinRequest, previous: str | None) -> Rendering:
    """The options as given; for a refresh what the file was written with; else this machine's defaults."""
    stamp = wgquick.stamp_of(previous) if previous is not None else None
    platform = req.platform or (stamp.platform if stamp else None) or wgquick.this_machine()
    if req.dns_mode is not None:
        return Rendering(req.dns_mode, platform)
    return Rendering(wgquick.dns_mode_of(previous) if previous is not None else platform.default_dns, platform)


def next_step(path: Path, platform: wgquick.Platform, refreshed: bool) -> str:
    """What brings the tunnel up (or, after a refresh, onto the new file) on the machine the file is for."""
    if platform is wgquick.Platform.LINUX:
        if refreshed:
            return f"a tunnel that is up keeps the old settings until: kubectl vpn down {path} && kubectl vpn up {path}"
        return f"bring the tunnel up with: kubectl vpn up {path}"
    again = " again (it replaces the tunnel of the same name)" if refreshed else ""
    if platform is wgquick.Platform.MACOS:
        return f"import {path} into the WireGuard app{again}, or: sudo wg-quick up {path} (Homebrew's wireguard-tools)"
    return f"import {path} into the WireGuard app on the {platform.label} device{again}; it holds the private key"


def create(cluster: Cluster, req: JoinRequest, how: Rendering, revision: str | None) -> Obj:
    """A new key pair here, a peer with its public key, the file; the peer deleted again when that fails."""
    private_key = keys.generate_private_key()  # stays in this process and the file it writes
    ref = {"name": req.server_name}
    if req.server_namespace != req.namespace:
        ref["namespace"] = req.server_namespace
    spec = {"serverRef": ref, "publicKey": keys.public_key_of(private_key)}
    cluster.create_kvpn(Kind.VPN_PEER, req.namespace, req.name, spec)
    try:
        peer, config = render(cluster, req, how, private_key, revision)
        wgquick.write_private(req.output, config)
    except (CliError, OSError, KeyboardInterrupt) as error:
        # The private key dies with this process, so a peer left behind could never be used.
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
        raise CliError(f"{reason}; {abandon(cluster, req)}") from None
    return peer


def refresh(
    cluster: Cluster, req: JoinRequest, how: Rendering, *, private_key: str, previous: str, revision: str | None
) -> tuple[Obj, bool]:
    """The file rewritten with the same key once the peer is rendered at the server's revision; whether it
    changed. A failure leaves the file and the peer as they were: the key is still in the file."""
    peer, config = render(cluster, req, how, private_key, revision)
    if config == previous:
        return peer, False
    wgquick.write_private(req.output, config)
    return peer, True


def render(
    cluster: Cluster, req: JoinRequest, how: Rendering, private_key: str, revision: str | None
) -> tuple[Obj, str]:
    """The peer once it is Ready at the server's revision, and the file its config Secret makes."""
    peer = wait_ready(cluster, req, keys.public_key_of(private_key), revision)
    config = fetch_config(cluster, req, peer, private_key, how)
    check_routes(wgfile.allowed_ips(config), req.output.stem, req.force, req.routes_file)
    return peer, config


def fetch_config(cluster: Cluster, req: JoinRequest, peer: Obj, private_key: str, how: Rendering) -> str:
    secret = cluster.secret(req.namespace, peer["status"]["configSecretName"]) or {}
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    if "wg0.conf" not in data:
        raise CliError(f"the config Secret of VpnPeer {req.name} holds no wg0.conf yet")
    config = wgquick.assemble(data["wg0.conf"], private_key, how.dns_mode, data.get("presharedKey"), how.platform)
    revision = peer["status"].get("serverRevision")
    stamp = wgquick.Stamp(req.server_namespace, req.server_name, revision, how.dns_mode, how.platform)
    return wgquick.stamped(config, stamp)


def abandon(cluster: Cluster, req: JoinRequest) -> str:
    """Deletes a peer join gives up on: its private key dies with this process, so the peer is useless."""
    try:
        cluster.delete_kvpn(Kind.VPN_PEER, req.namespace, req.name)
    except CliError as error:
        return f"could not delete it ({error}): delete it yourself, its private key is gone"
    return "deleted it, since its private key existed only in this process"


def wait_ready(cluster: Cluster, req: JoinRequest, public_key: str, revision: str | None) -> Obj:
    """Polls the peer until Ready with our key and a config Secret rendered from the server's revision, with a
    progress line on stderr. `revision` is the server's as last read; read again when the peer shows another,
    since the server may have moved on."""
    started = time.monotonic()
    tty = sys.stderr.isatty()
    last_line = ""
    while True:
        peer = cluster.get_kvpn(Kind.VPN_PEER, req.namespace, req.name)
        condition = ready_condition(peer)
        status = (peer or {}).get("status") or {}
        ready = bool(
            condition.get("status") == "True"
            and status.get("configSecretName")
            and status.get("publicKey") == public_key
        )
        if ready and status.get("serverRevision") != revision:
            revision = server_revision(cluster, req)
        if ready and status.get("serverRevision") == revision:
            if tty:
                print("\r\033[K", end="", file=sys.stderr)
            return peer or {}
        elapsed = time.monotonic() - started
        server = f"VpnServer {req.server_namespace}/{req.server_name}"
        what = f"waiting for the operator to render {server} revision {revision}" if ready else None
        what = what or condition.get("reason") or "waiting for the operator"
        line = f"waiting for VpnPeer {req.peer_id} to be Ready: {what}"
        if tty:
            print(f"\r\033[K{line} ({elapsed:.0f}s)", end="", file=sys.stderr, flush=True)
        elif line != last_line:
            print(line, file=sys.stderr)
        last_line = line
        if elapsed >= req.timeout:
            if tty:
                print(file=sys.stderr)
            if ready:
                detail = f"its config is from revision {status.get('serverRevision')}, {server} is at {revision}"
            elif condition:
                detail = f"{condition.get('reason')}: {condition.get('message')}"
            else:
                detail = "no Ready condition yet"
            raise CliError(
                f"timed out after {req.timeout:.0f}s waiting for VpnPeer {req.peer_id} to be Ready ({detail})"
            )
        time.sleep(0.5)


def server_revision(cluster: Cluster, req: JoinRequest) -> str | None:
    server = cluster.get_kvpn(Kind.VPN_SERVER, req.server_namespace, req.server_name) or {}
    revision: str | None = (server.get("status") or {}).get("revision")
    return revision
