"""Which DNS handling a platform supports, and what the user must do beyond the wg-quick file."""

from __future__ import annotations

import shutil
from pathlib import Path

from kvpn_cli import wgquick
from kvpn_cli.cluster import CliError
from kvpn_cli.wgquick import DnsMode, Platform
from kvpn_core import wgquick as wgfile


def resolved_running() -> bool:
    """systemd-resolved is in charge of this machine's DNS (resolvectl talks to it)."""
    return shutil.which("resolvectl") is not None and Path("/run/systemd/resolve").is_dir()


def check_mode(mode: DnsMode, platform: Platform) -> None:
    """Refuses split DNS where it cannot work, naming the alternatives.

    Only this machine's resolver can be looked at: a Linux file written for another machine is trusted.
    """
    if mode is not DnsMode.SPLIT or platform is Platform.MACOS:
        return
    if platform is not Platform.LINUX:
        raise CliError(
            f"the WireGuard app on {platform.label} cannot send only the cluster's domains to cluster DNS: use "
            "--dns full (every lookup goes to cluster DNS while connected) or --dns none (cluster names will not "
            "resolve)"
        )
    if wgquick.this_machine() is not Platform.LINUX or resolved_running():
        return
    raise CliError(
        "split DNS needs systemd-resolved, which is not running here: use --dns full "
        "(every lookup goes to cluster DNS while the tunnel is up) or --dns none (cluster names will not resolve)"
    )


def print_followup(mode: DnsMode, platform: Platform, dns: wgfile.Dns) -> None:
    """On macOS, split DNS is /etc/resolver files, which need root: say which ones to write."""
    if mode is not DnsMode.SPLIT or platform is not Platform.MACOS:
        return
    for path, body in wgquick.macos_resolver_files(dns).items():
        print(f"split DNS: sudo mkdir -p /etc/resolver && printf '{body.strip()}\\n' | sudo tee {path}")
