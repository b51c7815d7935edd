"""One server's interface as read back from the node: its link, its WireGuard device, their peers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Plain dataclasses rather than pydantic: a read-back of 10,000 peers builds 10,000 of them per sync
# and needs no validation (the system is the source).


@dataclass(frozen=True, slots=True)
class ObservedPeer:
    public_key: str
    """Base64."""

    preshared_key: str | None = field(default=None, repr=False)
    """Base64, None when unset (all zero)."""

    endpoint: str | None = None
    allowed_ips: tuple[str, ...] = ()
    """Normalized networks, sorted."""

    persistent_keepalive: int = 0
    last_handshake: float | None = None
    """Unix time of the last handshake, None when never."""

    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ObservedDevice:
    private_key: str | None = field(default=None, repr=False)
    listen_port: int = 0
    fwmark: int = 0
    peers: Mapping[str, ObservedPeer] = field(default_factory=dict)
    """Keyed by base64 public key."""


@dataclass(frozen=True, slots=True)
class ObservedLink:
    mtu: int
    up: bool
    addresses: tuple[str, ...] = ()
    """Interface addresses with prefix length (10.8.0.1/24)."""


@dataclass(frozen=True, slots=True)
class Observed:
    """One server's interface as read back; None parts are missing on the node."""

    link: ObservedLink | None = None
    device: ObservedDevice | None = None
