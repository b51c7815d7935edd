"""Peer status reports: only on change, at most once per 15 s per peer, the freshest gateway wins and names itself."""

from __future__ import annotations

from typing import Any

import pytest

from kvpn_agent.metrics import Metrics, PeerStats
from kvpn_agent.status_report import StatusReporter, rfc3339, status_patch
from kvpn_core.kube import KubeError
from tests.unit.fakes import Clock, FakeKube

T = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def stats(peer: str = "alice", handshake: float | None = T, rx: int = 100, tx: int = 200) -> PeerStats:
    return PeerStats("vpn", "office", "team", peer, f"key-{peer}", handshake, rx, tx, "192.0.2.7:4000")


def test_a_patch_holds_only_the_agents_five_fields() -> None:
    current = {"address": "10.8.0.2", "conditions": [{"type": "Ready"}]}
    assert status_patch(current, stats(), "gw-a") == {
        "lastHandshake": "2023-11-14T22:13:20Z",
        "gateway": "gw-a",
        "rxBytes": 100,
        "txBytes": 200,
        "endpoint": "192.0.2.7:4000",
    }


def test_nothing_to_say_without_a_handshake_or_without_a_change() -> None:
    assert status_patch({}, stats(handshake=None), "gw-a") is None
    same = {
        "lastHandshake": rfc3339(T),
        "gateway": "gw-a",
        "rxBytes": 100,
        "txBytes": 200,
        "endpoint": "192.0.2.7:4000",
    }
    assert status_patch(same, stats(), "gw-a") is None


def test_another_gateways_fresher_handshake_wins() -> None:
    fresher = {
        "lastHandshake": rfc3339(T + 30),
        "gateway": "gw-b",
        "rxBytes": 5,
        "txBytes": 5,
        "endpoint": "198.51.100.1:1",
    }
    assert status_patch(fresher, stats(), "gw-a") is None
    older = {**fresher, "lastHandshake": rfc3339(T - 30)}
    assert status_patch(older, stats(), "gw-a") == {
        "lastHandshake": rfc3339(T),
        "gateway": "gw-a",  # the peer moved here: takeover decisions go by this field
        "rxBytes": 100,
        "txBytes": 200,
        "endpoint": "192.0.2.7:4000",
    }


def peer_path(name: str) -> str:
    return f"/apis/kvpn.dev/v1alpha1/namespaces/team/vpnpeers/{name}"


def add(kube: FakeKube, name: str, status: dict[str, Any] | None = None) -> None:
    kube.put(peer_path(name), {"status": status or {}})


@pytest.fixture
def kube() -> FakeKube:
    made = FakeKube()
    add(made, "alice")
    return made


def test_writes_are_conditional_rate_limited_and_only_on_change(kube: FakeKube) -> None:
    clock = Clock()
    reporter = StatusReporter(kube, node="gw-a", clock=clock)  # type: ignore[arg-type]
    read = kube.read(peer_path("alice"))
    assert read is not None
    assert reporter.report([stats()]) == 1
    path, patch = kube.patches[0]
    assert path.endswith("/vpnpeers/alice/status")
    version = read["metadata"]["resourceVersion"]
    assert patch["metadata"] == {"resourceVersion": version}  # a concurrent writer makes this a 409, not a loss
    written = kube.read(peer_path("alice"))
    assert written is not None
    assert written["status"]["gateway"] == "gw-a"

    assert reporter.report([stats()]) == 0  # nothing changed
    clock.now += 5
    assert reporter.report([stats(rx=150)]) == 0  # changed, but the last write was 5 s ago
    clock.now += 10
    assert reporter.report([stats(rx=150)]) == 1
    clock.now += 60
    assert reporter.report([stats(rx=150)]) == 0  # a quiet peer costs nothing


def test_a_conflict_is_retried_in_the_next_pass(kube: FakeKube) -> None:
    reporter = StatusReporter(kube, node="gw-a", clock=Clock())  # type: ignore[arg-type]
    kube.conflicts = 1
    assert reporter.report([stats()]) == 0
    assert reporter.report([stats()]) == 1


def test_many_peers_of_a_namespace_are_read_with_one_list(kube: FakeKube) -> None:
    for i in range(30):
        add(kube, f"p{i}")
    reporter = StatusReporter(kube, node="gw-a", clock=Clock())  # type: ignore[arg-type]
    assert reporter.report([stats(f"p{i}") for i in range(30)]) == 30
    assert len(kube.lists) == 1


def test_an_unreachable_api_server_is_raised_and_nothing_is_marked(kube: FakeKube) -> None:
    reporter = StatusReporter(kube, node="gw-a", clock=Clock())  # type: ignore[arg-type]
    kube.down = True
    with pytest.raises(KubeError):
        reporter.report([stats()])
    kube.down = False
    assert reporter.report([stats()]) == 1


def test_peer_series_carry_both_namespaces_the_server_and_the_peer() -> None:
    metrics = Metrics()
    metrics.peers.update([stats()])
    labels = {"server_namespace": "vpn", "server": "office", "peer_namespace": "team", "peer": "alice"}
    registry = metrics.registry
    assert registry.get_sample_value("kvpn_peer_last_handshake_seconds", labels) == T
    assert registry.get_sample_value("kvpn_peer_rx_bytes_total", labels) == 100
    assert registry.get_sample_value("kvpn_peer_tx_bytes_total", labels) == 200
    metrics.peers.update([])
    assert registry.get_sample_value("kvpn_peer_rx_bytes_total", labels) is None  # gone with the peer
