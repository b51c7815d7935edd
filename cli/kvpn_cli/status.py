"""The `status` table: one row per VpnPeer, in units a person reads at a glance; whether local files are current."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

# WireGuard re-handshakes every two minutes while traffic flows; three minutes of silence means gone.
CONNECTED_WITHIN_SECONDS = 180


@dataclass(frozen=True)
class Row:
    namespace: str
    name: str
    server: str
    address: str
    connected: bool
    last_handshake: str | None
    rx_bytes: int | None
    tx_bytes: int | None
    ready: bool
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def human_bytes(value: int | None) -> str:
    """1536 -> '1.5 KiB'; '' when unknown."""
    if value is None:
        return ""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def ago(then: datetime | None, now: datetime) -> str:
    """'12s ago', '5m ago', '3h ago', '2d ago'; '' for never."""
    if then is None:
        return ""
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def row_of(peer: dict[str, Any], now: datetime) -> Row:
    spec, status = peer.get("spec") or {}, peer.get("status") or {}
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    handshake = _parse_time(status.get("lastHandshake"))
    ref = spec.get("serverRef") or {}
    server = ref.get("name", "")
    if ref.get("namespace") and ref["namespace"] != peer["metadata"]["namespace"]:
        server = f"{ref['namespace']}/{server}"
    return Row(
        namespace=peer["metadata"]["namespace"],
        name=peer["metadata"]["name"],
        server=server,
        address=status.get("address") or "",
        connected=handshake is not None and (now - handshake).total_seconds() < CONNECTED_WITHIN_SECONDS,
        last_handshake=status.get("lastHandshake"),
        rx_bytes=status.get("rxBytes"),
        tx_bytes=status.get("txBytes"),
        ready=ready.get("status") == "True",
        reason=ready.get("reason") or "Unknown",
    )


def table(rows: list[Row], now: datetime, all_namespaces: bool = False) -> str:
    """The rows as a kubectl-style table; STATUS is Ready or the Ready condition's reason."""
    header = ["NAME", "SERVER", "ADDRESS", "CONNECTED", "LAST-HANDSHAKE", "RX", "TX", "STATUS"]
    cells = [
        [
            r.name,
            r.server,
            r.address,
            "yes" if r.connected else "no",
            ago(_parse_time(r.last_handshake), now),
            human_bytes(r.rx_bytes),
            human_bytes(r.tx_bytes),
            "Ready" if r.ready else r.reason,
        ]
        for r in rows
    ]
    if all_namespaces:
        header = ["NAMESPACE", *header]
        cells = [[r.namespace, *c] for r, c in zip(rows, cells, strict=True)]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *cells]]
    return "\n".join(lines) + "\n"


# --- the config files on this machine --------------------------------------------------------


@dataclass(frozen=True)
class LocalFile:
    """A wg-quick file on this machine and what it says of itself: the VpnPeer it is for, its server."""

    path: Path
    peer_namespace: str
    peer_name: str
    server_namespace: str
    server_name: str
    revision: str | None
    """The server revision it was rendered from; None when the file does not say (an older join wrote it)."""

    own_key: bool = True
    """The key was made on the device (`join` refreshes it), else by the cluster (`config` writes it again)."""

    @property
    def server(self) -> str:
        return f"{self.server_namespace}/{self.server_name}"


def refresh_command(local: LocalFile, context: str | None = None) -> str:
    """The one command that rewrites the file in place with what the server says now."""
    if local.own_key:
        server = local.server_name if local.server_namespace == local.peer_namespace else local.server
        words = ["kubectl", "vpn", "join", server, "-n", local.peer_namespace, "--name", local.peer_name]
    else:
        words = ["kubectl", "vpn", "config", local.peer_name, "-n", local.peer_namespace]
    words += ["-o", str(local.path)]
    if context:
        words += ["--context", context]
    return shlex.join(words)


def freshness(local: LocalFile, current: str | None, context: str | None = None) -> str:
    """One line for `status`: whether the file was rendered from the server's current revision, and if not,
    the command that brings it up to date. `current` is the server's status.revision."""
    head = f"{local.path} (VpnPeer {local.peer_namespace}/{local.peer_name})"
    if current is None:
        return f"{head}: not checked: VpnServer {local.server} has no revision yet (the operator has not seen it)"
    if local.revision == current:
        return f"{head}: current, VpnServer {local.server} revision {current}"
    if local.revision is None:
        why = f"maybe stale, it does not record which revision of VpnServer {local.server} it is from"
    else:
        why = f"stale, rendered from VpnServer {local.server} revision {local.revision}, which is now at {current}"
    return f"{head}: {why}; refresh it with: {refresh_command(local, context)}"
