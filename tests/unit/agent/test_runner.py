"""The agent's loop against a simulated node: per-change apply, last good state, problems, the state file."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from harness.agent_process import SupervisorProcess, fake_wireguard_go
from harness.factories import binding_secret
from kvpn_agent.dataplane import Dataplane, KernelFirstLink, KernelFirstWireGuard
from kvpn_agent.desired import DesiredServer, build_desired, interface_name, legacy_interface_name
from kvpn_agent.gateway_lease import GatewayLeases, lease_path
from kvpn_agent.metrics import Metrics
from kvpn_agent.observed import ObservedDevice, ObservedLink, ObservedPeer
from kvpn_agent.processes import WireGuardGoProcesses
from kvpn_agent.ruleset import ObservedRuleset, PeerUpdate, Ruleset
from kvpn_agent.runner import Agent, Settings
from kvpn_agent.served import secret_index
from kvpn_agent.state import ServerInputs, StateFile
from kvpn_agent.supervisor_api import SupervisorClient
from kvpn_agent.sync import assumed_ruleset, sync
from kvpn_agent.uapi import UapiError
from kvpn_agent.watch import Obj, Store, key_of
from kvpn_agent.wire import DeviceConfig, PeerConfig, sort_networks
from kvpn_core.conditions import Reason
from kvpn_core.contract import (
    ANNOTATION_GATEWAY,
    GATEWAY_HANDOVER_SECONDS,
    GATEWAY_REPLACEMENT_SECONDS,
    LABEL_ROLE,
    LABEL_SERVER,
    ROLE_PEER,
    ROLE_SERVER_KEY,
    GatewayReport,
    PeerBinding,
    encode_data,
    gateway_lease_name,
)
from kvpn_core.keys import public_key_of
from kvpn_core.kube import core_path
from tests.unit.fakes import FakeKube

NS, NAME = "team", "office"
IFACE = interface_name(NS, NAME)
SERVER_KEY = base64.b64encode(hashlib.sha256(b"server").digest()).decode()


def key(i: int) -> str:
    return base64.b64encode(hashlib.sha256(f"peer{i}".encode()).digest()).decode()


class FakeNode:
    """Links, WireGuard devices and the table of one node, kept in memory; counts read-backs.

    ``refuse`` makes configuring a device fail as wireguard-go does when its port is taken.
    """

    def __init__(self) -> None:
        self.refuse: UapiError | None = None
        self.links: dict[str, ObservedLink] = {}
        self.devices: dict[str, ObservedDevice] = {}
        self.table: ObservedRuleset | None = None
        self.reads = 0
        self.sets: list[tuple[str, tuple[PeerConfig, ...]]] = []
        self.calls: list[str] = []

    # LinkBackend
    def observe(self, interface: str) -> ObservedLink | None:
        return self.links.get(interface)

    def create(self, interface: str) -> None:
        self.calls.append(f"create {interface}")
        self.links[interface] = ObservedLink(mtu=1500, up=False)
        self.devices[interface] = ObservedDevice()

    def delete(self, interface: str) -> None:
        self.calls.append(f"delete {interface}")
        self.links.pop(interface, None)
        self.devices.pop(interface, None)

    def set_mtu(self, interface: str, mtu: int) -> None:
        self.links[interface] = replace(self.links[interface], mtu=mtu)

    def add_address(self, interface: str, address: str) -> None:
        link = self.links[interface]
        self.links[interface] = replace(link, addresses=(*link.addresses, address))

    def remove_address(self, interface: str, address: str) -> None:
        link = self.links[interface]
        self.links[interface] = replace(link, addresses=tuple(a for a in link.addresses if a != address))

    def set_up(self, interface: str) -> None:
        self.links[interface] = replace(self.links[interface], up=True)

    # WireGuardBackend
    def get(self, interface: str) -> ObservedDevice | None:
        self.reads += 1
        return self.devices.get(interface)

    def set(self, interface: str, device: DeviceConfig | None, peers: Sequence[PeerConfig]) -> None:
        if self.refuse is not None and device is not None and device.listen_port:
            raise self.refuse
        self.sets.append((interface, tuple(peers)))
        current = self.devices[interface]
        if device is not None:
            current = replace(
                current,
                private_key=device.private_key or current.private_key,
                listen_port=device.listen_port or current.listen_port,
            )
        have = dict(current.peers)
        for p in peers:
            if p.remove:
                have.pop(p.public_key, None)
                continue
            before = have.get(p.public_key, ObservedPeer(public_key=p.public_key))
            have[p.public_key] = replace(
                before,
                preshared_key=before.preshared_key if p.preshared_key is None else (p.preshared_key or None),
                allowed_ips=sort_networks(p.allowed_ips) if p.replace_allowed_ips else before.allowed_ips,
                persistent_keepalive=before.persistent_keepalive
                if p.persistent_keepalive is None
                else p.persistent_keepalive,
                endpoint=p.endpoint or before.endpoint,
            )
        self.devices[interface] = replace(current, peers=have)

    # Firewall
    def list_table(self) -> ObservedRuleset | None:
        self.reads += 1
        return self.table

    def replace(self, ruleset: Ruleset) -> None:
        self.table = assumed_ruleset(ruleset)

    def update(self, ruleset: Ruleset, update: PeerUpdate) -> None:
        self.table = assumed_ruleset(ruleset)

    def interfaces(self, prefix: str = "") -> list[str]:
        return sorted(i for i in self.links if i.startswith(prefix))

    def peers(self) -> set[str]:
        device = self.devices.get(IFACE)
        return set(device.peers) if device else set()


@dataclass
class FilledWatch:
    """A watch whose store the test fills; ``synced`` like an Informer's after its first list."""

    store: Store
    synced: threading.Event = field(default_factory=threading.Event)
    connected: bool = True

    def start(self) -> None:
        pass


def server_obj(version: str = "1", **spec: Any) -> Obj:
    return {
        "metadata": {"namespace": NS, "name": NAME, "resourceVersion": version},
        "spec": {"addressPool": ["10.8.0.0/24"], "routes": ["10.96.0.0/12"], **spec},
    }


def key_secret(version: str = "1", private_key: str = SERVER_KEY) -> Obj:
    return {
        "metadata": {
            "namespace": NS,
            "name": f"kvpn-server-{NAME}",
            "resourceVersion": version,
            "labels": {LABEL_SERVER: NAME, LABEL_ROLE: ROLE_SERVER_KEY},
        },
        "data": encode_data({"privateKey": private_key}),
    }


def binding(i: int, version: str = "1", **fields: Any) -> Obj:
    pb = PeerBinding.model_validate(
        {
            "peerNamespace": NS,
            "peerName": f"p{i}",
            "peerUID": f"u{i}",
            "publicKey": key(i),
            "addresses": [f"10.8.0.{i + 2}"],
            **fields,
        }
    )
    return binding_secret(NAME, pb, f"2024-01-01T00:00:{i:02d}Z", namespace=NS, resource_version=version)


@dataclass
class Running:
    agent: Agent
    node: FakeNode
    servers: Store
    secrets: Store
    state: StateFile

    def change(self, *objs: Obj, remove: Sequence[tuple[str, str]] = ()) -> None:
        for obj in objs:
            (self.servers if "spec" in obj else self.secrets).put(obj)
        for k in remove:
            self.servers.remove(k)
        self.agent.notify((NS, NAME))


def wait(condition: Any, what: str, timeout: float = 5) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def start(
    tmp_path: Path,
    *,
    synced: bool = True,
    objs: Sequence[Obj] = (),
    node: FakeNode | None = None,
    wggo: WireGuardGoProcesses | None = None,
    ready_file: Path | None = None,
    dataplane: Dataplane | None = None,
    leases: GatewayLeases | None = None,
    pod: tuple[str, str] = ("", ""),
) -> Iterator[Running]:
    """``pod``: the agent's own (namespace, name), as the downward API gives them."""
    node = node or FakeNode()
    dataplane = dataplane or Dataplane("userspace", node, node, node, node, node, lambda families: [], wggo)  # type: ignore[arg-type]
    settings = Settings(
        pod_namespace=pod[0],
        pod_name=pod[1],
        resync_seconds=3600,
        report_seconds=3600,
        start_timeout=0.2,
        ready_file=ready_file,
    )
    state = StateFile(tmp_path / "state")
    agent = Agent(settings, dataplane, state, api=None, metrics=Metrics())
    agent.leases = leases
    servers, secrets = FilledWatch(Store()), FilledWatch(Store(secret_index))
    if synced:
        servers.synced.set()
        secrets.synced.set()
    agent.server_watches[""] = servers  # type: ignore[assignment]
    agent.secret_watches[""] = secrets  # type: ignore[assignment]
    running = Running(agent, node, servers.store, secrets.store, state)
    for obj in objs:
        (servers.store if "spec" in obj else secrets.store).put(obj)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    try:
        yield running
    finally:
        stop.set()
        thread.join(timeout=5)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    with start(tmp_path, objs=[server_obj(), key_secret(), binding(0), binding(1)]) as made:
        yield made


def problems(agent: Agent, reason: str) -> float:
    samples = [
        s for metric in agent.metrics.problems.collect() for s in metric.samples if s.labels.get("reason") == reason
    ]
    return sum(s.value for s in samples)


def test_a_binding_change_is_applied_against_the_cached_state_without_reading_back(running: Running) -> None:
    wait(running.agent.synced.is_set, "the first sync")
    assert running.node.peers() == {key(0), key(1)}
    reads = running.node.reads
    running.change(binding(2))
    wait(lambda: key(2) in running.node.peers(), "the new peer")
    running.change(binding(0, version="2", enabled="false"))
    wait(lambda: key(0) not in running.node.peers(), "the disabled peer to go")
    assert running.node.reads == reads
    assert running.node.sets[-1] == (IFACE, (PeerConfig(public_key=key(0), remove=True),))


def test_an_unusable_server_key_keeps_the_last_good_state_and_is_logged_once(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    wait(running.agent.synced.is_set, "the first sync")
    caplog.set_level(logging.INFO, logger="kvpn_agent")
    running.change(key_secret(version="2", private_key="bm90IGEga2V5"))
    running.change(key_secret(version="3", private_key="bm90IGEga2V5"), binding(2))
    wait(lambda: problems(running.agent, "InvalidServerKey") == 1, "the problem metric")
    errors = [r for r in caplog.records if r.getMessage() == "server's desired state is unusable"]
    assert len(errors) == 1
    assert errors[0].reason == "InvalidServerKey"  # type: ignore[attr-defined]
    assert running.node.peers() == {key(0), key(1)}  # as it was: the new binding waits for a usable key
    assert SERVER_KEY not in caplog.text

    running.change(key_secret(version="4"))
    wait(lambda: key(2) in running.node.peers(), "the new peer once the key is fixed")
    assert problems(running.agent, "InvalidServerKey") == 0


def test_a_bad_binding_is_left_out_and_reported_and_the_others_work(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    wait(running.agent.synced.is_set, "the first sync")
    caplog.set_level(logging.INFO, logger="kvpn_agent")
    running.change(binding(5, addresses=["10.9.9.9"]))
    running.change(binding(5, version="2", addresses=["10.9.9.9"]))
    wait(lambda: problems(running.agent, "AddressOutsidePool") == 1, "the problem metric")
    left_out = [r for r in caplog.records if r.getMessage() == "peer left out of the dataplane"]
    assert len(left_out) == 1
    assert left_out[0].peer == "p5"  # type: ignore[attr-defined]
    assert running.node.peers() == {key(0), key(1)}


def test_a_deleted_server_takes_its_interface_with_it(running: Running) -> None:
    wait(running.agent.synced.is_set, "the first sync")
    running.change(remove=[(NS, NAME)])
    wait(lambda: IFACE not in running.node.links, "the interface to go")


def test_an_upgraded_gateway_replaces_its_old_kvpn_interface_and_spares_a_laptop_tunnel(tmp_path: Path) -> None:
    node = FakeNode()
    old = legacy_interface_name(NS, NAME)
    for interface in (old, "kvpn-office", "kvgw-leftover0"):  # the old name, `kubectl vpn up`, a gone server
        node.links[interface] = ObservedLink(mtu=1420, up=True)
    with start(tmp_path, objs=[server_obj(), key_secret(), binding(0)], node=node) as run:
        wait(run.agent.synced.is_set, "the first sync")
        assert IFACE in node.links
        assert old not in node.links
        assert "kvgw-leftover0" not in node.links
        assert "kvpn-office" in node.links


def test_a_server_for_other_nodes_is_not_served(tmp_path: Path) -> None:
    objs = [server_obj(nodeSelector={"gateway": "yes"}), key_secret(), binding(0)]
    with start(tmp_path, objs=objs) as running:
        wait(running.agent.synced.is_set, "the first sync")
        assert running.node.links == {}


def test_the_state_file_holds_the_last_good_state_and_endpoints(running: Running) -> None:
    wait(running.agent.synced.is_set, "the first sync")
    running.node.devices[IFACE] = replace(
        running.node.devices[IFACE],
        peers={
            k: replace(p, endpoint="192.0.2.7:4000", last_handshake=1.7e9, rx_bytes=10)
            for k, p in running.node.devices[IFACE].peers.items()
        },
    )
    stats = running.agent.report_once()
    assert {(s.peer, s.endpoint) for s in stats} == {("p0", "192.0.2.7:4000"), ("p1", "192.0.2.7:4000")}
    saved = running.state.load()
    assert saved is not None
    assert saved.endpoints == {key(0): "192.0.2.7:4000", key(1): "192.0.2.7:4000"}
    assert [s.key for s in saved.servers] == [(NS, NAME)]
    assert running.state.path.stat().st_mode & 0o777 == 0o600
    assert running.state.directory.stat().st_mode & 0o777 == 0o700


def test_without_the_api_the_state_file_is_served_and_endpoints_restored(tmp_path: Path) -> None:
    inputs = ServerInputs(server_obj(), key_secret(), (binding(0),))
    StateFile(tmp_path / "state").save([inputs], {key(0): "192.0.2.7:4000"})
    with start(tmp_path, synced=False) as running:
        wait(running.agent.synced.is_set, "the first sync from the file")
        (added,) = running.node.sets[-1][1]
        assert added.endpoint == "192.0.2.7:4000"
        assert added.persistent_keepalive == 25  # so wireguard-go starts the handshake itself

        # The API server answers: its objects take over, identical ones change nothing.
        running.secrets.put(key_secret())
        running.secrets.put(binding(0))
        running.servers.put(server_obj())
        sets = len(running.node.sets)
        for watch in (*running.agent.server_watches.values(), *running.agent.secret_watches.values()):
            watch.synced.set()
        running.change(binding(1))
        wait(lambda: key(1) in running.node.peers(), "a change from the API")
        assert len(running.node.sets) == sets + 1


def test_without_the_api_and_without_a_state_file_the_node_is_left_alone(tmp_path: Path) -> None:
    with start(tmp_path, synced=False) as running:
        threading.Event().wait(0.6)
        assert not running.agent.synced.is_set()
        assert running.node.calls == []
        assert running.node.reads == 0


def test_sync_with_a_known_state_reads_nothing_back_and_a_failing_server_spares_the_others() -> None:
    node = FakeNode()

    first = sync([desired_server("a", 2)], node, node, node)
    assert first.state is not None
    node.reads = 0
    again = sync([desired_server("a", 3)], node, node, node, known=first.state)
    assert node.reads == 0
    assert [type(a).__name__ for a in again.actions] == ["AddPeer", "UpdateFirewall"]

    class Failing(FakeNode):
        def create(self, interface: str) -> None:
            if interface == interface_name(NS, "b"):
                raise OSError("no TUN")
            super().create(interface)

    failing = Failing()
    result = sync([desired_server("a", 1), desired_server("b", 1)], failing, failing, failing)
    assert list(result.errors) == [interface_name(NS, "b")]
    assert interface_name(NS, "a") in failing.links
    assert result.state is not None
    assert list(result.state.servers) == [interface_name(NS, "a")]


def test_binding_events_are_patched_in_and_give_the_desired_state_of_a_rebuild(running: Running) -> None:
    wait(running.agent.synced.is_set, "the first sync")
    agent, k = running.agent, (NS, NAME)
    builder = agent.served._builders[k]

    def event(obj: Obj, *, deleted: bool = False) -> None:
        if deleted:
            running.secrets.remove(key_of(obj))
        else:
            running.secrets.put(obj)
        agent._secret_changed(obj)

    event(binding(2))
    wait(lambda: key(2) in running.node.peers(), "the new peer")
    event(binding(0, version="2", enabled="false"))
    wait(lambda: key(0) not in running.node.peers(), "the disabled peer to go")
    event(binding(3, publicKey=key(2)))  # binding(2)'s key: the older binding keeps it, so a rebuild
    event(binding(2), deleted=True)

    def moved() -> bool:
        return [p.addresses for p in agent.served._good[k][1].peers if p.public_key == key(2)] == [["10.8.0.5"]]

    wait(moved, "the key to move to the newer binding")
    assert agent.served._builders[k] is builder  # patched, never rebuilt from scratch
    inputs, desired = agent.served._good[k]
    bindings = [s for s in running.secrets.indexed(k) if s["metadata"]["labels"][LABEL_ROLE] == ROLE_PEER]
    assert desired == build_desired(server_obj(), key_secret(), bindings)
    assert {key_of(b) for b in inputs.bindings} == {key_of(b) for b in bindings}
    assert running.node.peers() == {key(1), key(2)}


# --- readiness -------------------------------------------------------------------------------------

EADDRINUSE = UapiError(f"UAPI set=1 on {IFACE} failed with errno 98 (Address already in use)", errno.EADDRINUSE)


def test_readiness_follows_the_latest_pass_and_names_what_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = FakeNode()
    node.refuse = EADDRINUSE  # another process holds the port when the agent starts
    caplog.set_level(logging.INFO, logger="kvpn_agent")
    with start(tmp_path, node=node, objs=[server_obj(), key_secret(), binding(0)]) as running:
        agent = running.agent
        wait(agent.synced.is_set, "the first pass")
        ok, reason = agent.readiness()
        assert not ok
        assert reason == (
            f"{NS}/{NAME} ({IFACE}): UDP port 51820 is taken by another process on the node "
            f"(UAPI set=1 on {IFACE} failed with errno 98 (Address already in use))"
        )
        wait(lambda: len([r for r in caplog.records if r.getMessage() == "server sync failed"]) == 1, "the log")
        threading.Event().wait(2.5)  # retried (after 1 s, then 2 s): logged once, not per attempt
        assert len([r for r in caplog.records if r.getMessage() == "server sync failed"]) == 1

        node.refuse = None  # the port is free again
        wait(lambda: agent.readiness() == (True, "ok"), "readiness once the port is free", timeout=6)
        assert key(0) in node.peers()
        assert any(r.getMessage() == "server sync works again" for r in caplog.records)


def test_the_verdict_for_the_gateway_pods_outlives_the_agent_and_follows_its_passes(tmp_path: Path) -> None:
    """The wireguard-go pods' readiness (the Services' endpoints) is a file the agent leaves: a new agent
    keeps the previous one's verdict until its own first pass, a failed pass removes it, a good one
    puts it back, and stopping the agent leaves it as it is."""
    verdict = tmp_path / "dataplane-ready"
    verdict.write_text("ok\n")  # left by the agent before this one
    node = FakeNode()
    node.refuse = EADDRINUSE
    with start(tmp_path, synced=False, node=node, objs=[server_obj(), key_secret()], ready_file=verdict) as running:
        threading.Event().wait(0.5)  # no desired state yet, no pass: the previous verdict stands
        assert verdict.exists()
        running.agent.server_watches[""].synced.set()
        running.agent.secret_watches[""].synced.set()
        wait(lambda: not verdict.exists(), "the failed pass to withdraw the verdict")
        node.refuse = None
        wait(verdict.exists, "a good pass to restore it", timeout=6)
    assert verdict.read_text() == "ok\n"  # and a stopped agent leaves it in place


def test_not_ready_without_desired_state(tmp_path: Path) -> None:
    with start(tmp_path, synced=False) as running:
        assert running.agent.readiness() == (False, "no desired state yet (API server, state file)")


def test_an_unreachable_supervisor_is_not_ready_and_its_return_resyncs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop asks the supervisor (a real one, running a stand-in wireguard-go) every half second."""
    uapi = tmp_path / "uapi"
    uapi.mkdir()
    args, env = fake_wireguard_go(tmp_path, uapi)
    supervisor = SupervisorProcess(tmp_path / "run" / "wg.sock", tmp_path / "supervisor.log", extra=args, env=env)
    client = SupervisorClient(supervisor.socket_path, uapi, timeout=5)
    caplog.set_level(logging.INFO, logger="kvpn_agent")
    try:
        with start(tmp_path, wggo=client, objs=[server_obj(), key_secret(), binding(0)]) as running:
            agent = running.agent
            wait(agent.synced.is_set, "the first pass")
            ok, reason = agent.readiness()
            assert not ok
            assert reason.startswith(f"wireguard-go supervisor unreachable: wireguard-go supervisor at {client.path}")
            threading.Event().wait(1.2)
            down = [r for r in caplog.records if r.getMessage().startswith("wireguard-go supervisor unreachable")]
            assert len(down) == 1  # once per outage, not per look

            supervisor.start()
            started = time.monotonic()
            wait(lambda: agent.readiness()[0], "readiness once the supervisor answers")
            assert time.monotonic() - started < 1.5
            assert any(r.getMessage() == "wireguard-go supervisor answers again: resyncing now" for r in caplog.records)
            # The full pass adopts the served device (here: starts it, nothing serves the stand-in's socket).
            wait(client.devices, "the served device to be adopted")
            (pid,) = client.devices().values()

            reads = running.node.reads
            os.kill(pid, signal.SIGKILL)
            wait(lambda: running.node.reads > reads, "a resync after the device died", timeout=2)
            assert any(r.getMessage() == "wireguard-go exited; resyncing now" for r in caplog.records)

            supervisor.stop(signal.SIGKILL)
            wait(lambda: not agent.readiness()[0], "not ready once the supervisor is gone", timeout=1.5)
    finally:
        supervisor.stop(signal.SIGKILL)


def desired_server(name: str, peers: int) -> DesiredServer:
    pbs = tuple(
        PeerBinding(
            peer_namespace=NS, peer_name=f"p{i}", peer_uid=f"u{i}", public_key=key(i), addresses=[f"10.8.0.{i + 2}"]
        )
        for i in range(peers)
    )
    return DesiredServer(
        namespace=NS,
        name=name,
        interface=interface_name(NS, name),
        private_key=SERVER_KEY,  # type: ignore[arg-type]
        public_key=public_key_of(SERVER_KEY),
        listen_port=51820,
        mtu=1420,
        addresses=("10.8.0.1/24",),
        routes=("10.96.0.0/12",),
        masquerade=True,
        peers=pbs,
    )


def test_a_device_that_cannot_be_read_fails_its_server_only() -> None:
    """Before: the read-back ran outside the per-server guard, so one unreadable device (the kernel
    backend's NetlinkError) failed the whole pass, every other server with it."""

    class Unreadable(FakeNode):
        def get(self, interface: str) -> ObservedDevice | None:
            if interface == interface_name(NS, "b"):
                raise NetlinkError(errno.EPERM, "Operation not permitted")
            return super().get(interface)

    node = Unreadable()
    result = sync([desired_server("a", 1), desired_server("b", 1)], node, node, node)
    assert list(result.errors) == [interface_name(NS, "b")]
    assert "Operation not permitted" in result.errors[interface_name(NS, "b")]
    assert interface_name(NS, "a") in node.links
    assert node.table is not None  # the firewall pass ran too


class RefusedKernelLink:
    """The kernel's side of KernelFirstLink on a node whose kernel refuses WireGuard links."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node

    def create(self, interface: str) -> None:
        raise NetlinkError(errno.EOPNOTSUPP, "Operation not supported")

    def delete(self, interface: str) -> None:
        self.node.delete(interface)


class NoKernelWireGuard:
    def get(self, interface: str) -> ObservedDevice | None:
        return None  # no module, no device

    def set(self, interface: str, device: DeviceConfig | None, peers: Sequence[PeerConfig]) -> None:
        raise AssertionError(f"{interface} was configured through the kernel after the kernel refused it")


class Processes:
    """wireguard-go processes that always answer (the userspace link here is the FakeNode)."""

    def __init__(self) -> None:
        self.live: dict[str, int] = {}

    def socket(self, interface: str) -> Path:
        return Path(f"/nonexistent/{interface}.sock")

    def start(self, interface: str) -> int:
        return self.live.setdefault(interface, 1000 + len(self.live))

    def stop(self, interface: str) -> int | None:
        return self.live.pop(interface, None)

    def devices(self) -> dict[str, int]:
        return dict(self.live)


def fallback_dataplane(node: FakeNode) -> tuple[Dataplane, KernelFirstLink]:
    link = KernelFirstLink(node, RefusedKernelLink(node), node)  # type: ignore[arg-type]
    wireguard = KernelFirstWireGuard(link, NoKernelWireGuard(), node)
    reader = KernelFirstWireGuard(link, NoKernelWireGuard(), node)
    wggo = Processes()
    return Dataplane("kernel", link, wireguard, reader, node, node, lambda families: [], wggo, link), link  # type: ignore[arg-type]


def test_auto_serves_a_server_the_kernel_refuses_with_wireguard_go() -> None:
    node = FakeNode()
    dataplane, link = fallback_dataplane(node)
    assert not dataplane.uses_wireguard_go()  # kernel only so far: no wireguard-go to watch
    result = sync([desired_server("a", 2)], dataplane.link, dataplane.wireguard, node)
    assert result.errors == {}
    iface = interface_name(NS, "a")
    assert link.failed[iface] == "link creation refused: (95, 'Operation not supported')"
    assert node.calls == [f"create {iface}"]  # the userspace link made it
    assert len(node.devices[iface].peers) == 2
    assert dataplane.userspace(iface)
    assert dataplane.uses_wireguard_go()
    assert sync([desired_server("a", 2)], dataplane.link, dataplane.wireguard, node).actions == []
    dataplane.link.delete(iface)
    assert link.failed == {}  # a server served again later tries the kernel first


class Conditions:
    def __init__(self) -> None:
        self.reports: list[dict[Any, Any]] = []

    def report(self, wanted: dict[Any, Any], servers: Any) -> int:
        self.reports.append(dict(wanted))
        return 0


def test_a_kernel_fallback_is_a_dataplane_condition_naming_it(tmp_path: Path) -> None:
    node = FakeNode()
    dataplane, link = fallback_dataplane(node)
    with start(tmp_path, node=node, dataplane=dataplane, objs=[server_obj(), key_secret(), binding(0)]) as running:
        agent = running.agent
        wait(agent.synced.is_set, "the first pass")
        assert link.failed
        assert agent.readiness() == (True, "ok")  # served, on the fallback
        assert dataplane.wggo is not None
        wait(lambda: interface_name(NS, NAME) in dataplane.wggo.devices(), "its wireguard-go to be watched")  # type: ignore[union-attr]
        conditions = Conditions()
        agent.conditions = conditions  # type: ignore[assignment]
        agent._from_api = True
        agent.report_once()
    ((target, (reason, message)),) = conditions.reports[-1].items()
    assert target[1:] == (NS, NAME)
    assert reason == Reason.KERNEL_WIREGUARD_FAILED
    assert "served by the userspace backend (wireguard-go) instead" in message


# --- gateway leases --------------------------------------------------------------------------------

GATEWAY = "gw-1"
LEASE = lease_path(NS, gateway_lease_name(NAME, GATEWAY))


def served_server(version: str = "1", **spec: Any) -> Obj:
    """The VpnServer as the API server returns it: with the uid its gateway leases are owned by."""
    obj = server_obj(version, **spec)
    obj["metadata"]["uid"] = "uid-office"
    return obj


def lease_report(kube: FakeKube) -> GatewayReport | None:
    lease = kube.read(LEASE)
    return (
        None
        if lease is None
        else GatewayReport.model_validate_json(lease["metadata"]["annotations"][ANNOTATION_GATEWAY])
    )


def test_a_programmed_server_gets_a_ready_lease_and_a_failing_one_a_lease_that_says_why(tmp_path: Path) -> None:
    kube, node = FakeKube(), FakeNode()
    leases = GatewayLeases(kube, GATEWAY)  # type: ignore[arg-type]
    with start(tmp_path, node=node, objs=[served_server(), key_secret(), binding(0)], leases=leases) as running:
        wait(lambda: lease_report(kube) is not None, "the lease", timeout=1)  # the first pass, not the 2 s tick
        # The test's dataplane has no wireguard-go processes, so its interfaces count as the kernel's.
        assert lease_report(kube) == GatewayReport(ready=True, message="", backend="kernel")

        node.refuse = EADDRINUSE  # the new port is taken
        running.change(served_server(version="2", listenPort=51821))
        wait(lambda: not lease_report(kube).ready, "the failure in the lease", timeout=1)  # type: ignore[union-attr]
        report = lease_report(kube)
        assert report is not None
        assert report.message.startswith("UDP port 51821 is taken by another process on the node")
    # Stopped: the kernel's interface stays, and the lease says so for a minute.
    lease = kube.read(LEASE)
    assert lease is not None
    assert lease["spec"]["leaseDurationSeconds"] == GATEWAY_HANDOVER_SECONDS
    assert lease_report(kube) == GatewayReport(
        ready=False, message="agent stopping; the dataplane stays", backend="kernel"
    )


def test_an_agent_whose_pod_is_being_deleted_hands_its_leases_over_until_its_replacement_can_come(
    tmp_path: Path,
) -> None:
    kube = FakeKube()
    pod = {"metadata": {"namespace": "kvpn-system", "name": "kvpn-agent-x1"}}
    kube.put(core_path("pods", "kvpn-system", "kvpn-agent-x1"), pod)
    leases = GatewayLeases(kube, GATEWAY)  # type: ignore[arg-type]
    objs = [served_server(), key_secret(), binding(0)]
    with start(tmp_path, objs=objs, leases=leases, pod=("kvpn-system", "kvpn-agent-x1")):
        wait(lambda: lease_report(kube) is not None, "the lease", timeout=1)
        # What `kubectl delete pod`, an eviction or a rolling update does before the kubelet's SIGTERM.
        kube.merge_patch(core_path("pods", "kvpn-system", "kvpn-agent-x1"), {"metadata": {"deletionTimestamp": "x"}})
    lease = kube.read(LEASE)
    assert lease is not None
    assert lease["spec"]["leaseDurationSeconds"] == GATEWAY_REPLACEMENT_SECONDS
    handed_over = GatewayReport(ready=True, message="agent stopping; the dataplane stays", backend="kernel")
    assert lease_report(kube) == handed_over


def test_a_server_this_agent_cannot_program_gets_a_not_ready_lease_saying_why(tmp_path: Path) -> None:
    """Never programmed, never claimed ready: but the operator learns that this node fails, and why, so the
    server's status names the node."""
    kube, node = FakeKube(), FakeNode()
    node.refuse = EADDRINUSE
    leases = GatewayLeases(kube, GATEWAY)  # type: ignore[arg-type]
    with start(tmp_path, node=node, objs=[served_server(), key_secret(), binding(0)], leases=leases) as running:
        wait(lambda: lease_report(kube) is not None, "the lease", timeout=1)
        assert not running.agent.readiness()[0]
        report = lease_report(kube)
        assert report is not None
        assert not report.ready
        assert "UDP port 51820 is taken" in report.message


def test_a_server_left_running_by_the_previous_agent_is_claimed_after_the_first_pass(tmp_path: Path) -> None:
    kube, node = FakeKube(), FakeNode()
    node.links[IFACE] = ObservedLink(mtu=1420, up=True)  # the previous agent's, still serving
    node.devices[IFACE] = ObservedDevice()
    node.refuse = EADDRINUSE  # and this pass cannot program it
    leases = GatewayLeases(kube, GATEWAY)  # type: ignore[arg-type]
    with start(tmp_path, node=node, objs=[served_server(), key_secret(), binding(0)], leases=leases):
        wait(lambda: lease_report(kube) is not None, "the lease", timeout=1)
        report = lease_report(kube)
        assert report is not None
        assert not report.ready
        assert "UDP port 51820 is taken" in report.message


# --- a gateway cut off ends its sessions with the laptops it no longer hears ------------------------


class ListeningTakeover:
    """The takeover's device reads and session ends, on a device whose peers' received bytes the test sets."""

    def __init__(self) -> None:
        self.rx: dict[str, int] = {}
        self.reads = 0
        self.ended: list[str] = []

    def read(self, interface: str) -> ObservedDevice:
        self.reads += 1
        return ObservedDevice(peers={k: ObservedPeer(k, last_handshake=1.0, rx_bytes=rx) for k, rx in self.rx.items()})

    def drop_sessions(self, interface: str, peers: Sequence[ObservedPeer]) -> int:
        self.ended += [p.public_key for p in peers]
        return len(peers)


def test_a_gateway_cut_off_ends_the_sessions_it_stopped_hearing_before_its_network_is_back(tmp_path: Path) -> None:
    """The network is cut just before a renewal is due, and the renewal hangs for the client's 10 s: the
    laptop lost with the cut must still have its session ended as the leases run out, while the node is
    cut off (the others have taken it over by then), not once the network is back. A laptop still talking
    to this node keeps its session. Rounds every SILENCE_POLL_SECONDS, on the clock the test gives."""
    kube = FakeKube()
    leases = GatewayLeases(kube, GATEWAY)  # type: ignore[arg-type]
    with start(tmp_path, objs=[served_server(), key_secret(), binding(0), binding(1)], leases=leases) as running:
        wait(lambda: running.agent._renewed_at is not None, "a renewal", timeout=1)
        kube.down = True  # no renewal from here on
        time.sleep(0.1)
        agent, takeover = running.agent, ListeningTakeover()
        agent.takeover = takeover  # type: ignore[assignment]
        last = agent._renewed_at
        assert last is not None
        lost, talking = key(0), key(1)
        cut = last + 1.9
        ended_at: dict[str, float] = {}
        reads_before_late = 0
        for step in range(1, 30):
            now = last + 0.5 * step
            takeover.rx = {lost: int(200 * (min(now, cut) - last)), talking: 96 * step}  # bytes until the cut
            before = len(takeover.ended)
            agent.end_quiet_sessions(now=now)
            if now - last <= 3:
                reads_before_late = takeover.reads
            for k in takeover.ended[before:]:
                ended_at[k] = now
    assert reads_before_late == 0  # a renewal on time costs no read of the devices
    assert list(ended_at) == [lost]  # once, and only the laptop that went quiet
    assert 10 < ended_at[lost] - last <= 10.5  # at the first round after the leases ran out
