"""A node's gateway leases: what a lease says, created then renewed in one patch, deleted when no longer served."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re

import pytest

from kvpn_agent.gateway_lease import GatewayLeases, build_gateway_lease, handover_seconds, lease_path
from kvpn_core.contract import (
    ANNOTATION_GATEWAY,
    GATEWAY_HANDOVER_SECONDS,
    GATEWAY_LEASE_SECONDS,
    GATEWAY_REPLACEMENT_SECONDS,
    GatewayReport,
    gateway_lease_name,
    gateway_selector,
)
from kvpn_core.kube import KubeError, core_path
from tests.unit.fakes import FakeKube

NS, SERVER, NODE, UID = "team", "office", "gw-1", "server-uid-1"
KEY = (NS, SERVER)
PATH = lease_path(NS, gateway_lease_name(SERVER, NODE))
READY = GatewayReport(ready=True, backend="kernel")
T0 = dt.datetime(2026, 12, 1, 16, 40, 0, 123456, tzinfo=dt.UTC)


class Now:
    def __init__(self) -> None:
        self.at = T0

    def __call__(self) -> dt.datetime:
        return self.at


def leases(kube: FakeKube, now: Now | None = None) -> GatewayLeases:
    return GatewayLeases(kube, NODE, now=now or Now())  # type: ignore[arg-type]


def report_of(lease: dict[str, object]) -> GatewayReport:
    return GatewayReport.model_validate_json(lease["metadata"]["annotations"][ANNOTATION_GATEWAY])  # type: ignore[index]


def test_the_lease_names_its_node_and_server_is_owned_by_the_server_and_carries_the_report() -> None:
    report = GatewayReport(ready=False, message="sync failed: nft refused", backend="userspace")
    lease = build_gateway_lease(NS, SERVER, UID, NODE, report, duration=10, now=T0)

    assert lease["apiVersion"] == "coordination.k8s.io/v1"
    assert lease["kind"] == "Lease"
    meta = lease["metadata"]
    assert (meta["namespace"], meta["name"]) == (NS, f"kvpn-{SERVER}.{NODE}")
    assert meta["labels"] == {
        "app.kubernetes.io/managed-by": "kvpn",
        "kvpn.dev/server": SERVER,
        "kvpn.dev/role": "gateway",
    }
    # The operator finds it by the contract's selector.
    assert all(meta["labels"][k] == v for k, _, v in (t.partition("=") for t in gateway_selector(SERVER).split(",")))
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kvpn.dev/v1alpha1",
            "kind": "VpnServer",
            "name": SERVER,
            "uid": UID,
            "controller": False,
            "blockOwnerDeletion": False,
        }
    ]
    annotation = meta["annotations"][ANNOTATION_GATEWAY]
    assert json.loads(annotation) == {"ready": False, "message": "sync failed: nft refused", "backend": "userspace"}
    assert " " not in annotation.replace("sync failed: nft refused", "")  # compact
    assert lease["spec"] == {
        "holderIdentity": NODE,
        "leaseDurationSeconds": 10,
        "acquireTime": "2026-12-01T16:40:00.123456Z",
        "renewTime": "2026-12-01T16:40:00.123456Z",
    }


def test_micro_time_is_utc_with_six_digits_whatever_the_clocks_zone() -> None:
    lease = build_gateway_lease(
        NS, SERVER, UID, NODE, READY, duration=10, now=T0.astimezone(dt.timezone(dt.timedelta(hours=2)))
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", lease["spec"]["renewTime"])
    assert lease["spec"]["renewTime"] == "2026-12-01T16:40:00.123456Z"


def test_a_lease_is_created_once_then_renewed_with_one_small_patch() -> None:
    kube, now = FakeKube(), Now()
    gateway = leases(kube, now)
    gateway.renew({KEY: (UID, READY)})
    assert [p for p, _ in kube.creates] == [lease_path(NS)]
    created = kube.read(PATH)
    assert created is not None
    assert report_of(created) == READY
    assert created["spec"]["leaseDurationSeconds"] == GATEWAY_LEASE_SECONDS

    now.at = T0 + dt.timedelta(seconds=2)
    failing = GatewayReport(ready=False, message="wireguard-go supervisor unreachable: gone", backend="userspace")
    gateway.renew({KEY: (UID, failing)})
    assert len(kube.creates) == 1
    ((path, patch),) = kube.patches
    assert path == PATH
    assert set(patch["spec"]) == {"holderIdentity", "leaseDurationSeconds", "renewTime"}  # acquireTime stays
    renewed = kube.read(PATH)
    assert renewed is not None
    assert renewed["spec"]["renewTime"] == "2026-12-01T16:40:02.123456Z"
    assert renewed["spec"]["acquireTime"] == "2026-12-01T16:40:00.123456Z"
    assert report_of(renewed) == failing
    assert gateway.written() == {KEY: failing}


def test_a_lease_left_by_the_previous_agent_is_taken_over() -> None:
    kube = FakeKube()
    previous = build_gateway_lease(
        NS, SERVER, "an-older-server", NODE, READY, duration=GATEWAY_HANDOVER_SECONDS, now=T0
    )
    kube.put(PATH, previous)
    leases(kube).renew({KEY: (UID, READY)})  # the create is a 409: patched instead
    assert len(kube.creates) == 1
    lease = kube.read(PATH)
    assert lease is not None
    assert lease["spec"]["leaseDurationSeconds"] == GATEWAY_LEASE_SECONDS
    assert [o["uid"] for o in lease["metadata"]["ownerReferences"]] == [UID]


def test_a_lease_deleted_by_someone_else_is_made_again() -> None:
    kube = FakeKube()
    gateway = leases(kube)
    gateway.renew({KEY: (UID, READY)})
    del kube.objects[PATH]
    gateway.renew({KEY: (UID, READY)})
    assert kube.read(PATH) is not None
    assert len(kube.creates) == 2


def test_the_lease_of_a_server_no_longer_served_is_deleted() -> None:
    kube = FakeKube()
    gateway = leases(kube)
    other = (NS, "lab")
    gateway.renew({KEY: (UID, READY), other: ("uid-lab", READY)})
    gateway.renew({KEY: (UID, READY)})
    assert kube.deletes == [lease_path(NS, gateway_lease_name("lab", NODE))]
    assert kube.read(lease_path(NS, gateway_lease_name("lab", NODE))) is None
    assert kube.read(PATH) is not None

    del kube.objects[PATH]  # already gone (the server's deletion took it): fine
    gateway.renew({})
    assert gateway.written() == {}
    gateway.renew({})
    assert len(kube.deletes) == 2  # forgotten once deleted


def test_handover_renews_for_a_minute_as_it_was_and_then_writes_nothing() -> None:
    kube = FakeKube()
    gateway = leases(kube)
    failing = GatewayReport(ready=False, message="sync failed: x", backend="kernel")
    gateway.renew({KEY: (UID, READY), (NS, "lab"): ("uid-lab", failing)})
    gateway.handover()
    for name, ready in ((SERVER, True), ("lab", False)):
        lease = kube.read(lease_path(NS, gateway_lease_name(name, NODE)))
        assert lease is not None
        assert lease["spec"]["leaseDurationSeconds"] == GATEWAY_HANDOVER_SECONDS
        assert report_of(lease) == GatewayReport(
            ready=ready, message="agent stopping; the dataplane stays", backend="kernel"
        )
    writes = len(kube.patches) + len(kube.creates) + len(kube.deletes)
    gateway.renew({})  # the lease thread, late: the handover stands
    assert len(kube.patches) + len(kube.creates) + len(kube.deletes) == writes


def test_a_pod_being_deleted_hands_over_for_its_replacement_and_any_other_stop_for_a_minute() -> None:
    """A DaemonSet's replacement comes only once the kubelet has confirmed the deletion: a minute was
    measured not to be enough. A stop of a pod that stays (its container restarted, the node shutting
    down) keeps the minute, and so does one whose pod cannot be read."""
    kube = FakeKube()
    pod = core_path("pods", "kvpn-system", "kvpn-agent-x1")
    kube.put(pod, {"metadata": {"namespace": "kvpn-system", "name": "kvpn-agent-x1"}})
    assert handover_seconds(kube, "kvpn-system", "kvpn-agent-x1") == (GATEWAY_HANDOVER_SECONDS, "pod not deleted")  # type: ignore[arg-type]

    kube.objects[pod]["metadata"]["deletionTimestamp"] = "2026-12-02T05:20:11Z"
    seconds, why = handover_seconds(kube, "kvpn-system", "kvpn-agent-x1")  # type: ignore[arg-type]
    assert seconds == GATEWAY_REPLACEMENT_SECONDS > 2 * GATEWAY_HANDOVER_SECONDS
    assert "replacement" in why

    assert handover_seconds(kube, "kvpn-system", "kvpn-agent-gone")[0] == GATEWAY_HANDOVER_SECONDS  # type: ignore[arg-type]
    assert handover_seconds(kube, "", "")[0] == GATEWAY_HANDOVER_SECONDS  # type: ignore[arg-type]  # not run as a pod
    assert handover_seconds(None, "kvpn-system", "kvpn-agent-x1")[0] == GATEWAY_HANDOVER_SECONDS
    kube.down = True
    seconds, why = handover_seconds(kube, "kvpn-system", "kvpn-agent-x1")  # type: ignore[arg-type]
    assert (seconds, why.startswith("own pod not read")) == (GATEWAY_HANDOVER_SECONDS, True)

    gateway = leases(FakeKube())
    gateway.renew({KEY: (UID, READY)})
    gateway.handover(seconds=GATEWAY_REPLACEMENT_SECONDS)
    lease = gateway.kube.read(PATH)  # type: ignore[attr-defined]
    assert lease["spec"]["leaseDurationSeconds"] == GATEWAY_REPLACEMENT_SECONDS


def test_handover_of_some_servers_leaves_the_others_to_run_out() -> None:
    kube = FakeKube()
    gateway = leases(kube)
    gateway.renew({KEY: (UID, READY), (NS, "lab"): ("uid-lab", READY)})
    gateway.handover([KEY])
    lab = kube.read(lease_path(NS, gateway_lease_name("lab", NODE)))
    assert lab is not None
    assert lab["spec"]["leaseDurationSeconds"] == GATEWAY_LEASE_SECONDS


def test_an_unreachable_api_server_is_raised() -> None:
    kube = FakeKube()
    kube.down = True
    with pytest.raises(KubeError) as raised:
        leases(kube).renew({KEY: (UID, READY)})
    assert raised.value.status == 0


def test_a_refused_write_is_logged_once_and_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    refused: list[KubeError | None] = [KubeError(403, 'leases is forbidden: User "agent" cannot create')]
    kube = FakeKube(errors=lambda path: refused[0])
    gateway = leases(kube)
    caplog.set_level(logging.INFO, logger="kvpn_agent")
    for _ in range(3):
        gateway.renew({KEY: (UID, READY)})
    warnings = [r for r in caplog.records if r.getMessage() == "gateway lease not written"]
    assert len(warnings) == 1
    assert not any(r.exc_info for r in caplog.records)
    assert gateway.written() == {}

    refused[0] = None
    gateway.renew({KEY: (UID, READY)})
    assert kube.read(PATH) is not None
    assert any(r.getMessage() == "gateway lease written again" for r in caplog.records)
