"""VpnPeer status from what a gateway sees: last handshake, bytes, endpoint, the gateway; the freshest gateway wins."""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kvpn_agent.fetch import Obj, fetch
from kvpn_agent.metrics import PeerStats
from kvpn_core.api import Kind
from kvpn_core.kube import ConflictError, Kube, KubeError, NotFoundError, kvpn_path

log = logging.getLogger(__name__)

MIN_INTERVAL = 15.0
"""Seconds between two status writes of one peer: 10,000 chatty peers must not flood the API server."""

PeerKey = tuple[str, str]


def rfc3339(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(int(timestamp), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def status_patch(current: Mapping[str, Any], mine: PeerStats, gateway: str) -> Obj | None:
    """The status fields to write for ``mine`` as seen by node ``gateway``, or None when there is nothing to say.

    Another gateway's newer handshake is left alone: the peer talks to that one now, and its byte
    counters are that gateway's. Only these five fields are ever written; the rest is the operator's.
    """
    if mine.last_handshake is None:
        return None
    theirs = _parse_time(current.get("lastHandshake")) if current.get("lastHandshake") else None
    ours = dt.datetime.fromtimestamp(int(mine.last_handshake), dt.UTC)
    if theirs is not None and theirs > ours:
        return None
    patch: Obj = {
        "lastHandshake": rfc3339(mine.last_handshake),
        "gateway": gateway,
        "rxBytes": mine.rx_bytes,
        "txBytes": mine.tx_bytes,
    }
    if mine.endpoint:
        patch["endpoint"] = mine.endpoint
    if all(current.get(k) == v for k, v in patch.items()):
        return None
    return patch


class StatusReporter:
    """Writes due peers' status in one pass: only on change, at most once per peer per MIN_INTERVAL."""

    def __init__(
        self,
        kube: Kube,
        *,
        node: str,
        min_interval: float = MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.node = node
        """This gateway, written as the peer's status.gateway beside its handshake."""
        self.min_interval = min_interval
        self.clock = clock
        self._seen: dict[PeerKey, tuple[object, ...]] = {}
        """What was last decided on per peer (written, or left to a fresher gateway)."""
        self._at: dict[PeerKey, float] = {}

    def report(self, stats: Iterable[PeerStats]) -> int:
        """Returns the number of writes; raises KubeError when the API server cannot be reached."""
        now = self.clock()
        current = {(s.peer_namespace, s.peer): s for s in stats if s.last_handshake is not None}
        for gone in set(self._seen) - set(current):
            self._seen.pop(gone, None)
            self._at.pop(gone, None)
        due = [
            s
            for key, s in current.items()
            if self._seen.get(key) != _values(s) and now - self._at.get(key, -math.inf) >= self.min_interval
        ]
        writes = 0
        by_namespace: dict[str, list[PeerStats]] = {}
        for s in due:
            by_namespace.setdefault(s.peer_namespace, []).append(s)
        for namespace, group in sorted(by_namespace.items()):
            objects = self._fetch(namespace, [s.peer for s in group])
            for s in group:
                obj = objects.get(s.peer)
                outcome = self._write(obj, s) if obj is not None else "gone"
                if outcome == "conflict":
                    continue  # nothing was written: look again in the next pass
                writes += outcome == "written"
                self._seen[(s.peer_namespace, s.peer)] = _values(s)
                self._at[(s.peer_namespace, s.peer)] = now
        return writes

    def _fetch(self, namespace: str, names: list[str]) -> dict[str, Obj]:
        return fetch(self.kube, Kind.VPN_PEER, namespace, names)

    def _write(self, obj: Obj, mine: PeerStats) -> str:
        patch = status_patch(obj.get("status") or {}, mine, self.node)
        if patch is None:
            return "unchanged"
        path = kvpn_path(Kind.VPN_PEER, mine.peer_namespace, mine.peer, "status")
        # The resourceVersion makes the write conditional: a fresher handshake written by another
        # gateway since our read wins, and this peer is looked at again in the next pass.
        body = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "status": patch}
        try:
            self.kube.merge_patch(path, body)
        except ConflictError:
            return "conflict"
        except NotFoundError:
            return "gone"
        except KubeError as exc:
            if exc.status == 0:
                raise
            log.warning(
                "peer status not written",
                extra={"peer_namespace": mine.peer_namespace, "peer": mine.peer, "error": str(exc)},
            )
            return "failed"
        return "written"


def _values(s: PeerStats) -> tuple[object, ...]:
    return (s.last_handshake, s.rx_bytes, s.tx_bytes, s.endpoint)
