"""`config`, `qr` and `status`: what the cluster knows about peers, read back for a person or a phone."""

from __future__ import annotations

import base64
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import segno
import yaml

from kvpn_cli import follow, join, wgquick
from kvpn_cli import status as table
from kvpn_cli.cluster import CliError, Cluster
from kvpn_core.api import Kind

Obj = dict[str, Any]


def peer_config(cluster: Cluster, namespace: str, name: str) -> str:
    """The wg0.conf of a peer whose key the cluster generated, from its config Secret."""
    peer = cluster.get_kvpn(Kind.VPN_PEER, namespace, name)
    if peer is None:
        raise CliError(f"no VpnPeer {name!r} in namespace {namespace}; see `kubectl vpn status -n {namespace}`")
    if (peer.get("spec") or {}).get("publicKey"):
        raise CliError(
            f"VpnPeer {namespace}/{name} brought its own key: its private key lives only on the device that joined "
            "(in the file `kubectl vpn join` wrote there), never in the cluster; run that `kubectl vpn join` again "
            "there to refresh the file"
        )
    status = peer.get("status") or {}
    secret = cluster.secret(namespace, status["configSecretName"]) if status.get("configSecretName") else None
    encoded = ((secret or {}).get("data") or {}).get("wg0.conf")
    if not encoded:
        ready: Obj = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
        why = f"{ready.get('reason')}: {ready.get('message')}" if ready else "the operator has not seen it yet"
        raise CliError(f"VpnPeer {namespace}/{name} has no config yet ({why})")
    return base64.b64decode(encoded).decode()


def show_qr(config: str, png: Path | None) -> None:
    code = segno.make(config, error="l", micro=False)
    if png is not None:
        code.save(str(png), kind="png", scale=6, border=4)
        png.chmod(0o600)  # the picture holds the private key as much as the text does
        print(f"wrote {png}")
    else:
        code.terminal(out=sys.stdout, compact=True)


def show_status(cluster: Cluster, namespace: str | None, output: str | None) -> None:
    now = datetime.now(UTC)
    peers = cluster.list_kvpn(Kind.VPN_PEER, namespace)
    rows = sorted((table.row_of(p, now) for p in peers), key=lambda r: (r.namespace, r.name))
    if output == "json":
        print(json.dumps([r.to_json() for r in rows], indent=2))
    elif output == "yaml":
        print(yaml.safe_dump([r.to_json() for r in rows], sort_keys=False), end="")
    elif not rows:
        where = f"namespace {namespace}" if namespace else "any namespace"
        print(f"no VpnPeers in {where}", file=sys.stderr)
    else:
        print(table.table(rows, now, all_namespaces=namespace is None), end="")


def local_file_lines(cluster: Cluster, given: list[Path] | None, context: str | None) -> list[str]:
    """One line per config file on this machine (those given, else the ones in ~/.config/kvpn): current,
    or stale with the command that refreshes it. A file that cannot be checked says why; it stops no other."""
    paths = given or sorted(join.config_dir().glob("*.conf"))
    return [line for path in paths if (line := local_file_line(cluster, path, context, bool(given))) is not None]


def local_file_line(cluster: Cluster, path: Path, context: str | None, given: bool) -> str | None:
    """The line for one file; None for a file in the config folder that kubectl vpn did not write."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"{path}: cannot read it ({error.strerror})"
    named = follow.peer_named_in(text)
    if named is None:
        return f"{path}: not a kvpn file (it has no `# kvpn: WireGuard tunnel of VpnPeer` line)" if given else None
    head = f"{path} (VpnPeer {named[0]}/{named[1]})"
    try:
        local = describe(cluster, path, text, named)
        if isinstance(local, str):
            return f"{head}: {local}"
        server = cluster.get_kvpn(Kind.VPN_SERVER, local.server_namespace, local.server_name)
    except CliError as error:
        return f"{head}: not checked: {error}"
    if server is None:
        return f"{head}: VpnServer {local.server} not found (deleted, or the file is from another cluster)"
    return table.freshness(local, (server.get("status") or {}).get("revision"), context)


def describe(cluster: Cluster, path: Path, text: str, named: tuple[str, str]) -> table.LocalFile | str:
    """What the file says of itself; for a file without a stamp, its server from the VpnPeer (or why not)."""
    if stamp := wgquick.stamp_of(text):
        return table.LocalFile(path, *named, stamp.server_namespace, stamp.server_name, stamp.revision)
    peer = cluster.get_kvpn(Kind.VPN_PEER, *named)
    if peer is None:
        return "its VpnPeer no longer exists (deleted, or the file is from another cluster)"
    spec = peer.get("spec") or {}
    ref = spec.get("serverRef") or {}
    own_key = bool(spec.get("publicKey"))
    return table.LocalFile(path, *named, ref.get("namespace") or named[0], ref.get("name", ""), None, own_key)
