"""End to end on a dual-stack real-node cluster (Kubernetes 1.20's IPv6DualStack: pods, Services and the node
network have IPv6 addresses too; kube-proxy programs ip6tables), the one cluster start serving two themes.

IPv6 through the tunnel: a dual-stack server's laptops get an IPv6 tunnel address and the IPv6 pod and
Service networks as routes, discovered; they reach an IPv6 pod address on another node and hello's IPv6
ClusterIP (kube-proxy's ip6tables DNAT of forwarded traffic), and the IPv6 half of a peer's
allowedDestinations is enforced at the gateway.

The chart's Grafana dashboard, its every query run against a real Prometheus (Debian's) that
scrapes the agents on the real-node cluster the way the chart's PodMonitor says, while two laptops send
traffic. Each panel must return the series it should: one per connected peer, per gateway node, per agent.

The Prometheus Operator, which would turn the PodMonitor into a scrape job, and Prometheus' Kubernetes
discovery, which Debian's build leaves out, are the stand-in (harness/prometheus.py `scrape_job`: the
agent pods the PodMonitor selects, labelled as its relabelings say). Grafana is not run: its variables
are substituted the way it does ("All" is `.*`, `$__rate_interval` a window over several scrapes).
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.chart import CHART
from harness.cluster import in_ns
from harness.controlplane import SERVICE_CIDR, SERVICE_CIDR6
from harness.kvpn import wait_for
from harness.prometheus import Prometheus, scrape_job
from harness.world import (
    CHART_NAMESPACE,
    ECHO_PORT,
    HELLO_PORT,
    HELLO_SERVICE_PORT,
    NODEPORT_SERVER,
    PEER_NAMESPACE,
    POOLS6,
    RELEASE,
    SERVER,
    Laptop,
    TrafficLoop,
    World,
)
from tests.e2e.conftest import started_world

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.apiserver]

DASHBOARD = Path(CHART) / "dashboards" / "kvpn.json"
SCRAPE = "2s"
RATE_WINDOW = "20s"  # ten scrapes
Series = list[dict[str, Any]]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with started_world(dual_stack=True) as made:
        yield made


@pytest.fixture(scope="module")
def laptops(world: World) -> list[Laptop]:
    return [world.add_laptop("alice"), world.add_laptop("bob", server=NODEPORT_SERVER)]


def rendered(world: World, *values: str) -> list[dict[str, Any]]:
    """The chart's monitoring objects, as `helm template` renders them for the world's release."""
    out = world.helm(
        "template", RELEASE, str(CHART), "--namespace", CHART_NAMESPACE, "-s", "templates/monitoring.yaml",
        *(a for v in values for a in ("--set", v)),
    )  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def prometheus(world: World) -> Iterator[Prometheus]:
    (pod_monitor,) = rendered(world, "monitoring.podMonitor.enabled=true")
    assert pod_monitor["kind"] == "PodMonitor"
    job = scrape_job(pod_monitor, world.pods(), SCRAPE)
    with Prometheus(world.run_dir / "prometheus", [job], interval=SCRAPE) as prom:
        wait_for("every agent scraped", lambda: prom.targets_up() == len(world.nodes), timeout=60)
        yield prom


def panels() -> dict[str, dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {p["title"]: p for p in dashboard["panels"]}


def grafana(expr: str) -> str:
    """The query as Grafana sends it with every variable on "All"."""
    for variable in ("$server_namespace", "$server"):
        expr = expr.replace(variable, ".*")
    return expr.replace("$__rate_interval", RATE_WINDOW)


def results(prom: Prometheus, title: str) -> list[Series]:
    return [prom.query(grafana(t["expr"])) for t in panels()[title]["targets"]]


def value(series: dict[str, Any]) -> float:
    return float(series["value"][1])


def peers_of(found: Series) -> set[tuple[str, str]]:
    return {(s["metric"]["peer_namespace"], s["metric"]["peer"]) for s in found}


def test_the_dashboard_ships_in_the_chart_as_grafanas_sidecar_finds_it(world: World) -> None:
    (config_map,) = rendered(world, "monitoring.dashboard.enabled=true")
    assert config_map["kind"] == "ConfigMap"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["kvpn.json"]) == json.loads(DASHBOARD.read_text())
    for title, panel in panels().items():
        assert panel["targets"], title
        assert all(t["expr"] for t in panel["targets"]), title


def mismatches(got: dict[str, list[Series]], nodes: set[str], peers: set[tuple[str, str]]) -> list[str]:
    """What the panels' results say that they should not, given the gateway nodes and the peers sending
    traffic; empty when every panel shows what it should."""
    wrong: list[str] = []

    def expect(title: str, ok: bool, found: object) -> None:
        if not ok:
            wrong.append(f"{title}: {found}")

    for title, want in (
        ("Peers online", len(peers)),
        ("Peers served", len(peers)),
        ("Gateways reaching the API server", len(nodes)),
        ("Dataplane problems", 0),
    ):
        values = [value(s) for s in got[title][0]]
        expect(title, values == [want], values)
    (age,) = got["Handshake age per peer"]
    expect("Handshake age per peer", peers_of(age) == peers and all(0 <= value(s) < 180 for s in age), age)
    received, sent = got["Traffic per peer"]
    expect("Traffic per peer (from)", peers_of(received) == peers and all(value(s) > 0 for s in received), received)
    expect("Traffic per peer (to)", peers_of(sent) == peers and all(value(s) < 0 for s in sent), sent)  # below the axis
    from_peers, to_peers = got["Traffic per gateway"]
    # By node: the gateways that carry the traffic (a NodePort may hand a laptop to either), none other.
    carrying = {s["metric"]["node"] for s in from_peers if value(s) > 0}
    expect("Traffic per gateway (from)", bool(carrying) and carrying <= nodes, from_peers)
    answering = {s["metric"]["node"] for s in to_peers if value(s) < 0}
    expect("Traffic per gateway (to)", bool(answering) and answering <= nodes, to_peers)
    (p95,) = got["Sync duration (p95)"]
    expect("Sync duration (p95)", {s["metric"]["node"] for s in p95} == nodes, p95)
    errors, problems = got["Sync errors and problems"]
    expect("Sync errors", {s["metric"]["node"] for s in errors} == nodes and all(value(s) == 0 for s in errors), errors)
    expect("Problems", problems == [], problems)
    (backends,) = got["WireGuard backend"]
    pairs = {(s["metric"]["node"], s["metric"]["backend"]) for s in backends}
    expect("WireGuard backend", pairs == {(n, "userspace") for n in nodes}, pairs)
    return wrong


def test_every_panel_returns_the_series_it_should(world: World, laptops: list[Laptop], prometheus: Prometheus) -> None:
    """With alice (HostPort server) and bob (NodePort server) sending requests. A series shows once its
    target has been scraped a few times since the value came to be: the panels are read until each says
    what it should, for at most a minute."""
    nodes = {n.name for n in world.nodes}
    peers = {(PEER_NAMESPACE, lap.name) for lap in laptops}
    loops = [TrafficLoop(lap, max_time=1.0, pause=0.1) for lap in laptops]
    for loop in loops:
        loop.__enter__()
    last: list[str] = []
    try:

        def settled() -> bool:
            nonlocal last
            last = mismatches({title: results(prometheus, title) for title in panels()}, nodes, peers)
            return not last

        deadline = time.monotonic() + 60
        while not settled() and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        for loop in loops:
            loop.__exit__(None, None, None)
    assert last == [], "\n".join(last)


# --- IPv6 through the tunnel (after the dashboard's tests: their series count these laptops only) ---------


def ipv6(addresses: list[str]) -> str:
    found = [a for a in addresses if ipaddress.ip_address(a).version == 6]
    assert len(found) == 1, addresses
    return found[0]


def hello_ipv6_cluster_ip(world: World) -> str:
    return ipv6(list(world.core.read_namespaced_service("hello", "default").spec.cluster_ips))


def hello_pod_ipv6(world: World, node: str) -> str:
    pod = next(p for p in world.hello_pods() if p["spec"]["nodeName"] == node)
    return ipv6([entry["ip"] for entry in pod["status"]["podIPs"]])


def hello(laptop: Laptop, address: str, port: int = HELLO_SERVICE_PORT, max_time: float = 3) -> str | None:
    return laptop.curl(f"http://[{address}]:{port}/", max_time)


def test_a_dual_stack_server_discovers_both_families_and_its_laptops_get_an_ipv6_address(
    world: World, laptops: list[Laptop]
) -> None:
    """The Service networks (the API server's refusals of a probe per family) and the nodes' pod CIDRs of
    both families become the routes; each laptop's tunnel has an IPv6 address from the server's pool."""
    for server in (SERVER, NODEPORT_SERVER):
        status = world.server(server)["status"]
        routes = [ipaddress.ip_network(r) for r in status["routes"]]
        networks = [SERVICE_CIDR, SERVICE_CIDR6, *(c for n in world.nodes for c in n.pod_cidrs)]
        wanted = [ipaddress.ip_network(c) for c in networks]
        uncovered = [w for w in wanted if not any(w.version == r.version and w.subnet_of(r) for r in routes)]  # type: ignore[arg-type]
        assert not uncovered, status["routes"]  # (the nodes' pod CIDRs merged)
        assert ipaddress.ip_address(ipv6(status["addresses"])) in ipaddress.ip_network(POOLS6[server]), status
    for laptop in laptops:
        shown = in_ns(laptop.netns, "ip", "-6", "-o", "addr", "show", "dev", laptop.interface).stdout
        pool = ipaddress.ip_network(POOLS6[laptop.server])
        assert any(ipaddress.ip_interface(f.split()[3]).ip in pool for f in shown.splitlines()), shown


def test_a_laptop_reaches_an_ipv6_pod_on_another_node_and_an_ipv6_cluster_ip(
    world: World, laptops: list[Laptop]
) -> None:
    """Over HostPort (alice) and NodePort (bob): hello's pod on the node that is not the laptop's gateway
    by its IPv6 address, and hello's IPv6 ClusterIP, which only kube-proxy's ip6tables rules translate."""
    cluster_ip = hello_ipv6_cluster_ip(world)
    for laptop in laptops:
        gateway = world.node_of_endpoint(laptop)
        other = next(n for n in world.nodes if n is not gateway)
        body = hello(laptop, hello_pod_ipv6(world, other.name), HELLO_PORT)
        assert body is not None, laptop.name
        assert f"on {other.name}" in body, (laptop.name, body)
        body = wait_for(f"[{cluster_ip}] from {laptop.name}", lambda lap=laptop: hello(lap, cluster_ip, max_time=2))  # type: ignore[misc]
        assert body.startswith("hello from pod"), body


def test_the_ipv6_half_of_allowed_destinations_is_enforced(world: World, laptops: list[Laptop]) -> None:
    """Carol may reach hello's IPv6 ClusterIP on TCP 80 and nothing else of IPv6: not the pod's IPv6
    address, not the ClusterIP's echo port. Alice, unrestricted, reaches both meanwhile."""
    alice = laptops[0]
    cluster_ip = hello_ipv6_cluster_ip(world)
    carol = world.add_laptop(
        "carol", allowedDestinations=[{"cidr": f"{cluster_ip}/128", "protocol": "TCP", "ports": [{"port": 80}]}]
    )
    body = wait_for(f"[{cluster_ip}] from carol", lambda: hello(carol, cluster_ip, max_time=2))
    assert body.startswith("hello from pod"), body
    pod_ip = hello_pod_ipv6(world, world.nodes[0].name)
    assert hello(carol, pod_ip, HELLO_PORT, max_time=2) is None
    assert hello(alice, pod_ip, HELLO_PORT) is not None
    echo = in_ns(
        carol.netns, "curl", "-s", "--max-time", "2", f"telnet://[{cluster_ip}]:{ECHO_PORT}", check=False, timeout=10
    )
    assert echo.returncode == 28, echo  # timed out: dropped at the gateway, where a refusal would be 7
