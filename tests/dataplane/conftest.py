"""A node, a laptop and a service in network namespaces: the node configured by the agent's own modules."""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.commands import run
from harness.factories import binding_secret, keypair, wg_quick_config
from harness.netlab import Lab
from harness.traffic import whoami_servers, whoami_servers_any_family
from kvpn_agent.desired import DesiredServer, build_desired
from kvpn_agent.kernel import KernelLink, KernelWireGuard
from kvpn_agent.netlink import Netlink
from kvpn_agent.nft import Nft
from kvpn_agent.observed import ObservedDevice
from kvpn_agent.processes import WireGuardGo
from kvpn_agent.sync import LinkBackend, SyncResult, UapiBackend, WireGuardBackend, sync
from kvpn_agent.wggo import UserspaceLink
from kvpn_core.api import AllowedDestination
from kvpn_core.contract import PeerBinding, encode_data

REQUIRED = ("ip", "nft", "wireguard-go", "wg", "wg-quick", "curl")

# Addresses exist only inside the test's namespaces.
UNDERLAY_NODE, UNDERLAY_LAPTOP = "192.168.237.1", "192.168.237.2"
SERVICE_NET = "172.31.237.0/24"
NODE_SIDE, SERVICE, OTHER_SERVICE = "172.31.237.1", "172.31.237.2", "172.31.237.3"
POOL, SERVER_ADDRESS = "10.237.0.0/24", "10.237.0.1"
PORT, OTHER_PORT, LISTEN_PORT = 8080, 8081, 51820
# The IPv6 half of a dual-stack site (``dual_stack_site``); its tunnel still runs over the IPv4 underlay.
SERVICE_NET6 = "fd00:172:31:237::/64"
NODE_SIDE6, SERVICE6, OTHER_SERVICE6 = "fd00:172:31:237::1", "fd00:172:31:237::2", "fd00:172:31:237::3"
POOL6, SERVER_ADDRESS6 = "fd00:237::/64", "fd00:237::1"

BACKENDS = (pytest.param("userspace"), pytest.param("kernel", marks=pytest.mark.vm))
"""The agent's two WireGuard backends. Kernel WireGuard needs the module, which only the VM tier has
(harness/vm.py): its cases carry the ``vm`` marker, deselected on the host."""

both_backends = pytest.mark.parametrize("backend", BACKENDS, indirect=True)
"""For a test that must hold on either backend; without it a test gets the userspace one."""


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml by the VM tier; here too so that this folder collects on its own.
    config.addinivalue_line("markers", "vm: needs kernel WireGuard: runs inside the VM tier's guest")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/dataplane/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.root)


@pytest.fixture(autouse=True, scope="session")
def dataplane_prerequisites() -> None:
    """Root and the real binaries, or a failure that says so: this tier never skips, CI must run it."""
    if os.geteuid() != 0:
        pytest.fail("dataplane tests need root (network namespaces, TUN, nftables)", pytrace=False)
    if missing := [b for b in REQUIRED if shutil.which(b) is None]:
        pytest.fail(f"missing {', '.join(missing)}: run `make setup`", pytrace=False)


@dataclass
class LabLaptop:
    """A wg-quick peer in the lab's laptop namespace (not harness.world.Laptop, a laptop on the real-node
    cluster)."""

    interface: str
    address: str
    private_key: str
    public_key: str
    preshared_key: str
    binding: PeerBinding
    address6: str | None = None
    """Its IPv6 tunnel address, on a dual-stack site."""


@dataclass
class Site:
    """One VpnServer served by a node namespace, with a laptop and a service namespace around it."""

    lab: Lab
    tmp: Path
    node: str
    laptop_ns: str
    service_ns: str
    interface: str
    server_key: str
    server_public_key: str
    masquerade: bool = True
    backend: str = "userspace"
    dual_stack: bool = False
    """The server has an IPv6 pool and route too, the service an IPv6 address (make_site(dual_stack=True))."""
    bindings: dict[str, dict[str, Any]] = field(default_factory=dict)
    link: LinkBackend = field(init=False)
    wireguard: WireGuardBackend = field(init=False)
    firewall: Nft = field(init=False)
    netlink: Netlink = field(init=False)
    wggo: WireGuardGo | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.netlink = Netlink(netns=self.node)
        if self.backend == "kernel":
            self.link, self.wireguard = KernelLink(self.netlink), KernelWireGuard(self.node)
        else:
            self.wggo = WireGuardGo(prefix=("ip", "netns", "exec", self.node), log_dir=self.tmp)
            self.link, self.wireguard = UserspaceLink(self.netlink, self.wggo), UapiBackend()
        self.firewall = Nft(prefix=("ip", "netns", "exec", self.node))

    def device(self) -> ObservedDevice:
        """The server's WireGuard device as its backend reads it back."""
        device = self.wireguard.get(self.interface)
        assert device is not None, f"no WireGuard device {self.interface}"
        return device

    def ifindex(self) -> int | None:
        return self.netlink.index(self.interface)

    def server_object(self) -> dict[str, Any]:
        pools, addresses, routes = [POOL], [SERVER_ADDRESS], [SERVICE_NET]
        if self.dual_stack:
            pools, addresses, routes = [*pools, POOL6], [*addresses, SERVER_ADDRESS6], [*routes, SERVICE_NET6]
        return {
            "apiVersion": "kvpn.dev/v1alpha1",
            "kind": "VpnServer",
            "metadata": {"namespace": "team", "name": "office"},
            "spec": {
                "addressPool": pools,
                "listenPort": LISTEN_PORT,
                "routes": routes,
                "masquerade": self.masquerade,
            },
            "status": {"addresses": addresses, "routes": routes},
        }

    def desired(self) -> DesiredServer:
        key_secret = {"data": encode_data({"privateKey": self.server_key})}
        return build_desired(self.server_object(), key_secret, self.bindings.values(), interface=self.interface)

    def sync(self) -> SyncResult:
        return sync([self.desired()], self.link, self.wireguard, self.firewall)

    def bind(self, pb: PeerBinding) -> None:
        self.bindings[pb.secret_name("office")] = binding_secret("office", pb)

    def add_peer(self, host: int = 2, destinations: Sequence[AllowedDestination] = ()) -> LabLaptop:
        """A VpnPeer as the node sees it: its binding (applied by the next sync)."""
        private, public = keypair()
        psk, _ = keypair()
        address = f"10.237.0.{host}"
        address6 = str(ipaddress.ip_network(POOL6)[host]) if self.dual_stack else None
        pb = PeerBinding(
            peer_namespace="team",
            peer_name=f"laptop{host}",
            peer_uid=f"uid-{host}",
            public_key=public,
            preshared_key=psk,
            addresses=[address, *([address6] if address6 else [])],
            allowed_destinations=list(destinations),
        )
        self.bind(pb)
        return LabLaptop(self.lab.ifname(f"l{host}"), address, private, public, psk, pb, address6)

    def up(self, laptop: LabLaptop) -> None:
        """`wg-quick up` on the laptop with the config a user would get.

        Call it after the node knows the peer: with PersistentKeepalive the laptop sends its first
        handshake at once, and if that is lost the next try comes only after 5 s (REKEY_TIMEOUT).
        """
        conf = self.tmp / f"{laptop.interface}.conf"
        addresses = [f"{laptop.address}/32", *([f"{laptop.address6}/128"] if laptop.address6 else [])]
        conf.write_text(
            wg_quick_config(
                laptop.private_key,
                ", ".join(addresses),
                self.server_public_key,
                laptop.preshared_key,
                f"{UNDERLAY_NODE}:{LISTEN_PORT}",
                [SERVICE_NET, *([SERVICE_NET6] if self.dual_stack else [])],
            )
        )
        conf.chmod(0o600)
        with (self.tmp / "wg-quick.log").open("a") as log:
            run(
                "ip", "netns", "exec", self.laptop_ns, "wg-quick", "up", str(conf),
                env={**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go"},
                stdout=log, stderr=log,
            )  # fmt: skip

    def add_laptop(self, host: int = 2, destinations: Sequence[AllowedDestination] = ()) -> LabLaptop:
        """A peer, synced to the node, and its laptop's tunnel up."""
        laptop = self.add_peer(host, destinations)
        self.sync()
        self.up(laptop)
        return laptop

    def close(self) -> None:
        if self.wggo is not None:
            self.wggo.stop_all()
        if isinstance(self.wireguard, KernelWireGuard):
            self.wireguard.close()
        self.netlink.close()

    def diagnose(self) -> str:
        """What a failing assertion shows: both ends' WireGuard state, the node's table and routes."""
        parts = []
        for ns, argv in (
            (self.node, ["wg", "show", "all"]),
            (self.laptop_ns, ["wg", "show", "all"]),
            (self.node, ["nft", "list", "ruleset"]),
            (self.node, ["ip", "addr"]),
            (self.laptop_ns, ["ip", "route"]),
            *([(self.laptop_ns, ["ip", "-6", "route"])] if self.dual_stack else []),
        ):
            proc = run("ip", "netns", "exec", ns, *argv, check=False)
            parts.append(f"--- {ns}: {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
        for log in sorted(self.tmp.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text()[-3000:]}")
        return "\n".join(parts)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab("kvt")
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The Site's WireGuard backend: userspace unless the test is parametrized (``both_backends``)."""
    return str(getattr(request, "param", "userspace"))


@pytest.fixture
def site(lab: Lab, tmp_path: Path, backend: str) -> Iterator[Site]:
    made = make_site(lab, tmp_path, backend)
    try:
        yield made
    finally:
        made.close()  # before the lab removes the namespaces under it


@pytest.fixture
def dual_stack_site(lab: Lab, tmp_path: Path, backend: str) -> Iterator[Site]:
    """``site`` with an IPv6 pool, route and service besides the IPv4 ones."""
    made = make_site(lab, tmp_path, backend, dual_stack=True)
    try:
        yield made
    finally:
        made.close()


def make_site(lab: Lab, tmp_path: Path, backend: str = "userspace", *, dual_stack: bool = False) -> Site:
    node, laptop, service = lab.netns("node"), lab.netns("lap"), lab.netns("svc")
    if dual_stack:
        for ns in (node, service):
            # Before the veths exist, so that they inherit it: an address stays tentative (unusable,
            # a bind fails) for a second or more while duplicate address detection runs.
            no_dad = (f"net.ipv6.conf.{c}.accept_dad=0" for c in ("all", "default"))
            run("ip", "netns", "exec", ns, "sysctl", "-qw", *no_dad)
    lab.veth(node, f"{UNDERLAY_NODE}/24", laptop, f"{UNDERLAY_LAPTOP}/24")
    to_service, service_side = lab.veth(node, f"{NODE_SIDE}/24", service, f"{SERVICE}/24")
    run("ip", "-n", service, "addr", "add", f"{OTHER_SERVICE}/24", "dev", _first_veth(service))
    # Without masquerade the service needs the way back to the pool; with it, it never uses it.
    run("ip", "-n", service, "route", "add", POOL, "via", NODE_SIDE)
    run("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    services = [SERVICE, OTHER_SERVICE]
    if dual_stack:
        run("ip", "-n", node, "addr", "add", f"{NODE_SIDE6}/64", "dev", to_service)
        for address in (SERVICE6, OTHER_SERVICE6):
            run("ip", "-n", service, "addr", "add", f"{address}/64", "dev", service_side)
        run("ip", "-n", service, "-6", "route", "add", POOL6, "via", NODE_SIDE6)
        # The agent turns forwarding on for the families it serves (runner.py, at a full sync); sync()
        # called directly, as here, does not.
        run("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        services += [SERVICE6, OTHER_SERVICE6]
    listen = [(address, port) for address in services for port in (PORT, OTHER_PORT)]
    (whoami_servers_any_family if dual_stack else whoami_servers)(lab, service, listen)
    server_key, server_public = keypair()
    return Site(
        lab, tmp_path, node, laptop, service, lab.ifname("n"), server_key, server_public,
        backend=backend, dual_stack=dual_stack,
    )  # fmt: skip


def _first_veth(ns: str) -> str:
    links = run("ip", "-n", ns, "-o", "link", "show", "type", "veth").stdout
    return links.split(":")[1].strip().split("@")[0]
