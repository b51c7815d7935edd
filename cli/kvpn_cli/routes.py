"""The laptop's own routes, and which of them a tunnel's AllowedIPs would collide with."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Route:
    """One route of the laptop: a destination network and the interface it leaves by."""

    network: Network
    dev: str

    def __str__(self) -> str:
        return f"{self.network} dev {self.dev}"


def parse_ip_routes(text: str) -> list[Route]:
    """Routes from the JSON of `ip -j route`; default routes are left out (everything overlaps them)."""
    routes = []
    for entry in json.loads(text or "[]"):
        dst = entry.get("dst", "")
        if dst in ("", "default") or entry.get("type") in ("broadcast", "local", "unreachable", "blackhole"):
            continue
        try:
            network = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if network.prefixlen == 0:
            continue
        routes.append(Route(network, str(entry.get("dev", "?"))))
    return routes


def find_conflicts(tunnelled: list[str], routes: list[Route], own_interface: str) -> list[tuple[str, Route]]:
    """(tunnelled range, laptop route) pairs that overlap; routes of our own interface are not conflicts."""
    nets = [ipaddress.ip_network(n, strict=False) for n in tunnelled]
    return [
        (str(net), route)
        for net in nets
        for route in routes
        if route.dev != own_interface and net.version == route.network.version and net.overlaps(route.network)
    ]


def conflict_message(conflicts: list[tuple[str, Route]]) -> str:
    tunnelled, route = conflicts[0]
    more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
    return (
        f"the tunnel would route {tunnelled}, which overlaps this machine's route {route}{more}: "
        "traffic to one of them would go the wrong way; use --force to write the config anyway"
    )


def read_routes(routes_file: Path | None = None) -> list[Route]:
    """This machine's IPv4 and IPv6 routes (main table), or those in routes_file (JSON of `ip -j route`)."""
    if routes_file is not None:
        return parse_ip_routes(routes_file.read_text())
    routes: list[Route] = []
    for family in ("-4", "-6"):
        try:
            result = subprocess.run(["ip", "-j", family, "route"], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            continue  # no iproute2 (macOS) or no IPv6: nothing to compare against
        routes += parse_ip_routes(result.stdout)
    return routes
