"""End to end, through an attacker's eyes: a laptop with a valid peer (mallory) that is root on her own machine
tries to reach what her peer does not grant, and to disturb others, on the real-node cluster.

Each attempt must be dropped *by the gateway*: the test shows the packet reached it (WireGuard's byte
counters, kvpn's drop counters) and that nothing behind it saw the packet (a counter of our own in the
gateway node's namespace, or a listener that accepted nothing), while a control shows the target does
answer those who may reach it, so that every assertion could fail. On the control side, a developer bound
to the chart's developer role tries to read another team's config and to widen their reach.

One world for the module (its own cluster): the `cluster` server (HostPort), laptops in the developers'
namespace `dev`, and a second team, `team-b`, whose peers the platform team limits with a ceiling.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.cluster import Node, in_ns
from harness.kvpn import wait_for
from harness.via_api import DEVELOPER, binding, developer_kubeconfig
from harness.world import (
    CHART_NAMESPACE,
    HELLO_PORT,
    HELLO_URL,
    LISTEN_PORTS,
    PEER_NAMESPACE,
    POOLS,
    SERVER,
    Laptop,
    TrafficLoop,
    World,
    run,
)
from tests.e2e.conftest import started_world

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.apiserver]

PACKETS = Path(__file__).resolve().parents[2] / "harness" / "packets.py"
TEAM_B = "team-b"
OUTSIDER = "team-c"  # a namespace the server does not accept
PROBE_PORT = 9999  # nothing listens there: what counts is whether the packet got past the gateway
KUBELET_PORT = 10250
METRICS_PORT = 9586  # the chart's agent.metricsPort
METADATA = "169.254.169.254"
COUNTING = "kvpn-e2e-count"  # our own nft table in the gateway node's namespace


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    values = [f"operator.secretNamespaces={{{PEER_NAMESPACE},{TEAM_B}}}"]
    with started_world(values, namespaces=(TEAM_B, OUTSIDER)) as made:
        made.kvpn.patch("vpnservers", CHART_NAMESPACE, SERVER, {"peerNamespaces": [PEER_NAMESPACE, TEAM_B]})
        yield made


@pytest.fixture(scope="module")
def mallory(world: World) -> Laptop:
    return world.add_laptop("mallory")


@pytest.fixture(scope="module")
def alice(world: World) -> Laptop:
    return world.add_laptop("alice")


@pytest.fixture(scope="module")
def bob(world: World) -> Laptop:
    return world.add_laptop("bob")


# --- what the tests look with -----------------------------------------------------------------------


def packets(netns: str, *args: str, timeout: float = 30, input: str | None = None) -> str:
    return in_ns(netns, sys.executable, str(PACKETS), *args, timeout=timeout, input=input).stdout.strip()


def background(netns: str, *args: str) -> subprocess.Popen[str]:
    """packets.py running in a namespace until it is done; its output is read by the caller."""
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, str(PACKETS), *args], stdout=subprocess.PIPE, text=True
    )


def on_node(world: World, node: Node, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return world.cluster.in_node(node, *argv, **kwargs)


def node_packets(world: World, node: Node, *args: str) -> str:
    return on_node(world, node, sys.executable, str(PACKETS), *args, timeout=30).stdout.strip()


def tunnel_address(laptop: Laptop) -> str:
    match = re.search(r"^Address = ([0-9.]+)", laptop.config, re.M)
    assert match is not None, laptop.config
    return match.group(1)


def public_key(world: World, laptop: Laptop, namespace: str = PEER_NAMESPACE) -> str:
    peer = world.kvpn.get("vpnpeers", namespace, laptop.name)
    assert peer is not None
    return str(peer["status"]["publicKey"])


def rx_bytes(world: World, node: Node, key: str) -> int:
    """What the gateway's WireGuard received from a peer: proof that a packet reached the gateway."""
    return world.uapi(node).get().peers[key].rx_bytes


def kvpn_drops(world: World, node: Node) -> int:
    """Packets kvpn's own table on the node dropped for the server: its counter-and-drop rules."""
    sid = world.interfaces[SERVER].replace("-", "_")
    table = json.loads(on_node(world, node, "nft", "-j", "list", "table", "inet", "kvpn").stdout)
    total = 0
    for item in table["nftables"]:
        rule = item.get("rule")
        if rule is None or rule["chain"] not in (f"from_{sid}", f"in_{sid}", f"to_{sid}"):
            continue
        expr = rule["expr"]
        if len(expr) == 2 and "counter" in expr[0] and "drop" in expr[1]:
            total += int(expr[0]["counter"]["packets"])
    return total


def hello_pod_ip(world: World, node: Node | None = None) -> str:
    pods = [p for p in world.hello_pods() if node is None or p["spec"]["nodeName"] == node.name]
    return str(pods[0]["status"]["podIP"])


def hello_cluster_ip(world: World) -> str:
    return str(world.core.read_namespaced_service("hello", "default").spec.cluster_ip)


class Counting:
    """Counters in the gateway node's namespace, on packets that left WireGuard (prerouting on its
    interface, before kvpn's filter): what the gateway let out of the tunnel."""

    def __init__(self, world: World, node: Node) -> None:
        self.world, self.node = world, node
        self.interface = world.interfaces[SERVER]

    def __enter__(self) -> Counting:
        script = (
            f"table inet {COUNTING} {{\n  chain seen {{\n    type filter hook prerouting priority -400;\n  }}\n}}\n"
        )
        on_node(self.world, self.node, "nft", "-f", "-", input=script)
        return self

    def __exit__(self, *exc: object) -> None:
        on_node(self.world, self.node, "nft", "delete", "table", "inet", COUNTING, check=False)

    def add(self, name: str, match: str) -> None:
        nft = ("nft", "add")
        on_node(self.world, self.node, *nft, "counter", "inet", COUNTING, name)
        rule = f'iifname "{self.interface}" {match} counter name "{name}"'
        on_node(self.world, self.node, *nft, "rule", "inet", COUNTING, "seen", *rule.split())

    def value(self, name: str) -> int:
        out = on_node(self.world, self.node, "nft", "-j", "list", "counter", "inet", COUNTING, name).stdout
        found = next(i["counter"] for i in json.loads(out)["nftables"] if "counter" in i)
        return int(found["packets"])


@contextlib.contextmanager
def widened(world: World, laptop: Laptop, targets: list[str], gateway: Node) -> Iterator[None]:
    """What an attacker does to her own machine: accept anything from the tunnel and route `targets` into it.
    The gateway's own address is the tunnel's endpoint: only TCP to it goes in (a rule of its own)."""
    ns, interface = laptop.netns, laptop.interface
    key = laptop.server_public_key()
    allowed = in_ns(ns, "wg", "show", interface, "allowed-ips").stdout.split()[1:]
    in_ns(ns, "wg", "set", interface, "peer", key, "allowed-ips", "0.0.0.0/0")
    added: list[list[str]] = []
    try:
        for target in targets:
            if target == gateway.address:
                in_ns(ns, "ip", "route", "add", f"{target}/32", "dev", interface, "table", "7100")
                added.append(["route", "del", f"{target}/32", "dev", interface, "table", "7100"])
                in_ns(ns, "ip", "rule", "add", "to", target, "ipproto", "tcp", "lookup", "7100", "pref", "100")
                added.append(["rule", "del", "pref", "100"])
            else:
                in_ns(ns, "ip", "route", "replace", f"{target}/32", "dev", interface)
                added.append(["route", "del", f"{target}/32", "dev", interface])
        yield
    finally:
        for undo in reversed(added):
            in_ns(ns, "ip", *undo, check=False)
        in_ns(ns, "wg", "set", interface, "peer", key, "allowed-ips", ",".join(allowed), check=False)


def first_line(proc: subprocess.Popen[str]) -> str:
    """The line a background script prints once it is ready."""
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def curl_ok(laptop: Laptop, url: str = HELLO_URL) -> None:
    body = laptop.curl(url, 3)
    assert body is not None, f"{url} from {laptop.name}: no answer"
    assert body.startswith("hello from pod"), f"{url} from {laptop.name}: {body!r}"


# --- the data plane ---------------------------------------------------------------------------------


def test_spoofed_sources_never_leave_the_gateways_wireguard(world: World, mallory: Laptop, alice: Laptop) -> None:
    """Mallory sends through her tunnel with the source of another peer, of a free pool address, of the
    other server's pool and of a pod. WireGuard at the gateway takes only her own address from her key."""
    gateway = world.node_of_endpoint(mallory)
    own = tunnel_address(mallory)
    spoofed = {
        "alice": tunnel_address(alice),
        "pool": str(ipaddress.ip_network(POOLS[SERVER])[200]),
        "other_pool": str(ipaddress.ip_network(POOLS["nodeport"])[200]),
        "pod": str(ipaddress.ip_address(hello_pod_ip(world)) + 77),
    }
    target = hello_pod_ip(world)
    key = public_key(world, mallory)
    with Counting(world, gateway) as seen:
        for name, source in {"own": own, **spoofed}.items():
            seen.add(name, f"ip saddr {source} udp dport {PROBE_PORT}")
        for source in spoofed.values():
            in_ns(mallory.netns, "ip", "addr", "add", f"{source}/32", "dev", mallory.interface)
        try:
            received = rx_bytes(world, gateway, key)
            for source in [own, *spoofed.values()]:
                packets(mallory.netns, "udp", "--src", source, "--dst", target, "--port", str(PROBE_PORT))
            wait_for("mallory's own datagrams at the gateway", lambda: seen.value("own") == 3, timeout=10)
            time.sleep(1)
            assert {name: seen.value(name) for name in spoofed} == dict.fromkeys(spoofed, 0)
            # The spoofed ones did reach the gateway, encrypted with her key: it is WireGuard that dropped them.
            assert rx_bytes(world, gateway, key) - received >= 3 * (len(spoofed) + 1) * 32
        finally:
            for source in spoofed.values():
                in_ns(mallory.netns, "ip", "addr", "del", f"{source}/32", "dev", mallory.interface, check=False)
    curl_ok(mallory)


@contextlib.contextmanager
def metadata_stand_in(world: World, node: Node) -> Iterator[subprocess.Popen[str]]:
    """A stand-in for a cloud metadata server as some clouds run it: on the node, at 169.254.169.254:80."""
    on_node(world, node, "ip", "addr", "add", f"{METADATA}/32", "dev", "lo")
    try:
        assert node.process is not None
        argv = ["nsenter", "-t", str(node.process.pid), "-n", sys.executable, str(PACKETS)]
        listener = subprocess.Popen(
            [*argv, "listen", "--host", METADATA, "--port", "80", "--seconds", "40"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert first_line(listener) == "listening"
            yield listener
        finally:
            listener.kill()
            listener.wait()
    finally:
        on_node(world, node, "ip", "addr", "del", f"{METADATA}/32", "dev", "lo", check=False)


def test_the_gateway_drops_what_lies_outside_the_routes_and_the_node_itself(world: World, mallory: Laptop) -> None:
    """Mallory routes into her tunnel the cloud metadata address, the API server, the gateway node's own
    addresses (its kubelet and the agent's metrics; the metrics, which listen on every address, also
    through the node's address on the pod bridge, which lies inside the routes) and another node's
    kubelet. From the gateway node each answers; through the tunnel none does, and kvpn's drop counters
    on the gateway count the attempts."""
    gateway = world.node_of_endpoint(mallory)
    other = next(n for n in world.nodes if n is not gateway)
    api_host, _, api_port = world.cluster.plane.server.removeprefix("https://").rpartition(":")
    bridge = str(ipaddress.ip_network(gateway.pod_cidr)[1])
    targets = [
        ("the metadata address (a node-local stand-in)", METADATA, 80),
        ("the API server", api_host, int(api_port)),
        ("the gateway's kubelet", gateway.address, KUBELET_PORT),
        ("the agent's metrics", gateway.address, METRICS_PORT),
        ("the agent's metrics on the pod bridge", bridge, METRICS_PORT),
        ("another node's kubelet", other.address, KUBELET_PORT),
    ]
    assert ipaddress.ip_address(bridge) in ipaddress.ip_network(gateway.pod_cidr)
    with metadata_stand_in(world, gateway) as listener:
        control = {
            what: node_packets(world, gateway, "connect", "--dst", a, "--port", str(p)) for what, a, p in targets
        }
        assert control == dict.fromkeys(control, "connected"), control
        dropped = kvpn_drops(world, gateway)
        with widened(world, mallory, sorted({a for _, a, _ in targets}), gateway):
            tried = {
                what: packets(mallory.netns, "connect", "--dst", a, "--port", str(p), "--timeout", "2")
                for what, a, p in targets
            }
        listener.kill()
    assert tried == dict.fromkeys(tried, "timeout"), tried
    assert kvpn_drops(world, gateway) - dropped >= len(targets)
    curl_ok(mallory)


def test_peer_to_peer_stays_closed(world: World, mallory: Laptop, alice: Laptop) -> None:
    """Alice's tunnel takes packets from the whole pool (as a file meant for peer-to-peer would) and listens
    on her tunnel address; the gateway itself reaches her there. Mallory, routing alice's address into her
    tunnel, does not."""
    gateway = world.node_of_endpoint(mallory)
    assert world.node_of_endpoint(alice) is gateway
    target = tunnel_address(alice)
    key = alice.server_public_key()
    allowed = in_ns(alice.netns, "wg", "show", alice.interface, "allowed-ips").stdout.split()[1:]
    in_ns(alice.netns, "wg", "set", alice.interface, "peer", key, "allowed-ips", ",".join([*allowed, POOLS[SERVER]]))
    in_ns(alice.netns, "ip", "route", "add", POOLS[SERVER], "dev", alice.interface)
    try:
        listener = background(alice.netns, "listen", "--host", target, "--port", "7777", "--seconds", "8")
        assert first_line(listener) == "listening"
        assert node_packets(world, gateway, "connect", "--dst", target, "--port", "7777") == "connected"
        dropped = kvpn_drops(world, gateway)
        with widened(world, mallory, [target], gateway):
            tried = packets(mallory.netns, "connect", "--dst", target, "--port", "7777", "--timeout", "2")
        accepted, _ = listener.communicate(timeout=15)
    finally:
        in_ns(alice.netns, "ip", "route", "del", POOLS[SERVER], "dev", alice.interface, check=False)
        in_ns(alice.netns, "wg", "set", alice.interface, "peer", key, "allowed-ips", ",".join(allowed), check=False)
    assert tried == "timeout"
    assert accepted.split()[-1] == "1"  # the gateway's control connection, not mallory's
    assert kvpn_drops(world, gateway) > dropped


def test_garbage_and_replayed_packets_at_the_wireguard_port_change_nothing(
    world: World, mallory: Laptop, bob: Laptop
) -> None:
    """Mallory floods the gateway's WireGuard port with noise (random datagrams, random bodies behind each
    message type), then replays her own captured handshake and data packets from another port. No replayed
    datagram gets past WireGuard, none is answered, her endpoint at the gateway stays hers, and bob's requests
    through the same gateway meanwhile all succeed."""
    gateway = world.node_of_endpoint(mallory)
    assert world.node_of_endpoint(bob) is gateway
    port = str(LISTEN_PORTS[SERVER])
    key = public_key(world, mallory)
    own = tunnel_address(mallory)
    target = hello_pod_ip(world)
    conf = world.run_dir / "mallory-showconf.conf"
    with Counting(world, gateway) as seen, TrafficLoop(bob, max_time=1.0, pause=0.05) as loop:
        seen.add("probe", f"ip saddr {own} udp dport {PROBE_PORT}")
        packets(mallory.netns, "garbage", "--dst", gateway.address, "--port", port, "--count", "3000")
        # A fresh session, captured from its first packet: the initiation and the data after it.
        capture = background(mallory.netns, "capture", "--dst", gateway.address, "--port", port, "--seconds", "4")
        assert first_line(capture) == "capturing"
        try:
            conf.write_text(in_ns(mallory.netns, "wg", "showconf", mallory.interface).stdout)
            conf.chmod(0o600)
            in_ns(mallory.netns, "wg", "setconf", mallory.interface, str(conf))  # drops the session
        finally:
            conf.unlink(missing_ok=True)
        packets(mallory.netns, "udp", "--src", own, "--dst", target, "--port", str(PROBE_PORT))
        captured, _ = capture.communicate(timeout=15)
        payloads = json.loads(captured)
        kinds = sorted({base64.b64decode(p)[0] for p in payloads})
        assert {1, 4} <= set(kinds), kinds  # an initiation and data
        wait_for("mallory's datagrams at the gateway", lambda: seen.value("probe") == 3, timeout=10)
        endpoint = world.uapi(gateway).get().peers[key].endpoint
        replayed = json.loads(
            packets(mallory.netns, "replay", "--dst", gateway.address, "--port", port, input=captured)
        )
        time.sleep(1)
        assert replayed == {"sent": len(payloads), "answers": 0}
        assert seen.value("probe") == 3
        assert world.uapi(gateway).get().peers[key].endpoint == endpoint
        time.sleep(1)
    assert loop.outage.attempts > 20
    assert loop.failures == 0, f"bob lost {loop.failures} of {loop.outage.attempts} requests"
    curl_ok(mallory)


def test_an_expired_peer_is_cut_off(world: World) -> None:
    """A peer given until a moment a few seconds away: it works until then and not after."""
    until = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=25)
    eve = world.add_laptop("eve", expiresAt=until.isoformat().replace("+00:00", "Z"))
    curl_ok(eve)
    key = public_key(world, eve)
    time.sleep(max(0.0, (until - dt.datetime.now(dt.UTC)).total_seconds()))
    wait_for("eve cut off", lambda: eve.curl(max_time=1) is None, timeout=5)
    wait_for("eve off every gateway", lambda: all(key not in world.uapi_peers(n) for n in world.nodes), timeout=5)
    peer = world.kvpn.get("vpnpeers", PEER_NAMESPACE, "eve")
    assert peer is not None
    ready = next(c for c in peer["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Expired")


# --- the control side -------------------------------------------------------------------------------


def test_a_developer_reads_no_other_teams_config_and_cannot_widen_their_reach(world: World) -> None:
    """A developer of `dev`, bound to exactly the chart's developer and server-reader roles."""
    world.add_peer("carol", namespace=TEAM_B)  # another team's peer and its config Secret
    carol = world.kvpn.get("vpnpeers", TEAM_B, "carol")
    assert carol is not None
    kubeconfig = developer_kubeconfig(world, "dana", relay=False)
    env = {**world.cluster.env(), "KUBECONFIG": str(kubeconfig)}
    kubectl = str(world.tools / "kubectl")

    def as_dana(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(kubectl, *args, env=env, check=False, input=input)

    def can(*args: str) -> bool:
        return as_dana("auth", "can-i", *args).stdout.strip() == "yes"

    assert can("get", "secrets", "-n", PEER_NAMESPACE)  # the control: her own team's configs
    secret = as_dana("-n", TEAM_B, "get", "secret", carol["status"]["configSecretName"])
    assert secret.returncode != 0
    assert "forbidden" in secret.stderr.lower(), secret.stderr
    assert not can("get", "secrets", "-n", TEAM_B)
    assert not can("get", "secrets", "-n", CHART_NAMESPACE)  # server keys and every peer's binding
    assert not can("list", "secrets", "-n", PEER_NAMESPACE)  # names come from her peers' status
    assert not can("create", "vpnpeers", "-n", TEAM_B)
    assert not can("patch", "vpnservers", "-n", CHART_NAMESPACE)
    edit = as_dana("-n", CHART_NAMESPACE, "patch", "vpnserver", SERVER, "--type=merge", "-p", '{"spec":{"routes":[]}}')
    assert edit.returncode != 0
    assert "forbidden" in edit.stderr.lower(), edit.stderr

    # A namespace the server does not accept: even with the rights there, the operator refuses the peer.
    world.apply([binding("dana", OUTSIDER, DEVELOPER)])
    peer = {
        "apiVersion": "kvpn.dev/v1alpha1",
        "kind": "VpnPeer",
        "metadata": {"name": "sneaky", "namespace": OUTSIDER},
        "spec": {"serverRef": {"name": SERVER, "namespace": CHART_NAMESPACE}},
    }
    made = as_dana("apply", "-f", "-", input=json.dumps(peer))
    assert made.returncode == 0, made.stderr
    refused = world.kvpn.wait_ready("vpnpeers", OUTSIDER, "sneaky", "False", "NamespaceNotAllowed", timeout=30)
    assert not refused["status"].get("address"), refused["status"]
    assert not refused["status"].get("configSecretName"), refused["status"]


# --- the admin ceiling --------------------------------------------------------------------------------


def test_a_ceiling_for_a_team_namespace_limits_its_peers_whatever_they_ask(world: World) -> None:
    """The platform team lets team-b reach only hello's Service on port 80. Frank of team-b asks for the
    whole pod network and hello's Service: he gets the Service (by name too: DNS stays open) and not the
    pods, and his peer says what was cut."""
    cluster_ip = hello_cluster_ip(world)
    ceiling = [
        {
            "namespaces": [TEAM_B],
            "destinations": [{"cidr": f"{cluster_ip}/32", "protocol": "TCP", "ports": [{"port": 80}]}],
        }
    ]
    world.kvpn.patch("vpnservers", CHART_NAMESPACE, SERVER, {"peerCeilings": ceiling})
    pod_ip = ipaddress.ip_address(hello_pod_ip(world))
    pod_network = next(r for r in world.server()["status"]["routes"] if pod_ip in ipaddress.ip_network(r))
    frank = world.add_laptop(
        "frank",
        namespace=TEAM_B,
        allowedDestinations=[{"cidr": pod_network}, {"cidr": f"{cluster_ip}/32"}],
    )
    curl_ok(frank)  # hello by name: the DNS stand-in answers, hello's ClusterIP on 80 is allowed
    curl_ok(frank, f"http://{cluster_ip}:80/")
    assert frank.curl(f"http://{hello_pod_ip(world)}:{HELLO_PORT}/", 2) is None
    peer = world.kvpn.get("vpnpeers", TEAM_B, "frank")
    assert peer is not None
    cut = next(c for c in peer["status"]["conditions"] if c["type"] == "Ceiling")
    assert (cut["status"], cut["reason"]) == ("False", "CutByCeiling"), cut
    assert pod_network in cut["message"], cut["message"]
    assert cluster_ip in cut["message"], cut["message"]
    # The developer's own ask, in dev, is not under team-b's ceiling: mallory still reaches the pods.
    mallory = world.laptops["mallory"]
    curl_ok(mallory, f"http://{hello_pod_ip(world)}:{HELLO_PORT}/")
