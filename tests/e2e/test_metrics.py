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


def test_every_panel_returns_the_series_it_should(world: World, laptops: list[Laptop], prometheus: Prometheus) -> None:
    """With alice (HostPort server) and bob (NodePort server) sending requests for half a minute."""
    nodes = {n.name for n in world.nodes}
    peers = {(PEER_NAMESPACE, lap.name) for lap in laptops}
    loops = [TrafficLoop(lap, max_time=1.0, pause=0.1) for lap in laptops]
    for loop in loops:
        loop.__enter__()
    try:

        def flowing() -> bool:
            received = results(prometheus, "Traffic per peer")[0]
            return peers_of([s for s in received if value(s) > 0]) == peers

        wait_for("both peers' traffic in a rate", flowing, timeout=60)
        got = {title: results(prometheus, title) for title in panels()}
    finally:
        for loop in loops:
            loop.__exit__(None, None, None)

    assert [value(s) for s in got["Peers online"][0]] == [len(peers)]
    assert [value(s) for s in got["Peers served"][0]] == [len(peers)]
    assert [value(s) for s in got["Gateways reaching the API server"][0]] == [len(nodes)]
    assert [value(s) for s in got["Dataplane problems"][0]] == [0]

    (age,) = got["Handshake age per peer"]
    assert peers_of(age) == peers
    assert all(0 <= value(s) < 180 for s in age), age

    received, sent = got["Traffic per peer"]
    assert peers_of(received) == peers_of(sent) == peers
    assert all(value(s) > 0 for s in received), received
    assert all(value(s) < 0 for s in sent), sent  # drawn below the axis

    from_peers, to_peers = got["Traffic per gateway"]
    assert {s["metric"]["node"] for s in from_peers} == nodes  # every gateway serves every peer
    assert sum(value(s) for s in from_peers) > 0
    assert sum(value(s) for s in to_peers) < 0

    (p95,) = got["Sync duration (p95)"]
    assert {s["metric"]["node"] for s in p95} == nodes

    errors, problems = got["Sync errors and problems"]
    assert {s["metric"]["node"] for s in errors} == nodes
    assert all(value(s) == 0 for s in errors), errors
    assert problems == []

    (backends,) = got["WireGuard backend"]
    assert {(s["metric"]["node"], s["metric"]["backend"]) for s in backends} == {(n, "userspace") for n in nodes}
