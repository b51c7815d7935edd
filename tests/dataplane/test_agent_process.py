"""`kvpn-agent run` as a process against the real API server and operator; a stock wg-quick laptop."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kvpn_agent.model import interface_name
from kvpn_agent.uapi import UapiClient
from kvpn_operator.contract import binding_secret_name
from tests.dataplane.conftest import LISTEN_PORT, NODE_SIDE, POOL, PORT, SERVICE, SERVICE_NET, UNDERLAY_NODE, Site
from tests.dataplane.kit import Lab, curl, run, wait_for
from tests.support.agent_process import AgentProcess
from tests.support.controlplane import ControlPlane
from tests.support.kvpn import Kvpn, decode

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("operator")]

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
class World:
    """One gateway node running the agent, one VpnServer and one VpnPeer, a laptop, a service."""

    site: Site
    kvpn: Kvpn
    namespace: str
    agent: AgentProcess
    proxy: Proxy
    interface: str
    laptop_if: str = ""
    peer: str = "laptop"

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
        return f"{self.site.diagnose()}\n--- agent\n{self.agent.log_tail(60)}"


@pytest.fixture
def kvpn(api: client.ApiClient) -> Kvpn:
    return Kvpn(api)


@pytest.fixture
def world(
    site: Site, kvpn: Kvpn, namespace: str, control_plane: ControlPlane, api: client.ApiClient, tmp_path: Path
) -> Iterator[World]:
    lab: Lab = site.lab
    node_name = f"kvt-{lab.token}"
    core = client.CoreV1Api(api)
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node_name, labels={GATEWAY_LABEL: lab.token})))
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
    kvpn.wait_ready("vpnservers", namespace, SERVER)
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
    agent = AgentProcess(argv, {**os.environ, "KUBECONFIG": str(kubeconfig)}, tmp_path / "agent.log")
    interface = interface_name(namespace, SERVER)
    lab.interfaces.append(interface)  # its UAPI socket goes with the lab, whatever state the agent left
    made = World(site, kvpn, namespace, agent, proxy, interface)
    try:
        agent.start()
        yield made
    finally:
        agent.stop(signal.SIGKILL)
        proxy.close()
        with contextlib.suppress(client.ApiException):
            core.delete_node(node_name)
        # The lab ends every process in the node namespace (the agent's wireguard-go among them).
    log_text = agent.log_path.read_text()
    assert "Traceback" not in log_text, agent.log_tail(80)


def _address(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("https://").rpartition(":")
    return host, int(port)


def connected(world: World) -> World:
    config = world.add_peer()
    world.laptop_up(config)
    assert world.reach() == NODE_SIDE, world.diagnose()
    return world


def test_laptop_reaches_the_service_and_the_status_shows_it(world: World) -> None:
    connected(world)
    status = wait_for_status(world, lambda s: s.get("lastHandshake") and (s.get("rxBytes") or 0) > 0)
    assert status["endpoint"].startswith("192.168.237.2:")
    assert status["address"] == "10.237.0.2"  # the operator's field, untouched

    _, metrics = world.agent.get("/metrics")
    assert 'kvpn_agent_backend_info{backend="userspace"} 1.0' in metrics
    labels = f'namespace="{world.namespace}",peer="laptop",server="{SERVER}"'
    assert re.search(rf"kvpn_peer_last_handshake_seconds\{{{labels}\}} 1\.\d+e\+09", metrics), metrics
    assert re.search(rf"kvpn_peer_rx_bytes_total\{{{labels}\}} [1-9]", metrics), metrics
    assert "kvpn_agent_sync_duration_seconds_count" in metrics
    assert world.agent.get("/healthz")[0] == 200

    # Keys are in the state file (0600, in a 0700 folder) and nowhere in the log.
    state = Path(world.agent.argv[world.agent.argv.index("--state-dir") + 1])
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "state.json").stat().st_mode & 0o777 == 0o600
    server_key = decode(world.kvpn.secret(world.namespace, f"kvpn-server-{SERVER}") or {}, "privateKey")
    peer_status = world.kvpn.get("vpnpeers", world.namespace, "laptop") or {}
    peer_secret = world.kvpn.secret(world.namespace, peer_status["status"]["configSecretName"])
    psk = decode(peer_secret or {}, "presharedKey")
    assert server_key
    assert psk
    log_text = world.agent.log_path.read_text()
    assert server_key not in log_text
    assert psk not in log_text


def wait_for_status(world: World, check: Any, timeout: float = 10) -> dict[str, Any]:
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


def dataplane_condition(world: World, peer: str) -> dict[str, Any] | None:
    conditions = ((world.kvpn.get("vpnpeers", world.namespace, peer) or {}).get("status") or {}).get("conditions")
    return next((c for c in conditions or [] if c["type"] == "Dataplane"), None)


def test_a_bad_binding_is_a_dataplane_condition_on_its_peer_and_the_rest_keeps_working(world: World) -> None:
    connected(world)
    world.kvpn.peer(world.namespace, "tablet", server=SERVER)
    tablet = world.kvpn.wait_ready("vpnpeers", world.namespace, "tablet")["status"]
    wait_for(lambda: tablet["publicKey"] in world.uapi().get().peers, 10, "the agent to add the tablet")
    assert dataplane_condition(world, "tablet") is None  # no problem, no condition
    assert dataplane_condition(world, "laptop") is None

    # A malformed key that slipped through into the binding (the operator would never write it).
    core = client.CoreV1Api(world.kvpn.core.api_client)
    binding = binding_secret_name(SERVER, tablet["address"])
    good_key = core.read_namespaced_secret(binding, world.namespace).data["publicKey"]
    core.patch_namespaced_secret(
        binding, world.namespace, {"data": {"publicKey": base64.b64encode(b"garbage").decode()}}
    )
    condition = wait_for_value(lambda: dataplane_condition(world, "tablet"), 10, "the Dataplane condition")
    assert condition["status"] == "False"
    assert condition["reason"] == "InvalidPublicKey"
    assert f"gateway node kvt-{world.site.lab.token}" in condition["message"], condition
    assert tablet["publicKey"] not in world.uapi().get().peers
    assert world.reach() == NODE_SIDE, world.diagnose()  # the other peer keeps working
    peer = world.kvpn.get("vpnpeers", world.namespace, "tablet") or {}
    ready = next(c for c in peer["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"  # the operator's, untouched
    assert peer["status"]["address"] == tablet["address"]
    assert dataplane_condition(world, "laptop") is None

    started = time.monotonic()
    core.patch_namespaced_secret(binding, world.namespace, {"data": {"publicKey": good_key}})
    wait_for(lambda: tablet["publicKey"] in world.uapi().get().peers, 5, "the tablet to come back")
    # At most one write per peer per 15 s: the removal may wait for that.
    wait_for(lambda: dataplane_condition(world, "tablet") is None, 20, "the Dataplane condition to go")
    print(f"binding fixed -> Dataplane condition removed: {time.monotonic() - started:.1f} s")
    peer = world.kvpn.get("vpnpeers", world.namespace, "tablet") or {}
    assert [c["type"] for c in peer["status"]["conditions"]] == ["Ready"]
    assert world.reach() == NODE_SIDE, world.diagnose()


def test_disabling_the_peer_cuts_it_off_within_two_seconds(world: World) -> None:
    connected(world)
    wait_for_status(world, lambda s: s.get("endpoint"))  # so that re-enabling restores it
    public_key = next(iter(world.uapi().get().peers))
    started = time.monotonic()
    world.patch_peer(disabled=True)
    wait_for(lambda: public_key not in world.uapi().get().peers, 2, "the peer to leave the interface")
    removed = time.monotonic() - started
    assert world.reach(max_time=2) is None
    print(f"VpnPeer disabled -> peer removed from wireguard-go: {removed * 1000:.0f} ms")

    world.patch_peer(disabled=False)
    wait_for(lambda: public_key in world.uapi().get().peers, 3, "the peer to come back")
    assert world.reach(max_time=2) == NODE_SIDE, world.diagnose()  # the gateway sent the handshake itself


def test_killing_and_restarting_the_agent_drops_nothing(world: World) -> None:
    connected(world)
    time.sleep(RESYNC + 0.5)  # a resync has read back the node since the laptop came up
    before = world.dataplane()
    failures: list[float] = []
    attempts = 0
    stop = threading.Event()

    def loop() -> None:
        nonlocal attempts
        while not stop.is_set():
            attempts += 1
            if world.reach(max_time=2) != NODE_SIDE:
                failures.append(time.monotonic())
            time.sleep(0.1)

    traffic = threading.Thread(target=loop)
    traffic.start()
    try:
        time.sleep(0.5)
        world.agent.stop(signal.SIGKILL)
        time.sleep(1)
        world.agent.start()
        time.sleep(RESYNC + 0.5)  # its first sync and one resync
    finally:
        stop.set()
        traffic.join(timeout=10)
    assert attempts > 5
    assert failures == [], world.diagnose()
    assert world.dataplane() == before
    syncs = [r for r in world.agent.records(start=1) if r.get("message") == "synced"]
    assert syncs, world.agent.log_tail()
    assert syncs[0]["actions"] == 0, syncs


def test_tunnels_survive_an_api_outage_and_the_agent_catches_up(world: World) -> None:
    connected(world)
    wait_for_status(world, lambda s: s.get("endpoint"))  # the agent has seen where the laptop is
    public_key = next(iter(world.uapi().get().peers))
    world.proxy.cut()
    # While the API server is away, the tunnel works and drift is still repaired from the last good state.
    run("ip", "netns", "exec", world.site.node, "wg", "set", world.interface, "peer", public_key, "remove")
    wait_for(lambda: public_key in world.uapi().get().peers, RESYNC + 3, "the resync to restore the peer")
    assert world.reach(max_time=2) == NODE_SIDE, world.diagnose()  # the gateway sent the handshake itself
    world.patch_peer(disabled=True)  # the agent cannot see this yet
    time.sleep(1)
    assert world.reach() == NODE_SIDE
    assert world.agent.get("/healthz")[0] == 200
    _, metrics = world.agent.get("/metrics")
    assert "kvpn_agent_api_reachable 0.0" in metrics

    world.proxy.restore()
    started = time.monotonic()
    wait_for(lambda: public_key not in world.uapi().get().peers, 15, "the agent to learn of the change")
    print(f"API back -> change applied: {time.monotonic() - started:.1f} s")
    assert world.reach(max_time=2) is None


def test_restart_without_api_serves_the_state_file_and_restores_endpoints(world: World) -> None:
    """A node that lost everything (agent, wireguard-go, interface) while the API server is away."""
    connected(world)
    wait_for_status(world, lambda s: s.get("endpoint"))  # the endpoint reached the state file as well
    world.agent.stop(signal.SIGKILL)
    world.proxy.cut()
    run("ip", "-n", world.site.node, "link", "del", world.interface)  # wireguard-go exits with its device
    wait_for(lambda: not world.uapi().exists(), 5, "wireguard-go to exit")
    run("ip", "netns", "exec", world.site.node, "nft", "delete", "table", "inet", "kvpn")

    started = time.time()
    world.agent.start()
    handshake = wait_for_value(
        lambda: next((p.last_handshake for p in world.uapi().get().peers.values() if p.last_handshake), None),
        10,
        "a handshake with the laptop",
    )
    assert handshake >= int(started)
    assert world.reach(max_time=2) == NODE_SIDE, world.diagnose()
    messages = [r.get("message") for r in world.agent.records(start=1)]
    assert "API server unreachable: serving the last good state" in messages
    created = next(r for r in world.agent.records(start=1) if r.get("message") == "CreateInterface")
    since_created = handshake - _ts(created)
    print(f"agent start -> first handshake: {handshake - started:.2f} s ({since_created:.3f} s after CreateInterface)")
    world.proxy.restore()


def _ts(record: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(record["time"]).timestamp()


def test_drift_is_repaired_by_the_resync(world: World) -> None:
    connected(world)
    wait_for_status(world, lambda s: s.get("endpoint"))
    node = world.site.node
    run("ip", "netns", "exec", node, "nft", "flush", "table", "inet", "kvpn")
    wait_for(lambda: world.reach(max_time=1) == NODE_SIDE, RESYNC + 5, "the table to come back")

    public_key = next(iter(world.uapi().get().peers))
    run("ip", "netns", "exec", node, "wg", "set", world.interface, "peer", public_key, "remove")
    wait_for(lambda: public_key in world.uapi().get().peers, RESYNC + 3, "the peer to come back")
    wait_for(lambda: world.reach(max_time=1) == NODE_SIDE, 10, "the laptop to reach the service again")

    pids = run("ip", "netns", "pids", node).stdout.split()
    serving = [p for p in pids if "wireguard-go" in Path(f"/proc/{p}/cmdline").read_text()]
    os.kill(int(serving[0]), signal.SIGKILL)
    wait_for(lambda: world.reach(max_time=1) == NODE_SIDE, RESYNC + 10, "the tunnel after wireguard-go was killed")


def test_shutdown_leaves_the_dataplane_and_cleanup_removes_it(world: World) -> None:
    connected(world)
    world.agent.stop(signal.SIGTERM)
    assert world.reach() == NODE_SIDE  # a rolling update must not drop tunnels
    state_dir = Path(world.agent.argv[world.agent.argv.index("--state-dir") + 1])
    result = run(
        sys.executable, "-m", "kvpn_agent.main", "cleanup", "--netns", world.site.node, "--state-dir", str(state_dir)
    )
    assert "kvpn-" not in run("ip", "-n", world.site.node, "link").stdout, result.stderr
    assert run("ip", "netns", "exec", world.site.node, "nft", "list", "tables").stdout.strip() == ""
    assert not world.uapi().exists()
    assert not (state_dir / "state.json").exists()
    assert world.reach(max_time=2) is None
