"""`kvpn-agent run` as a process against the real API server and operator; a stock wg-quick laptop."""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from harness.commands import run
from harness.controlplane import ControlPlane
from harness.kvpn import Kvpn, decode
from harness.netlab import wait_for
from harness.traffic import RequestLoop
from kvpn_core.contract import binding_secret_name
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
from tests.dataplane.conftest import NODE_SIDE, Site

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("operator")]


@pytest.fixture
def kvpn(api: client.ApiClient) -> Kvpn:
    return Kvpn(api)


@pytest.fixture
def world(
    site: Site, kvpn: Kvpn, namespace: str, control_plane: ControlPlane, api: client.ApiClient, tmp_path: Path
) -> Iterator[AgentLab]:
    """The agent starting wireguard-go itself, as the demo's host-process agents do."""
    with agent_world(site, kvpn, namespace, control_plane, api, tmp_path) as made:
        yield made


def test_laptop_reaches_the_service_and_the_status_shows_it(world: AgentLab) -> None:
    connected(world)
    status = wait_for_status(world, lambda s: s.get("lastHandshake") and (s.get("rxBytes") or 0) > 0)
    assert status["endpoint"].startswith("192.168.237.2:")
    assert status["address"] == "10.237.0.2"  # the operator's field, untouched

    _, metrics = world.agent.get("/metrics")
    assert 'kvpn_agent_backend_info{backend="userspace"} 1.0' in metrics
    labels = f'peer="laptop",peer_namespace="{world.namespace}",server="{SERVER}",server_namespace="{world.namespace}"'
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


def test_a_bad_binding_is_a_dataplane_condition_on_its_peer_and_the_rest_keeps_working(world: AgentLab) -> None:
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


def test_disabling_the_peer_cuts_it_off_within_two_seconds(world: AgentLab) -> None:
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


def test_killing_and_restarting_the_agent_drops_nothing(world: AgentLab) -> None:
    connected(world)
    time.sleep(RESYNC + 0.5)  # a resync has read back the node since the laptop came up
    before = world.dataplane()
    with RequestLoop(world.site.laptop_ns, URL, NODE_SIDE) as requests:
        time.sleep(0.5)
        world.agent.stop(signal.SIGKILL)
        time.sleep(1)
        world.agent.start()
        time.sleep(RESYNC + 0.5)  # its first sync and one resync
    assert requests.attempts > 5
    assert requests.failures == [], world.diagnose()
    assert world.dataplane() == before
    syncs = [r for r in world.agent.records(start=1) if r.get("message") == "synced"]
    assert syncs, world.agent.log_tail()
    assert syncs[0]["actions"] == 0, syncs


def test_tunnels_survive_an_api_outage_and_the_agent_catches_up(world: AgentLab) -> None:
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


def test_restart_without_api_serves_the_state_file_and_restores_endpoints(world: AgentLab) -> None:
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


def test_drift_is_repaired_by_the_resync(world: AgentLab) -> None:
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


def test_shutdown_leaves_the_dataplane_and_cleanup_removes_it(world: AgentLab) -> None:
    connected(world)
    world.agent.stop(signal.SIGTERM)
    assert world.reach() == NODE_SIDE  # a rolling update must not drop tunnels
    state_dir = Path(world.agent.argv[world.agent.argv.index("--state-dir") + 1])
    result = run(
        sys.executable, "-m", "kvpn_agent.main", "cleanup", "--netns", world.site.node, "--state-dir", str(state_dir)
    )
    assert "kvgw-" not in run("ip", "-n", world.site.node, "link").stdout, result.stderr
    assert run("ip", "netns", "exec", world.site.node, "nft", "list", "tables").stdout.strip() == ""
    assert not world.uapi().exists()
    assert not (state_dir / "state.json").exists()
    assert world.reach(max_time=2) is None
