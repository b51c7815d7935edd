"""The wg-quick file format: a peer's file rendered (wg0.conf, as wg-quick and the WireGuard apps read it), and read."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


class ClientConfig(BaseModel):
    """Everything a peer's wg0.conf says: the device's side ([Interface]) and the server's ([Peer])."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    private_key: str | None
    """The device's private key; None when the user brought their own key."""

    public_key: str
    """The device's public key (named in the header only)."""

    addresses: list[str]
    """The device's tunnel addresses, one per family."""

    dns_servers: list[str]
    dns_search: list[str]
    mtu: int | None
    server_public_key: str
    preshared_key: str | None

    endpoint: str
    """host:port of the server; empty for a server reached through the API server (expose type ApiServer):
    then the file has no Endpoint line, and `kubectl vpn up --via api` sets a local one."""

    allowed_ips: list[str]
    """The server's routes; the DNS servers are added when no route covers them."""

    persistent_keepalive: int
    """Seconds between keepalives; 0 for none."""

    name: str
    """The VpnPeer as namespace/name."""


def render_client_config(cfg: ClientConfig) -> str:
    """The text of wg0.conf for cfg."""
    if cfg.private_key is None:
        # A comment, so that wg-quick still parses the file; a user who uncomments it without filling in
        # the key gets wg's "Key is not the correct length or format" rather than a silent keyless tunnel.
        private_key = [f"# PrivateKey = <add the private key that matches public key {cfg.public_key}>"]
    else:
        private_key = _fields(("PrivateKey", cfg.private_key))
    if cfg.endpoint:
        header = f"# kvpn: WireGuard tunnel of VpnPeer {cfg.name} to {cfg.endpoint}"
    else:
        # wg-quick takes a file without an Endpoint, but such a tunnel never starts by itself (the server
        # cannot speak first): say what brings it up. The peer's name stays followed by a space, as
        # `kubectl vpn` reads it (kvpn_cli.follow.HEADER).
        header = f"# kvpn: WireGuard tunnel of VpnPeer {cfg.name} through the API server (`kubectl vpn up --via api`)"
    lines = [
        header,
        f"# Public key of this device: {cfg.public_key}",
        "",
        "[Interface]",
        *private_key,
        *_fields(
            ("Address", ", ".join(_host_network(a) for a in cfg.addresses)),
            # wg-quick and the apps take the entries that are not IP addresses as search domains.
            ("DNS", ", ".join([*cfg.dns_servers, *cfg.dns_search])),
            ("MTU", cfg.mtu),
        ),
        "",
        "[Peer]",
        *_fields(
            ("PublicKey", cfg.server_public_key),
            ("PresharedKey", cfg.preshared_key),
            ("Endpoint", cfg.endpoint),
            ("AllowedIPs", ", ".join(_allowed_ips(cfg))),
            ("PersistentKeepalive", cfg.persistent_keepalive),
        ),
    ]
    return "\n".join(lines) + "\n"


def _fields(*pairs: tuple[str, object]) -> list[str]:
    # Empty values (no DNS, no MTU, keepalive 0, no preshared key) leave their line out, as wg showconf does.
    return [f"{key} = {value}" for key, value in pairs if value]


def _host_network(address: str) -> str:
    return str(ipaddress.ip_network(address))


def _allowed_ips(cfg: ClientConfig) -> list[str]:
    routes = [ipaddress.ip_network(route) for route in cfg.allowed_ips]
    # Queries to a DNS server outside the routes would bypass the tunnel and never reach cluster DNS.
    dns = [
        ipaddress.ip_network(server)
        for server in cfg.dns_servers
        if not any(ipaddress.ip_address(server) in route for route in routes)
    ]
    return [str(net) for net in dict.fromkeys([*routes, *dns])]


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dns:
    servers: list[str]
    domains: list[str]


def field(config: str, key: str) -> str | None:
    """The value of the first `key = value` line of a wg-quick file."""
    match = re.search(rf"^{key}\s*=\s*(.*)$", config, re.MULTILINE)
    return match.group(1).strip() if match else None


def allowed_ips(config: str) -> list[str]:
    return [item.strip() for item in (field(config, "AllowedIPs") or "").split(",") if item.strip()]


def dns_of(config: str) -> Dns:
    """The DNS line split as wg-quick reads it: IP addresses are servers, anything else a search domain."""
    servers, domains = [], []
    for item in (field(config, "DNS") or "").split(","):
        if not (item := item.strip()):
            continue
        try:
            ipaddress.ip_address(item)
        except ValueError:
            domains.append(item)
        else:
            servers.append(item)
    return Dns(servers, domains)


# --- the WireGuard apps ----------------------------------------------------------------------

APP_KEYS: dict[str, frozenset[str]] = {
    "Interface": frozenset({"PrivateKey", "Address", "DNS", "MTU", "ListenPort"}),
    "Peer": frozenset({"PublicKey", "PresharedKey", "AllowedIPs", "Endpoint", "PersistentKeepalive"}),
}
"""The keys the WireGuard apps (iOS, macOS, Android, Windows) read, by section. Their parsers refuse a file
with any other key, wg-quick's own (PostUp, PreDown, Table, SaveConfig) included."""


def for_apps(config: str) -> str:
    """The file with only what the WireGuard apps parse: sections, their APP_KEYS, comments and blank lines."""
    kept, section = [], ""
    for line in config.splitlines(keepends=True):
        content = line.split("#", 1)[0].strip()
        if content.startswith("["):
            section = content.strip("[]").strip()
        elif content:
            key = content.split("=", 1)[0].strip()
            # The apps match keys without regard to case, as wg does.
            if key.lower() not in {k.lower() for k in APP_KEYS.get(section, frozenset())}:
                continue
        kept.append(line)
    return "".join(kept)
