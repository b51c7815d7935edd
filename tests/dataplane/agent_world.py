"""The agent as a process on a dataplane test's node, against the real API server and operator.

One gateway node (a network namespace) serving one VpnServer, a stock wg-quick laptop, a service;
the agent reaches the API server only through a relay the test can cut. With ``supervised`` the
node also runs `kvpn-agent wireguard-go` and the agent has it start wireguard-go, as in the chart.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from harness.agent_process import AgentProcess, SupervisorProcess
from harness.commands import run
from harness.controlplane import ControlPlane
from harness.kvpn import Kvpn, decode
from harness.netlab import Lab, wait_for
from harness.traffic import curl
from kvpn_agent.desired import interface_name
from kvpn_agent.observed import ObservedDevice
from kvpn_agent.state import ServerInputs, StateFile
from kvpn_agent.supervisor_api import SupervisorClient
from kvpn_agent.uapi import UapiClient
from kvpn_core.contract import encode_data
from tests.dataplane.conftest import (
    LISTEN_PORT,
    NODE_SIDE,
    POOL,
    PORT,
    SERVICE,
    SERVICE_NET,
    UNDERLAY_NODE,
    LabLaptop,
    Site,
)

URL = f"http://{SERVICE}:{PORT}/"
SERVER = "office"
RESYNC = 2.0
GATEWAY_LABEL = "kvpn.dev/test-gateway"


class Proxy:
    """A TCP relay to the API server that the test can cut: the agent's only way to it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_off = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_off:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open |= {conn, upstream}
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Like an API server that went away: open connections reset, new ones closed at once."""
        self.cut_off = True
        with self._lock:
            conns, self._open = self._open, set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.cut_off = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


@dataclass
class AgentLab:
    """One gateway node running the agent as a host process, one VpnServer and one VpnPeer, a laptop, a
    service (harness.world.World is kvpn on the real-node cluster)."""

    site: Site
    kvpn: Kvpn
    namespace: str
    agent: AgentProcess
    proxy: Proxy
    interface: str
    supervisor: SupervisorProcess | None = None
    laptop_if: str = ""
    peer: str = "laptop"

    @property
    def node_name(self) -> str:
        return f"kvt-{self.site.lab.token}"

    def supervisor_client(self) -> SupervisorClient:
        assert self.supervisor is not None
        return SupervisorClient(self.supervisor.socket_path)

    def uapi(self) -> UapiClient:
        return UapiClient(self.interface)

    def add_peer(self, name: str = "laptop") -> str:
        """A VpnPeer through the API; returns the wg0.conf the operator rendered for it."""
        self.peer = name
        self.kvpn.peer(self.namespace, name, server=SERVER)
        status = self.kvpn.wait_ready("vpnpeers", self.namespace, name)["status"]
        secret = self.kvpn.secret(self.namespace, status["configSecretName"])
        assert secret is not None
        config = decode(secret, "wg0.conf") or ""
        public_key = status["publicKey"]
        wait_for(lambda: public_key in self.uapi().get().peers, 10, "the agent to add the peer")
        return config

    def laptop_up(self, config: str) -> None:
        """The operator's wg0.conf with stock wg-quick. Its DNS line would make wg-quick call
        resolvconf, which this machine lacks (and the laptop namespace has no resolver to change)."""
        assert re.search(r"^DNS = ", config, re.M), config
        config = re.sub(r"^DNS = .*\n", "", config, flags=re.M)
        self.laptop_if = self.site.lab.ifname("l")
        path = self.site.tmp / f"{self.laptop_if}.conf"
        path.write_text(config)
        path.chmod(0o600)
        with (self.site.tmp / "wg-quick.log").open("a") as log:
            run(
                "ip", "netns", "exec", self.site.laptop_ns, "wg-quick", "up", str(path),
                env={**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go"},
                stdout=log, stderr=log,
            )  # fmt: skip

    def reach(self, max_time: float = 5) -> str | None:
        return curl(self.site.laptop_ns, URL, max_time=max_time)

    def patch_peer(self, **spec: Any) -> None:
        self.kvpn.patch("vpnpeers", self.namespace, self.peer, spec)

    def dataplane(self) -> tuple[object, str]:
        """The node's WireGuard configuration and table, without counters and timestamps."""
        device = self.uapi().get()
        peers = sorted(
            (p.public_key, p.preshared_key, p.allowed_ips, p.persistent_keepalive) for p in device.peers.values()
        )
        table = run("ip", "netns", "exec", self.site.node, "nft", "list", "table", "inet", "kvpn").stdout
        return (device.private_key, device.listen_port, peers), re.sub(r"packets \d+ bytes \d+", "", table)

    def diagnose(self) -> str:
        supervisor = f"\n--- supervisor\n{self.supervisor.log_tail(30)}" if self.supervisor else ""
        return f"{self.site.diagnose()}\n--- agent\n{self.agent.log_tail(60)}{supervisor}"


@contextlib.contextmanager
def agent_world(
    site: Site,
    kvpn: Kvpn,
    namespace: str,
    control_plane: ControlPlane,
    api: client.ApiClient,
    tmp_path: Path,
    *,
    supervised: bool = False,
    start: bool = True,
) -> Iterator[AgentLab]:
    """The world, its agent started (and ready) unless ``start`` is False; everything ended after."""
    lab: Lab = site.lab
    node_name = f"kvt-{lab.token}"
    core = client.CoreV1Api(api)
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node_name, labels={GATEWAY_LABEL: lab.token})))
    # The node's address, as a kubelet reports it: the operator sends laptops to gateways it can name.
    core.patch_node_status(node_name, {"status": {"addresses": [{"type": "InternalIP", "address": UNDERLAY_NODE}]}})
    kvpn.server(
        namespace,
        SERVER,
        addressPool=[POOL],
        listenPort=LISTEN_PORT,
        routes=[SERVICE_NET],
        expose={"type": "HostPort", "endpoint": f"{UNDERLAY_NODE}:{LISTEN_PORT}"},
        dns={"nameserver": SERVICE},
        nodeSelector={GATEWAY_LABEL: lab.token},
    )
    proxy = Proxy(_address(control_plane.server))
    kubeconfig = tmp_path / "agent-kubeconfig"
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    kubeconfig.write_text(yaml.safe_dump(config))
    argv = [
        sys.executable, "-m", "kvpn_agent.main", "run",
        "--netns", site.node, "--namespace", namespace, "--node-name", node_name,
        "--state-dir", str(tmp_path / "state"), "--metrics-address", "127.0.0.1",
        "--resync-seconds", str(RESYNC), "--report-seconds", "0.5", "--start-timeout", "3", "--log-format", "json",
    ]  # fmt: skip
    supervisor = None
    if supervised:
        # In the node's network namespace, as its pod is on the node's network: its wireguard-go
        # opens the TUN device and the UDP port there.
        supervisor = SupervisorProcess(
            tmp_path / "run" / "wireguard-go.sock",
            tmp_path / "supervisor.log",
            prefix=("ip", "netns", "exec", site.node),
        )
        argv += ["--wireguard-go-supervisor", str(supervisor.socket_path)]
    agent = AgentProcess(argv, {**os.environ, "KUBECONFIG": str(kubeconfig)}, tmp_path / "agent.log")
    interface = interface_name(namespace, SERVER)
    lab.interfaces.append(interface)  # its UAPI socket goes with the lab, whatever state the agent left
    made = AgentLab(site, kvpn, namespace, agent, proxy, interface, supervisor)
    try:
        if supervisor is not None:
            supervisor.start()
        if start:
            agent.start()
            # Ready once the agent's gateway lease says the server is programmed on its node.
            kvpn.wait_ready("vpnservers", namespace, SERVER, timeout=30)
        yield made
    finally:
        agent.stop(signal.SIGKILL)
        if made.supervisor is not None:
            made.supervisor.stop(signal.SIGKILL)
        proxy.close()
        with contextlib.suppress(client.ApiException):
            core.delete_node(node_name)
        # The lab ends every process in the node namespace (wireguard-go among them).
    for log_path in (agent.log_path, *([supervisor.log_path] if supervisor else [])):
        text = log_path.read_text() if log_path.exists() else ""
        assert "Traceback" not in text, "\n".join(text.splitlines()[-80:])


def _address(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("https://").rpartition(":")
    return host, int(port)


def connected(world: AgentLab) -> AgentLab:
    config = world.add_peer()
    world.laptop_up(config)
    assert world.reach() == NODE_SIDE, world.diagnose()
    return world


def wait_for_status(world: AgentLab, check: Any, timeout: float = 10) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        status = (world.kvpn.get("vpnpeers", world.namespace, world.peer) or {}).get("status") or {}
        return status if check(status) else None

    found: dict[str, Any] = wait_for_value(probe, timeout, "the peer's status")
    return found


def wait_for_value(probe: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def dataplane_condition(world: AgentLab, name: str, plural: str = "vpnpeers") -> dict[str, Any] | None:
    conditions = ((world.kvpn.get(plural, world.namespace, name) or {}).get("status") or {}).get("conditions")
    return next((c for c in conditions or [] if c["type"] == "Dataplane"), None)


@dataclass
class StateWorld:
    """A gateway node whose agent has no cluster: it serves its state file (the kernel tier's agent)."""

    site: Site
    agent: AgentProcess
    interface: str
    laptop: LabLaptop

    def reach(self, max_time: float = 5) -> str | None:
        return curl(self.site.laptop_ns, URL, max_time=max_time)

    def device(self) -> ObservedDevice:
        device = self.site.wireguard.get(self.interface)
        assert device is not None, f"no WireGuard device {self.interface}"
        return device

    def diagnose(self) -> str:
        return f"{self.site.diagnose()}\n--- agent\n{self.agent.log_tail(60)}"


@contextlib.contextmanager
def state_file_world(site: Site, tmp_path: Path, *, extra: Sequence[str] = ()) -> Iterator[StateWorld]:
    """`kvpn-agent run --backend <the site's>` serving one VpnServer from its state file, no API server.

    The agent gets no cluster (KUBECONFIG names nothing), so it serves the last good state it finds
    (test_restart_without_api_serves_the_state_file_and_restores_endpoints): no control plane is
    needed, which the VM tier's slow guest is spared. The laptop's tunnel is up when it yields.
    """
    namespace = f"t{site.lab.token}"  # the interface's name is unique on the machine (UAPI sockets are shared)
    server = site.server_object()
    server["metadata"] = {"namespace": namespace, "name": SERVER, "resourceVersion": "1"}
    laptop = site.add_peer()
    key_secret = {
        "metadata": {"namespace": namespace, "name": f"kvpn-server-{SERVER}", "resourceVersion": "1"},
        "data": encode_data({"privateKey": site.server_key}),
    }
    state_dir = tmp_path / "state"
    StateFile(state_dir).save([ServerInputs(server, key_secret, tuple(site.bindings.values()))], {})
    argv = [
        sys.executable, "-m", "kvpn_agent.main", "run", "--backend", site.backend,
        "--netns", site.node, "--node-name", f"kvt-{site.lab.token}", "--state-dir", str(state_dir),
        "--resync-seconds", str(RESYNC), "--report-seconds", "0.5", "--start-timeout", "0", "--log-format", "json",
        *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {"KUBECONFIG": str(tmp_path / "no-cluster")}
    agent = AgentProcess(argv, env, tmp_path / "agent.log")
    interface = interface_name(namespace, SERVER)
    site.interface = interface  # the Site's read-back and diagnosis look at the agent's interface
    site.lab.interfaces.append(interface)
    try:
        agent.start()
        site.up(laptop)
        world = StateWorld(site, agent, interface, laptop)
        assert world.reach() == NODE_SIDE, world.diagnose()
        yield world
    finally:
        agent.stop(signal.SIGKILL)
    text = agent.log_path.read_text() if agent.log_path.exists() else ""
    assert "Traceback" not in text, "\n".join(text.splitlines()[-80:])
