"""The VpnPeer's reconcile and release against a fake API: address claims, Secrets, status and its verdicts."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest

from kvpn_core import keys
from kvpn_core.conditions import READY, Reason
from kvpn_core.contract import (
    LABEL_PEER_UID,
    PeerBinding,
    binding_secret_name,
    binding_selector,
    peer_config_secret_name,
)
from kvpn_core.kube import Retry
from kvpn_operator.memory import AddressBooks
from kvpn_operator.peer import index_entry, reconcile_peer, release_peer, waiting_for_addresses
from kvpn_operator.reporting import Report
from kvpn_operator.server import ClusterFacts, ServiceNetworks, reconcile_server
from kvpn_operator.storage import PeerObject, ServerObject
from tests.unit.fakes import FakeStorage, a_gateway

Obj = dict[str, Any]
T0 = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
NS = "vpn"


def with_server(pool: str = "10.8.0.0/24", **spec: object) -> FakeStorage:
    """A fake API holding a VpnServer its own reconcile has made Ready."""
    storage = FakeStorage()
    body = {"addressPool": [pool], "routes": ["10.96.0.0/12"], "expose": {"endpoint": "vpn.example.com:51820"}}
    server = storage.put("vpnservers", {"metadata": {"name": "office", "namespace": NS}, "spec": {**body, **spec}})
    a_gateway(storage, NS, "office", renewed=T0)
    reconcile_server(
        storage,
        ServerObject.model_validate(server),
        facts=ClusterFacts(),
        service_networks=ServiceNetworks(),
        peers=list,
        now=T0,
    )
    return storage


def a_peer(storage: FakeStorage, name: str = "laptop", **spec: object) -> Obj:
    body = {"serverRef": {"name": "office"}, **spec}
    return storage.put("vpnpeers", {"metadata": {"name": name, "namespace": NS}, "spec": body})


def reconcile(storage: FakeStorage, books: AddressBooks, name: str = "laptop") -> Report:
    obj = storage.read("vpnpeers", NS, name)
    assert obj is not None
    return reconcile_peer(storage, books, PeerObject.model_validate(obj), now=T0)


def status(storage: FakeStorage, name: str = "laptop") -> Obj:
    obj = storage.read("vpnpeers", NS, name)
    assert obj is not None
    return dict(obj.get("status") or {})


def config(storage: FakeStorage, name: str = "laptop") -> dict[str, str]:
    secret = storage.read("secrets", NS, peer_config_secret_name(name))
    assert secret is not None
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def bindings(storage: FakeStorage) -> list[PeerBinding]:
    return [PeerBinding.from_secret(s) for s in storage.list_secrets(NS, label_selector=binding_selector("office"))]


def test_a_peer_gets_an_address_a_binding_a_config_and_ready() -> None:
    storage = with_server()
    a_peer(storage)
    report = reconcile(storage, AddressBooks())
    assert (report.outcome.status, report.outcome.finding.reason) == ("True", Reason.READY)
    current = status(storage)
    assert (current["address"], current["configSecretName"]) == ("10.8.0.2", "kvpn-peer-laptop")
    [binding] = bindings(storage)
    assert binding.addresses[0] == current["address"]
    assert binding.public_key == current["publicKey"] == keys.public_key_of(config(storage)["privateKey"])
    assert "Endpoint = vpn.example.com:51820" in config(storage)["wg0.conf"]
    ready = next(c for c in current["conditions"] if c["type"] == READY)
    assert ready["observedGeneration"] == 1


def test_a_peer_of_a_server_reached_through_the_api_server_gets_a_config_without_endpoint() -> None:
    """A wg-quick file without Endpoint is valid; `kubectl vpn up --via api` sets a local one."""
    storage = with_server(expose={"type": "ApiServer"})
    a_peer(storage)
    report = reconcile(storage, AddressBooks())
    assert (report.outcome.status, report.outcome.finding.reason) == ("True", Reason.READY)
    wg0 = config(storage)["wg0.conf"]
    assert "Endpoint" not in wg0
    assert "[Peer]\nPublicKey = " in wg0
    assert "AllowedIPs = 10.96.0.0/12" in wg0
    assert "through the API server" in wg0.splitlines()[0]


def test_a_server_switched_to_the_api_server_rewrites_its_peers_configs() -> None:
    storage = with_server()
    a_peer(storage)
    books = AddressBooks()
    reconcile(storage, books)
    assert "Endpoint = vpn.example.com:51820" in config(storage)["wg0.conf"]
    storage.edit("vpnservers", NS, "office", {"spec": {"expose": {"type": "ApiServer", "endpoint": None}}})
    server = storage.read("vpnservers", NS, "office")
    assert server is not None
    reconcile_server(
        storage,
        ServerObject.model_validate(server),
        facts=ClusterFacts(),
        service_networks=ServiceNetworks(),
        peers=list,
        now=T0,
    )
    reconcile(storage, books)
    assert "Endpoint" not in config(storage)["wg0.conf"]
    assert status(storage)["serverRevision"] == storage.read("vpnservers", NS, "office")["status"]["revision"]


def test_a_second_reconcile_writes_nothing() -> None:
    storage = with_server()
    a_peer(storage)
    books = AddressBooks()
    reconcile(storage, books)
    writes = list(storage.writes)
    assert not reconcile(storage, books).transition
    assert storage.writes == writes


def test_after_a_restart_the_peer_keeps_its_address_and_key() -> None:
    """A new operator process has empty address books: the binding named after the address is adopted."""
    storage = with_server()
    a_peer(storage)
    reconcile(storage, AddressBooks())
    before, key = status(storage)["address"], config(storage)["privateKey"]
    writes = list(storage.writes)
    reconcile(storage, AddressBooks())
    assert (status(storage)["address"], config(storage)["privateKey"]) == (before, key)
    assert storage.writes == writes


def test_two_peers_get_different_addresses_even_from_separate_books() -> None:
    """Two operator processes with their own memory: the API server's 409 keeps the addresses apart."""
    storage = with_server()
    a_peer(storage, "one")
    a_peer(storage, "two")
    reconcile(storage, AddressBooks(), "one")
    reconcile(storage, AddressBooks(), "two")
    assert status(storage, "one")["address"] != status(storage, "two")["address"]
    assert len(bindings(storage)) == 2


def test_a_full_pool_says_so_and_the_peer_is_found_waiting() -> None:
    storage = with_server(pool="10.8.0.0/30")  # one peer address: .2
    a_peer(storage, "one")
    a_peer(storage, "two")
    books = AddressBooks()
    reconcile(storage, books, "one")
    report = reconcile(storage, books, "two")
    assert (report.outcome.finding.reason, report.outcome.warning) == (Reason.POOL_EXHAUSTED, True)
    obj = storage.read("vpnpeers", NS, "two")
    assert obj is not None
    _, entry = index_entry(obj)
    assert waiting_for_addresses([entry]) == [entry]


def test_a_missing_server_is_reported() -> None:
    storage = FakeStorage()
    a_peer(storage)
    report = reconcile(storage, AddressBooks())
    assert (report.outcome.status, report.outcome.finding.reason, report.outcome.warning) == (
        "False",
        Reason.SERVER_NOT_FOUND,
        True,
    )
    assert storage.count("secrets") == 0


def test_a_server_whose_ready_is_for_an_older_spec_is_waited_for() -> None:
    """The server's spec changed and its reconcile has not run yet: no verdict from the stale status."""
    storage = with_server()
    storage.edit("vpnservers", NS, "office", {"spec": {"mtu": 1380}})
    a_peer(storage)
    with pytest.raises(Retry, match="older generation"):
        reconcile(storage, AddressBooks())
    assert storage.count("secrets") == 1  # the server's key only


def test_a_config_secret_of_someone_else_is_not_overwritten() -> None:
    storage = with_server()
    storage.put("secrets", {"metadata": {"name": peer_config_secret_name("laptop"), "namespace": NS}, "data": {}})
    a_peer(storage)
    books = AddressBooks()
    reconcile(storage, books)  # new peer: the create meets 409, and the Secret is read
    assert next(c for c in status(storage)["conditions"] if c["type"] == READY)["reason"] == Reason.SECRET_CONFLICT
    secret = storage.read("secrets", NS, peer_config_secret_name("laptop"))
    assert secret is not None
    assert secret["data"] == {}


def test_bring_your_own_key_keeps_the_private_key_out_of_the_cluster() -> None:
    storage = with_server()
    public = keys.public_key_of(keys.generate_private_key())
    a_peer(storage, publicKey=public)
    reconcile(storage, AddressBooks())
    assert "privateKey" not in config(storage)
    assert status(storage)["publicKey"] == public


def test_an_invalid_public_key_is_refused() -> None:
    storage = with_server()
    a_peer(storage, publicKey="A" * 43 + "=")  # the schema's pattern lets all zeros through; WireGuard does not
    report = reconcile(storage, AddressBooks())
    assert (report.outcome.finding.reason, report.outcome.warning) == (Reason.INVALID_PUBLIC_KEY, True)
    assert storage.count("secrets") == 1  # the server's key only: no binding, no config


def test_release_deletes_the_binding_once() -> None:
    storage = with_server()
    peer = a_peer(storage)
    books = AddressBooks()
    reconcile(storage, books)
    [binding] = bindings(storage)
    assert release_peer(storage, books, PeerObject.model_validate(peer))
    assert storage.read("secrets", NS, binding_secret_name("office", binding.addresses[0])) is None
    assert not release_peer(storage, books, PeerObject.model_validate(peer))


def test_release_spares_a_binding_of_another_peer() -> None:
    storage = with_server()
    a_peer(storage, "one")
    other = a_peer(storage, "two")
    books = AddressBooks()
    reconcile(storage, books, "one")
    assert not release_peer(storage, books, PeerObject.model_validate(other))
    [binding] = bindings(storage)
    secret = storage.read("secrets", NS, binding_secret_name("office", binding.addresses[0]))
    assert secret is not None
    assert secret["metadata"]["labels"][LABEL_PEER_UID] != other["metadata"]["uid"]
