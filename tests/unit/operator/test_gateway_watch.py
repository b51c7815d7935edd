"""The gateway watch: a lease that runs out, flips or goes nudges its server, within one round."""

from __future__ import annotations

import datetime as dt

from kvpn_operator.gateway_watch import GatewayWatch, scope
from kvpn_operator.memory import ANNOTATION_NUDGE
from tests.unit.fakes import FakeStorage, a_gateway

T0 = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)


def nudge_of(storage: FakeStorage, namespace: str, name: str) -> str | None:
    server = storage.read("vpnservers", namespace, name)
    assert server is not None
    return (server["metadata"].get("annotations") or {}).get(ANNOTATION_NUDGE)


def world() -> tuple[FakeStorage, list[dt.datetime]]:
    storage = FakeStorage()
    for namespace in ("vpn", "elsewhere"):
        storage.put("vpnservers", {"metadata": {"name": "office", "namespace": namespace}, "spec": {}})
        a_gateway(storage, namespace, "office", "node-a", renewed=T0)
    return storage, [T0]


def test_the_first_round_learns_and_a_lease_running_out_nudges_its_server_only() -> None:
    storage, clock = world()
    watch = GatewayWatch(storage, scope(None), now=lambda: clock[0])
    assert watch.check() == []
    assert watch.check() == []  # nothing changed
    clock[0] = T0 + dt.timedelta(seconds=10)  # the leases' end
    assert watch.check() == [("elsewhere", "office"), ("vpn", "office")]
    assert nudge_of(storage, "vpn", "office")
    assert watch.check() == []


def test_a_flipped_verdict_and_a_deleted_lease_nudge_too() -> None:
    storage, clock = world()
    watch = GatewayWatch(storage, scope(["vpn"]), now=lambda: clock[0])
    watch.check()
    a_gateway(storage, "vpn", "office", "node-a", renewed=T0, ready=False, message="sync failed")
    assert watch.check() == [("vpn", "office")]
    storage.objects = {k: v for k, v in storage.objects.items() if k[0] != "leases"}
    assert watch.check() == [("vpn", "office")]  # "elsewhere" is out of the operator's scope


def test_scope_takes_globs_as_kopf_does() -> None:
    in_scope = scope(["team-*", "vpn"])
    assert [n for n in ("team-a", "vpn", "vpn2", "other") if in_scope(n)] == ["team-a", "vpn"]
