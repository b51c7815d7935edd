"""Which DNS handling this machine supports, and what the user must do beyond the wg-quick file."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from kvpn_cli import wgquick
from kvpn_cli.cluster import CliError
from kvpn_core import wgquick as wgfile


def resolved_running() -> bool:
    """systemd-resolved is in charge of this machine's DNS (resolvectl talks to it)."""
    return shutil.which("resolvectl") is not None and Path("/run/systemd/resolve").is_dir()


def check_mode(mode: wgquick.DnsMode) -> None:
    """Refuses split DNS where it cannot work, naming the alternatives."""
    if mode is not wgquick.DnsMode.SPLIT or sys.platform == "darwin":
        return
    if sys.platform.startswith("linux") and resolved_running():
        return
    raise CliError(
        "split DNS needs systemd-resolved, which is not running here: use --dns full "
        "(every lookup goes to cluster DNS while the tunnel is up) or --dns none (cluster names will not resolve)"
    )


def print_followup(mode: wgquick.DnsMode, dns: wgfile.Dns) -> None:
    """On macOS, split DNS is /etc/resolver files, which need root: say which ones to write."""
    platform: str = sys.platform  # a str, not the constant mypy narrows to the checking machine's
    if mode is not wgquick.DnsMode.SPLIT or platform != "darwin":
        return
    for path, body in wgquick.macos_resolver_files(dns).items():
        print(f"split DNS: sudo mkdir -p /etc/resolver && printf '{body.strip()}\\n' | sudo tee {path}")
