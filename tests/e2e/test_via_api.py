"""The tunnel through the Kubernetes API server (`kubectl vpn up --via api`), on the real-node cluster.

A laptop whose namespace sends no UDP at all, and no TCP but to the API server, joins a VpnServer
exposed as ApiServer (no Service, no UDP port anywhere) with a developer's ServiceAccount token bound
to the chart's developer, server-reader and relay-user roles as NOTES.txt says, nothing more. Its WireGuard
datagrams go through kube-apiserver, kubelet and containerd's port-forward to the chart's relay pods,
and from there to a gateway's WireGuard port. Relay and agent pods come and go under its requests;
bad input to the relay harms no one else; the developer's port-forward permission reaches the relay
pods and nothing else on a node.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes.client import Configuration

from harness.cluster import in_ns
from harness.kvpn import wait_for
from harness.via_api import RELAY, ApiLaptop, api_laptop, create_api_server, developer_kubeconfig
from harness.world import (
    CHART_NAMESPACE,
    HELLO_PORT,
    HELLO_URL,
    PEER_NAMESPACE,
    PLUGIN,
    RELAY_NAMESPACE,
    TrafficLoop,
    World,
    run,
)
from kvpn_cli.portforward import PortForward, PortForwardError, Target
from kvpn_core.relaywire import HELLO_SECONDS, RELAY_PORT, FrameReader, Hello, Welcome, frame
from tests.e2e.conftest import started_world

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.apiserver]

API_SERVER = "api"
API_PORT = 51824
# A relay pod deleted: the laptop's relay opens a stream to the other pod at once (no new session:
# same gateway); the bound leaves room for the API server's and kubelet's own setup of the stream.
RELAY_GONE_WITHIN = 5.0
AGENT_GONE_WITHIN = 2.0
GATEWAY_CUT_WITHIN = 20.0


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with started_world(helm_values=["relay.enabled=true"]) as made:
        made.wait_ready("deployment", RELAY, namespace=RELAY_NAMESPACE)
        create_api_server(made, API_SERVER, API_PORT, "10.13.0.0/24")
        yield made


@pytest.fixture(scope="module")
def developer(world: World) -> Path:
    return developer_kubeconfig(world, "uma-dev", relay=True)


@pytest.fixture(scope="module")
def uma(world: World, developer: Path) -> Iterator[ApiLaptop]:
    with api_laptop(world, "uma", API_SERVER, developer) as made:
        assert "Endpoint" not in made.laptop.config, made.laptop.config  # no UDP endpoint to write
        yield made
    print(f"--- kubectl vpn up --via api said:\n{made.said}")


def hello_cluster_ip(world: World) -> str:
    return str(world.core.read_namespaced_service("hello", "default").spec.cluster_ip)


def test_a_laptop_without_udp_reaches_hello_by_name_by_cluster_ip_and_by_pod_ip(world: World, uma: ApiLaptop) -> None:
    laptop = uma.laptop
    assert laptop.curl(HELLO_URL, 3), "by name"
    assert laptop.curl(f"http://{hello_cluster_ip(world)}/", 3), "by ClusterIP"
    for pod in world.hello_pods():
        assert laptop.curl(f"http://{pod['status']['podIP']}:{HELLO_PORT}/", 3), f"pod {pod['metadata']['name']}"
    # Full-sized packets both ways: a data message's length is then anything the MTU makes it.
    pod_ip = world.hello_pods()[0]["status"]["podIP"]
    body = world.run_dir / "upload.bin"
    body.write_bytes(os.urandom(4 << 20))
    for args in (
        [f"http://{pod_ip}:{HELLO_PORT}/bytes/{4 << 20}"],
        ["--data-binary", f"@{body}", f"http://{pod_ip}:{HELLO_PORT}/sink"],
    ):
        moved = in_ns(
            laptop.netns,
            "curl",
            "-s",
            "-f",
            "-o",
            "/dev/null",
            "--max-time",
            "30",
            "-w",
            "%{size_download} %{size_upload}",
            *args,
            check=False,
            timeout=40,
        )
        assert moved.returncode == 0, (args, moved.returncode)
        assert str(4 << 20) in moved.stdout.split(), moved.stdout
    gateway = uma.health()["gateway"]
    # The gateway's agent saw the peer, as over UDP (its status report, every few seconds).
    peer = wait_for(
        "uma's gateway in her status",
        lambda: (p := world.kvpn.get("vpnpeers", PEER_NAMESPACE, "uma")) and p["status"].get("gateway") and p,
        timeout=30,
    )
    assert peer["status"]["gateway"] == gateway, peer["status"]
    # The peer's address as the gateway sees it: a relay pod's, or its node's where the CNI masquerades
    # pod traffic leaving the pod network (this cluster's bridge plugin does); never the laptop's.
    relay_side = {p["status"]["podIP"] for p in world.pods(RELAY_NAMESPACE)} | {n.address for n in world.nodes}
    assert peer["status"]["endpoint"].rpartition(":")[0] in relay_side, peer["status"]
    said = uma.status()
    assert f"{laptop.interface} (kvpn-system/{API_SERVER}) via the API server: relay " in said, said
    assert f"to gateway {gateway}" in said, said


def test_allowed_destinations_and_disable_still_apply_via_the_api(world: World, uma: ApiLaptop) -> None:
    laptop = uma.laptop
    cluster_ip = hello_cluster_ip(world)
    pod_url = f"http://{world.hello_pods()[0]['status']['podIP']}:{HELLO_PORT}/"
    only = [{"cidr": f"{cluster_ip}/32", "protocol": "TCP", "ports": [{"port": 80}]}]
    world.kvpn.patch("vpnpeers", PEER_NAMESPACE, "uma", {"allowedDestinations": only})
    try:
        wait_for("the pod IP refused", lambda: laptop.curl(pod_url, 1) is None, timeout=15)
        assert laptop.curl(f"http://{cluster_ip}/", 3), "the allowed ClusterIP"
        world.kvpn.patch("vpnpeers", PEER_NAMESPACE, "uma", {"disabled": True})
        wait_for("nothing answers while disabled", lambda: laptop.curl(f"http://{cluster_ip}/", 1) is None, timeout=15)
    finally:
        world.kvpn.patch("vpnpeers", PEER_NAMESPACE, "uma", {"disabled": False, "allowedDestinations": []})
    world.wait_reachable(laptop, pod_url, timeout=30)


def test_a_relay_pod_or_the_gateways_agent_pod_deleted_needs_nothing_of_the_laptop(
    world: World, uma: ApiLaptop
) -> None:
    laptop = uma.laptop
    relay_pod = uma.health()["relay_pod"]
    with TrafficLoop(laptop, HELLO_URL, max_time=0.5, pause=0.05) as relay_loop:
        time.sleep(1)
        world.kubectl("-n", RELAY_NAMESPACE, "delete", "pod", relay_pod, "--wait=false")
        wait_for(
            "a stream to another relay pod", lambda: uma.health().get("relay_pod") not in ("", relay_pod), timeout=30
        )
        time.sleep(3)
    gateway = next(n for n in world.nodes if n.name == uma.health()["gateway"])
    with TrafficLoop(laptop, HELLO_URL, max_time=0.5, pause=0.05) as agent_loop:
        time.sleep(1)
        world.delete_agent_pod(gateway)
        time.sleep(2)
    summary = {
        "relay pod deleted": {"failed": relay_loop.failures, "longest_gap_s": relay_loop.outage.longest_s},
        "gateway's agent pod deleted": {"failed": agent_loop.failures, "longest_gap_s": agent_loop.outage.longest_s},
    }
    print(json.dumps(summary))
    assert relay_loop.outage.longest_s <= RELAY_GONE_WITHIN, summary
    assert agent_loop.outage.longest_s <= AGENT_GONE_WITHIN, summary
    assert uma.health()["reconnects"] >= 1


async def probe(
    config: Configuration, headers: dict[str, str], target: Target, send: bytes, wait: float, then: bytes = b""
) -> str:
    """What a stream to `target` that sends `send` (and `then`, once welcomed) gets within `wait` s, as
    "; "-joined events: the relay's Welcomes ("welcome: NODE", or "refused: REASON"), then "closed" when
    the stream ended or "open"."""
    stream = await PortForward.open(config, headers, target)
    events = []
    try:
        if send:
            stream.send(send)
        reader = FrameReader()
        async with asyncio.timeout(wait):
            while True:
                for payload in reader.feed(await stream.recv()):
                    welcome = Welcome.decode(payload)
                    events.append(f"refused: {welcome.error}" if welcome.error else f"welcome: {welcome.gateway}")
                    if then and welcome.ok:
                        stream.send(then)
    except TimeoutError:
        events.append("open")
    except PortForwardError:
        events.append("closed")
    finally:
        stream.close()
    return "; ".join(events)


def test_bad_input_to_the_relay_closes_that_stream_and_harms_no_other(world: World, uma: ApiLaptop) -> None:
    """Garbage, a frame longer than the relay takes, a stream left idle, a server that does not exist, and
    a datagram that is not WireGuard's: each stream is closed or refused, while uma's requests go on. A
    stream cannot aim datagrams anywhere: the relay sends only to the gateways of the server it names."""
    config = world.cluster.api.configuration
    headers = {"Authorization": f"Bearer {world.cluster.plane.token}"}  # the admin's
    pod = next(p["metadata"]["name"] for p in world.pods(RELAY_NAMESPACE) if p["status"].get("podIP"))
    target = Target(RELAY_NAMESPACE, pod, RELAY_PORT)
    hello = Hello(f"{CHART_NAMESPACE}/{API_SERVER}", "probe").encode()
    cases = {
        "garbage": (b"GET / HTTP/1.1\r\n\r\n", 5.0, b""),
        "oversized": (struct.pack(">H", 65535) + b"\1" * 100, 5.0, b""),
        "idle": (b"", HELLO_SECONDS + 5, b""),
        "no such server": (Hello("kube-system/none", "probe").encode(), 5.0, b""),
        "not WireGuard": (hello, 5.0, frame(b"\1\0\0\0" + b"x" * 10)),  # once welcomed
    }

    async def all_cases() -> dict[str, str]:
        found = await asyncio.gather(*(probe(config, headers, target, *case) for case in cases.values()))
        return dict(zip(cases, found, strict=True))

    with TrafficLoop(uma.laptop, HELLO_URL, max_time=1.0, pause=0.1) as loop:
        results = asyncio.run(all_cases())
    print(json.dumps(results))
    expected = {
        "garbage": "refused: a frame of 18245 bytes (1 to 4096 allowed); closed",  # "GE", read as a length
        "oversized": "refused: a frame of 65535 bytes (1 to 4096 allowed); closed",
        "idle": f"refused: no Hello within {HELLO_SECONDS:g} s; closed",
        "no such server": "refused: no VpnServer kube-system/none; closed",
    }
    assert {k: results[k] for k in expected} == expected, results
    welcomed, refused = results["not WireGuard"].split("; ", 1)
    assert welcomed.startswith("welcome: "), results
    assert refused == "refused: a 14-byte frame that is not a WireGuard message; closed", results
    assert loop.failures == 0, loop.outage


def test_the_developer_role_port_forwards_to_the_relay_and_nothing_else(world: World, developer: Path) -> None:
    kubectl = [str(world.tools / "kubectl"), "--kubeconfig", str(developer)]
    can = {
        ns: run(
            *kubectl, "auth", "can-i", "create", "pods", "--subresource=portforward", "-n", ns, check=False
        ).stdout.strip()
        for ns in (RELAY_NAMESPACE, CHART_NAMESPACE, PEER_NAMESPACE, "kube-system")
    }
    assert can == {RELAY_NAMESPACE: "yes", CHART_NAMESPACE: "no", PEER_NAMESPACE: "no", "kube-system": "no"}, can
    # And the rest of the developer's roles, both ways: peers and their Secrets in the team's namespace,
    # servers read where they are; no Secret of the servers' namespace, no server edited, no peer elsewhere.
    for verb, resource, ns, answer in [
        ("create", "vpnpeers.kvpn.dev", PEER_NAMESPACE, "yes"),
        ("get", "secrets", PEER_NAMESPACE, "yes"),
        ("list", "secrets", PEER_NAMESPACE, "no"),
        ("get", "vpnservers.kvpn.dev", CHART_NAMESPACE, "yes"),
        ("patch", "vpnservers.kvpn.dev", CHART_NAMESPACE, "no"),
        ("get", "secrets", CHART_NAMESPACE, "no"),
        ("create", "vpnpeers.kvpn.dev", CHART_NAMESPACE, "no"),
        ("create", "vpnpeers.kvpn.dev", "kube-system", "no"),
    ]:
        said = run(*kubectl, "auth", "can-i", verb, resource, "-n", ns, check=False).stdout.strip()
        assert said == answer, (verb, resource, ns, said)
    config = Configuration()
    config.host = world.cluster.plane.server
    config.ssl_ca_cert = str(world.cluster.plane.ca_file)
    token = yaml.safe_load(developer.read_text())["users"][0]["user"]["token"]
    headers = {"Authorization": f"Bearer {token}"}
    agent = world.component_pods("agent")[0]["metadata"]["name"]
    relay_pod = next(p["metadata"]["name"] for p in world.pods(RELAY_NAMESPACE) if p["status"].get("podIP"))

    async def attempts() -> tuple[str, str]:
        try:
            (await PortForward.open(config, headers, Target(CHART_NAMESPACE, agent, 10248))).close()
            refused = "opened"
        except PortForwardError as exc:
            refused = f"{exc.status} {exc}"
        # kubelet's healthz listens on the node's loopback: not in a relay pod's own network namespace.
        stream = await PortForward.open(config, headers, Target(RELAY_NAMESPACE, relay_pod, 10248))
        try:
            stream.send(b"GET /healthz HTTP/1.0\r\n\r\n")
            async with asyncio.timeout(10):
                answer = await stream.recv()
            return refused, f"answered: {answer[:60]!r}"
        except PortForwardError as exc:
            return refused, f"closed: {exc}"
        finally:
            stream.close()

    refused, loopback = asyncio.run(attempts())
    assert refused.startswith("403"), refused
    assert loopback.startswith("closed"), loopback


def test_a_developer_without_the_relay_role_is_told_the_permission_in_one_line(world: World, uma: ApiLaptop) -> None:
    kubeconfig = developer_kubeconfig(world, "vic-dev", relay=False)
    env = {**uma.env, "KUBECONFIG": str(kubeconfig), "HOME": str(world.run_dir / "home-vic")}
    joined = world.run_dir / "vic.conf"
    argv = [PLUGIN, "join", f"{CHART_NAMESPACE}/{API_SERVER}", "-n", PEER_NAMESPACE, "--name", "vic"]
    run(*argv, "--dns", "none", "-o", str(joined), "--timeout", "30", env=env)
    ns = uma.laptop.netns
    proc = run("ip", "netns", "exec", ns, PLUGIN, "up", str(joined), "--via", "api", env=env, check=False)
    said = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, proc.stdout, said)
    assert len(said.splitlines()) == 1, said
    assert RELAY_NAMESPACE in said, said
    assert "pods/portforward" in said, said
    assert "Traceback" not in proc.stdout + said


def test_a_gateway_cut_off_moves_the_stream_and_the_session(world: World, uma: ApiLaptop) -> None:
    """The node of uma's gateway loses its network (last: the node comes back, but slowly). Once its lease
    runs out the operator marks it not ready, the relay moves the stream to the other gateway and says
    so, and the plugin re-adds the server's peer: a new session there at once. Requests go to hello's pod
    on the surviving node. If uma's relay pod was on the cut node too, her stream breaks and is opened
    again to the other relay pod."""
    gateway = next(n for n in world.nodes if n.name == uma.health()["gateway"])
    survivor = next(n for n in world.nodes if n is not gateway)
    pod = next(p for p in world.hello_pods() if p["spec"]["nodeName"] == survivor.name)
    url = f"http://{pod['status']['podIP']}:{HELLO_PORT}/"
    moves = uma.health()["gateway_moves"]
    with TrafficLoop(uma.laptop, url, max_time=0.5, pause=0.05) as loop:
        time.sleep(1)
        with world.network_cut(gateway):
            wait_for("uma's stream on the survivor", lambda: uma.health().get("gateway") == survivor.name, timeout=40)
            wait_for("uma answered again", lambda: uma.laptop.curl(url, 0.5) is not None, timeout=20)
            time.sleep(2)
    summary = {"event": "gateway cut (via the API)", "failed": loop.failures, "longest_gap_s": loop.outage.longest_s}
    print(json.dumps(summary))
    assert uma.health()["gateway_moves"] == moves + 1, uma.health()
    # The lease's 10 s, the operator's and the relay's polls, a new session: the bound of issue 11's UDP cases.
    assert loop.outage.longest_s <= GATEWAY_CUT_WITHIN, summary
    wait_for(
        "both gateways serving again",
        lambda: all(g["ready"] for g in world.server(API_SERVER)["status"]["gateways"]),
        timeout=90,
    )
