"""`up` / `down`: wg-quick on a file `join` wrote, after the same route check (Linux only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kvpn_cli import dns, join, wgquick
from kvpn_cli.cluster import CliError
from kvpn_core import wgquick as wgfile


def resolve_file(target: str | None) -> Path:
    """A path as given, or the file of that server (or the only file) in ~/.config/kvpn."""
    if target and (path := Path(target)).suffix == ".conf":
        if not path.exists():
            raise CliError(f"no such file: {path}")
        return path.resolve()
    files = sorted(join.config_dir().glob("*.conf"))
    if target:
        files = [f for f in files if f.stem == wgquick.interface_name(target)]
    if len(files) != 1:
        found = ", ".join(str(f) for f in files) or "none"
        where = join.config_dir()
        raise CliError(f"name the config file to use (found in {where}: {found}); `kubectl vpn join` writes one")
    return files[0]


def require_linux(action: str) -> None:
    if not sys.platform.startswith("linux"):
        raise CliError(f"`kubectl vpn {action}` drives wg-quick, on Linux only: use the WireGuard app here")


def wg_quick(action: str, target: str | None, force: bool = False, routes_file: Path | None = None) -> None:
    require_linux(action)
    path = resolve_file(target)
    config = path.read_text()
    if action == "up":
        if "resolvectl" in config and not dns.resolved_running():
            raise CliError(f"{path} uses split DNS, which needs systemd-resolved: join again with --dns full or none")
        join.check_routes(wgfile.allowed_ips(config), path.stem, force, routes_file)
    command = ["wg-quick", action, str(path)]
    if os.geteuid() != 0:
        command = ["sudo", *command]
    try:
        result = subprocess.run(command, check=False)
    except FileNotFoundError:
        raise CliError("wg-quick is not installed (Debian/Ubuntu: apt install wireguard-tools)") from None
    if result.returncode != 0:
        raise CliError(f"wg-quick {action} {path} failed (exit {result.returncode}); its output is above")
