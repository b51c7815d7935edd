"""The operator against a real API server: what a user sees after applying VpnServers and VpnPeers."""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from typing import Any

import pytest
from kubernetes import client

from harness.gateway_standin import LABEL as GATEWAY_STAND_IN
from harness.kvpn import Kvpn, decode, ready, wait_for
from harness.operator_process import OperatorProcess
from kvpn_core import keys
from kvpn_core.contract import PeerBinding, binding_selector

pytestmark = pytest.mark.usefixtures("operator")

SERVERS, PEERS = "vpnservers", "vpnpeers"


@pytest.fixture
def kvpn(api: client.ApiClient) -> Kvpn:
    return Kvpn(api)


def binding_of(kvpn: Kvpn, namespace: str, server: str, peer_name: str) -> PeerBinding | None:
    for secret in kvpn.secrets(namespace, binding_selector(server)):
        binding = PeerBinding.from_secret(client.ApiClient().sanitize_for_serialization(secret))
        if binding.peer_name == peer_name:
            return binding
    return None


def test_generated_key_gives_a_complete_config(kvpn: Kvpn, namespace: str, operator: OperatorProcess) -> None:
    kvpn.server(namespace, "dev")
    kvpn.peer(namespace, "alice")
    peer = kvpn.wait_ready(PEERS, namespace, "alice")
    server = kvpn.wait_ready(SERVERS, namespace, "dev")

    status = peer["status"]
    assert status["address"] == "10.8.0.2"
    secret = kvpn.secret(namespace, status["configSecretName"])
    assert secret is not None
    assert secret.metadata.owner_references[0].uid == peer["metadata"]["uid"]
    private_key = decode(secret, "privateKey")
    assert private_key
    assert keys.public_key_of(private_key) == status["publicKey"]
    config = decode(secret, "wg0.conf") or ""
    assert f"PrivateKey = {private_key}" in config
    assert f"PublicKey = {server['status']['publicKey']}" in config
    assert "Endpoint = vpn.example.com:51820" in config
    assert "AllowedIPs = 10.96.0.0/16" in config
    assert "Address = 10.8.0.2/32" in config

    # The agent's view of the peer carries its public and preshared keys, never its private key.
    binding = binding_of(kvpn, namespace, "dev", "alice")
    assert binding is not None
    assert binding.public_key == status["publicKey"]
    assert binding.enabled
    assert binding.preshared_key == decode(secret, "presharedKey")
    assert private_key not in str(kvpn.secrets(namespace, binding_selector("dev")))
    # ... and it is nowhere a person or a log collector looks.
    assert private_key not in str(peer) + str(server)
    assert private_key not in str(kvpn.events(namespace, "alice"))
    assert private_key not in operator.log_text()


def test_bring_your_own_key_keeps_the_private_key_out_of_the_cluster(
    kvpn: Kvpn, namespace: str, api: client.ApiClient
) -> None:
    private_key = keys.generate_private_key()
    public_key = keys.public_key_of(private_key)
    kvpn.server(namespace, "dev")
    kvpn.peer(namespace, "laptop", publicKey=public_key)
    peer = kvpn.wait_ready(PEERS, namespace, "laptop")

    assert peer["status"]["publicKey"] == public_key
    secret = kvpn.secret(namespace, peer["status"]["configSecretName"])
    assert secret is not None
    assert decode(secret, "privateKey") is None
    assert "PrivateKey =" not in (decode(secret, "wg0.conf") or "").replace("# PrivateKey", "")
    every_secret = client.CoreV1Api(api).list_secret_for_all_namespaces().items
    assert private_key not in str([s.data for s in every_secret])


def test_static_address_and_conflict(kvpn: Kvpn, namespace: str) -> None:
    kvpn.server(namespace, "dev")
    kvpn.peer(namespace, "first", address="10.8.0.10")
    assert kvpn.wait_ready(PEERS, namespace, "first")["status"]["address"] == "10.8.0.10"

    kvpn.peer(namespace, "second", address="10.8.0.10")
    second = kvpn.wait_ready(PEERS, namespace, "second", "False", "AddressConflict")
    assert "10.8.0.10" in second["status"]["conditions"][0]["message"]
    warning = wait_for(
        "a Warning Event for the conflict",
        lambda: [e for e in kvpn.events(namespace, "second") if e.type == "Warning" and e.reason == "AddressConflict"],
    )
    assert "taken" in warning[0].message

    kvpn.peer(namespace, "outside", address="10.9.0.10")
    outside = kvpn.wait_ready(PEERS, namespace, "outside", "False", "AddressOutOfPool")
    assert "outside the pool" in outside["status"]["conditions"][0]["message"]

    # The conflicting peer moves to a free static address when its owner fixes the spec.
    kvpn.patch(PEERS, namespace, "second", {"address": "10.8.0.11"})
    assert kvpn.wait_ready(PEERS, namespace, "second")["status"]["address"] == "10.8.0.11"


def test_pool_exhaustion_then_reuse_after_delete(kvpn: Kvpn, namespace: str) -> None:
    kvpn.server(namespace, "dev", addressPool=["10.8.0.0/29"])
    for i in range(5):
        kvpn.peer(namespace, f"p{i}")
    addresses = {kvpn.wait_ready(PEERS, namespace, f"p{i}")["status"]["address"] for i in range(5)}
    assert addresses == {f"10.8.0.{i}" for i in range(2, 7)}

    kvpn.peer(namespace, "late")
    late = kvpn.wait_ready(PEERS, namespace, "late", "False", "PoolExhausted")
    assert "10.8.0.0/29" in late["status"]["conditions"][0]["message"]

    freed = kvpn.get(PEERS, namespace, "p3")
    assert freed is not None
    config_name = freed["status"]["configSecretName"]
    kvpn.delete(PEERS, namespace, "p3")
    # The freed address goes to the waiting peer, without anyone touching it.
    late = kvpn.wait_ready(PEERS, namespace, "late")
    assert late["status"]["address"] == freed["status"]["address"]
    # The deleted peer's config Secret is garbage-collected (owner reference).
    wait_for("the deleted peer's config Secret to go", lambda: kvpn.secret(namespace, config_name) is None, 30)
    owners = {b.peer_name for b in [binding_of(kvpn, namespace, "dev", f"p{i}") for i in range(5)] if b}
    assert "p3" not in owners


def test_invalid_public_key_is_reported(kvpn: Kvpn, namespace: str) -> None:
    kvpn.server(namespace, "dev")
    kvpn.peer(namespace, "zero", publicKey="A" * 43 + "=")  # passes the schema's pattern; all-zero key
    peer = kvpn.wait_ready(PEERS, namespace, "zero", "False", "InvalidPublicKey")
    assert "address" not in peer["status"]
    wait_for(
        "a Warning Event",
        lambda: [e for e in kvpn.events(namespace, "zero") if e.reason == "InvalidPublicKey"],
    )

    with pytest.raises(client.ApiException) as refused:  # what the schema can say, the API server says
        kvpn.peer(namespace, "short", publicKey="abc")
    assert refused.value.status == 422


def test_a_key_another_peer_of_the_server_holds_is_refused_until_it_is_free(kvpn: Kvpn, namespace: str) -> None:
    """The gateways serve the older of two bindings with one key; the operator says so of the newer one,
    with an Event that does not say who holds the key, and makes it Ready once the older is gone."""
    kvpn.server(namespace, "dev")
    kvpn.server(namespace, "lab", addressPool=["10.9.0.0/24"], listenPort=51830)
    key = keys.public_key_of(keys.generate_private_key())
    kvpn.peer(namespace, "first", publicKey=key)
    kvpn.wait_ready(PEERS, namespace, "first")
    kvpn.peer(namespace, "copy", publicKey=key)
    copy = kvpn.wait_ready(PEERS, namespace, "copy", "False", "DuplicatePublicKey")
    message = copy["status"]["conditions"][0]["message"]
    assert f"VpnServer {namespace}/dev" in message
    assert "first" not in message, message
    assert "address" not in copy["status"]
    assert binding_of(kvpn, namespace, "dev", "copy") is None  # no gateway sees it
    events = wait_for(
        "a Warning Event", lambda: [e for e in kvpn.events(namespace, "copy") if e.reason == "DuplicatePublicKey"]
    )
    assert all("first" not in e.message for e in events)
    kvpn.peer(namespace, "elsewhere", server="lab", publicKey=key)  # another server: another interface
    kvpn.wait_ready(PEERS, namespace, "elsewhere")

    kvpn.delete(PEERS, namespace, "first")
    assert kvpn.wait_ready(PEERS, namespace, "copy", timeout=30)["status"]["address"]
    assert binding_of(kvpn, namespace, "dev", "copy") is not None


def test_peer_before_its_server(kvpn: Kvpn, namespace: str) -> None:
    kvpn.peer(namespace, "early", server="later")
    kvpn.wait_ready(PEERS, namespace, "early", "False", "ServerNotFound")
    kvpn.server(namespace, "later")
    assert kvpn.wait_ready(PEERS, namespace, "early")["status"]["address"] == "10.8.0.2"


def test_namespace_not_allowed_until_the_server_allows_it(kvpn: Kvpn, namespace: str, api: client.ApiClient) -> None:
    other = f"{namespace[:50]}-dev"
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        kvpn.server(namespace, "dev")
        kvpn.peer(other, "guest", serverRef={"name": "dev", "namespace": namespace})
        guest = kvpn.wait_ready(PEERS, other, "guest", "False", "NamespaceNotAllowed")
        assert "peerNamespaces" in guest["status"]["conditions"][0]["message"]

        kvpn.patch(SERVERS, namespace, "dev", {"peerNamespaces": [other]})
        guest = kvpn.wait_ready(PEERS, other, "guest")
        # The config Secret lives with the peer; the binding (address claim) with the server.
        assert kvpn.secret(other, guest["status"]["configSecretName"]) is not None
        assert binding_of(kvpn, namespace, "dev", "guest") is not None
    finally:
        client.CoreV1Api(api).delete_namespace(other)


def test_disable_and_expiry(kvpn: Kvpn, namespace: str) -> None:
    kvpn.server(namespace, "dev")
    kvpn.peer(namespace, "temp")
    kvpn.wait_ready(PEERS, namespace, "temp")
    kvpn.patch(PEERS, namespace, "temp", {"disabled": True})
    kvpn.wait_ready(PEERS, namespace, "temp", "False", "Disabled")
    assert wait_for(
        "the binding to be disabled",
        lambda: (b := binding_of(kvpn, namespace, "dev", "temp")) and not b.enabled,
    )
    kvpn.patch(PEERS, namespace, "temp", {"disabled": False})
    kvpn.wait_ready(PEERS, namespace, "temp")

    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kvpn.patch(PEERS, namespace, "temp", {"expiresAt": soon})
    expired = kvpn.wait_ready(PEERS, namespace, "temp", "False", "Expired", timeout=10)
    seen = dt.datetime.now(dt.UTC)
    assert seen >= dt.datetime.fromisoformat(soon)
    assert (seen - dt.datetime.fromisoformat(soon)).total_seconds() < 3
    assert expired["status"]["address"]  # switched off, not deleted: the address stays reserved
    assert wait_for(
        "the binding to be disabled",
        lambda: (b := binding_of(kvpn, namespace, "dev", "temp")) and not b.enabled,
    )


def test_each_expose_type(kvpn: Kvpn, namespace: str, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    node = f"gw-{secrets.token_hex(3)}"
    core.create_node(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node, "labels": {"kvpn-test-gateway": namespace, GATEWAY_STAND_IN: "true"}},
            "spec": {"podCIDR": "10.244.7.0/24", "podCIDRs": ["10.244.7.0/24"]},
        }
    )
    core.patch_node_status(
        node,
        {
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "192.0.2.10"},
                    {"type": "ExternalIP", "address": "198.51.100.7"},
                ]
            }
        },
    )
    try:
        gateway = {"kvpn-test-gateway": namespace}
        kvpn.server(namespace, "np", expose={"type": "NodePort", "nodePort": 31820}, nodeSelector=gateway)
        np = kvpn.wait_ready(SERVERS, namespace, "np")
        assert np["status"]["endpoint"] == "198.51.100.7:31820"
        service = core.read_namespaced_service("kvpn-np", namespace)
        assert service.spec.type == "NodePort"
        assert service.spec.ports[0].protocol == "UDP"

        kvpn.server(
            namespace,
            "hp",
            expose={"type": "HostPort"},
            nodeSelector=gateway,
            listenPort=51999,
            addressPool=["10.9.0.0/24"],
            routes=[],
        )
        hp = kvpn.wait_ready(SERVERS, namespace, "hp")
        assert hp["status"]["endpoint"] == "198.51.100.7:51999"
        assert "10.244.7.0/24" in hp["status"]["routes"]  # discovered: pod network of the node
        assert "10.96.0.0/16" in hp["status"]["routes"]  # discovered: the Service network
        assert not [s for s in core.list_namespaced_service(namespace).items if s.metadata.name == "kvpn-hp"]

        kvpn.server(namespace, "lb", expose={"type": "LoadBalancer"}, addressPool=["10.10.0.0/24"])
        kvpn.wait_ready(SERVERS, namespace, "lb", "False", "EndpointPending")
        # What a cloud's load-balancer controller does once it has an address:
        core.patch_namespaced_service_status(
            "kvpn-lb", namespace, {"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}}}
        )
        lb = kvpn.wait_ready(SERVERS, namespace, "lb", timeout=30)
        assert lb["status"]["endpoint"] == "203.0.113.5:51820"
    finally:
        core.delete_node(node)


def test_concurrent_creates_get_distinct_addresses(kvpn: Kvpn, namespace: str) -> None:
    kvpn.server(namespace, "dev", addressPool=["10.8.0.0/22"])
    names = [f"c{i:03d}" for i in range(200)]
    for name in names:
        kvpn.peer(namespace, name)
    peers = wait_for(
        "200 Ready peers",
        lambda: (
            items
            if len(items := [p for p in kvpn.list(PEERS, namespace) if ready(p) == ("True", "Ready")]) == 200
            else None
        ),
        timeout=120,
        interval=1,
    )
    addresses = [p["status"]["address"] for p in peers]
    assert len(set(addresses)) == 200
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("10.8.0.0/22") for a in addresses)
    bindings = kvpn.secrets(namespace, binding_selector("dev"))
    assert len(bindings) == 200


def test_operator_killed_while_creating_peers(
    kvpn: Kvpn, namespace: str, operator: OperatorProcess, api: client.ApiClient
) -> None:
    kvpn.server(namespace, "dev", addressPool=["10.8.0.0/22"])
    kvpn.wait_ready(SERVERS, namespace, "dev")
    rng = secrets.SystemRandom()
    names = [f"k{i:03d}" for i in range(200)]
    kill_at = sorted(rng.sample(range(10, 190), 4))
    for i, name in enumerate(names):
        kvpn.peer(namespace, name)
        if i in kill_at:
            operator.kill()
            operator.start()
    peers = wait_for(
        "200 Ready peers after the restarts",
        lambda: (
            items
            if len(items := [p for p in kvpn.list(PEERS, namespace) if ready(p) == ("True", "Ready")]) == 200
            else None
        ),
        timeout=180,
        interval=1,
    )
    by_uid = {p["metadata"]["uid"]: p for p in peers}
    addresses = [p["status"]["address"] for p in peers]
    assert len(set(addresses)) == 200

    # No orphans: every binding belongs to a live peer at that peer's address, every config Secret to a peer.
    bindings = [
        PeerBinding.from_secret(api.sanitize_for_serialization(s))
        for s in kvpn.secrets(namespace, binding_selector("dev"))
    ]
    assert len(bindings) == 200
    for binding in bindings:
        assert binding.peer_uid in by_uid
        assert by_uid[binding.peer_uid]["status"]["address"] == binding.addresses[0]
    configs = kvpn.secrets(namespace, "kvpn.dev/role=peer-config")
    assert len(configs) == 200
    assert {s.metadata.owner_references[0].uid for s in configs} == set(by_uid)


def test_no_write_when_nothing_changed(kvpn: Kvpn, namespace: str, operator: OperatorProcess) -> None:
    kvpn.server(namespace, "dev")
    for name in ("a", "b"):
        kvpn.peer(namespace, name)
    for name in ("a", "b"):
        kvpn.wait_ready(PEERS, namespace, name)
    # Settle: the server's resync has counted the peers.
    wait_for(
        "peerCount 2",
        lambda: (s := kvpn.get(SERVERS, namespace, "dev")) and s["status"]["peerCount"] == 2,
        timeout=40,
        interval=0.5,
    )

    def versions() -> dict[str, str]:
        objs = [*kvpn.list(SERVERS, namespace), *kvpn.list(PEERS, namespace)]
        found = {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in objs}
        found.update({s.metadata.name: s.metadata.resource_version for s in kvpn.secrets(namespace)})
        found["events"] = str(len(kvpn.core.list_namespaced_event(namespace).items))
        return found

    before = versions()
    operator.restart()  # resume handlers run for every object
    wait_for(
        "a server resync after the restart",
        lambda: (
            "Timer 'reconcile_vpnserver" in operator.log_text() or "reconcile_vpnserver/timer" in operator.log_text()
        ),
        timeout=40,
        interval=1,
    )
    assert versions() == before


def test_a_condition_of_another_type_survives_a_reconcile(kvpn: Kvpn, namespace: str) -> None:
    """The agent writes its own Dataplane condition into the list the operator writes Ready into."""
    kvpn.server(namespace, "dev")
    kvpn.peer(namespace, "alice")
    peer = kvpn.wait_ready(PEERS, namespace, "alice")
    server = kvpn.wait_ready(SERVERS, namespace, "dev")
    dataplane = {
        "type": "Dataplane",
        "status": "False",
        "reason": "InvalidPublicKey",
        "message": "publicKey is not 32 bytes (gateway node gw-1)",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    for plural, obj in ((PEERS, peer), (SERVERS, server)):
        kvpn.custom.patch_namespaced_custom_object_status(
            "kvpn.dev", "v1alpha1", namespace, plural, obj["metadata"]["name"],
            {"status": {"conditions": [*obj["status"]["conditions"], dataplane]}},
        )  # fmt: skip

    # A spec change of each: the operator reconciles both and rewrites Ready.
    kvpn.patch(PEERS, namespace, "alice", {"disabled": True})
    kvpn.patch(SERVERS, namespace, "dev", {"mtu": 1380})
    peer = kvpn.wait_ready(PEERS, namespace, "alice", status="False", reason="Disabled")

    def reconciled() -> dict[str, object] | None:
        found = kvpn.get(SERVERS, namespace, "dev") or {}
        status = found.get("status") or {}
        return found if status.get("observedGeneration") == found["metadata"]["generation"] else None

    server = wait_for("the server's reconcile", reconciled)
    # The server's discovery and Gateways conditions are the operator's too.
    expected = {PEERS: {"Ready", "Dataplane"}, SERVERS: {"Ready", "PodNetwork", "ClusterDNS", "Gateways", "Dataplane"}}
    for plural, obj in ((PEERS, peer), (SERVERS, server)):
        by_type = {c["type"]: c for c in obj["status"]["conditions"]}
        assert set(by_type) == expected[plural], obj["status"]
        assert by_type["Dataplane"] == dataplane


def test_a_changed_pool_moves_peers_and_frees_their_old_bindings(kvpn: Kvpn, namespace: str) -> None:
    kvpn.server(namespace, "dev", addressPool=["10.8.0.0/24"])
    kvpn.peer(namespace, "mover")
    assert kvpn.wait_ready(PEERS, namespace, "mover")["status"]["address"] == "10.8.0.2"

    kvpn.patch(SERVERS, namespace, "dev", {"addressPool": ["10.9.0.0/24"]})
    moved = wait_for(
        "the peer at an address of the new pool",
        lambda: (
            p
            if (p := kvpn.get(PEERS, namespace, "mover"))
            and p["status"].get("address", "").startswith("10.9.")
            and ready(p) == ("True", "Ready")
            else None
        ),
        timeout=30,
    )
    assert moved["status"]["address"] == "10.9.0.2"
    bindings = wait_for(
        "one binding, at the new address",
        lambda: b if len(b := kvpn.secrets(namespace, binding_selector("dev"))) == 1 else None,
        timeout=10,
    )
    assert bindings[0].metadata.name == "kvpn-dev-10-9-0-2"


def condition_of(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    """The condition of that type (an empty dict when there is none)."""
    found: dict[str, Any] = next(
        (c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {}
    )
    return found


def test_a_server_says_what_discovery_did_not_find(kvpn: Kvpn, namespace: str, api: client.ApiClient) -> None:
    """No Node with a pod network and no kube-dns Service: peers would silently lack pod routes and DNS.
    The server says so in conditions naming what to set, and a Warning Event each; they flip to True
    once the cluster has them (at the next resync), and the peers' configs gain the routes and DNS."""
    core = client.CoreV1Api(api)
    # This cluster's controller manager allocates no node CIDRs; other tests' Nodes are gone by now.
    assert not [n.metadata.name for n in core.list_node().items if n.spec.pod_cidr or n.spec.pod_cidrs]
    assert not [s for s in core.list_namespaced_service("kube-system").items if s.metadata.name == "kube-dns"]

    kvpn.server(namespace, "dev", routes=[])  # routes and DNS left to discovery
    kvpn.peer(namespace, "alice")

    def gaps() -> dict[str, Any] | None:
        server = kvpn.get(SERVERS, namespace, "dev")
        # Ready too: the gateway stand-in's lease for a new server comes within a second.
        wanted = {"PodNetwork": "PodNetworkNotFound", "ClusterDNS": "DNSServiceNotFound", "Ready": "Ready"}
        return server if all(condition_of(server, t).get("reason") == r for t, r in wanted.items()) else None

    server = wait_for("PodNetwork and ClusterDNS False", gaps, timeout=30)
    pod_network, dns, ready_ = (condition_of(server, t) for t in ("PodNetwork", "ClusterDNS", "Ready"))
    assert pod_network["status"] == "False"
    assert "no Node has spec.podCIDR" in pod_network["message"]
    assert "--allocate-node-cidrs" in pod_network["message"]
    assert "set spec.routes" in pod_network["message"]
    assert dns["status"] == "False"
    assert "Service kube-system/kube-dns not found" in dns["message"]
    assert "spec.dns.nameserver" in dns["message"]
    assert "operator.dnsService" in dns["message"]
    assert "spec.dns.enabled: false" in dns["message"]
    # Still Ready: peers reach ClusterIPs through the Service network; the message says what is missing.
    assert (ready_["status"], ready_["reason"]) == ("True", "Ready")
    assert "PodNetwork" in ready_["message"]
    assert "ClusterDNS" in ready_["message"]
    assert server["status"]["routes"] == ["10.96.0.0/16"]
    assert not server["status"].get("dnsNameserver")

    def warnings() -> list[str]:
        return sorted(e.reason for e in kvpn.events(namespace, "dev") if e.type == "Warning")

    assert wait_for("a Warning Event for each", lambda: w if len(w := warnings()) >= 2 else None) == [
        "DNSServiceNotFound",
        "PodNetworkNotFound",
    ]

    node = f"pods-{secrets.token_hex(3)}"
    core.create_node(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}, "spec": {"podCIDR": "10.244.9.0/24"}}
    )
    core.create_namespaced_service(
        "kube-system",
        {
            "metadata": {"name": "kube-dns"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]},
        },
    )
    try:

        def found() -> dict[str, Any] | None:
            server = kvpn.get(SERVERS, namespace, "dev")
            wanted = {"PodNetwork": "PodNetworkFound", "ClusterDNS": "DNSServiceFound"}
            return server if all(condition_of(server, t).get("reason") == r for t, r in wanted.items()) else None

        # At the server's next resync (every 15 s): the operator lists Nodes, it does not watch them.
        server = wait_for("PodNetwork and ClusterDNS True", found, timeout=45, interval=0.5)
        assert condition_of(server, "PodNetwork")["status"] == "True"
        assert "10.244.9.0/24" in condition_of(server, "PodNetwork")["message"]
        assert condition_of(server, "ClusterDNS")["status"] == "True"
        assert "10.96.0.10" in condition_of(server, "ClusterDNS")["message"]
        assert server["status"]["routes"] == ["10.96.0.0/16", "10.244.9.0/24"]
        assert server["status"]["dnsNameserver"] == "10.96.0.10"
        assert server["status"]["dnsSearch"] == ["svc.cluster.local", "cluster.local"]
        ready_ = condition_of(server, "Ready")
        assert ready_["status"] == "True"
        assert "PodNetwork" not in ready_["message"]
        assert "ClusterDNS" not in ready_["message"]

        # What the user gets out of it: the peer's config now routes pods and names a DNS server.
        def config() -> str | None:
            peer = kvpn.get(PEERS, namespace, "alice") or {}
            name = (peer.get("status") or {}).get("configSecretName")
            text = decode(secret, "wg0.conf") if name and (secret := kvpn.secret(namespace, name)) else None
            return text if text and "10.244.9.0/24" in text and "DNS = 10.96.0.10" in text else None

        wait_for("the peer's config with pod routes and DNS", config, timeout=20)
        # The Warnings were posted once each, on the transition, not at every resync.
        assert warnings() == ["DNSServiceNotFound", "PodNetworkNotFound"]
    finally:
        core.delete_node(node)
        # 1.20 answers a Service delete with a Status, which this client would parse as a Service.
        core.delete_namespaced_service("kube-dns", "kube-system", _preload_content=False)


# --- pod networks for every CNI (spec.podNetwork) ----------------------------------------------------------


def a_pod_with_ips(core: client.CoreV1Api, namespace: str, name: str, *ips: str, host_network: bool = False) -> None:
    """A pod as a kubelet would report it once its CNI gave it `ips` (this cluster has no kubelet)."""
    spec = {
        "hostNetwork": host_network,
        "automountServiceAccountToken": False,
        "containers": [{"name": "app", "image": "registry.invalid/app"}],
    }

    def created() -> bool:
        try:
            core.create_namespaced_pod(namespace, {"metadata": {"name": name}, "spec": spec})
        except client.ApiException as error:
            if "service account" in str(error.body).replace("serviceaccount", "service account"):
                return False  # the namespace's default ServiceAccount is a moment younger than the namespace
            raise
        return True

    wait_for(f"pod {namespace}/{name} created", created)
    status = {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}
    if host_network:
        status["hostIP"] = ips[0]
    core.patch_namespaced_pod_status(name, namespace, {"status": status})


def test_pod_ips_in_use_become_routes_when_nodes_have_no_pod_cidr(
    kvpn: Kvpn, namespace: str, api: client.ApiClient
) -> None:
    """As under Cilium cluster-pool IPAM or the AWS VPC CNI: no Node has a podCIDR, yet pods have IPs. Auto
    routes networks covering them (a /16 per IPv4, a /64 per IPv6 group), read cluster-wide, and says so."""
    core = client.CoreV1Api(api)
    assert not [n.metadata.name for n in core.list_node().items if n.spec.pod_cidr or n.spec.pod_cidrs]
    a_pod_with_ips(core, namespace, "web", "10.77.1.5", "fd00:77::5")
    a_pod_with_ips(core, "default", f"api-{namespace}"[:63], "10.77.200.3")  # another namespace: cluster-wide
    a_pod_with_ips(core, namespace, "agent", "192.0.2.50", host_network=True)  # the node's IP: no pod network
    try:
        kvpn.server(namespace, "dev", routes=[])
        kvpn.peer(namespace, "alice")

        def from_pods() -> dict[str, Any] | None:
            server = kvpn.get(SERVERS, namespace, "dev")
            # Ready too: the gateway stand-in's lease for a new server comes within a second.
            wanted = {"PodNetwork": "PodNetworkFromPodIPs", "Ready": "Ready"}
            return server if all(condition_of(server, t).get("reason") == r for t, r in wanted.items()) else None

        # Within a resync (15 s) of the operator's pod list (at most 10 s old).
        server = wait_for("PodNetwork from the pod IPs in use, and Ready", from_pods, timeout=45)
        pod_network = condition_of(server, "PodNetwork")
        assert pod_network["status"] == "True"
        assert "from the pod IPs in use (the nodes' pod CIDRs are empty" in pod_network["message"]
        routes = server["status"]["routes"]
        assert routes[0] == "10.96.0.0/16"  # the Service network, discovered as before
        assert {"10.77.0.0/16", "fd00:77::/64"} <= set(routes)
        assert not [r for r in routes if ipaddress.ip_address("192.0.2.50") in ipaddress.ip_network(r)]
        assert condition_of(server, "Ready")["status"] == "True"
        assert "PodNetwork" not in condition_of(server, "Ready")["message"]

        def config() -> str | None:
            peer = kvpn.get(PEERS, namespace, "alice") or {}
            name = (peer.get("status") or {}).get("configSecretName")
            text = decode(secret, "wg0.conf") if name and (secret := kvpn.secret(namespace, name)) else None
            return text if text and "10.77.0.0/16" in text else None

        assert "fd00:77::/64" in wait_for("the peer's config with the pods' networks", config, timeout=20)
    finally:
        # No kubelet confirms a graceful delete; and no other test may see these pod IPs.
        for pod_namespace, name in ((namespace, "web"), ("default", f"api-{namespace}"[:63]), (namespace, "agent")):
            core.delete_namespaced_pod(name, pod_namespace, grace_period_seconds=0)


def test_explicit_pod_networks_are_exactly_the_routes_given(kvpn: Kvpn, namespace: str, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    a_pod_with_ips(core, namespace, "web", "10.77.1.5")  # discovered by Auto; not with Explicit
    try:
        explicit = {"strategy": "Explicit", "cidrs": ["10.42.0.0/16", "10.43.0.0/17"]}
        kvpn.server(namespace, "dev", routes=[], podNetwork=explicit)
        server = kvpn.wait_ready(SERVERS, namespace, "dev")
        assert server["status"]["routes"] == ["10.96.0.0/16", "10.42.0.0/16", "10.43.0.0/17"]
        pod_network = condition_of(server, "PodNetwork")
        assert (pod_network["status"], pod_network["reason"]) == ("True", "PodNetworkFromSpec")
        assert pod_network["message"] == "pod networks from spec.podNetwork.cidrs: 10.42.0.0/16, 10.43.0.0/17"

        # cidrs belong to Explicit only: the CRD takes the object, the operator refuses it and says why.
        kvpn.server(namespace, "mixed", routes=[], podNetwork={"cidrs": ["10.42.0.0/16"]}, addressPool=["10.9.0.0/24"])
        mixed = kvpn.wait_ready(SERVERS, namespace, "mixed", "False", "InvalidSpec")
        assert condition_of(mixed, "Ready")["message"].startswith(
            "spec.podNetwork: cidrs are taken only with strategy Explicit (it is Auto)"
        )
    finally:
        core.delete_namespaced_pod("web", namespace, grace_period_seconds=0)
