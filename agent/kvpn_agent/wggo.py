"""The userspace backend's link: a wireguard-go process creates the TUN device, netlink configures it."""

from __future__ import annotations

import contextlib

from kvpn_agent.netlink import Netlink, NetlinkConfigured
from kvpn_agent.processes import WireGuardGoProcesses


class UserspaceLink(NetlinkConfigured):
    """LinkBackend for wireguard-go: the process creates the TUN device, netlink configures it."""

    def __init__(self, netlink: Netlink, wggo: WireGuardGoProcesses) -> None:
        self.netlink = netlink
        self.wggo = wggo

    def create(self, interface: str) -> None:
        # A link without a live device is a leftover (or a kernel link of the same name): start clean.
        self.wggo.stop(interface)
        self.netlink.delete(interface)
        self.wggo.start(interface)

    def delete(self, interface: str) -> None:
        self.wggo.stop(interface)
        self.netlink.delete(interface)
        with contextlib.suppress(FileNotFoundError):
            self.wggo.socket(interface).unlink()
