"""The VpnPeer's reconcile and release against a fake API: address claims, Secrets, status and its verdicts."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import Callable
from typing import Any

import kopf
import pytest

from kvpn_agent.desired import build_desired
from kvpn_core import keys
from kvpn_core.conditions import READY, Reason
from kvpn_core.contract import (
    LABEL_PEER_UID,
    PeerBinding,
    binding_secret_name,
    binding_selector,
    peer_config_secret_name,
    server_key_secret_name,
)
from kvpn_core.kube import Retry
from kvpn_operator import handlers
from kvpn_operator.memory import ANNOTATION_NUDGE, AddressBooks, PeerEntry
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
    storage.put("vpnservers", {"metadata": {"name": "office", "namespace": NS}, "spec": {**body, **spec}})
    a_gateway(storage, NS, "office", renewed=T0)
    resync(storage, peers=list)
    return storage


def resync(storage: FakeStorage, name: str = "office", peers: Callable[[], list[PeerEntry]] | None = None) -> None:
    """The server's reconcile, with its peers from the index as kopf would hold them (or ``peers``)."""
    server = storage.read("vpnservers", NS, name)
    assert server is not None
    reconcile_server(
        storage,
        ServerObject.model_validate(server),
        facts=ClusterFacts(),
        service_networks=ServiceNetworks(),
        peers=peers or (lambda: peer_index(storage).get((NS, name), [])),
        now=T0,
    )


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
    resync(storage, peers=list)
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


# --- one public key per server ---------------------------------------------------------------------------


def a_peer_in(storage: FakeStorage, namespace: str, name: str, server: str = "office", **spec: object) -> Obj:
    body = {"serverRef": {"name": server, "namespace": NS}, **spec}
    return storage.put("vpnpeers", {"metadata": {"name": name, "namespace": namespace}, "spec": body})


def peer_index(storage: FakeStorage) -> dict[tuple[str, str], list[PeerEntry]]:
    """The operator's peers_by_server index, as kopf would hold it for the objects stored now."""
    index: dict[tuple[str, str], list[PeerEntry]] = {}
    for (resource, _, _), obj in sorted(storage.objects.items()):
        if resource == "vpnpeers":
            key, entry = index_entry(obj)
            index.setdefault(key, []).append(entry)
    return index


def key_index(storage: FakeStorage) -> dict[tuple[str, str, str], list[PeerEntry]]:
    """The operator's peers_by_key index, as kopf would hold it for the objects stored now."""
    index: dict[tuple[str, str, str], list[PeerEntry]] = {}
    for (resource, _, _), obj in sorted(storage.objects.items()):
        if resource == "vpnpeers":
            for key, entry in asyncio.run(handlers.peers_by_key(body=kopf.Body(obj))).items():
                index.setdefault(key, []).append(entry)
    return index


def reconcile_in(storage: FakeStorage, books: AddressBooks, namespace: str, name: str) -> Report:
    obj = storage.read("vpnpeers", namespace, name)
    assert obj is not None
    index = key_index(storage)
    return reconcile_peer(
        storage, books, PeerObject.model_validate(obj), now=T0, holders=lambda *key: index.get(key, [])
    )


def ready_of(storage: FakeStorage, namespace: str, name: str) -> Obj:
    obj = storage.read("vpnpeers", namespace, name)
    assert obj is not None
    return next(c for c in obj["status"]["conditions"] if c["type"] == READY)


def a_public_key() -> str:
    return keys.public_key_of(keys.generate_private_key())


def served_by_the_gateways(storage: FakeStorage, server: str = "office") -> tuple[list[str], list[str]]:
    """What an agent makes of the server's bindings: the peers it programs and those it refuses for their key."""
    obj, key = storage.read("vpnservers", NS, server), storage.read("secrets", NS, server_key_secret_name(server))
    assert obj is not None
    desired = build_desired(obj, key, storage.list_secrets(NS, label_selector=binding_selector(server)))
    refused = [p.peer_name for p in desired.problems if p.finding.reason == Reason.DUPLICATE_PUBLIC_KEY]
    return [p.peer_name for p in desired.peers], refused


DUPLICATE_MESSAGE = (
    "another VpnPeer of VpnServer vpn/office already uses this public key; generate a new key pair and put its "
    "public key in spec.publicKey (kubectl vpn join makes one)"
)


def test_a_peer_reusing_the_key_of_an_older_peer_is_refused_and_never_reaches_the_gateways() -> None:
    storage = with_server(peerNamespaces=["*"])
    books, key = AddressBooks(), a_public_key()
    a_peer_in(storage, "team-a", "alice-laptop", publicKey=key)
    assert reconcile_in(storage, books, "team-a", "alice-laptop").outcome.status == "True"
    a_peer_in(storage, "team-b", "bob-laptop", publicKey=key)
    report = reconcile_in(storage, books, "team-b", "bob-laptop")
    # What the handler turns into a Warning Event on the newer peer, with the condition's reason and message.
    assert (report.outcome.status, report.outcome.finding.reason, report.outcome.warning, report.transition) == (
        "False",
        Reason.DUPLICATE_PUBLIC_KEY,
        True,
        True,
    )
    assert report.outcome.finding.message == DUPLICATE_MESSAGE
    assert ready_of(storage, "team-b", "bob-laptop")["reason"] == "DuplicatePublicKey"
    bob = storage.read("vpnpeers", "team-b", "bob-laptop")
    assert bob is not None
    assert "address" not in bob["status"]
    assert [b.peer_name for b in bindings(storage)] == ["alice-laptop"]
    assert storage.read("secrets", "team-b", peer_config_secret_name("bob-laptop")) is None
    assert served_by_the_gateways(storage) == (["alice-laptop"], [])


def test_the_refusal_names_neither_the_other_peer_nor_its_namespace() -> None:
    storage = with_server(peerNamespaces=["*"])
    books, key = AddressBooks(), a_public_key()
    a_peer_in(storage, "secret-team", "ceo-phone", publicKey=key)
    reconcile_in(storage, books, "secret-team", "ceo-phone")
    a_peer_in(storage, "interns", "laptop", publicKey=key)
    message = reconcile_in(storage, books, "interns", "laptop").outcome.finding.message
    assert "ceo" not in message
    assert "secret-team" not in message
    assert "vpn/office" in message  # its own server, which the user named


def test_the_older_peer_is_unaffected_and_each_side_settles() -> None:
    storage = with_server()
    books, key = AddressBooks(), a_public_key()
    a_peer_in(storage, NS, "one", publicKey=key)
    reconcile_in(storage, books, NS, "one")
    before = status(storage, "one")
    a_peer_in(storage, NS, "two", publicKey=key)
    reconcile_in(storage, books, NS, "two")
    writes = list(storage.writes)
    assert not reconcile_in(storage, books, NS, "one").transition
    assert not reconcile_in(storage, books, NS, "two").transition
    assert storage.writes == writes
    assert status(storage, "one") == before
    assert ready_of(storage, NS, "one")["status"] == "True"


def test_a_peer_is_never_the_duplicate_of_itself() -> None:
    """Its own index entry holds its key and its address: a fresh operator (empty books) keeps it Ready."""
    storage = with_server()
    a_peer_in(storage, NS, "laptop", publicKey=a_public_key())
    reconcile_in(storage, AddressBooks(), NS, "laptop")
    writes = list(storage.writes)
    report = reconcile_in(storage, AddressBooks(), NS, "laptop")
    assert (report.outcome.finding.reason, report.transition) == (Reason.READY, False)
    assert storage.writes == writes


def test_peers_of_different_servers_may_share_a_key() -> None:
    """Each server has an interface of its own on a gateway: one key on two interfaces is no conflict."""
    storage = with_server()
    body = {"addressPool": ["10.9.0.0/24"], "routes": ["10.96.0.0/12"], "expose": {"endpoint": "lab.example.com:51821"}}
    storage.put("vpnservers", {"metadata": {"name": "lab", "namespace": NS}, "spec": body})
    a_gateway(storage, NS, "lab", renewed=T0)
    resync(storage, "lab", peers=list)
    books, key = AddressBooks(), a_public_key()
    a_peer_in(storage, NS, "office-laptop", publicKey=key)
    a_peer_in(storage, NS, "lab-laptop", server="lab", publicKey=key)
    assert reconcile_in(storage, books, NS, "office-laptop").outcome.status == "True"
    assert reconcile_in(storage, books, NS, "lab-laptop").outcome.status == "True"
    assert served_by_the_gateways(storage, "office") == (["office-laptop"], [])
    assert served_by_the_gateways(storage, "lab") == (["lab-laptop"], [])


def test_the_key_goes_to_the_older_binding_as_on_the_gateways() -> None:
    """The older peer's binding may be the newer one: the gateways go by bindings, and so does the operator.

    "two" is created first with a key of its own and later takes "one"'s key: its binding is the older,
    so the gateways serve "two" and refuse "one"; the operator says the same and removes "one"'s binding.
    """
    storage = with_server()
    books, key = AddressBooks(), a_public_key()
    a_peer_in(storage, NS, "two", publicKey=a_public_key())
    reconcile_in(storage, books, NS, "two")
    a_peer_in(storage, NS, "one", publicKey=key)
    reconcile_in(storage, books, NS, "one")
    storage.edit("vpnpeers", NS, "two", {"spec": {"publicKey": key}})
    assert reconcile_in(storage, books, NS, "two").outcome.status == "True"
    assert served_by_the_gateways(storage) == (["two"], ["one"])  # before the operator settles "one"
    report = reconcile_in(storage, books, NS, "one")
    assert (report.outcome.finding.reason, report.transition) == (Reason.DUPLICATE_PUBLIC_KEY, True)
    assert [b.peer_name for b in bindings(storage)] == ["two"]
    assert served_by_the_gateways(storage) == (["two"], [])
    assert "address" not in (storage.read("vpnpeers", NS, "one") or {})["status"]


def test_bindings_created_in_the_same_second_are_ordered_by_name_as_on_the_gateways() -> None:
    storage = with_server()
    books, key = AddressBooks(), a_public_key()
    for name in ("one", "two"):
        a_peer_in(storage, NS, name, publicKey=a_public_key())
        reconcile_in(storage, books, NS, name)
    for secret in storage.list_secrets(NS, label_selector=binding_selector("office")):
        storage.edit(
            "secrets", NS, secret["metadata"]["name"], {"metadata": {"creationTimestamp": "2024-05-01T12:00:00Z"}}
        )
    for name in ("two", "one"):  # "two" holds .3, "one" .2: the binding kvpn-office-10-8-0-2 sorts first
        storage.edit("vpnpeers", NS, name, {"spec": {"publicKey": key}})
        reconcile_in(storage, books, NS, name)
    assert served_by_the_gateways(storage) == (["one"], ["two"])
    assert reconcile_in(storage, books, NS, "two").outcome.finding.reason == Reason.DUPLICATE_PUBLIC_KEY
    assert reconcile_in(storage, books, NS, "one").outcome.status == "True"


def test_a_switched_off_peer_holds_no_key_as_on_the_gateways() -> None:
    storage = with_server()
    books, key = AddressBooks(), a_public_key()
    a_peer_in(storage, NS, "old", publicKey=key, disabled=True)
    assert reconcile_in(storage, books, NS, "old").outcome.finding.reason == Reason.DISABLED
    a_peer_in(storage, NS, "new", publicKey=key)
    assert reconcile_in(storage, books, NS, "new").outcome.status == "True"
    assert served_by_the_gateways(storage) == (["new"], [])


def test_the_servers_own_key_is_refused() -> None:
    storage = with_server()
    server = storage.read("vpnservers", NS, "office")
    assert server is not None
    a_peer_in(storage, NS, "laptop", publicKey=server["status"]["publicKey"])
    report = reconcile_in(storage, AddressBooks(), NS, "laptop")
    assert (report.outcome.finding.reason, report.outcome.warning) == (Reason.DUPLICATE_PUBLIC_KEY, True)
    assert report.outcome.finding.message.startswith("this public key is VpnServer vpn/office's own;")
    assert bindings(storage) == []


def test_two_peers_that_missed_each_other_are_woken_by_their_servers_resync() -> None:
    """Reconciled at the same moment, neither saw the other's binding: both say Ready, the gateways serve one."""
    storage = with_server()
    books, key = AddressBooks(), a_public_key()
    for name in ("one", "two"):
        a_peer_in(storage, NS, name, publicKey=key)
        obj = storage.read("vpnpeers", NS, name)
        assert obj is not None
        reconcile_peer(storage, books, PeerObject.model_validate(obj), now=T0, holders=lambda *_: [])
    assert served_by_the_gateways(storage) == (["one"], ["two"])

    resync(storage)
    nudges = {
        name: (storage.read("vpnpeers", NS, name) or {})["metadata"]["annotations"][ANNOTATION_NUDGE]
        for name in ("one", "two")
    }
    assert nudges["one"] == nudges["two"]
    assert nudges["one"].startswith("key-")
    writes = list(storage.writes)
    resync(storage)  # the same group is not woken twice
    assert [w for w in storage.writes[len(writes) :] if w[1] == "vpnpeers"] == []
    assert reconcile_in(storage, books, NS, "two").outcome.finding.reason == Reason.DUPLICATE_PUBLIC_KEY
    assert reconcile_in(storage, books, NS, "one").outcome.status == "True"
    assert served_by_the_gateways(storage) == (["one"], [])


# --- through the handlers: the Event, and the nudges that wake the newer peer -----------------------------


class Operator:
    """The kopf handlers driven by hand over a fake API, with kopf's indexes built from what is stored."""

    def __init__(self, storage: FakeStorage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.storage, self.memo = storage, handlers.Services(storage)
        self.events: list[tuple[str, str, str, str]] = []

        def event(body: kopf.Body, *, type: str, reason: str, message: str) -> None:
            self.events.append((body.metadata.name or "", type, reason, message))

        monkeypatch.setattr(kopf, "event", event)

    def indexes(self) -> dict[str, Any]:
        servers = {(ns, name): [o] for (r, ns, name), o in self.storage.objects.items() if r == "vpnservers"}
        return {
            "peers_by_server": peer_index(self.storage),
            "peers_by_key": key_index(self.storage),
            "servers_by_name": servers,
        }

    def body(self, namespace: str, name: str) -> kopf.Body:
        obj = self.storage.read("vpnpeers", namespace, name)
        assert obj is not None
        return kopf.Body(obj)

    def reconcile(self, namespace: str, name: str) -> None:
        handlers.reconcile_vpnpeer(body=self.body(namespace, name), memo=self.memo, **self.indexes())

    def delete(self, namespace: str, name: str) -> None:
        handlers.release_vpnpeer(body=self.body(namespace, name), memo=self.memo, **self.indexes())
        del self.storage.objects[("vpnpeers", namespace, name)]  # the finalizer is gone: so is the object

    def nudge_of(self, namespace: str, name: str) -> str | None:
        obj = self.storage.read("vpnpeers", namespace, name)
        assert obj is not None
        return (obj["metadata"].get("annotations") or {}).get(ANNOTATION_NUDGE)


def test_the_newer_peer_gets_a_warning_event_that_names_no_other_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    operator = Operator(with_server(peerNamespaces=["*"]), monkeypatch)
    key = a_public_key()
    a_peer_in(operator.storage, "team-a", "alice-laptop", publicKey=key)
    operator.reconcile("team-a", "alice-laptop")
    a_peer_in(operator.storage, "team-b", "bob-laptop", publicKey=key)
    operator.reconcile("team-b", "bob-laptop")
    assert operator.events[-1] == ("bob-laptop", "Warning", "DuplicatePublicKey", DUPLICATE_MESSAGE)
    assert not [e for e in operator.events if e[0] == "alice-laptop" and e[1] == "Warning"]


def test_deleting_the_older_peer_makes_the_newer_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    operator = Operator(with_server(peerNamespaces=["*"]), monkeypatch)
    key = a_public_key()
    a_peer_in(operator.storage, "team-a", "alice-laptop", publicKey=key)
    operator.reconcile("team-a", "alice-laptop")
    a_peer_in(operator.storage, "team-b", "bob-laptop", publicKey=key)
    operator.reconcile("team-b", "bob-laptop")
    assert ready_of(operator.storage, "team-b", "bob-laptop")["reason"] == "DuplicatePublicKey"
    operator.delete("team-a", "alice-laptop")
    assert (operator.nudge_of("team-b", "bob-laptop") or "").startswith("key-freed-")
    operator.reconcile("team-b", "bob-laptop")  # what kopf does on the nudge's change
    assert ready_of(operator.storage, "team-b", "bob-laptop")["status"] == "True"
    assert operator.events[-1][:3] == ("bob-laptop", "Normal", "Ready")
    assert served_by_the_gateways(operator.storage) == (["bob-laptop"], [])


def test_the_older_peer_taking_a_new_key_makes_the_newer_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    operator = Operator(with_server(), monkeypatch)
    key = a_public_key()
    a_peer_in(operator.storage, NS, "one", publicKey=key)
    operator.reconcile(NS, "one")
    a_peer_in(operator.storage, NS, "two", publicKey=key)
    operator.reconcile(NS, "two")
    assert ready_of(operator.storage, NS, "two")["reason"] == "DuplicatePublicKey"
    nudged = operator.nudge_of(NS, "two")
    operator.storage.edit("vpnpeers", NS, "one", {"spec": {"publicKey": a_public_key()}})
    operator.reconcile(NS, "one")
    assert operator.nudge_of(NS, "two") not in (None, nudged)
    operator.reconcile(NS, "two")
    assert ready_of(operator.storage, NS, "two")["status"] == "True"
    assert sorted(served_by_the_gateways(operator.storage)[0]) == ["one", "two"]


def test_a_peer_whose_verdict_stands_nudges_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nudges settle: the older peer, woken by the newer one's refusal, wakes no one again."""
    operator = Operator(with_server(), monkeypatch)
    key = a_public_key()
    a_peer_in(operator.storage, NS, "one", publicKey=key)
    operator.reconcile(NS, "one")
    a_peer_in(operator.storage, NS, "two", publicKey=key)
    operator.reconcile(NS, "two")
    assert (operator.nudge_of(NS, "one") or "").startswith("key-")
    nudged = operator.nudge_of(NS, "two")
    operator.reconcile(NS, "one")
    operator.reconcile(NS, "two")
    assert operator.nudge_of(NS, "two") == nudged
