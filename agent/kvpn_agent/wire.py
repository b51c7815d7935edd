"""WireGuard configuration changes as the backends (netlink, UAPI) apply them, and the network order they compare in."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Interface-level settings to change; None leaves a setting as it is."""

    private_key: str | None = field(default=None, repr=False)
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One peer's change. None leaves a setting as it is; ``preshared_key=""`` clears it."""

    public_key: str
    remove: bool = False
    update_only: bool = False
    preshared_key: str | None = field(default=None, repr=False)
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: tuple[str, ...] = ()


def sort_networks(cidrs: Iterable[str]) -> tuple[str, ...]:
    """Networks normalized and in one order, so that desired and observed lists compare equal."""
    nets = {ipaddress.ip_network(c, strict=False) for c in cidrs}
    return tuple(str(n) for n in sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen)))
