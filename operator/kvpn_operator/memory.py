"""What the operator keeps in memory between reconciles: address books per server and the peer index entries.

Memory is only a hint. Correctness rests on the API server: an address is held by the peer binding
named after it, and creating a second one fails with 409 Conflict. The book saves the list calls
and the failed creates that would otherwise be needed to find a free address.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kvpn_core.contract import LABEL_PEER_UID, PeerBinding
from kvpn_operator.ipam import AllocationError, Pool, choose_index

Obj = dict[str, Any]

# Not under kvpn.dev/: kopf stores its own state there and leaves those annotations out of the object's
# essence, so a change to them would not wake the handlers, which is all a nudge is for.
ANNOTATION_NUDGE = "reconcile.kvpn.dev/nudge"
_REVISION = re.compile(r"^[0-9a-f]{16}$")


def is_revision(nudge: str | None) -> bool:
    """Whether a nudge names a server revision (other nudges say an address was freed or a server deleted)."""
    return bool(nudge and _REVISION.match(nudge))


@dataclass(frozen=True)
class PeerEntry:
    """A VpnPeer as the server side needs to see it, kept in a kopf index keyed by (namespace, server)."""

    namespace: str
    name: str
    ready: bool
    reason: str
    address: str | None
    """The address in its status: its binding is named after it."""
    server_revision: str | None
    nudge: str | None
    public_keys: frozenset[str] = frozenset()
    """The key its spec asks for and the key its status says it holds (one, when they agree; none for a
    peer whose key is still to be generated): who may compete with whom for a key."""

    @property
    def has_address(self) -> bool:
        return bool(self.address)


class AddressBook:
    """The host indexes of one server's pool that are claimed, and by which peer (UID)."""

    def __init__(self, pool: Pool, bindings: Iterable[Obj]) -> None:
        self.pool = pool
        self._lock = threading.Lock()
        self._owner: dict[int, str] = {}
        self._index: dict[str, int] = {}
        for secret in bindings:
            uid = (secret["metadata"].get("labels") or {}).get(LABEL_PEER_UID, "")
            try:
                binding = PeerBinding.from_secret(secret)
                self._mark(pool.index_of(binding.addresses[0]), uid or binding.peer_uid)
            except (AllocationError, ValueError):
                # Outside the current pool (its peer moves on its next reconcile), or not a binding we can
                # read: skipping it is safe, since claiming its address still meets the API server's 409.
                continue

    def _mark(self, index: int, uid: str) -> None:
        self._owner[index] = uid
        self._index.setdefault(uid, index)

    def index_of_peer(self, uid: str) -> int | None:
        with self._lock:
            return self._index.get(uid)

    def reserve(self, uid: str, requested: str | None) -> int:
        """Picks an index for `uid` and holds it in memory until `release`; AllocationError if none."""
        with self._lock:
            index = choose_index(self.pool, self._owner.keys(), requested)
            self._owner[index] = uid
            return index

    def confirm(self, uid: str, index: int) -> None:
        """`uid`'s claim on `index` exists in the API: it is now the peer's address."""
        with self._lock:
            self._owner[index] = uid
            self._index[uid] = index

    def taken_by_other(self, index: int, uid: str) -> None:
        """The API server holds a claim on `index` this book did not know about."""
        with self._lock:
            self._owner[index] = uid

    def release(self, uid: str, index: int) -> None:
        with self._lock:
            if self._owner.get(index) == uid:
                del self._owner[index]
            if self._index.get(uid) == index:
                del self._index[uid]

    def claimed(self) -> int:
        with self._lock:
            return len(self._owner)


class AddressBooks:
    """One AddressBook per server incarnation (UID) and pool, loaded on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._books: dict[tuple[str, tuple[str, ...]], AddressBook] = {}

    def get(self, server_uid: str, pool: tuple[str, ...], load: Callable[[], list[Obj]]) -> AddressBook:
        key = (server_uid, pool)
        with self._lock:
            book = self._books.get(key)
        if book is None:
            fresh = AddressBook(Pool(pool), load())
            with self._lock:
                book = self._books.setdefault(key, fresh)
        return book

    def peek(self, server_uid: str, pool: tuple[str, ...]) -> AddressBook | None:
        with self._lock:
            return self._books.get((server_uid, pool))

    def forget(self, server_uid: str) -> None:
        with self._lock:
            for key in [k for k in self._books if k[0] == server_uid]:
                del self._books[key]
