"""End to end: the chart's Grafana dashboard, its every query run against a real Prometheus (Debian's) that
scrapes the agents on the real-node cluster the way the chart's PodMonitor says, while two laptops send
traffic. Each panel must return the series it should: one per connected peer, per gateway node, per agent.

The Prometheus Operator, which would turn the PodMonitor into a scrape job, and Prometheus' Kubernetes
discovery, which Debian's build leaves out, are the stand-in (harness/prometheus.py `scrape_job`: the
agent pods the PodMonitor selects, labelled as its relabelings say). Grafana is not run: its variables
are substituted the way it does ("All" is `.*`, `$__rate_interval` a window over several scrapes).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.chart import CHART
from harness.kvpn import wait_for
from harness.prometheus import Prometheus, scrape_job
from harness.world import CHART_NAMESPACE, NODEPORT_SERVER, PEER_NAMESPACE, RELEASE, Laptop, TrafficLoop, World
from tests.e2e.conftest import started_world

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.apiserver]

DASHBOARD = Path(CHART) / "dashboards" / "kvpn.json"
SCRAPE = "2s"
RATE_WINDOW = "20s"  # ten scrapes
Series = list[dict[str, Any]]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with started_world() as made:
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
