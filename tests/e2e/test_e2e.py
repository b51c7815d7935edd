"""End to end on this machine: a laptop with stock wg-quick reaches a cluster Service by its DNS name.

One world (tests/support/world.py) for the module: the real control plane, the chart's CRDs and RBAC,
the operator and two agents running as the chart's ServiceAccounts, two gateway nodes, a pod network
with "hello" and cluster DNS, laptops on an underlay. Every assertion is a real request from a laptop
namespace, bounded by curl's --max-time. The tests run in file order and build on each other's state
(documented per test); each leaves the laptops connected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.kvpn import wait_for
from tests.support.world import (
    DNS_CLUSTER_IP,
    HELLO_CLUSTER_IP,
    HELLO_CLUSTER_IP_URL,
    HELLO_POD_IP,
    HELLO_POD_URL,
    HELLO_URL,
    NODE_POD_SIDE,
    NODE_UNDERLAY,
    PEER_NAMESPACE,
    PLUGIN,
    POD_CIDRS,
    Laptop,
    TrafficLoop,
    World,
    in_ns,
    run,
)

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.apiserver]

REQUIRED = ("ip", "nft", "wireguard-go", "wg", "wg-quick", "curl", "dnsmasq", "unshare")
CUT_WITHIN = 2.0
# Forbidden answers in a log would mean the chart's RBAC is not enough for what the process does.
PERMISSION_PROBLEMS = re.compile(r"forbidden|\(403\)", re.IGNORECASE)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, TUN, nftables)", pytrace=False)
    if missing := [b for b in REQUIRED if shutil.which(b) is None]:
        pytest.fail(f"missing {', '.join(missing)}: run `make setup`", pytrace=False)
    made = World()
    made.start()
    print(f"world up in {made.timings['total']:.1f} s: {made.timings}")
    try:
        yield made
        for name in ("operator.log", "agent-node-a.log", "agent-node-b.log"):
            text = (made.run_dir / name).read_text(errors="replace")
            assert "Traceback" not in text, f"{name}:\n{text[-4000:]}"
            assert not PERMISSION_PROBLEMS.search(text), f"permission trouble in {name}:\n{text[-4000:]}"
    finally:
        made.stop()


@pytest.fixture(scope="module")
def alice(world: World) -> Laptop:
    return world.add_laptop("alice")


def curl_ok(laptop: Laptop, url: str = HELLO_URL, max_time: float = 3) -> str:
    body = laptop.curl(url, max_time)
    assert body is not None, f"{url} from {laptop.name} got no answer"
    assert body.startswith("hello from pod"), body
    return body


def seconds_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def test_the_server_discovered_endpoint_routes_and_dns(world: World) -> None:
    status = world.server()["status"]
    assert status["endpoint"] == f"{NODE_UNDERLAY['node-a']}:51820"  # the first gateway Node's InternalIP
    assert set(status["routes"]) == {"10.96.0.0/16", *POD_CIDRS.values()}
    assert status["dnsNameserver"] == DNS_CLUSTER_IP


def test_laptop_reaches_hello_by_name_by_cluster_ip_and_by_pod_ip(world: World, alice: Laptop) -> None:
    assert "DNS = 10.96.0.10, svc.cluster.local, cluster.local" in alice.config
    body = world.wait_reachable(alice, HELLO_URL)
    assert body.startswith(f"hello from pod {HELLO_POD_IP}")
    # The laptop's traffic leaves the gateway masqueraded as the node (node-a: its endpoint).
    assert f"(client {NODE_POD_SIDE['node-a']})" in body
    curl_ok(alice, HELLO_CLUSTER_IP_URL)
    curl_ok(alice, HELLO_POD_URL)
    # Short names through the pushed search domains, as `curl http://hello.default` would.
    curl_ok(alice, "http://hello.default/")


def test_allowed_destinations_reach_only_those(world: World, alice: Laptop) -> None:
    bob = world.add_laptop(
        "bob",
        allowedDestinations=[{"cidr": f"{HELLO_CLUSTER_IP}/32", "protocol": "TCP", "ports": [{"port": 80}]}],
    )
    world.wait_reachable(bob, HELLO_CLUSTER_IP_URL)
    curl_ok(bob, HELLO_URL)  # cluster DNS stays reachable for every peer
    assert bob.curl(HELLO_POD_URL, max_time=2) is None  # the pod itself is not among its destinations
    curl_ok(alice, HELLO_POD_URL)  # alice, without restrictions, still reaches the pod


def test_both_gateway_nodes_serve_the_same_peer(world: World, alice: Laptop) -> None:
    """Gateway node-a drops off the underlay; the laptop moves to node-b with `wg set ... endpoint`.
    node-b already has the peer and the server's key, so the tunnel carries on there after the
    laptop's next handshake, which WireGuard starts by itself once sent data has gone unanswered for
    15 s (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT): the failover time of any WireGuard client moved to
    another server with the same key. (With node-a still up, node-a's own retry of the handshake can
    win that race and pull the laptop back: roaming, by design.)"""
    node_a, node_b = world.netns["node-a"], world.netns["node-b"]
    curl_ok(alice)
    in_ns(node_a, "ip", "link", "set", "eth0", "down")
    try:
        alice.switch_endpoint("node-b")
        assert alice.endpoint() == f"{NODE_UNDERLAY['node-b']}:51820"
        started = time.monotonic()
        body = world.wait_reachable(alice, HELLO_URL, timeout=30)
        print(f"node-a down, endpoint switched to node-b: working again after {time.monotonic() - started:.1f} s")
        assert f"(client {NODE_POD_SIDE['node-b']})" in body, body  # masqueraded by node-b: served by it
        curl_ok(alice, HELLO_POD_URL)
        curl_ok(alice, HELLO_CLUSTER_IP_URL)
        public_key = world.kvpn.get("vpnpeers", PEER_NAMESPACE, "alice")["status"]["publicKey"]  # type: ignore[index]
        assert world.agents["node-b"].uapi(world.interface).get().peers[public_key].last_handshake
    finally:
        in_ns(node_a, "ip", "link", "set", "eth0", "up")
    curl_ok(alice)
    assert in_ns(node_b, "ip", "link", "show", "eth0").returncode == 0


@pytest.mark.parametrize("target", ["operator", "agent-sigterm", "agent-sigkill"])
def test_restarts_drop_nothing(world: World, alice: Laptop, target: str) -> None:
    node = next(n for n, address in NODE_UNDERLAY.items() if alice.endpoint().startswith(f"{address}:"))
    curl_ok(alice)
    with TrafficLoop(alice) as traffic:
        time.sleep(0.5)
        started = time.monotonic()
        if target == "operator":
            assert world.operator is not None
            world.operator.restart()
        else:
            world.agents[node].restart(signal.SIGTERM if target == "agent-sigterm" else signal.SIGKILL)
        print(f"{target} on {node} back (healthy/ready) in {time.monotonic() - started:.1f} s")
        time.sleep(2)  # and working for a while afterwards
    assert traffic.attempts >= 5
    assert traffic.failures == [], f"{len(traffic.failures)} of {traffic.attempts} requests failed"
    assert world.kvpn.get("vpnpeers", PEER_NAMESPACE, "alice") is not None


def test_disabling_a_peer_cuts_it_off_within_two_seconds(world: World, alice: Laptop) -> None:
    curl_ok(alice)
    public_key = world.kvpn.get("vpnpeers", PEER_NAMESPACE, "alice")["status"]["publicKey"]  # type: ignore[index]
    started = time.monotonic()
    world.kvpn.patch("vpnpeers", PEER_NAMESPACE, "alice", {"disabled": True})
    cut = seconds_until(lambda: alice.curl(HELLO_URL, max_time=0.5) is None, CUT_WITHIN, "alice cut off")
    for agent in world.agents.values():
        seconds_until(
            lambda a=agent: public_key not in a.uapi(world.interface).get().peers,  # type: ignore[misc]
            CUT_WITHIN - (time.monotonic() - started) + 0.05,
            f"the peer gone from {agent.node}",
        )
    print(f"disabled -> no answer after {cut:.2f} s")
    assert alice.curl(HELLO_CLUSTER_IP_URL, max_time=1) is None
    assert alice.curl(HELLO_POD_URL, max_time=1) is None

    world.kvpn.patch("vpnpeers", PEER_NAMESPACE, "alice", {"disabled": False})
    back = seconds_until(lambda: alice.curl(HELLO_URL, max_time=1) is not None, 15, "alice back")
    print(f"re-enabled -> answering again after {back:.2f} s")


def test_kubectl_vpn_join_gives_a_working_tunnel_and_status_shows_its_handshake(world: World) -> None:
    carol = world.add_laptop("carol", join=True)  # the key pair is made by `kubectl vpn join`, on the laptop
    match = re.search(r"^PrivateKey = (\S+)$", carol.config, re.M)
    assert match, carol.config
    secrets_data = str([s.data for s in world.core.list_secret_for_all_namespaces().items])
    assert match.group(1) not in secrets_data  # the private key never reached the cluster
    assert "hello from pod" in curl_ok(carol)  # by name, through cluster DNS pushed by the server

    assert world.plane is not None

    def carol_row() -> dict[str, Any] | None:
        out = run(PLUGIN, "status", "-n", PEER_NAMESPACE, "-o", "json", env=world.plane.env()).stdout  # type: ignore[union-attr]
        row = next((r for r in json.loads(out) if r["name"] == "carol"), None)
        return row if row and row["connected"] and row["rx_bytes"] else None

    # The agents report at most every 15 s per peer: the live handshake shows within that.
    row = wait_for("carol's handshake in `kubectl vpn status`", carol_row, timeout=40, interval=1)
    assert row["ready"]
    table = run(PLUGIN, "status", "-n", PEER_NAMESPACE, env=world.plane.env()).stdout
    line = next(li for li in table.splitlines() if li.split()[:1] == ["carol"])
    assert "ago" in line
    assert "yes" in line


def test_kubectl_vpn_up_and_down_bring_the_tunnel_up_and_down(world: World) -> None:
    dave = world.add_laptop("dave", plugin_up=True)  # joined with --dns none, then `kubectl vpn up`
    assert "hello from pod" in curl_ok(dave, HELLO_CLUSTER_IP_URL)
    dave.plugin("down")
    assert in_ns(dave.netns, "ip", "link", "show", dave.interface, check=False).returncode != 0
    assert dave.curl(HELLO_CLUSTER_IP_URL, max_time=1) is None
    dave.plugin("up")
    assert "hello from pod" in curl_ok(dave, HELLO_CLUSTER_IP_URL)


def test_deleting_a_peer_cuts_it_off_within_two_seconds(world: World) -> None:
    bob = world.laptops["bob"]
    curl_ok(bob, HELLO_CLUSTER_IP_URL)
    world.kvpn.delete("vpnpeers", PEER_NAMESPACE, "bob")
    cut = seconds_until(
        lambda: bob.curl(HELLO_CLUSTER_IP_URL, max_time=0.5) is None, CUT_WITHIN, "bob cut off after delete"
    )
    print(f"deleted -> no answer after {cut:.2f} s")
    assert bob.curl(HELLO_URL, max_time=1) is None
    curl_ok(world.laptops["alice"])  # the other peer is untouched
