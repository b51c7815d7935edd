"""Assemble the laptop's wg-quick file from the config Secret: the local private key, the DNS mode, the platform."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from kvpn_core.wgquick import Dns, dns_of, field, for_apps

PRIVATE_KEY_PLACEHOLDER = re.compile(r"^# PrivateKey = .*$", re.MULTILINE)
INTERFACE_NAME = re.compile(r"^[a-zA-Z0-9_=+.-]{1,15}$")


class DnsMode(StrEnum):
    SPLIT = "split"
    """Only the cluster's domains go to cluster DNS (systemd-resolved per-link DNS; /etc/resolver on macOS)."""
    FULL = "full"
    """Every lookup goes to cluster DNS while the tunnel is up (the classic `DNS =` line)."""
    NONE = "none"
    """The tunnel leaves DNS alone."""


class Platform(StrEnum):
    """The machine that reads the file: what it may contain, and where split DNS lives."""

    LINUX = "linux"
    """wg-quick: split DNS is resolvectl in PostUp/PreDown."""
    MACOS = "macos"
    """The WireGuard app, or Homebrew's wg-quick (which aborts when a PostUp fails): app keys only; split DNS
    is /etc/resolver files, outside the file."""
    IOS = "ios"
    ANDROID = "android"
    WINDOWS = "windows"

    @property
    def label(self) -> str:
        return {"linux": "Linux", "macos": "macOS", "ios": "iOS", "android": "Android", "windows": "Windows"}[self]

    @property
    def default_dns(self) -> DnsMode:
        """Split where the machine can split; the apps of the others only take a `DNS =` line for everything."""
        return DnsMode.SPLIT if self in (Platform.LINUX, Platform.MACOS) else DnsMode.FULL


def this_machine(platform: str = sys.platform) -> Platform:
    """The Platform of sys.platform; other Unixes run wg-quick as Linux does."""
    if platform == "darwin":
        return Platform.MACOS
    if platform in ("win32", "cygwin"):
        return Platform.WINDOWS
    if platform in ("ios", "android"):  # Python 3.13 on those
        return Platform(platform)
    return Platform.LINUX


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


def assemble(
    secret_config: str,
    private_key: str | None,
    dns_mode: DnsMode,
    preshared_key: str | None = None,
    platform: Platform = Platform.LINUX,
) -> str:
    """The device's file: the Secret's wg0.conf with the local key and the chosen DNS handling.

    Only Linux gets wg-quick's hooks; every other platform's file is cut to the keys the WireGuard apps
    read, so that whatever the Secret holds, the app imports it.
    """
    config = secret_config
    if private_key is not None:
        line = f"PrivateKey = {private_key}"
        if PRIVATE_KEY_PLACEHOLDER.search(config):
            config = PRIVATE_KEY_PLACEHOLDER.sub(lambda _: line, config, count=1)
        elif field(config, "PrivateKey") is None:
            config = config.replace("[Interface]\n", f"[Interface]\n{line}\n", 1)
    if preshared_key and field(config, "PresharedKey") is None:
        config = config.replace("[Peer]\n", f"[Peer]\nPresharedKey = {preshared_key}\n", 1)
    if dns_mode is not DnsMode.FULL:
        dns = dns_of(config)
        config = re.sub(r"^DNS\s*=.*\n", "", config, flags=re.MULTILINE)
        if platform is Platform.LINUX and dns_mode is DnsMode.SPLIT and (hooks := split_dns_hooks(dns)):
            # The hooks go where the DNS line was: the end of [Interface], before the blank line and [Peer].
            config = config.replace("\n\n[Peer]\n", "\n" + "\n".join(hooks) + "\n\n[Peer]\n", 1)
    return config if platform is Platform.LINUX else for_apps(config)


# --- what join rendered the file from ----------------------------------------------------------

STAMP = re.compile(
    r"^# kvpn: server (?P<namespace>[^/\s]+)/(?P<name>\S+) revision (?P<revision>\S+)"
    r"(?: \(--dns (?P<dns>\S+) --platform (?P<platform>\S+)\))?$\n?",
    re.MULTILINE,
)
UNKNOWN_REVISION = "unknown"


@dataclass(frozen=True)
class Stamp:
    """The comment `join` writes into the file: the server revision it was rendered from, and how.

    `status` compares the revision with the server's; a re-run of `join` keeps the DNS mode and platform.
    wg-quick and the WireGuard apps skip comments.
    """

    server_namespace: str
    server_name: str
    revision: str | None
    """The server's status.revision the file was rendered from; None when the server had none."""

    dns_mode: DnsMode | None = None
    platform: Platform | None = None

    @property
    def server(self) -> str:
        return f"{self.server_namespace}/{self.server_name}"

    def line(self) -> str:
        how = f" (--dns {self.dns_mode} --platform {self.platform})" if self.dns_mode and self.platform else ""
        return f"# kvpn: server {self.server} revision {self.revision or UNKNOWN_REVISION}{how}"


def stamp_of(config: str) -> Stamp | None:
    """The file's stamp; None for a file an older `join` (or the operator) wrote."""
    if (match := STAMP.search(config)) is None:
        return None
    revision = match["revision"]
    return Stamp(
        match["namespace"],
        match["name"],
        None if revision == UNKNOWN_REVISION else revision,
        DnsMode(match["dns"]) if match["dns"] in set(DnsMode) else None,  # a later version's: not ours to keep
        Platform(match["platform"]) if match["platform"] in set(Platform) else None,
    )


def stamped(config: str, stamp: Stamp) -> str:
    """The file with `stamp` as its only stamp, after the leading comments (the first names the VpnPeer)."""
    lines = STAMP.sub("", config).splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return "".join([*lines[:at], stamp.line() + "\n", *lines[at:]])


def dns_mode_of(config: str) -> DnsMode:
    """The DNS mode a file was written with: its stamp's, else what its lines show."""
    if (stamp := stamp_of(config)) and stamp.dns_mode:
        return stamp.dns_mode
    if "resolvectl" in config:
        return DnsMode.SPLIT
    return DnsMode.FULL if field(config, "DNS") is not None else DnsMode.NONE


# --- files -------------------------------------------------------------------------------------


def interface_name(server: str) -> str:
    """wg-quick names the interface after the file: at most 15 characters."""
    return f"kvpn-{server}"[:15].rstrip("-.")


def write_private(path: Path, text: str) -> None:
    """Replaces path with text, readable by the owner only from the first byte (it holds the private key).

    Written next to it and renamed over it, so that an interrupted write, a full disk or a `wg-quick up`
    at the same moment never finds half a file, and the old one stays until the new one is whole. A
    symlink's target is what gets replaced, and the file keeps its owner when root rewrites a user's
    file (`sudo kubectl vpn up --follow`).
    """
    target = path.resolve() if path.is_symlink() else path
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            _keep_owner(handle.fileno(), target)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        Path(scratch).replace(target)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(scratch).unlink()
        raise


def _keep_owner(fd: int, path: Path) -> None:
    try:
        old = path.stat()
    except FileNotFoundError:
        return
    if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
        with contextlib.suppress(PermissionError):  # only root may give a file away; others write their own
            os.fchown(fd, old.st_uid, old.st_gid)
