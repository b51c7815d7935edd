"""What users read when a spec is refused, and status written only when it changed."""

from __future__ import annotations

import itertools
from typing import Any, cast

import pytest
from pydantic import BaseModel, ValidationError

from kvpn_core.api import Kind, VpnPeerSpec, VpnServerSpec
from kvpn_core.kube import ConflictError, Kube
from kvpn_operator.reporting import describe_validation_error
from kvpn_operator.storage import KubeStorage, write_status
from tests.unit.fakes import FakeKube

Obj = dict[str, Any]
STATUS_PATH = "/apis/kvpn.dev/v1alpha1/namespaces/dev/vpnservers/office/status"
OBJECT_PATH = "/apis/kvpn.dev/v1alpha1/namespaces/dev/vpnservers/office"
PEER_KEY = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="


def refusal(model: type[BaseModel], spec: Obj) -> str:
    with pytest.raises(ValidationError) as error:
        model.model_validate(spec)
    return describe_validation_error(error.value)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"addressPool": ["10.8.0.0/33"]},
            "spec.addressPool[0]: '10.8.0.0/33' is not a network in CIDR notation (for example 10.8.0.0/24): ",
        ),
        ({"addressPool": ["10.8.0.1/24"]}, "spec.addressPool[0]: '10.8.0.1/24' is not a network in CIDR notation"),
        (
            {"addressPool": ["10.8.0.0/24", "10.9.0.0/24"]},
            "spec.addressPool: addressPool takes at most one network per IP family",
        ),
        (
            {"addressPool": ["10.8.0.0/31"]},
            "spec.addressPool: addressPool 10.8.0.0/31 is too small: it needs room for the server and a peer",
        ),
        ({"addressPool": []}, "spec.addressPool: List should have at least 1 item"),
        ({}, "spec.addressPool: Field required"),
        ({"addressPool": ["10.8.0.0/24"], "expose": {"nodePort": 0}}, "spec.expose.nodePort: Input should be"),
        ({"addressPool": ["10.8.0.0/24"], "dns": {"search": ["ok.local", "Bad_"]}}, "spec.dns.search[1]: String"),
    ],
    ids=["bad-prefix", "host-bits", "two-ipv4", "too-small", "empty", "missing", "nested", "list-item"],
)
def test_server_spec_refusal_names_the_field_as_written(spec: Obj, expected: str) -> None:
    message = refusal(VpnServerSpec, spec)
    assert message.startswith(expected)
    assert "Value error" not in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"addressPool": ["10.8.0.0/24", "fd00:8::/300"]}, "spec.addressPool[1]: 'fd00:8::/300' is not a network"),
        (
            {"addressPool": ["10.8.0.0/24"], "routes": ["10.96.0.0/12", "10.244.0.0/33"]},
            "spec.routes[1]: '10.244.0.0/33' is not a network",
        ),
    ],
    ids=["addressPool", "routes"],
)
def test_bad_cidr_in_a_list_names_its_index(spec: Obj, expected: str) -> None:
    assert refusal(VpnServerSpec, spec).startswith(expected)


def test_peer_spec_refusal_names_nested_list_items() -> None:
    message = refusal(
        VpnPeerSpec,
        {"serverRef": {"name": "office"}, "allowedDestinations": [{"cidr": "10.0.0.0/8"}, {"cidr": "10.1.0.0/33"}]},
    )
    assert message.startswith("spec.allowedDestinations[1].cidr: '10.1.0.0/33' is not a network in CIDR notation")


def test_peer_spec_refusal_does_not_start_with_value_error() -> None:
    message = refusal(VpnPeerSpec, {"serverRef": {"name": "office"}, "allowedDestinations": [{"cidr": "x"}]})
    assert message.startswith("spec.allowedDestinations[0].cidr: 'x' is not a network")


def test_peer_spec_refusal_lists_three_errors_then_counts_the_rest() -> None:
    message = refusal(
        VpnPeerSpec,
        {
            "serverRef": {"name": "Office"},
            "publicKey": "not-a-key",
            "allowedDestinations": [{"cidr": "10.0.0.0/33", "ports": [{"port": 0}, {"port": 70000}]}],
        },
    )
    parts = message.split("; ")
    assert [p.split(":", 1)[0] for p in parts] == [
        "spec.serverRef.name",
        "spec.publicKey",
        "spec.allowedDestinations[0].cidr",
    ]
    assert message.endswith(" (and 2 more)")


def test_peer_spec_accepts_a_good_key() -> None:
    VpnPeerSpec.model_validate({"serverRef": {"name": "office"}, "publicKey": PEER_KEY})


def over(kube: FakeKube) -> KubeStorage:
    """The real Storage, over the fake client: write_status's requests as the API server would see them."""
    return KubeStorage(cast(Kube, kube))


def server(resource_version: str, status: Obj | None) -> Obj:
    obj: Obj = {"metadata": {"name": "office", "namespace": "dev", "resourceVersion": resource_version}}
    if status is not None:
        obj["status"] = status
    return obj


def stored(kube: FakeKube, resource_version: str, status: Obj | None) -> Obj:
    """The VpnServer as the API server holds it now; a caller holding an older version gets a 409."""
    return kube.put(OBJECT_PATH, server(resource_version, status))


def test_equal_status_writes_nothing() -> None:
    kube = FakeKube()
    current = {"endpoint": "203.0.113.10:31820", "routes": ["10.96.0.0/12"], "peerCount": 2}
    obj = stored(kube, "7", current)
    assert not write_status(over(kube), Kind.VPN_SERVER, obj, {"endpoint": "203.0.113.10:31820"})
    assert kube.patches == []


@pytest.mark.parametrize("status", [None, {}, {"publicKey": None}], ids=["no-status", "empty", "explicit-none"])
def test_none_equals_missing(status: Obj | None) -> None:
    kube = FakeKube()
    obj = stored(kube, "7", status)
    assert not write_status(over(kube), Kind.VPN_SERVER, obj, {"publicKey": None, "revision": None})
    assert kube.patches == []


def test_different_status_is_one_merge_patch_carrying_resource_version() -> None:
    kube = FakeKube()
    desired = {"endpoint": "203.0.113.10:31820", "dnsNameserver": None}
    obj = stored(kube, "7", {"endpoint": None, "dnsNameserver": "10.96.0.10", "peerCount": 3})
    assert write_status(over(kube), Kind.VPN_SERVER, obj, desired)
    assert kube.patches == [(STATUS_PATH, {"metadata": {"resourceVersion": "7"}, "status": desired})]
    assert kube.gets == []
    assert (kube.read(OBJECT_PATH) or {})["status"] == {"endpoint": "203.0.113.10:31820", "peerCount": 3}


def test_conflict_rereads_and_patches_with_the_new_resource_version() -> None:
    kube = FakeKube()
    stored(kube, "8", {"endpoint": "old:1"})  # written since the caller read version 7
    desired = {"endpoint": "new:1"}
    assert write_status(over(kube), Kind.VPN_SERVER, server("7", {"endpoint": "old:1"}), desired)
    assert kube.gets == [OBJECT_PATH]
    assert [p["metadata"]["resourceVersion"] for _, p in kube.patches] == ["7", "8"]


def test_conflict_then_fresh_copy_already_holds_the_status() -> None:
    """Another writer got there first: compare again and write nothing more."""
    kube = FakeKube()
    stored(kube, "8", {"endpoint": "new:1"})
    assert not write_status(over(kube), Kind.VPN_SERVER, server("7", {}), {"endpoint": "new:1"})
    assert len(kube.patches) == 1


def test_conflict_on_a_deleted_object_gives_up_quietly() -> None:
    kube = FakeKube(conflicts=1)  # the 409 came from a writer that deleted it: the re-read finds nothing
    assert not write_status(over(kube), Kind.VPN_SERVER, server("7", {}), {"endpoint": "new:1"})
    assert len(kube.patches) == 1


def test_three_conflicts_raise_conflict_error() -> None:
    kube = FakeKube()
    stored(kube, "8", {})
    counter = itertools.count()
    # Another writer changes the status again after each of the operator's re-reads.
    kube.meanwhile = lambda path: kube.edit(STATUS_PATH, {"status": {"peerCount": next(counter)}})
    with pytest.raises(ConflictError, match="office"):
        write_status(over(kube), Kind.VPN_SERVER, server("7", {}), {"endpoint": "new:1"})
    assert [p["metadata"]["resourceVersion"] for _, p in kube.patches] == ["7", "8", "9"]


def test_conflict_keeps_a_condition_another_writer_added_meanwhile() -> None:
    """An agent wrote its Dataplane condition between the operator's read and its patch."""
    ready = {"type": "Ready", "status": "True", "reason": "Ready", "message": "", "lastTransitionTime": "T1"}
    dataplane = {
        "type": "Dataplane",
        "status": "False",
        "reason": "InvalidPublicKey",
        "message": "m",
        "lastTransitionTime": "T2",
    }
    stale_ready = {**ready, "status": "False", "reason": "ServerNotReady"}
    kube = FakeKube()
    stored(kube, "8", {"conditions": [stale_ready, dataplane]})
    assert write_status(
        KubeStorage(cast(Kube, kube)),
        Kind.VPN_SERVER,
        server("7", {"conditions": [stale_ready]}),
        {"conditions": [ready]},
    )
    assert kube.patches[-1][1]["status"]["conditions"] == [ready, dataplane]


def test_conflict_takes_every_owned_condition_from_desired_and_keeps_the_rest() -> None:
    """The server owns Ready, PodNetwork and ClusterDNS: a stale copy of those is replaced, the agent's kept."""

    def cond(type_: str, status: str, reason: str) -> Obj:
        return {"type": type_, "status": status, "reason": reason, "message": "", "lastTransitionTime": "T"}

    ready, pods = cond("Ready", "True", "Ready"), cond("PodNetwork", "True", "PodNetworkFound")
    stale_pods = cond("PodNetwork", "False", "PodNetworkNotFound")
    dataplane = cond("Dataplane", "False", "InvalidServerKey")
    kube = FakeKube()
    stored(kube, "8", {"conditions": [ready, stale_pods, dataplane]})
    owned = ("Ready", "PodNetwork", "ClusterDNS")
    desired = {"conditions": [ready, pods]}
    assert write_status(over(kube), Kind.VPN_SERVER, server("7", {"conditions": [stale_pods]}), desired, owned=owned)
    assert kube.patches[-1][1]["status"]["conditions"] == [ready, pods, dataplane]
