"""Which servers this node serves, their last good desired state kept current per change, and their problems."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, cast

from kvpn_agent.builder import DesiredBuilder
from kvpn_agent.desired import BindingCache, DesiredServer, DesiredStateError, PeerProblem
from kvpn_agent.metrics import Metrics
from kvpn_agent.state import ServerInputs, selected
from kvpn_agent.watch import Key, Obj
from kvpn_core.conditions import Finding
from kvpn_core.contract import LABEL_ROLE, LABEL_SERVER, ROLE_PEER, server_key_secret_name

log = logging.getLogger(__name__)

Problems = tuple[Finding | None, frozenset[PeerProblem]]
"""A server's problems: why it is unusable (None when it is not), and its peers left out."""


class Objects(Protocol):
    """The contract objects as the watches hold them now."""

    def server(self, key: Key) -> Obj | None:
        """The VpnServer; None also when its Secrets are not watched (it cannot be served then)."""

    def secret(self, key: Key) -> Obj | None: ...

    def bindings(self, key: Key) -> Iterable[Obj]:
        """The Secrets labelled with the server's name (secret_index)."""


class ServedServers:
    """The servers this node serves, each as the inputs that last built and the DesiredServer built from them.

    A server whose objects turn bad keeps being served as it was, and its problems are logged once
    per change. Changed only by the sync loop; ``lock`` (the Agent's) is held for every change to
    what the reporter's thread reads, so a reader on another thread holds it while it calls
    ``keys``, ``desired``, ``inputs`` or ``problems``.
    """

    def __init__(self, lock: threading.Lock, metrics: Metrics) -> None:
        self._lock = lock
        self._metrics = metrics
        self._good: dict[Key, tuple[ServerInputs, DesiredServer]] = {}
        self._builders: dict[Key, DesiredBuilder] = {}
        self._parsed = BindingCache()
        """Parsed bindings of every served server, kept across their rebuilds."""
        self._problems: dict[Key, Problems] = {}
        self.gone: set[str] = set()
        """Interfaces of servers no longer served, until a sync pass has deleted them."""

    def keys(self) -> set[Key]:
        return set(self._good)

    def desired(self) -> list[DesiredServer]:
        return [desired for _, desired in self._good.values()]

    def inputs(self) -> list[ServerInputs]:
        return [inputs for inputs, _ in self._good.values()]

    def problems(self) -> dict[Key, Problems]:
        return dict(self._problems)

    def recompute(
        self,
        keys: Iterable[Key],
        objects: Objects,
        node_labels: Mapping[str, str],
        bindings: Mapping[Key, set[str]] | None = None,
    ) -> bool:
        """Rebuilds the desired state of ``keys`` from ``objects``; True when any of it changed.

        A server of which only bindings changed (``bindings``: their names) has them patched into
        its desired state; the others are compared and rebuilt from all their objects.
        """
        changed = False
        for key in sorted(keys):
            names = (bindings or {}).get(key)
            if names and (patched := self._patch(key, names, objects, node_labels)) is not None:
                changed = patched or changed
                continue
            inputs = _inputs(key, objects, node_labels)
            old = self._good.get(key)
            if inputs is None:
                if old is not None:
                    log.info("server no longer served here", extra={"server_namespace": key[0], "server": key[1]})
                    with self._lock:
                        del self._good[key]
                    self._builders.pop(key, None)
                    self.gone.add(old[1].interface)
                    changed = True
                self._set_problems(key, None, ())
            elif old is None or old[0].version() != inputs.version():
                changed = self.build(key, inputs) or changed
        return changed

    def _patch(self, key: Key, names: set[str], objects: Objects, node_labels: Mapping[str, str]) -> bool | None:
        """Patches changed bindings into the server's desired state; None when it needs a rebuild."""
        old, builder = self._good.get(key), self._builders.get(key)
        if old is None or builder is None or builder.desired is not old[1]:
            return None
        ns, name = key
        server = objects.server(key)
        if server is None:
            return None
        key_secret = objects.secret((ns, server_key_secret_name(name)))
        if (
            not selected(server, node_labels)
            or _rv(server) != _rv(old[0].server)
            or _rv(key_secret) != _rv(old[0].key_secret)
            or (key_secret is None) != (old[0].key_secret is None)
        ):
            return None
        changes: dict[str, Obj | None] = {}
        for binding in names:
            secret = objects.secret((ns, binding))
            if secret is not None and (secret_index(secret) != key or role(secret) != ROLE_PEER):
                secret = None
            had = builder.secrets.get(binding)
            if (secret is None) != (had is None) or (secret is not None and _rv(secret) != _rv(had)):
                changes[binding] = secret
        if not changes:
            return False
        desired = builder.apply(changes)
        self._install(
            key,
            ServerInputs(old[0].server, old[0].key_secret, cast("tuple[Obj, ...]", tuple(builder.secrets.values()))),
            desired,
        )
        return True

    def build(self, key: Key, inputs: ServerInputs) -> bool:
        """Serves ``inputs`` from now on if they build; False (the problem noted) when they do not."""
        try:
            builder = DesiredBuilder(inputs.server, inputs.key_secret, inputs.bindings, cache=self._parsed)
        except DesiredStateError as exc:
            self._set_problems(key, exc.finding, ())
            return False
        self._builders[key] = builder
        self._install(key, inputs, builder.desired)
        return True

    def _install(self, key: Key, inputs: ServerInputs, desired: DesiredServer) -> None:
        if key not in self._good:
            log.info(
                "serving server", extra={"server_namespace": key[0], "server": key[1], "interface": desired.interface}
            )
        with self._lock:
            self._good[key] = (inputs, desired)
        self.gone.discard(desired.interface)
        self._set_problems(key, None, desired.problems)

    def _set_problems(self, key: Key, server: Finding | None, peers: Sequence[PeerProblem]) -> None:
        """Logs what is new or resolved, once per change; the metric counts what stands."""
        new = (server, frozenset(peers))
        old_server, old_peers = self._problems.get(key, (None, frozenset()))
        if new == (old_server, old_peers):
            return
        ns, name = key
        if server is not None and server != old_server:
            log.error(
                "server's desired state is unusable",
                extra={
                    "server_namespace": ns,
                    "server": name,
                    "reason": server.reason,
                    "detail": server.message,
                    "serving": "its last good state" if key in self._good else "nothing",
                },
            )
        for p in sorted(new[1] - old_peers, key=lambda p: p.binding):
            log.warning(
                "peer left out of the dataplane",
                extra={
                    "server_namespace": ns,
                    "server": name,
                    "binding": p.binding,
                    "peer_namespace": p.peer_namespace,
                    "peer": p.peer_name,
                    "reason": p.finding.reason,
                    "detail": p.finding.message,
                },
            )
        for p in sorted(old_peers - new[1], key=lambda p: p.binding):
            log.info("peer problem resolved", extra={"server_namespace": ns, "server": name, "binding": p.binding})
        with self._lock:  # the reporter's thread turns them into Dataplane conditions
            if server is None and new[1] == frozenset():
                self._problems.pop(key, None)
            else:
                self._problems[key] = new
        counts: dict[tuple[str, str, str], int] = {}
        for (pns, pname), (srv, prs) in self._problems.items():
            for reason in [srv.reason] if srv else []:
                counts[(pns, pname, reason)] = counts.get((pns, pname, reason), 0) + 1
            for p in prs:
                counts[(pns, pname, p.finding.reason)] = counts.get((pns, pname, p.finding.reason), 0) + 1
        self._metrics.set_problems(counts)


def _inputs(key: Key, objects: Objects, node_labels: Mapping[str, str]) -> ServerInputs | None:
    """The server's current objects, or None when this node does not serve it."""
    ns, name = key
    server = objects.server(key)
    if server is None or not selected(server, node_labels):
        return None
    key_secret = objects.secret((ns, server_key_secret_name(name)))
    bindings = tuple(s for s in objects.bindings(key) if role(s) == ROLE_PEER)
    return ServerInputs(server, key_secret, bindings)


def _rv(obj: Mapping[str, Any] | None) -> str:
    return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")


def role(secret: Obj) -> str | None:
    """What a contract Secret is (its LABEL_ROLE): a binding, a server's key."""
    return ((secret.get("metadata") or {}).get("labels") or {}).get(LABEL_ROLE)


def secret_index(secret: Obj) -> Key | None:
    """The server a key Secret or binding belongs to (both carry its name as a label)."""
    meta = secret.get("metadata") or {}
    server = (meta.get("labels") or {}).get(LABEL_SERVER)
    return (str(meta.get("namespace") or ""), str(server)) if server else None
