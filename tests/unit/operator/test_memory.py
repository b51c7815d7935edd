"""The in-memory address books: loaded from peer bindings, safe under concurrent reconciles."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kvpn_core.contract import LABEL_PEER_UID, PeerBinding, encode_data
from kvpn_operator import builders
from kvpn_operator.ipam import AllocationError, Pool
from kvpn_operator.memory import AddressBook, AddressBooks

Obj = dict[str, Any]
SERVER: Obj = {
    "apiVersion": "kvpn.dev/v1alpha1",
    "kind": "VpnServer",
    "metadata": {"name": "office", "namespace": "vpn", "uid": "server-uid"},
}
POOL = ("10.8.0.0/24",)


def binding_secret(uid: str, address: str) -> Obj:
    return builders.binding_secret(
        SERVER, PeerBinding(peer_namespace="dev", peer_name=uid, peer_uid=uid, addresses=[address])
    )


def test_book_loads_claims_from_bindings() -> None:
    book = AddressBook(Pool(POOL), [binding_secret("a", "10.8.0.2"), binding_secret("b", "10.8.0.5")])
    assert book.index_of_peer("a") == 2
    assert book.index_of_peer("b") == 5
    assert book.index_of_peer("c") is None
    assert book.claimed() == 2
    assert book.reserve("c", None) == 3


def test_book_skips_bindings_outside_the_pool() -> None:
    """After a pool change the old bindings stay until their peers move; they hold nothing in the new pool."""
    book = AddressBook(Pool(POOL), [binding_secret("a", "10.9.0.2"), binding_secret("b", "10.8.0.1")])
    assert book.claimed() == 0
    assert book.index_of_peer("a") is None
    assert book.reserve("c", None) == 2


def test_book_takes_the_owner_from_the_label() -> None:
    secret = binding_secret("data-uid", "10.8.0.2")
    secret["metadata"]["labels"][LABEL_PEER_UID] = "label-uid"
    book = AddressBook(Pool(POOL), [secret])
    assert book.index_of_peer("label-uid") == 2
    assert book.index_of_peer("data-uid") is None


def test_book_skips_a_malformed_binding() -> None:
    broken = binding_secret("x", "10.8.0.9")
    broken["data"] = encode_data({"peerName": "x"})  # no addresses
    book = AddressBook(Pool(POOL), [binding_secret("a", "10.8.0.2"), broken])
    assert book.index_of_peer("a") == 2


def test_reserve_confirm_release() -> None:
    book = AddressBook(Pool(POOL), [])
    index = book.reserve("a", None)
    assert index == 2
    assert book.index_of_peer("a") is None  # held, not yet the peer's address
    assert book.reserve("b", None) == 3
    book.confirm("a", index)
    assert book.index_of_peer("a") == 2
    book.release("a", index)
    assert book.index_of_peer("a") is None
    assert book.claimed() == 1
    assert book.reserve("c", None) == 2


def test_release_of_an_unconfirmed_reservation_frees_it() -> None:
    book = AddressBook(Pool(POOL), [])
    index = book.reserve("a", None)
    book.release("a", index)
    assert book.claimed() == 0


def test_release_by_another_peer_is_a_no_op() -> None:
    book = AddressBook(Pool(POOL), [])
    book.confirm("a", book.reserve("a", None))
    book.release("b", 2)
    assert book.index_of_peer("a") == 2
    assert book.claimed() == 1


def test_release_of_an_old_index_keeps_the_new_one() -> None:
    """A peer that moved: freeing its old address must not forget the new one."""
    book = AddressBook(Pool(POOL), [])
    book.confirm("a", book.reserve("a", None))
    new = book.reserve("a", "10.8.0.9")
    book.confirm("a", new)
    book.release("a", 2)
    assert book.index_of_peer("a") == 9
    assert book.claimed() == 1


def test_reserve_a_requested_address() -> None:
    book = AddressBook(Pool(POOL), [binding_secret("a", "10.8.0.2")])
    assert book.reserve("b", "10.8.0.200") == 200
    with pytest.raises(AllocationError) as taken:
        book.reserve("c", "10.8.0.2")
    assert taken.value.finding.reason == "AddressConflict"
    with pytest.raises(AllocationError) as outside:
        book.reserve("c", "10.9.0.2")
    assert outside.value.finding.reason == "AddressOutOfPool"


def test_taken_by_other_skips_the_index_without_giving_it_to_anyone() -> None:
    book = AddressBook(Pool(POOL), [])
    book.taken_by_other(2, "")
    assert book.reserve("a", None) == 3
    assert book.index_of_peer("") is None
    with pytest.raises(AllocationError, match="already taken"):
        book.reserve("b", "10.8.0.2")


def test_reserve_until_full() -> None:
    book = AddressBook(Pool(("10.8.0.0/29",)), [])
    assert [book.reserve(f"p{i}", None) for i in range(5)] == [2, 3, 4, 5, 6]
    with pytest.raises(AllocationError) as full:
        book.reserve("p5", None)
    assert full.value.finding.reason == "PoolExhausted"


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads as often as possible, so a missing lock would show."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_reservations_never_share_an_index() -> None:
    book = AddressBook(Pool(("10.8.0.0/16",)), [])
    threads, per_thread = 16, 50
    start = threading.Barrier(threads)
    results: list[list[tuple[str, int]]] = [[] for _ in range(threads)]

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            uid = f"peer-{t}-{i}"
            index = book.reserve(uid, None)
            book.confirm(uid, index)
            results[t].append((uid, index))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    claims = [claim for r in results for claim in r]
    assert len(claims) == threads * per_thread
    assert len({index for _, index in claims}) == threads * per_thread
    assert book.claimed() == threads * per_thread
    assert all(book.index_of_peer(uid) == index for uid, index in claims)


def test_books_load_once_per_server_and_pool() -> None:
    books = AddressBooks()
    loads: list[str] = []

    def load() -> list[Obj]:
        loads.append("x")
        return [binding_secret("a", "10.8.0.2")]

    assert books.peek("server-uid", POOL) is None
    book = books.get("server-uid", POOL, load)
    assert books.get("server-uid", POOL, load) is book
    assert books.peek("server-uid", POOL) is book
    assert len(loads) == 1
    assert book.index_of_peer("a") == 2


def test_books_new_pool_or_new_server_incarnation_is_a_new_book() -> None:
    books = AddressBooks()
    first = books.get("server-uid", POOL, list)
    assert books.get("server-uid", ("10.8.0.0/24", "fd00:8::/64"), list) is not first
    assert books.get("recreated-uid", POOL, list) is not first


def test_books_forget_drops_every_pool_of_that_server_only() -> None:
    books = AddressBooks()
    books.get("server-uid", POOL, list)
    books.get("server-uid", ("10.9.0.0/24",), list)
    other = books.get("other-uid", POOL, list)
    books.forget("server-uid")
    assert books.peek("server-uid", POOL) is None
    assert books.peek("server-uid", ("10.9.0.0/24",)) is None
    assert books.peek("other-uid", POOL) is other


@pytest.mark.usefixtures("busy_switching")
def test_books_concurrent_first_use_hands_out_one_book() -> None:
    books = AddressBooks()
    start = threading.Barrier(8)
    got: list[AddressBook] = []

    def work() -> None:
        start.wait()
        got.append(books.get("server-uid", POOL, list))

    workers = [threading.Thread(target=work) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert len(got) == 8
    assert len({id(b) for b in got}) == 1
