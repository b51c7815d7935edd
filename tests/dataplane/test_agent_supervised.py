"""The agent with `kvpn-agent wireguard-go` as its own process, as the chart runs them in two DaemonSets.

Real wireguard-go started by the supervisor in the node's namespace, the agent against the real API
server and operator, a stock wg-quick laptop: the agent's restart loses nothing, the supervisor's
loss is seen (not Ready) and healed, and a listen port taken on the node is reported.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
from kubernetes import client

from harness.commands import run
from harness.controlplane import ControlPlane
from harness.kvpn import Kvpn
from harness.netlab import wait_for
from harness.traffic import TcpProbe, curl, echo_server
from kvpn_core.conditions import condition_of
from tests.dataplane.agent_world import (
    RESYNC,
    SERVER,
    URL,
    AgentLab,
    agent_world,
    connected,
    dataplane_condition,
    wait_for_status,
    wait_for_value,
)
from tests.dataplane.conftest import LISTEN_PORT, NODE_SIDE, SERVICE, Site

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("operator")]

ECHO_PORT = 9090


@pytest.fixture
def kvpn(api: client.ApiClient) -> Kvpn:
    return Kvpn(api)


@pytest.fixture
def world(
    site: Site, kvpn: Kvpn, namespace: str, control_plane: ControlPlane, api: client.ApiClient, tmp_path: Path
) -> Iterator[AgentLab]:
    with agent_world(site, kvpn, namespace, control_plane, api, tmp_path, supervised=True) as made:
        yield made


@pytest.fixture
def unstarted(
    site: Site, kvpn: Kvpn, namespace: str, control_plane: ControlPlane, api: client.ApiClient, tmp_path: Path
) -> Iterator[AgentLab]:
    """The supervisor running, the agent not yet started."""
    with agent_world(site, kvpn, namespace, control_plane, api, tmp_path, supervised=True, start=False) as made:
        yield made


class Requests:
    """A loop of requests from the laptop to the service through the tunnel, each remembered."""

    def __init__(self, world: AgentLab, max_time: float = 1.0) -> None:
        self.world, self.max_time = world, max_time
        self.done: list[tuple[float, bool]] = []  # (when it was sent, whether it was answered)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop)

    def _loop(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            self.done.append((sent, curl(self.world.site.laptop_ns, URL, self.max_time) == NODE_SIDE))
            self._stop.wait(0.1)

    def __enter__(self) -> Requests:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def failed(self) -> list[float]:
        return [t for t, ok in self.done if not ok]

    def first_success_after(self, moment: float) -> float | None:
        return next((t for t, ok in self.done if ok and t >= moment), None)


def wait_readyz(world: AgentLab, ok: bool, timeout: float) -> tuple[float, str]:
    """Seconds until /readyz says ``ok`` (200) or not (a 503: the agent answers, it is not ready), and its body."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        code, body = world.agent.get("/readyz")
        if code and (code == 200) == ok:
            return time.monotonic() - started, body
        time.sleep(0.05)
    raise AssertionError(f"/readyz not {'200' if ok else 'failing'} after {timeout} s: {world.agent.get('/readyz')}")


def messages(world: AgentLab, start: int) -> list[str]:
    return [str(r.get("message")) for r in world.agent.records(start=start)]


def test_the_agent_killed_and_restarted_breaks_no_connection_and_keeps_its_wireguard_go(world: AgentLab) -> None:
    connected(world)
    echo_server(world.site.lab, world.site.service_ns, SERVICE, ECHO_PORT)
    time.sleep(RESYNC + 0.5)  # a resync has read back the node since the laptop came up
    devices = world.supervisor_client().devices()
    pid = devices[world.interface]
    before = world.dataplane()
    probe = TcpProbe(world.site.lab, world.site.laptop_ns, SERVICE, ECHO_PORT, world.site.tmp / "tcp-probe.log")
    with probe, Requests(world) as requests:
        time.sleep(0.5)
        world.agent.stop(signal.SIGKILL)  # the whole process group, as a container's end
        time.sleep(1)
        restarted = time.monotonic()
        world.agent.start()
        ready_after = time.monotonic() - restarted
        time.sleep(RESYNC + 0.5)  # its first sync and one resync
    tcp = probe.result()
    print(
        f"agent SIGKILLed, restarted 1 s later: ready {ready_after:.2f} s after its start; "
        f"{len(requests.done)} requests, {len(requests.failed())} failed; "
        f"one TCP connection: broken={tcp['broken']}, longest silence {tcp['max_gap_s']:.3f} s"
    )
    assert len(requests.done) > 10
    assert requests.failed() == [], world.diagnose()
    assert tcp["broken"] is None, tcp
    assert tcp["max_gap_s"] < 1.0, tcp
    # Adopted, not re-created: the same wireguard-go, the same configuration, nothing to do.
    assert world.supervisor_client().devices() == devices
    assert Path(f"/proc/{pid}").exists()
    assert world.dataplane() == before
    syncs = [r for r in world.agent.records(start=1) if r.get("message") == "synced"]
    assert syncs, world.agent.log_tail()
    assert syncs[0]["actions"] == 0, syncs
    assert "CreateInterface" not in messages(world, 1)
    assert world.supervisor is not None
    started = [r for r in world.supervisor.records() if r.get("message") == "wireguard-go started"]
    assert [r["pid"] for r in started] == [pid]


def test_a_dead_supervisor_makes_the_agent_unready_and_its_return_heals_the_laptop(world: AgentLab) -> None:
    connected(world)
    wait_for_status(world, lambda s: s.get("endpoint"))  # the agent knows where the laptop is
    assert world.supervisor is not None
    echo_server(world.site.lab, world.site.service_ns, SERVICE, ECHO_PORT)
    probe = TcpProbe(world.site.lab, world.site.laptop_ns, SERVICE, ECHO_PORT, world.site.tmp / "tcp-probe.log")
    with probe, Requests(world, max_time=0.5) as requests:  # a short timeout: the gap measured to 0.5 s
        time.sleep(0.5)
        killed = time.monotonic()
        world.supervisor.stop(signal.SIGKILL)  # with its wireguard-go: what deleting its pod does
        unready_after, reason = wait_readyz(world, ok=False, timeout=5)
        assert "wireguard-go supervisor unreachable" in reason, reason
        wait_for(lambda: any(t > killed for t in requests.failed()), 5, "the laptop to be cut off")
        time.sleep(2)  # an outage of a few seconds
        assert world.agent.get("/healthz")[0] == 200  # alive, only not ready: no restart wanted
        restarted, restarted_wall = time.monotonic(), time.time()
        world.supervisor.start()
        listening = time.monotonic() - restarted
        ready_after, _ = wait_readyz(world, ok=True, timeout=10)
        ready_after += listening
        wait_for(lambda: requests.first_success_after(restarted) is not None, 10, "the laptop to get through again")
        time.sleep(1)
    healed = requests.first_success_after(restarted)
    assert healed is not None
    first_failure = min(t for t in requests.failed() if t > killed)
    (peer,) = world.uapi().get().peers.values()
    assert peer.last_handshake is not None
    handshake = peer.last_handshake - restarted_wall
    tcp = probe.result()
    print(
        f"supervisor killed with its wireguard-go: agent not ready after {unready_after:.2f} s. "
        f"Supervisor started again: listening after {listening:.2f} s, agent ready after {ready_after:.2f} s, "
        f"first handshake with the laptop after {handshake:.2f} s, first request through sent after "
        f"{healed - restarted:.2f} s (requests failing for {healed - first_failure:.2f} s in all, to 0.6 s); "
        f"one TCP connection: broken={tcp['broken']}, longest silence {tcp['max_gap_s']:.2f} s"
    )
    assert unready_after < 2.0
    assert handshake < 2.0
    assert healed - restarted < 3.0
    assert all(ok for t, ok in requests.done if t > healed)
    records = messages(world, 0)
    assert sum(m.startswith("wireguard-go supervisor unreachable") for m in records) == 1  # once, not per attempt
    assert records.count("wireguard-go supervisor answers again: resyncing now") == 1
    assert records.count("server sync failed") == 1  # the devices could not be re-created: said once
    # The gateway sent the first handshake to the laptop's last endpoint (its keepalive is 25 s away).
    assert world.dataplane()[0][2], world.diagnose()


def test_a_taken_listen_port_is_not_ready_with_a_reason_and_a_condition_until_freed(unstarted: AgentLab) -> None:
    world, node = unstarted, unstarted.site.node
    holder = world.site.lab.spawn(
        node, sys.executable, "-c", f"import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.bind(('0.0.0.0', {LISTEN_PORT})); time.sleep(600)",
    )  # fmt: skip
    wait_for(
        lambda: f":{LISTEN_PORT} " in run("ip", "netns", "exec", node, "ss", "-Hunl").stdout, 5, "the port to be taken"
    )
    world.agent.start(wait_ready=False)
    _, reason = wait_readyz(world, ok=False, timeout=15)
    wait_for(lambda: "is taken" in world.agent.get("/readyz")[1], 15, "the sync failure in /readyz")
    reason = world.agent.get("/readyz")[1]
    assert f"UDP port {LISTEN_PORT} is taken by another process on the node" in reason, reason
    assert f"{world.namespace}/{SERVER} ({world.interface})" in reason, reason
    condition = wait_for_value(lambda: dataplane_condition(world, SERVER, "vpnservers"), 15, "the Dataplane condition")
    assert condition["status"] == "False"
    assert condition["reason"] == "SyncFailed"
    assert f"UDP port {LISTEN_PORT} is taken" in condition["message"]
    assert f"(gateway node {world.node_name})" in condition["message"], condition
    # Its only gateway cannot serve it: not Ready, naming the node and the agent's reason.
    named = f"{world.node_name}: UDP port {LISTEN_PORT} is taken"
    ready = wait_for_value(
        lambda: (
            (c := condition_of(world.kvpn.get("vpnservers", world.namespace, SERVER) or {}, "Ready"))
            and named in c["message"]
            and c
        ),
        15,
        "the server's Ready naming its gateway and why",
    )
    assert (ready["status"], ready["reason"]) == ("False", "NoHealthyGateway"), ready

    holder.terminate()
    holder.wait(timeout=5)
    freed = time.monotonic()
    ready_after, _ = wait_readyz(world, ok=True, timeout=RESYNC + 5)
    # At most one condition write per object per 15 s: the removal may wait for that.
    wait_for(lambda: dataplane_condition(world, SERVER, "vpnservers") is None, 20, "the Dataplane condition to go")
    gone_after = time.monotonic() - freed
    print(f"listen port freed: ready after {ready_after:.2f} s, Dataplane condition gone after {gone_after:.1f} s")
    connected(world)  # and the server works
    records = messages(world, 0)
    assert records.count("server sync failed") == 1, records  # once for the whole conflict, not per retry
    assert "server sync works again" in records


def test_cleanup_asks_the_supervisor_to_stop_the_devices(world: AgentLab) -> None:
    connected(world)
    world.agent.stop(signal.SIGTERM)
    assert world.reach() == NODE_SIDE  # a stopped agent leaves tunnels up
    assert world.supervisor is not None
    state_dir = Path(world.agent.argv[world.agent.argv.index("--state-dir") + 1])
    result = run(
        sys.executable, "-m", "kvpn_agent.main", "cleanup", "--netns", world.site.node,
        "--state-dir", str(state_dir), "--wireguard-go-supervisor", str(world.supervisor.socket_path),
    )  # fmt: skip
    assert "the supervisor stopped wireguard-go" in result.stderr, result.stderr
    assert world.supervisor_client().devices() == {}
    assert world.supervisor.listening()  # the supervisor itself stays: it is not the agent's to remove
    assert "kvgw-" not in run("ip", "-n", world.site.node, "link").stdout
    assert run("ip", "netns", "exec", world.site.node, "nft", "list", "tables").stdout.strip() == ""
    assert not world.uapi().exists()
    assert not (state_dir / "state.json").exists()
    assert world.reach(max_time=2) is None
