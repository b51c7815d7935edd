"""Where the relay sends: the gateways read from the VpnServers' status, and the choice among them."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from typing import Any, cast

import pytest

from kvpn_core.api import API_VERSION, Kind
from kvpn_core.contract import GATEWAY_LEASE_SECONDS, LABEL_ROLE, LABEL_SERVER, ROLE_GATEWAY, gateway_lease_name
from kvpn_core.kube import Kube, KubeError, kvpn_path
from kvpn_relay.gateways import (
    LEASES_PATH,
    STALE_SECONDS,
    Gateways,
    ServerGateways,
    choose,
    expired_gateways,
    read_server,
    read_servers,
)
from tests.unit.fakes import Clock, FakeKube, random_key

Obj = dict[str, Any]


def vpn_server(name: str, gateways: list[Obj], listen_port: int | None = None, namespace: str = "team") -> Obj:
    spec: Obj = {"addressPool": ["10.8.0.0/24"]}
    if listen_port is not None:
        spec["listenPort"] = listen_port
    return {
        "apiVersion": API_VERSION,
        "kind": "VpnServer",
        "metadata": {"namespace": namespace, "name": name},
        "spec": spec,
        "status": {"gateways": gateways},
    }


def gateway(node: str, address: str | None, ready: bool = True) -> Obj:
    entry: Obj = {"node": node, "ready": ready, "reason": "Serving" if ready else "LeaseExpired"}
    if address is not None:
        entry["address"] = address
    return entry


def test_a_server_is_sent_to_its_ready_gateways_with_an_address_and_heard_from_all_it_lists() -> None:
    server = read_server(
        vpn_server(
            "office",
            [
                gateway("node-c", "10.0.0.3"),
                gateway("node-a", "10.0.0.1"),
                gateway("node-b", "10.0.0.2", ready=False),  # taking over, perhaps: heard, not sent to
                gateway("node-d", None),  # no address (an operator before the field): unusable
                gateway("node-e", "node-e.example"),  # a name is no address: the relay resolves nothing
                {"node": "node-f", "address": "10.0.0.6"},  # not a GatewayStatus
                gateway("node-g", "fd00:0::7"),
            ],
            listen_port=51821,
        )
    )
    assert server == ServerGateways(
        51821,
        (("node-a", "10.0.0.1"), ("node-c", "10.0.0.3"), ("node-g", "fd00::7")),
        frozenset({("10.0.0.1", 51821), ("10.0.0.2", 51821), ("10.0.0.3", 51821), ("fd00::7", 51821)}),
    )


def test_servers_are_named_as_a_hello_names_them_with_the_default_port_and_with_no_gateways() -> None:
    servers = read_servers(
        [
            vpn_server("office", [gateway("node-a", "10.0.0.1")]),
            vpn_server("lab", [], namespace="research"),
            {**vpn_server("new", []), "status": None},
        ]
    )
    assert servers == {
        "team/office": ServerGateways(51820, (("node-a", "10.0.0.1"),), frozenset({("10.0.0.1", 51820)})),
        "research/lab": ServerGateways(51820, (), frozenset()),
        "team/new": ServerGateways(51820, (), frozenset()),
    }


def test_pick_keeps_to_the_family_of_a_streams_socket() -> None:
    server = read_server(vpn_server("office", [gateway("node-a", "10.0.0.1"), gateway("node-b", "fd00::2")]))
    assert server.pick("key", "node-b", version=4) == ("node-a", "10.0.0.1")
    assert server.pick("key", "node-b") == ("node-b", "fd00::2")
    assert read_server(vpn_server("office", [gateway("node-b", "fd00::2")])).pick("key", "", version=4) is None


NODES = ["node-a", "node-b", "node-c", "node-d"]


def test_choose_keeps_the_preferred_gateway_while_it_is_ready() -> None:
    assert choose(NODES, "key", "node-c") == "node-c"
    assert choose(["node-a", "node-b"], "key", "node-c") in {"node-a", "node-b"}
    assert choose([], "key", "node-c") is None


def test_choose_is_the_same_on_every_relay_pod_whatever_the_order() -> None:
    for _ in range(50):
        key = random_key()
        assert choose(NODES, key, "") == choose(list(reversed(NODES)), key, "") == choose(set(NODES), key, "gone")


def test_choose_spreads_laptops_and_a_gateway_that_goes_moves_only_its_own() -> None:
    keys = [random_key() for _ in range(2000)]
    before = {key: choose(NODES, key, "") for key in keys}
    shares = Counter(before.values())
    assert set(shares) == set(NODES)
    assert all(0.18 < count / len(keys) < 0.32 for count in shares.values()), shares
    after = {key: choose(NODES[1:], key, "") for key in keys}
    assert {key for key in keys if after[key] != before[key]} == {key for key in keys if before[key] == "node-a"}


def test_the_snapshot_is_ready_after_a_list_and_stale_when_lists_stop_succeeding(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kube, clock = FakeKube(), Clock()
    kube.put(kvpn_path(Kind.VPN_SERVER, "team", "office"), vpn_server("office", [gateway("a", "10.0.0.1")]))
    source = Gateways(cast(Kube, kube), clock=clock)
    assert (source.listed, source.ready, dict(source.snapshot)) == (False, False, {})
    source.poll()
    assert (source.listed, source.ready) == (True, True)
    assert source.snapshot["team/office"].ready == (("a", "10.0.0.1"),)
    # Cluster-wide, from the API server's watch cache.
    assert kube.lists == [
        (f"/apis/{API_VERSION}/vpnservers", {"label_selector": None, "cached": True, "limit": None}),
        (LEASES_PATH, {"label_selector": "kvpn.dev/role=gateway", "cached": True, "limit": None}),
    ]

    kube.down = True
    with caplog.at_level(logging.INFO, logger="kvpn_relay"):
        for _ in range(4):
            clock.now += 7
            source.poll()
        assert source.ready  # 28 s
        clock.now += STALE_SECONDS - 28
        source.poll()
    # The gateways last listed stay; the outage is one line, and past STALE_SECONDS the relay is unhealthy.
    assert source.snapshot["team/office"].ready == (("a", "10.0.0.1"),)
    assert [r.getMessage() for r in caplog.records] == [
        "listing the VpnServers failed; streams keep the gateways last listed, retrying"
    ]
    assert (source.listed, source.ready) == (True, False)

    kube.down = False
    kube.put(kvpn_path(Kind.VPN_SERVER, "team", "lab"), vpn_server("lab", []))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvpn_relay"):
        source.poll()
    assert source.ready
    assert sorted(source.snapshot) == ["team/lab", "team/office"]
    assert [r.getMessage() for r in caplog.records] == ["listed the VpnServers"]


def test_the_thread_lists_every_poll_until_stopped() -> None:
    kube = FakeKube()
    source = Gateways(cast(Kube, kube), poll_seconds=0.01).start()
    try:
        deadline = time.monotonic() + 2
        while len(kube.lists) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        source.stop()
    assert len(kube.lists) >= 3
    assert source.ready


def lease(namespace: str, server: str, node: str, renewed: dt.datetime) -> Obj:
    return {
        "metadata": {
            "namespace": namespace,
            "name": gateway_lease_name(server, node),
            "labels": {LABEL_SERVER: server, LABEL_ROLE: ROLE_GATEWAY},
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": GATEWAY_LEASE_SECONDS,
            "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        },
    }


def test_a_gateway_whose_lease_ran_out_is_not_sent_to_whatever_the_status_still_says() -> None:
    """The operator that would mark it not ready may have been on the node that went silent."""
    now = dt.datetime.now(dt.UTC)
    leases = [
        lease("team", "office", "node-a", now - dt.timedelta(seconds=GATEWAY_LEASE_SECONDS + 1)),
        lease("team", "office", "node-b", now),
        lease("lab", "office", "node-b", now - dt.timedelta(seconds=GATEWAY_LEASE_SECONDS + 1)),  # another server
    ]
    expired = expired_gateways(leases, now)
    assert expired == {("team/office", "node-a"), ("lab/office", "node-b")}
    server = read_server(vpn_server("office", [gateway("node-a", "10.0.0.1"), gateway("node-b", "10.0.0.2")]), expired)
    assert server.ready == (("node-b", "10.0.0.2"),)
    assert ("10.0.0.1", 51820) in server.known  # still heard: it may come back with its sessions


def test_leases_that_cannot_be_read_leave_the_status_to_judge(caplog: pytest.LogCaptureFixture) -> None:
    kube = FakeKube(errors=lambda path: KubeError(403, "forbidden") if "leases" in path else None)
    kube.put(kvpn_path(Kind.VPN_SERVER, "team", "office"), vpn_server("office", [gateway("a", "10.0.0.1")]))
    source = Gateways(cast(Kube, kube))
    with caplog.at_level(logging.INFO, logger="kvpn_relay"):
        source.poll()
        source.poll()
    assert source.snapshot["team/office"].ready == (("a", "10.0.0.1"),)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["listing the gateway leases failed; judging gateways by status"]
