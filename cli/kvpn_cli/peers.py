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
            "(in the file `kubectl vpn join` wrote there), never in the cluster"
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
