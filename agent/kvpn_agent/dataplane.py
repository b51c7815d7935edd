"""The node's dataplane wiring: the WireGuard backend chosen (kernel, wireguard-go, auto) and its adapters."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from kvpn_agent.desired import GATEWAY_PREFIX
from kvpn_agent.kernel import KernelLink, KernelWireGuard
from kvpn_agent.netlink import Netlink, NetlinkConfigured, enable_forwarding
from kvpn_agent.nft import Nft
from kvpn_agent.observed import ObservedDevice
from kvpn_agent.processes import WireGuardGo, WireGuardGoProcesses
from kvpn_agent.supervisor_api import SupervisorClient
from kvpn_agent.sync import Firewall, LinkBackend, UapiBackend, WireGuardBackend
from kvpn_agent.wggo import UserspaceLink
from kvpn_agent.wire import DeviceConfig, PeerConfig

log = logging.getLogger(__name__)

PROBE_INTERFACE = f"{GATEWAY_PREFIX}probe"
"""The link made and deleted to learn whether the kernel has WireGuard: the agent's, by its prefix."""


@dataclass
class Dataplane:
    """The node's WireGuard, links and firewall, behind the interfaces the sync module drives."""

    backend: str
    link: LinkBackend
    wireguard: WireGuardBackend
    reader: WireGuardBackend
    """A second client for the reporter's thread (the kernel backend's socket is not thread-safe)."""

    firewall: Firewall
    netlink: Netlink
    forwarding: Callable[[tuple[int, ...]], list[str]]
    wggo: WireGuardGoProcesses | None = None
    """The userspace backend's processes (the agent's own, or the supervisor's); None: kernel only."""

    fallback: KernelFirstLink | None = None
    """backend auto on a node with the module: which servers the kernel refused, now on wireguard-go."""

    takeover: WireGuardBackend | None = None
    """A third client, for the takeover worker's handshakes (kvpn_agent.takeover); None: no takeovers."""

    def userspace(self, interface: str) -> bool:
        """Whether wireguard-go serves (or is to serve) the interface."""
        return self.wggo is not None and (self.fallback is None or interface in self.fallback.failed)

    def outlives_agent(self, interface: str) -> bool:
        """Whether the interface keeps serving when the agent stops: a kernel link does, and so does a
        wireguard-go the supervisor runs (its own pod); the agent's own children die with its container."""
        return not self.userspace(interface) or isinstance(self.wggo, SupervisorClient)

    def uses_wireguard_go(self) -> bool:
        """Whether any interface is wireguard-go's: only then its processes (and supervisor) are watched."""
        return self.wggo is not None and (self.fallback is None or bool(self.fallback.failed))


class KernelFirstLink(NetlinkConfigured):
    """LinkBackend of ``auto``: a kernel link per server, wireguard-go for a server whose link the kernel refuses.

    The refusal is remembered for as long as the agent runs (a restart tries the kernel again) and
    reported on the server's Dataplane condition; the WireGuard backends follow ``failed``.
    """

    def __init__(self, netlink: Netlink, kernel: KernelLink, userspace: UserspaceLink) -> None:
        self.netlink = netlink
        self.kernel = kernel
        self.userspace = userspace
        self.failed: dict[str, str] = {}
        """Interface → why the kernel refused its link; replaced, never mutated (the reporter reads it)."""

    def create(self, interface: str) -> None:
        if interface not in self.failed:
            try:
                self.kernel.create(interface)
            except (NetlinkError, OSError) as exc:
                why = f"link creation refused: {exc}"
                log.error(  # noqa: TRY400 - a fact about the node: no traceback
                    "kernel WireGuard failed: serving the server with wireguard-go instead",
                    extra={"interface": interface, "error": why},
                )
                self.failed = {**self.failed, interface: why}
            else:
                return
        self.userspace.create(interface)

    def delete(self, interface: str) -> None:
        if interface in self.failed:
            self.userspace.delete(interface)
            self.failed = {k: v for k, v in self.failed.items() if k != interface}
        else:
            self.kernel.delete(interface)


class KernelFirstWireGuard:
    """WireGuardBackend of ``auto``: the kernel's, or wireguard-go's for the servers in ``link.failed``."""

    def __init__(self, link: KernelFirstLink, kernel: WireGuardBackend, userspace: WireGuardBackend) -> None:
        self.link, self.kernel, self.userspace = link, kernel, userspace

    def _for(self, interface: str) -> WireGuardBackend:
        return self.userspace if interface in self.link.failed else self.kernel

    def get(self, interface: str) -> ObservedDevice | None:
        return self._for(interface).get(interface)

    def set(self, interface: str, device: DeviceConfig | None, peers: Sequence[PeerConfig]) -> None:
        self._for(interface).set(interface, device, peers)


def kernel_wireguard_works(netns: str | None = None) -> bool:
    """Whether `ip link add type wireguard` works here: the kernel module is present (or loads)."""
    try:
        with Netlink(netns) as netlink:
            netlink.add_wireguard(PROBE_INTERFACE)
            netlink.delete(PROBE_INTERFACE)
    except (NetlinkError, OSError):
        return False
    return True


def build_dataplane(backend: str, netns: str | None, log_dir: Path | None, supervisor: Path | None = None) -> Dataplane:
    """The backends for ``backend``, in ``netns`` when given (tests, demo).

    ``kernel`` and ``userspace`` are what they say. ``auto`` is the kernel where `ip link add type
    wireguard` works (KernelFirstLink: a server whose link is refused later on gets wireguard-go),
    and ``userspace`` where it does not. With ``supervisor`` (the socket of `kvpn-agent
    wireguard-go`) the userspace processes are the supervisor's, which outlive this agent; without
    it the agent starts them itself.
    """
    if backend == "auto":
        backend = "kernel-first" if kernel_wireguard_works(netns) else "userspace"
        log.info("backend auto", extra={"chosen": "kernel" if backend == "kernel-first" else "userspace"})
    prefix = ("ip", "netns", "exec", netns) if netns else ()
    netlink = Netlink(netns)
    firewall = Nft(prefix)
    forwarding = _netns_forwarding(netns) if netns else enable_forwarding
    wg = KernelWireGuard(netns)
    kernel = KernelLink(netlink, wg)  # the sync thread's socket
    if backend == "kernel":
        return Dataplane(
            "kernel", kernel, wg, KernelWireGuard(netns), firewall, netlink, forwarding, takeover=KernelWireGuard(netns)
        )
    wggo: WireGuardGoProcesses
    if supervisor is not None:
        wggo = SupervisorClient(supervisor)
    else:
        if log_dir is not None:
            log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        wggo = WireGuardGo(prefix=prefix, log_dir=log_dir)
    userspace = UserspaceLink(netlink, wggo)
    if backend == "userspace":
        return Dataplane(
            "userspace",
            userspace,
            UapiBackend(),
            UapiBackend(),
            firewall,
            netlink,
            forwarding,
            wggo,
            takeover=UapiBackend(),
        )
    link = KernelFirstLink(netlink, kernel, userspace)
    return Dataplane(
        "kernel",
        link,
        KernelFirstWireGuard(link, wg, UapiBackend()),
        KernelFirstWireGuard(link, KernelWireGuard(netns), UapiBackend()),
        firewall,
        netlink,
        forwarding,
        wggo,
        link,
        KernelFirstWireGuard(link, KernelWireGuard(netns), UapiBackend()),
    )


def _netns_forwarding(netns: str) -> Callable[[tuple[int, ...]], list[str]]:
    def forwarding(families: tuple[int, ...]) -> list[str]:
        changed = []
        for family in families:
            key = "net.ipv4.ip_forward" if family == 4 else "net.ipv6.conf.all.forwarding"
            argv = ["ip", "netns", "exec", netns, "sysctl", "-n", key]
            if subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout.strip() != "1":
                subprocess.run([*argv[:-2], "-qw", f"{key}=1"], check=True, timeout=10)
                changed.append(key)
        return changed

    return forwarding
