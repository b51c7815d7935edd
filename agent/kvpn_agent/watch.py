"""List-then-watch of one kind of object into an in-memory store, in a thread that reconnects forever."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

from kubernetes.client import ApiClient
from urllib3.exceptions import HTTPError

from kvpn_core.kube import Kube, KubeError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]
"""(namespace, name)."""

WATCH_SECONDS = 240
"""The API server ends each watch after this long; the next one resumes from the last resourceVersion."""

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 5.0
"""Retry delays while the API server is unreachable: short, so the agent catches up soon after it returns."""

_KEPT_METADATA = ("namespace", "name", "uid", "resourceVersion", "creationTimestamp", "generation", "labels")


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def trim(obj: Obj) -> Obj:
    """The parts of an object the agent reads; managedFields and annotations would double its memory."""
    meta = obj.get("metadata") or {}
    kept: Obj = {k: v for k, v in obj.items() if k in ("apiVersion", "kind", "type", "data", "spec", "status")}
    kept["metadata"] = {k: meta[k] for k in _KEPT_METADATA if k in meta}
    return kept


class Store:
    """Objects by (namespace, name), plus an index (for Secrets: by the server they belong to)."""

    def __init__(self, index: Callable[[Obj], Key | None] | None = None) -> None:
        self._lock = threading.Lock()
        self._items: dict[Key, Obj] = {}
        self._index_of = index
        self._index: dict[Key, set[Key]] = {}

    def get(self, key: Key) -> Obj | None:
        with self._lock:
            return self._items.get(key)

    def names(self) -> list[Key]:
        with self._lock:
            return list(self._items)

    def indexed(self, key: Key) -> list[Obj]:
        with self._lock:
            return [self._items[k] for k in self._index.get(key, ())]

    def put(self, obj: Obj) -> Obj | None:
        """Stores ``obj``; returns the object it replaced."""
        key = key_of(obj)
        with self._lock:
            old = self._items.get(key)
            self._unindex(key, old)
            self._items[key] = obj
            if self._index_of is not None and (ix := self._index_of(obj)) is not None:
                self._index.setdefault(ix, set()).add(key)
            return old

    def remove(self, key: Key) -> Obj | None:
        with self._lock:
            old = self._items.pop(key, None)
            self._unindex(key, old)
            return old

    def _unindex(self, key: Key, old: Obj | None) -> None:
        if old is not None and self._index_of is not None and (ix := self._index_of(old)) is not None:
            self._index.get(ix, set()).discard(key)

    def replace(self, objs: list[Obj]) -> list[Obj]:
        """Makes the store hold exactly ``objs``; returns every object added, changed or removed."""
        fresh = {key_of(o): o for o in objs}
        changed = []
        for key in set(self.names()) - set(fresh):
            if (old := self.remove(key)) is not None:
                changed.append(old)
        for obj in fresh.values():
            old = self.put(obj)
            if old is None or _version(old) != _version(obj):
                changed.append(obj)
        return changed


def _version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class Expired(Exception):  # noqa: N818 - a verdict, like the API's 410 Gone it stands for
    """The watch's resourceVersion is too old: list again."""


class Informer:
    """Keeps ``store`` equal to the objects at ``path`` (label-selected) and calls ``on_change`` per change.

    ``synced`` is set after the first complete list; the store then stays, stale but whole, through
    any outage, which is what lets the agent keep serving while the API server is away.
    """

    def __init__(
        self,
        api: ApiClient,
        path: str,
        on_change: Callable[[Obj], None],
        *,
        label_selector: str = "",
        index: Callable[[Obj], Key | None] | None = None,
    ) -> None:
        self.api = api
        self.kube = Kube(api, timeout=30.0)
        self.path = path
        self.on_change = on_change
        self.label_selector = label_selector
        self.store = Store(index)
        self.synced = threading.Event()
        self.connected = False
        self._failing = False
        self._stop = threading.Event()
        self._response: Any = None
        """The open watch response, for reconnect (from another thread)."""
        self._ending = threading.Event()
        """Set by reconnect: the broken stream that follows is the one it ended, not a failure."""
        self._thread = threading.Thread(target=self._run, name=f"watch {path}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def reconnect(self) -> None:
        """Ends the open watch now; the next resumes from its last resourceVersion on a new connection.
        For after an outage of the node's own network: the API server's events sent meanwhile wait behind
        TCP's retransmission backoff (as long as the outage was), or the connection is dead and only the
        read timeout, minutes away, would say so."""
        connection = getattr(self._response, "connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            self._ending.set()
            with contextlib.suppress(OSError):  # closed meanwhile: nothing to end
                sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            try:
                version = self._list()
                delay = BACKOFF_FIRST
                while not self._stop.is_set():
                    version = self._watch(version)
            except Expired:
                continue
            except (KubeError, HTTPError, OSError, ValueError) as exc:
                if not self._failing:  # once per outage, not once per retry
                    log.warning("API request failed, retrying", extra={"path": self.path, "error": _short(exc)})
                self.connected, self._failing = False, True
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def _query(self, **extra: str) -> dict[str, str]:
        query = {"labelSelector": self.label_selector} if self.label_selector else {}
        return {**query, **extra}

    def _list(self) -> str:
        listing = self.kube.request("GET", self.path, query=self._query())
        changed = self.store.replace([trim(o) for o in listing.get("items") or []])
        if not self.connected:
            log.info("listed", extra={"path": self.path, "objects": len(self.store.names()), "changed": len(changed)})
        self.connected, self._failing = True, False
        self.synced.set()
        for obj in changed:
            self.on_change(obj)
        return str((listing.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, version: str) -> str:
        query = self._query(
            watch="1", resourceVersion=version, timeoutSeconds=str(WATCH_SECONDS), allowWatchBookmarks="true"
        )
        for event in self._stream(query):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Expired
                raise KubeError(int(obj.get("code") or 0), str(obj.get("message") or obj))
            version = _version(obj) or version
            if kind == "BOOKMARK":
                continue
            obj = trim(obj)
            if kind == "DELETED":
                self.store.remove(key_of(obj))
            else:
                self.store.put(obj)
            self.on_change(obj)
        return version

    def _stream(self, query: dict[str, str]) -> Iterator[Obj]:
        """The events of one watch request, one JSON object per line, as they arrive."""
        url = f"{self.api.configuration.host}{self.path}?{urlencode(query)}"
        headers = {"Accept": "application/json"}
        self.api.update_params_for_auth(headers, None, ["BearerToken"], None, None, None)
        # The read timeout outlasts the server's own end of the watch: a silent connection is a dead one.
        response = self.api.call_api("GET", url, header_params=headers, _request_timeout=(5, WATCH_SECONDS + 30))
        raw = self._response = response.response
        try:
            if response.status == 410:
                raise Expired
            if response.status != 200:
                raise KubeError(response.status, f"watch {self.path}: HTTP {response.status}")
            buffer = b""
            try:
                for chunk in raw.stream(amt=None, decode_content=False):
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield json.loads(line)
                    if self._stop.is_set():
                        return
            except (HTTPError, OSError):
                if not self._ending.is_set():
                    raise
        finally:
            self._ending.clear()
            self._response = None
            raw.close()
            raw.release_conn()


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
