"""The agent's Dataplane condition: only problems are written, the rest of the status is left alone."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from kvpn_agent.condition_report import (
    DATAPLANE,
    ConditionReporter,
    ObjectRef,
    conditions_update,
    dataplane_problems,
)
from kvpn_agent.desired import PeerProblem
from kvpn_core.api import Kind
from kvpn_core.conditions import Finding, Reason
from kvpn_core.kube import KubeError, kvpn_path
from tests.unit.fakes import Clock, FakeKube

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
READY = {
    "type": "Ready",
    "status": "True",
    "reason": "Ready",
    "message": "ok",
    "lastTransitionTime": "2026-01-01T00:00:00Z",
}
PEER: ObjectRef = (Kind.VPN_PEER, "team", "alice")
SERVER: ObjectRef = (Kind.VPN_SERVER, "vpn", "office")


def problem(
    binding: str = "kvpn-office-10-8-0-2", peer: str = "alice", reason: Reason = Reason.INVALID_PUBLIC_KEY
) -> PeerProblem:
    return PeerProblem(binding=binding, peer_namespace="team", peer_name=peer, finding=Finding(reason, "bad key"))


def test_problems_land_on_their_peer_or_server_with_the_node_named() -> None:
    found = dataplane_problems(
        {
            ("vpn", "office"): (
                None,
                frozenset({problem(), problem("kvpn-office-x", peer="", reason=Reason.INVALID_BINDING)}),
            ),
            ("vpn", "lab"): (Finding(Reason.INVALID_SERVER_KEY, "the server's private key is unusable"), frozenset()),
        },
        "gw-1",
    )
    assert found == {
        PEER: Finding(Reason.INVALID_PUBLIC_KEY, "bad key (gateway node gw-1)"),
        (Kind.VPN_SERVER, "vpn", "lab"): Finding(
            Reason.INVALID_SERVER_KEY,
            "the server's private key is unusable (gateway node gw-1)",
        ),
    }  # a binding too broken to name its peer is only logged


def test_a_server_this_node_cannot_program_is_a_sync_failed_condition_naming_the_node() -> None:
    port = "UDP port 51820 is taken by another process on the node (errno 98)"
    found = dataplane_problems({}, "gw-1", {("vpn", "office"): port})
    assert found == {
        SERVER: Finding(Reason.SYNC_FAILED, f"this node cannot program the server: {port} (gateway node gw-1)")
    }
    # A server whose desired state is bad and which also fails: both said, the desired state first.
    both = dataplane_problems(
        {("vpn", "office"): (Finding(Reason.INVALID_SERVER_KEY, "bad key"), frozenset())},
        "gw-1",
        {("vpn", "office"): port},
    )
    assert both[SERVER].reason == "InvalidServerKey"
    assert both[SERVER].message.startswith("bad key (gateway node gw-1); this node cannot program the server: UDP port")


def test_a_server_the_kernel_refused_names_the_fallback_it_runs_on() -> None:
    why = "link creation refused: (95, 'Operation not supported')"
    found = dataplane_problems({}, "gw-1", None, {("vpn", "office"): why})
    assert found == {
        SERVER: Finding(
            Reason.KERNEL_WIREGUARD_FAILED,
            f"kernel WireGuard failed on this node ({why}): the server is served by the userspace backend"
            " (wireguard-go) instead (gateway node gw-1)",
        )
    }


def test_setting_keeps_every_other_condition_as_read() -> None:
    other = {"type": "Custom", "status": "Unknown", "reason": "X", "extra": "kept as is"}
    updated = conditions_update([READY, other], Finding(Reason.INVALID_PUBLIC_KEY, "bad key"), NOW)
    assert updated == [
        READY,
        other,
        {"type": DATAPLANE, "status": "False", "reason": "InvalidPublicKey", "message": "bad key",
         "lastTransitionTime": "2026-11-25T12:00:00Z"},
    ]  # fmt: skip
    assert conditions_update(updated, Finding(Reason.INVALID_PUBLIC_KEY, "bad key"), NOW) is None  # already says so


def test_a_new_reason_keeps_the_transition_time_and_removal_drops_only_ours() -> None:
    first = conditions_update([READY], Finding(Reason.INVALID_PUBLIC_KEY, "bad key"), NOW)
    assert first is not None
    later = conditions_update(first, Finding(Reason.ADDRESS_CONFLICT, "taken"), NOW + dt.timedelta(hours=1))
    assert later is not None
    assert later[1]["reason"] == "AddressConflict"
    assert later[1]["lastTransitionTime"] == "2026-11-25T12:00:00Z"  # still False since then
    assert conditions_update(later, None, NOW) == [READY]
    assert conditions_update([READY], None, NOW) is None  # nothing to remove


def add(kube: FakeKube, ref: ObjectRef, conditions: list[dict[str, Any]], server: str = "office") -> None:
    kube.put(
        kvpn_path(*ref),
        {
            "spec": {"serverRef": {"name": server, "namespace": "vpn"}},
            "status": {"address": "10.8.0.2", "conditions": conditions},
        },
    )


def stored(kube: FakeKube, ref: ObjectRef) -> dict[str, Any]:
    found = kube.read(kvpn_path(*ref))
    assert found is not None
    return found


def conditions_of(kube: FakeKube, ref: ObjectRef) -> list[dict[str, Any]]:
    return list(stored(kube, ref)["status"]["conditions"])


def other_writer(kube: FakeKube, ref: ObjectRef, conditions: list[dict[str, Any]]) -> None:
    kube.edit(kvpn_path(*ref, "status"), {"status": {"conditions": conditions}})


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    made = FakeKube()
    add(made, PEER, [READY])
    add(made, SERVER, [READY])
    yield made
    for _, patch in made.patches:  # nothing but the list the agent shares with the operator, at the version read
        assert set(patch) == {"metadata", "status"}
        assert set(patch["metadata"]) == {"resourceVersion"}
        assert set(patch["status"]) == {"conditions"}


def reporter(kube: FakeKube, clock: Clock) -> ConditionReporter:
    return ConditionReporter(kube, clock=clock, now=lambda: NOW)  # type: ignore[arg-type]


def test_a_problem_is_written_once_and_removed_when_it_goes(kube: FakeKube) -> None:
    clock = Clock()
    conditions = reporter(kube, clock)
    bad = {PEER: Finding(Reason.INVALID_PUBLIC_KEY, "bad key (gateway node gw-1)")}
    read = stored(kube, PEER)["metadata"]["resourceVersion"]
    assert conditions.report(bad) == 1
    path, patch = kube.patches[0]
    assert path.endswith("/namespaces/team/vpnpeers/alice/status")
    assert patch["metadata"] == {"resourceVersion": read}
    assert [c["type"] for c in conditions_of(kube, PEER)] == ["Ready", DATAPLANE]
    assert conditions_of(kube, PEER)[0] == READY

    gets = len(kube.gets)
    clock.now += 60
    assert conditions.report(bad) == 0
    assert len(kube.gets) == gets  # a standing problem costs nothing ...
    clock.now += 120
    assert conditions.report(bad) == 0
    assert len(kube.gets) == gets + 1  # ... but a read now and then

    assert conditions.report({}) == 1
    assert conditions_of(kube, PEER) == [READY]
    clock.now += 60
    assert conditions.report({}) == 0
    assert len(kube.patches) == 2


def test_at_most_one_write_per_object_per_interval(kube: FakeKube) -> None:
    clock = Clock()
    conditions = reporter(kube, clock)
    assert conditions.report({PEER: Finding(Reason.INVALID_PUBLIC_KEY, "a")}) == 1
    clock.now += 5
    assert conditions.report({}) == 0  # solved, but the last write was 5 s ago
    assert conditions.report({PEER: Finding(Reason.ADDRESS_CONFLICT, "b")}) == 0
    clock.now += 10
    assert conditions.report({PEER: Finding(Reason.ADDRESS_CONFLICT, "b")}) == 1
    assert conditions_of(kube, PEER)[1]["reason"] == "AddressConflict"


def test_a_concurrent_write_is_read_again_and_kept(kube: FakeKube) -> None:
    conditions = reporter(kube, Clock())
    # The operator writes Ready between the agent's read and its patch: 409, read again, keep its Ready.
    flipped = {**READY, "status": "False", "reason": "Disabled"}

    def race(path: str) -> None:
        if len(kube.gets) == 1:
            other_writer(kube, PEER, [flipped])

    kube.meanwhile = race
    assert conditions.report({PEER: Finding(Reason.INVALID_PUBLIC_KEY, "a")}) == 1
    assert [c["type"] for c in conditions_of(kube, PEER)] == ["Ready", DATAPLANE]
    assert conditions_of(kube, PEER)[0] == flipped


def test_a_condition_removed_by_someone_else_comes_back_at_the_next_recheck(kube: FakeKube) -> None:
    clock = Clock()
    conditions = reporter(kube, clock)
    bad = {PEER: Finding(Reason.INVALID_PUBLIC_KEY, "a")}
    conditions.report(bad)
    other_writer(kube, PEER, [READY])
    clock.now += 130
    assert conditions.report(bad) == 1
    assert conditions_of(kube, PEER)[1]["type"] == DATAPLANE


def test_server_conditions_and_a_stale_one_from_before_a_restart(kube: FakeKube) -> None:
    stale = {"type": DATAPLANE, "status": "False", "reason": "InvalidPublicKey", "message": "old",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip
    add(kube, (Kind.VPN_PEER, "team", "bob"), [READY, stale])
    add(kube, (Kind.VPN_PEER, "team", "carol"), [READY, stale], server="elsewhere")  # not served here
    add(kube, (Kind.VPN_SERVER, "vpn", "lab"), [READY, stale])
    conditions = reporter(kube, Clock())
    served = [stored(kube, SERVER), stored(kube, (Kind.VPN_SERVER, "vpn", "lab"))]
    assert conditions.report({SERVER: Finding(Reason.SERVER_KEY_MISSING, "no key yet")}, served) == 3
    assert conditions_of(kube, SERVER)[1]["reason"] == "ServerKeyMissing"
    assert conditions_of(kube, (Kind.VPN_SERVER, "vpn", "lab")) == [READY]
    assert conditions_of(kube, (Kind.VPN_PEER, "team", "bob")) == [READY]
    assert conditions_of(kube, (Kind.VPN_PEER, "team", "carol")) == [READY, stale]
    assert len(kube.lists) == 1
    conditions.report({SERVER: Finding(Reason.SERVER_KEY_MISSING, "no key yet")}, served)
    assert len(kube.lists) == 1  # the VpnPeers are swept once per start


def test_an_unreachable_api_server_is_raised_and_retried(kube: FakeKube) -> None:
    conditions = reporter(kube, Clock())
    kube.down = True
    with pytest.raises(KubeError):
        conditions.report({PEER: Finding(Reason.INVALID_PUBLIC_KEY, "a")})
    kube.down = False
    assert conditions.report({PEER: Finding(Reason.INVALID_PUBLIC_KEY, "a")}) == 1


def test_a_missing_object_is_not_an_error(kube: FakeKube) -> None:
    conditions = reporter(kube, Clock())
    assert conditions.report({(Kind.VPN_PEER, "team", "nobody"): Finding(Reason.INVALID_PUBLIC_KEY, "a")}) == 0


def test_another_gateways_kernel_fallback_is_left_to_that_gateway(kube: FakeKube) -> None:
    theirs = {"type": DATAPLANE, "status": "False", "reason": Reason.KERNEL_WIREGUARD_FAILED,
              "message": "kernel WireGuard failed on this node (x) (gateway node gw-2)",
              "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip
    add(kube, SERVER, [READY, theirs])
    healthy = ConditionReporter(kube, clock=Clock(), now=lambda: NOW, node="gw-1")  # type: ignore[arg-type]
    assert healthy.report({}, [stored(kube, SERVER)]) == 0
    assert conditions_of(kube, SERVER) == [READY, theirs]


def test_another_gateways_sync_failure_is_left_to_that_gateway(kube: FakeKube) -> None:
    """A SyncFailed condition is about one node: a healthy gateway of the same server leaves it."""
    theirs = {"type": DATAPLANE, "status": "False", "reason": Reason.SYNC_FAILED,
              "message": "port taken (gateway node gw-2)", "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip
    add(kube, SERVER, [READY, theirs])
    healthy = ConditionReporter(kube, clock=Clock(), now=lambda: NOW, node="gw-1")  # type: ignore[arg-type]
    assert healthy.report({}, [stored(kube, SERVER)]) == 0
    assert conditions_of(kube, SERVER) == [READY, theirs]
    # The node it names removes it once its problem is gone, even after a restart (nothing remembered).
    restarted = ConditionReporter(kube, clock=Clock(), now=lambda: NOW, node="gw-2")  # type: ignore[arg-type]
    assert restarted.report({}, [stored(kube, SERVER)]) == 1
    assert conditions_of(kube, SERVER) == [READY]
