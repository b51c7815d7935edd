"""Links and addresses through pyroute2 (rtnetlink): MTU, addresses, up, delete, IP forwarding."""

from __future__ import annotations

import errno
import ipaddress
import logging
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kvpn_agent.observed import ObservedLink

log = logging.getLogger(__name__)

IFF_UP = 0x1


class Netlink:
    """One rtnetlink socket, in the agent's namespace or (for tests) a named one."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._ipr: Any = None

    def _sock(self) -> Any:
        if self._ipr is None:
            self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()

    def index(self, interface: str) -> int | None:
        found = self._sock().link_lookup(ifname=interface)
        return int(found[0]) if found else None

    def _require(self, interface: str) -> int:
        index = self.index(interface)
        if index is None:
            raise NetlinkError(errno.ENODEV, f"no interface {interface}")
        return index

    def interfaces(self, prefix: str = "") -> list[str]:
        """Names of the links whose name starts with ``prefix``."""
        names = (str(link.get_attr("IFLA_IFNAME")) for link in self._sock().get_links())
        return sorted(n for n in names if n.startswith(prefix))

    def observe(self, interface: str) -> ObservedLink | None:
        index = self.index(interface)
        if index is None:
            return None
        (link,) = self._sock().link("get", index=index)
        addresses = tuple(
            str(ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"))
            for a in self._sock().get_addr(index=index)
        )
        return ObservedLink(mtu=int(link.get_attr("IFLA_MTU")), up=bool(link["flags"] & IFF_UP), addresses=addresses)

    def add_wireguard(self, interface: str) -> None:
        """A kernel WireGuard link (fails with EOPNOTSUPP where the module is missing)."""
        self._sock().link("add", ifname=interface, kind="wireguard")

    def delete(self, interface: str) -> None:
        index = self.index(interface)
        if index is not None:
            self._sock().link("del", index=index)

    def set_mtu(self, interface: str, mtu: int) -> None:
        self._sock().link("set", index=self._require(interface), mtu=mtu)

    def set_up(self, interface: str) -> None:
        self._sock().link("set", index=self._require(interface), state="up")

    def add_address(self, interface: str, address: str) -> None:
        iface = ipaddress.ip_interface(address)
        try:
            self._sock().addr(
                "add", index=self._require(interface), address=str(iface.ip), prefixlen=iface.network.prefixlen
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # someone (or an earlier, interrupted sync) already added it
                raise

    def remove_address(self, interface: str, address: str) -> None:
        iface = ipaddress.ip_interface(address)
        try:
            self._sock().addr(
                "del", index=self._require(interface), address=str(iface.ip), prefixlen=iface.network.prefixlen
            )
        except NetlinkError as exc:
            if exc.code != errno.EADDRNOTAVAIL:
                raise


def enable_forwarding(families: tuple[int, ...] = (4, 6), proc_sys: Path = Path("/proc/sys")) -> list[str]:
    """Turns on forwarding for the families in use; returns the settings it changed.

    Writes /proc/sys of the agent's own network namespace (the node's, with hostNetwork); only a
    setting that is off is written, so a node that already forwards sees no write at all.
    """
    paths = {4: proc_sys / "net/ipv4/ip_forward", 6: proc_sys / "net/ipv6/conf/all/forwarding"}
    changed = []
    for family in families:
        path = paths[family]
        if path.read_text().strip() == "1":
            continue
        try:
            path.write_text("1\n")
        except OSError as exc:
            # An unprivileged container sees /proc/sys read-only. The interface and firewall are still worth
            # programming; the message says what the node needs.
            log.error(  # noqa: TRY400 - a fact about the node, not a bug: no traceback
                "IP forwarding is off and cannot be turned on here (%s): set %s=1 on the node",
                exc.strerror,
                str(path.relative_to(proc_sys)).replace("/", "."),
            )
            continue
        changed.append(str(path))
    return changed


class NetlinkConfigured:
    """What both WireGuard backends do the same way once the link exists: look at it and configure it."""

    netlink: Netlink

    def observe(self, interface: str) -> ObservedLink | None:
        return self.netlink.observe(interface)

    def set_mtu(self, interface: str, mtu: int) -> None:
        self.netlink.set_mtu(interface, mtu)

    def add_address(self, interface: str, address: str) -> None:
        self.netlink.add_address(interface, address)

    def remove_address(self, interface: str, address: str) -> None:
        self.netlink.remove_address(interface, address)

    def set_up(self, interface: str) -> None:
        self.netlink.set_up(interface)
