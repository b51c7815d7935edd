"""Assemble the laptop's wg-quick file from the config Secret: the local private key, the DNS mode."""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path

from kvpn_core.wgquick import Dns, dns_of, field

PRIVATE_KEY_PLACEHOLDER = re.compile(r"^# PrivateKey = .*$", re.MULTILINE)
INTERFACE_NAME = re.compile(r"^[a-zA-Z0-9_=+.-]{1,15}$")


class DnsMode(StrEnum):
    SPLIT = "split"
    """Only the cluster's domains go to cluster DNS (systemd-resolved per-link DNS)."""
    FULL = "full"
    """Every lookup goes to cluster DNS while the tunnel is up (the classic `DNS =` line)."""
    NONE = "none"
    """The tunnel leaves DNS alone."""


def split_dns_hooks(dns: Dns) -> list[str]:
    """PostUp/PreDown lines that send only the cluster's domains to cluster DNS, via systemd-resolved.

    Domains without `~` are both search and routing domains for resolved, so `curl http://api.payments`
    expands to api.payments.svc.cluster.local and only names under these domains use the tunnel's DNS.
    """
    if not dns.servers:
        return []
    domains = dns.domains or ["cluster.local"]
    return [
        f"PostUp = resolvectl dns %i {' '.join(dns.servers)}; resolvectl domain %i {' '.join(domains)}",
        "PreDown = resolvectl revert %i",
    ]


def macos_resolver_files(dns: Dns) -> dict[str, str]:
    """/etc/resolver/<domain> files: macOS sends lookups under each domain to the cluster's DNS."""
    body = "".join(f"nameserver {server}\n" for server in dns.servers)
    return {f"/etc/resolver/{domain}": body for domain in dns.domains} if body else {}


def assemble(secret_config: str, private_key: str | None, dns_mode: DnsMode, preshared_key: str | None = None) -> str:
    """The laptop's wg-quick file: the Secret's wg0.conf with the local key and the chosen DNS handling."""
    config = secret_config
    if private_key is not None:
        line = f"PrivateKey = {private_key}"
        if PRIVATE_KEY_PLACEHOLDER.search(config):
            config = PRIVATE_KEY_PLACEHOLDER.sub(lambda _: line, config, count=1)
        elif field(config, "PrivateKey") is None:
            config = config.replace("[Interface]\n", f"[Interface]\n{line}\n", 1)
    if preshared_key and field(config, "PresharedKey") is None:
        config = config.replace("[Peer]\n", f"[Peer]\nPresharedKey = {preshared_key}\n", 1)
    if dns_mode is DnsMode.FULL:
        return config
    dns = dns_of(config)
    config = re.sub(r"^DNS\s*=.*\n", "", config, flags=re.MULTILINE)
    if dns_mode is DnsMode.SPLIT and (hooks := split_dns_hooks(dns)):
        # The hooks go where the DNS line was: the end of [Interface], before the blank line and [Peer].
        config = config.replace("\n\n[Peer]\n", "\n" + "\n".join(hooks) + "\n\n[Peer]\n", 1)
    return config


def interface_name(server: str) -> str:
    """wg-quick names the interface after the file: at most 15 characters."""
    return f"kvpn-{server}"[:15].rstrip("-.")


def write_private(path: Path, text: str) -> None:
    """Writes text to path readable by the owner only, also when the file already existed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
