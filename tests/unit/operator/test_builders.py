"""The child objects kvpn writes, against reviewed golden files; and when an existing Service needs a patch."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from kvpn_core.api import AllowedDestination, VpnServerSpec
from kvpn_core.contract import PeerBinding, binding_selector
from kvpn_operator import builders

Obj = dict[str, Any]
GOLDEN = Path(__file__).parent / "golden"

SERVER: Obj = {
    "apiVersion": "kvpn.dev/v1alpha1",
    "kind": "VpnServer",
    "metadata": {"name": "office", "namespace": "vpn", "uid": "0b6f6c1e-3c7d-4a59-9d3e-2f1f7c8a9b01"},
}
PEER: Obj = {
    "apiVersion": "kvpn.dev/v1alpha1",
    "kind": "VpnPeer",
    "metadata": {"name": "alice", "namespace": "dev", "uid": "7d1c2a44-5e0f-4b8e-a0c2-6a9f4e3b2d10"},
}
# RFC 7748 section 6.1: Bob's private key serves as the server's, Alice's public key as the peer's.
SERVER_PRIVATE = "XasIfmJKikt54X+Lg4AO5m87sSkmGLb9HC+LJ/+I4Os="
PEER_PUBLIC = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
PRESHARED = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

BINDING = PeerBinding(
    peer_namespace="dev",
    peer_name="alice",
    peer_uid=PEER["metadata"]["uid"],
    public_key=PEER_PUBLIC,
    preshared_key=PRESHARED,
    addresses=["10.8.0.2", "fd00:8::2"],
    allowed_destinations=[
        AllowedDestination.model_validate({"cidr": "10.96.0.0/12"}),
        AllowedDestination.model_validate(
            {"cidr": "10.244.0.0/16", "protocol": "TCP", "ports": [{"port": 443}, {"port": 8000, "endPort": 8080}]}
        ),
    ],
)
PEER_CONFIG = {
    "wg0.conf": "[Interface]\nAddress = 10.8.0.2/32\n\n[Peer]\nEndpoint = 203.0.113.10:31820\n",
    "publicKey": PEER_PUBLIC,
    "address": "10.8.0.2",
}


def server_spec(**fields: Any) -> VpnServerSpec:
    return VpnServerSpec.model_validate({"addressPool": ["10.8.0.0/24"], **fields})


CASES: dict[str, Callable[[], Obj]] = {
    "builders_server_key_secret": lambda: builders.server_key_secret(SERVER, SERVER_PRIVATE),
    "builders_service_nodeport": lambda: builders.service(SERVER, server_spec()),
    "builders_service_loadbalancer": lambda: builders.service(
        SERVER,
        server_spec(
            listenPort=443,
            expose={
                "type": "LoadBalancer",
                "nodePort": 31820,
                "annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
            },
        ),
    ),
    "builders_binding": lambda: builders.binding_secret(SERVER, BINDING),
    "builders_peer_config_secret": lambda: builders.peer_config_secret(PEER, "office", PEER_CONFIG),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_golden_file(case: str) -> None:
    """Goldens are written once by hand-run code and reviewed by eye; a missing one is a failure, not a write."""
    golden = GOLDEN / f"{case}.yaml"
    assert golden.exists(), f"{golden} is missing: generate it once, review it, and commit it"
    assert CASES[case]() == yaml.safe_load(golden.read_text())


def test_binding_is_found_by_the_selector_agents_use() -> None:
    labels = builders.binding_secret(SERVER, BINDING)["metadata"]["labels"]
    selector = dict(pair.split("=") for pair in binding_selector("office").split(","))
    assert selector.items() <= labels.items()


def test_children_are_owned_by_their_parent() -> None:
    uid = SERVER["metadata"]["uid"]
    for child in (CASES["builders_server_key_secret"](), CASES["builders_binding"]()):
        assert builders.owned_by(child, uid)
        assert not builders.owned_by(child, PEER["metadata"]["uid"])
    assert builders.owned_by(CASES["builders_peer_config_secret"](), PEER["metadata"]["uid"])
    assert not builders.owned_by({"metadata": {}}, uid)


@pytest.mark.parametrize(
    ("kind", "expected"), [("LoadBalancer", True), ("NodePort", True), ("HostPort", False), ("ApiServer", False)]
)
def test_exposes_service(kind: str, expected: bool) -> None:
    assert builders.exposes_service(server_spec(expose={"type": kind})) is expected


# A DNS-1035 label: what Kubernetes requires of a Service name.
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


@pytest.mark.parametrize("name", ["vpn.example", "a" * 59, "1st", "Dev"], ids=["dotted", "59-chars", "digit", "upper"])
def test_server_names_that_cannot_name_a_service_are_refused(name: str) -> None:
    problem = builders.server_name_problem(name)
    assert problem is not None
    assert "at most 58" in problem


@given(st.from_regex(r"[a-z][-a-z0-9.]{0,70}", fullmatch=True))
def test_every_accepted_server_name_makes_a_dns_1035_service_name(name: str) -> None:
    if builders.server_name_problem(name) is None:
        assert DNS_1035_LABEL.match(builders.service_name(name))


def test_peer_names_too_long_for_their_config_secret_are_refused() -> None:
    assert builders.peer_name_problem("a" * 243) is None
    assert builders.peer_name_problem("a" * 244) is not None


def filled_in_by_the_api_server(service: Obj) -> Obj:
    """`service` as a GET returns it after create: defaults, allocations and status added."""
    live = copy.deepcopy(service)
    live["metadata"].update(uid="c0ffee", resourceVersion="812", creationTimestamp="2024-05-01T12:00:00Z")
    live["metadata"]["annotations"]["cloud.example.com/lb-id"] = "lb-123"  # a cloud controller's own
    spec = live["spec"]
    spec.update(
        clusterIP="10.96.4.7",
        clusterIPs=["10.96.4.7"],
        ipFamilies=["IPv4"],
        ipFamilyPolicy="SingleStack",
        sessionAffinity="None",
        internalTrafficPolicy="Cluster",
    )
    spec.setdefault("externalTrafficPolicy", "Cluster")
    for port in spec["ports"]:
        port.setdefault("nodePort", 30417)
    live["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}
    return live


SPECS = {
    "nodeport": server_spec(),
    "fixed-nodeport": server_spec(expose={"nodePort": 31820}),
    "loadbalancer": server_spec(expose={"type": "LoadBalancer", "annotations": {"lb.example.com/internal": "true"}}),
}


@pytest.mark.parametrize("name", SPECS)
def test_service_patch_none_when_only_server_filled_fields_differ(name: str) -> None:
    desired = builders.service(SERVER, SPECS[name])
    assert builders.service_patch(filled_in_by_the_api_server(desired), desired) is None


def test_service_patch_on_type_change() -> None:
    live = filled_in_by_the_api_server(builders.service(SERVER, SPECS["nodeport"]))
    desired = builders.service(SERVER, server_spec(expose={"type": "LoadBalancer"}))
    assert builders.service_patch(live, desired) == {
        "spec": {"type": "LoadBalancer", "selector": None, "externalTrafficPolicy": "Local"},
    }


def test_a_service_that_selects_pods_loses_its_selector() -> None:
    """An older kvpn's Service selected every gateway pod, on every node, healthy or not: the selector goes,
    and the Endpoints the operator writes (the healthy gateways of this server) are all it sends to."""
    live = filled_in_by_the_api_server(builders.service(SERVER, SPECS["nodeport"]))
    live["spec"]["selector"] = {"app.kubernetes.io/name": "kvpn", "app.kubernetes.io/component": "wireguard-go"}
    live["spec"]["externalTrafficPolicy"] = "Cluster"
    assert builders.service_patch(live, builders.service(SERVER, SPECS["nodeport"])) == {
        "spec": {"type": "NodePort", "selector": None, "externalTrafficPolicy": "Local"}
    }
    assert "selector" not in builders.service(SERVER, SPECS["nodeport"])["spec"]


def test_service_patch_on_port_change() -> None:
    live = filled_in_by_the_api_server(builders.service(SERVER, SPECS["nodeport"]))
    desired = builders.service(SERVER, server_spec(listenPort=443))
    patch = builders.service_patch(live, desired)
    assert patch == {"spec": {"ports": desired["spec"]["ports"]}}
    assert patch["spec"]["ports"][0]["port"] == 443


def test_service_patch_when_fixed_node_port_differs() -> None:
    live = filled_in_by_the_api_server(builders.service(SERVER, SPECS["nodeport"]))
    assert live["spec"]["ports"][0]["nodePort"] == 30417
    desired = builders.service(SERVER, SPECS["fixed-nodeport"])
    patch = builders.service_patch(live, desired)
    assert patch == {"spec": {"ports": desired["spec"]["ports"]}}
    assert patch["spec"]["ports"][0]["nodePort"] == 31820


def test_service_patch_on_annotation_change() -> None:
    live = filled_in_by_the_api_server(builders.service(SERVER, SPECS["loadbalancer"]))
    desired = builders.service(
        SERVER,
        server_spec(expose={"type": "LoadBalancer", "annotations": {"lb.example.com/internal": "false"}}),
    )
    assert builders.service_patch(live, desired) == {"metadata": {"annotations": {"lb.example.com/internal": "false"}}}


def test_service_patch_when_existing_service_has_no_annotations() -> None:
    desired = builders.service(SERVER, SPECS["loadbalancer"])
    live = filled_in_by_the_api_server(desired)
    del live["metadata"]["annotations"]
    assert builders.service_patch(live, desired) == {"metadata": {"annotations": {"lb.example.com/internal": "true"}}}
