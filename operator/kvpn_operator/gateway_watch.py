"""Notices, within a second, a gateway lease that runs out or whose verdict flips, and nudges its VpnServer.

A lease that runs out makes no watch event: something has to look at the clock. One thread does, for
every server at once, with one cached LIST of the gateway leases per round (kopf's per-object daemons
would be one task per VpnServer, each to be stopped at shutdown).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from kvpn_core.api import Kind
from kvpn_core.contract import LABEL_SERVER
from kvpn_core.kube import KubeError
from kvpn_operator import gateways
from kvpn_operator.memory import ANNOTATION_NUDGE
from kvpn_operator.storage import Storage

CHECK_SECONDS = 0.5

log = logging.getLogger("kvpn.operator.gateways")

Fingerprints = dict[tuple[str, str], tuple[tuple[str, str], ...]]


def fingerprints(leases: Collection[dict[str, Any]], now: dt.datetime, in_scope: Callable[[str], bool]) -> Fingerprints:
    """What the leases say now, per server (namespace, name) in scope."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for lease in leases:
        meta = lease.get("metadata") or {}
        namespace, server = str(meta.get("namespace") or ""), (meta.get("labels") or {}).get(LABEL_SERVER)
        if server and in_scope(namespace):
            grouped.setdefault((namespace, str(server)), []).append(lease)
    return {key: gateways.lease_fingerprint(found, now) for key, found in grouped.items()}


def changed(before: Fingerprints, after: Fingerprints) -> list[tuple[str, str]]:
    """The servers whose gateways say something else now (a server whose last lease went counts too)."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k, ()) != after.get(k, ()))


def scope(patterns: Collection[str] | None) -> Callable[[str], bool]:
    """The operator's namespaces (globs allowed, as kopf takes them); None for all."""
    if not patterns:
        return lambda _namespace: True
    return lambda namespace: any(fnmatch.fnmatchcase(namespace, p) for p in patterns)


class GatewayWatch:
    """`GatewayWatch(storage, scope(namespaces)).start()`: a daemon thread until `stop()`."""

    def __init__(
        self,
        storage: Storage,
        in_scope: Callable[[str], bool],
        *,
        period: float = CHECK_SECONDS,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.storage, self.in_scope, self.period, self.now = storage, in_scope, period, now
        self._seen: Fingerprints | None = None
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gateway watch", daemon=True)

    def start(self) -> GatewayWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.check()
            except KubeError as exc:  # retried at the next round; said once per outage
                if not self._failing:
                    log.warning("gateway leases not read (retried): %s", exc)
                self._failing = True

    def check(self) -> list[tuple[str, str]]:
        """One round: the servers nudged. The first round only learns what the leases say: the operator's
        resume reconciles every server anyway."""
        current = fingerprints(self.storage.list_all_gateway_leases(), self.now(), self.in_scope)
        if self._failing:
            log.info("gateway leases read again")
            self._failing = False
        before, self._seen = self._seen, current
        if before is None:
            return []
        nudged = []
        for namespace, name in changed(before, current):
            said = ", ".join(f"{node} {verdict}" for node, verdict in current.get((namespace, name), ())) or "none"
            log.info("gateways changed for %s/%s: %s", namespace, name, said)
            token = f"gateways-{time.time_ns()}"
            if self.storage.annotate(Kind.VPN_SERVER, namespace, name, {ANNOTATION_NUDGE: token}):
                nudged.append((namespace, name))
        return nudged
