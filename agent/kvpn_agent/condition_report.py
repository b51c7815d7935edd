"""The agent's own condition, Dataplane, on the VpnPeers and VpnServers whose desired state it cannot
use, or that its node fails to program (False, with the reason); removed when the problem is gone."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from kvpn_agent.desired import PeerProblem
from kvpn_agent.fetch import Obj, fetch
from kvpn_core.api import API_VERSION, PLURALS, Condition, Kind
from kvpn_core.conditions import Finding, Outcome, Reason, set_condition
from kvpn_core.kube import ConflictError, Kube, KubeError, NotFoundError, kvpn_path

log = logging.getLogger(__name__)

MIN_INTERVAL = 15.0
"""Seconds between two condition writes of one object: 10,000 broken peers must not flood the API server."""

DATAPLANE = "Dataplane"
"""The agent's own condition type on VpnPeers and VpnServers; Ready stays the operator's."""

NODE_REASONS = (Reason.SYNC_FAILED, Reason.KERNEL_WIREGUARD_FAILED)
"""Reasons about one node (its message names it): only that node removes such a condition."""

FALLBACK = "the userspace backend (wireguard-go)"

RECHECK = 120.0
"""Seconds between two reads of an object that has a problem: a condition removed by someone else
(another gateway whose problem went away first, an operator write that raced ours) comes back."""

ObjectRef = tuple[Kind, str, str]
"""A VpnPeer or VpnServer: kind, namespace, name."""


def node_mark(node: str) -> str:
    return f"(gateway node {node})"


def dataplane_problems(
    problems: Mapping[tuple[str, str], tuple[Finding | None, Iterable[PeerProblem]]],
    node: str,
    failures: Mapping[tuple[str, str], str] | None = None,
    fallbacks: Mapping[tuple[str, str], str] | None = None,
) -> dict[ObjectRef, Finding]:
    """What this node has to say, per object: the server-level problems on their VpnServer, the
    per-peer ones on their VpnPeer. A binding too broken to name its peer is only logged.

    ``failures`` are the servers this node failed to program in its latest sync pass, and why;
    ``fallbacks`` those whose kernel link was refused, and why, now served by wireguard-go.
    """
    out: dict[ObjectRef, list[Finding]] = {}
    where = node_mark(node)
    for (namespace, server), (server_problem, peer_problems) in problems.items():
        if server_problem is not None:
            out.setdefault((Kind.VPN_SERVER, namespace, server), []).append(
                Finding(server_problem.reason, f"{server_problem.message} {where}")
            )
        for p in sorted(peer_problems, key=lambda p: p.binding):
            if p.peer_namespace and p.peer_name:
                out.setdefault((Kind.VPN_PEER, p.peer_namespace, p.peer_name), []).append(
                    Finding(p.finding.reason, f"{p.finding.message} {where}")
                )
    for (namespace, server), error in sorted((failures or {}).items()):
        message = f"this node cannot program the server: {error} {where}"
        out.setdefault((Kind.VPN_SERVER, namespace, server), []).append(Finding(Reason.SYNC_FAILED, message))
    for (namespace, server), error in sorted((fallbacks or {}).items()):
        message = f"kernel WireGuard failed on this node ({error}): the server is served by {FALLBACK} instead {where}"
        out.setdefault((Kind.VPN_SERVER, namespace, server), []).append(
            Finding(Reason.KERNEL_WIREGUARD_FAILED, message)
        )
    return {ref: Finding(found[0].reason, "; ".join(f.message for f in found)) for ref, found in out.items()}


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def conditions_update(current: list[Obj], problem: Finding | None, now: dt.datetime) -> list[Obj] | None:
    """The whole conditions list with only the Dataplane condition set (False) or removed; None when
    the list already says that. Every other condition is kept exactly as read."""
    mine = next((c for c in current if c.get("type") == DATAPLANE), None)
    if problem is None:
        return [c for c in current if c.get("type") != DATAPLANE] if mine is not None else None
    if mine is not None and (mine.get("status"), mine.get("reason"), mine.get("message")) == ("False", *problem):
        return None
    previous: list[Condition] = []
    if mine is not None:
        with contextlib.suppress(ValidationError):  # a hand-written, malformed one is replaced
            previous = [Condition.model_validate(mine)]
    condition = set_condition(previous, type_=DATAPLANE, outcome=Outcome.waiting(*problem), generation=None, now=now)[0]
    entry = condition.model_dump(by_alias=True, mode="json", exclude_none=True)
    if mine is None:
        return [*current, entry]
    return [entry if c is mine else c for c in current]


class ConditionReporter:
    """Keeps this node's Dataplane conditions in line with its problems, in the reporter's pass.

    Only problems are written (a True condition per peer would be a write storm at 10,000 peers);
    the condition goes when the problem goes. Writes happen only on change, at most once per object
    per ``min_interval``, and carry the resourceVersion read: the conditions list is written whole
    (a merge patch cannot change one element of a list), so a concurrent writer is a 409, answered
    by reading again. With several gateways the condition holds the latest report from any node:
    they build from the same objects, so they agree but for a moment. A SyncFailed or
    KernelWireGuardFailed condition is the exception: it is about one node (``node``), and only
    that node removes it.
    """

    def __init__(
        self,
        kube: Kube,
        min_interval: float = MIN_INTERVAL,
        recheck: float = RECHECK,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = _utcnow,
        *,
        node: str = "",
    ) -> None:
        self.kube = kube
        self.min_interval = min_interval
        self.recheck = recheck
        self.clock = clock
        self.now = now
        self.node = node
        self._said: dict[ObjectRef, Finding] = {}
        """The problem each object was last found or made to hold, for objects with a problem."""
        self._looked: dict[ObjectRef, float] = {}
        self._wrote: dict[ObjectRef, float] = {}
        self._swept = False
        self._unswept: set[ObjectRef] = set()
        """VpnPeers found with a Dataplane condition at start and not looked at since."""

    def report(self, wanted: Mapping[ObjectRef, Finding], servers: Iterable[Obj] = ()) -> int:
        """Sets and removes conditions as needed; returns the number of writes.

        ``servers`` are the VpnServers this node serves, as last read: one still holding a Dataplane
        condition this node has no problem for gets it removed. The VpnPeers are looked at once per
        start (one LIST), for a condition whose problem went away while no agent was running.
        Raises KubeError when the API server cannot be reached.
        """
        clock = self.clock()
        stale = self._stale(wanted, servers)
        due = {
            t
            for t in (set(wanted) | set(self._said) | stale)
            if clock - self._wrote.get(t, -math.inf) >= self.min_interval
            and (
                t in stale
                or self._said.get(t) != wanted.get(t)
                or clock - self._looked.get(t, -math.inf) >= self.recheck
            )
        }
        writes = 0
        by_place: dict[tuple[Kind, str], list[str]] = {}
        for kind, namespace, name in due:
            by_place.setdefault((kind, namespace), []).append(name)
        for (kind, namespace), names in sorted(by_place.items()):
            objects = fetch(self.kube, kind, namespace, sorted(names))
            for name in sorted(names):
                ref = (kind, namespace, name)
                outcome = self._write(ref, objects.get(name), wanted.get(ref))
                if outcome == "failed":
                    continue  # looked at again in the next pass
                writes += outcome == "written"
                self._unswept.discard(ref)
                self._looked[ref] = clock
                if outcome == "written":
                    self._wrote[ref] = clock
                if ref in wanted:  # gone too: a binding whose VpnPeer is gone is looked for again later
                    self._said[ref] = wanted[ref]
                else:
                    self._said.pop(ref, None)
        self._forget(wanted, clock)
        return writes

    def _stale(self, wanted: Mapping[ObjectRef, Finding], servers: Iterable[Obj]) -> set[ObjectRef]:
        """Objects holding a Dataplane condition this node has no problem for."""
        served: set[tuple[str, str]] = set()
        stale: set[ObjectRef] = set()
        for server in servers:
            meta = server.get("metadata") or {}
            ref = (Kind.VPN_SERVER, str(meta.get("namespace") or ""), str(meta.get("name") or ""))
            served.add(ref[1:])
            if _has_dataplane(server) and not self._another_nodes(server):
                stale.add(ref)
        if not self._swept:
            self._unswept = self._sweep_peers(served)
            self._swept = True
        return (stale | self._unswept) - set(wanted)

    def _another_nodes(self, obj: Obj) -> bool:
        """Whether the object's Dataplane condition is another gateway's (NODE_REASONS): not ours to remove."""
        mine = node_mark(self.node)
        return any(
            c.get("type") == DATAPLANE and c.get("reason") in NODE_REASONS and mine not in str(c.get("message"))
            for c in (obj.get("status") or {}).get("conditions") or []
        )

    def _forget(self, wanted: Mapping[ObjectRef, Finding], clock: float) -> None:
        """Drops what is known of objects without a problem, once their write interval is over."""
        for ref in set(self._looked) - set(wanted) - set(self._said):
            self._looked.pop(ref)
        for ref in set(self._wrote) - set(wanted) - set(self._said):
            if clock - self._wrote[ref] >= self.min_interval:
                self._wrote.pop(ref)

    def _sweep_peers(self, served: set[tuple[str, str]]) -> set[ObjectRef]:
        if not served:
            return set()
        try:
            peers = self.kube.list(f"/apis/{API_VERSION}/{PLURALS[Kind.VPN_PEER]}")
        except KubeError as exc:
            if exc.status == 0:
                raise
            log.warning("VpnPeers not listed: stale Dataplane conditions stay", extra={"error": str(exc)})
            return set()
        found = set()
        for peer in peers:
            meta, ref = peer.get("metadata") or {}, (peer.get("spec") or {}).get("serverRef") or {}
            namespace = str(meta.get("namespace") or "")
            if _has_dataplane(peer) and (ref.get("namespace") or namespace, ref.get("name")) in served:
                found.add((Kind.VPN_PEER, namespace, str(meta.get("name"))))
        return found

    def _write(self, ref: ObjectRef, obj: Obj | None, problem: Finding | None) -> str:
        kind, namespace, name = ref
        path = kvpn_path(kind, namespace, name, "status")
        for _ in range(3):
            if obj is None:
                return "gone"
            conditions = conditions_update(list((obj.get("status") or {}).get("conditions") or []), problem, self.now())
            if conditions is None:
                return "unchanged"
            body = {
                "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                "status": {"conditions": conditions},
            }
            try:
                self.kube.merge_patch(path, body)
            except ConflictError:
                obj = self.kube.get(kvpn_path(kind, namespace, name))
                continue
            except NotFoundError:
                return "gone"
            except KubeError as exc:
                if exc.status == 0:
                    raise
                log.warning(
                    "Dataplane condition not written",
                    extra={"kind": kind.value, "namespace": namespace, "object": name, "error": str(exc)},
                )
                return "failed"
            log.info(
                "Dataplane condition set" if problem else "Dataplane condition removed",
                extra={
                    "kind": kind.value,
                    "namespace": namespace,
                    "object": name,
                    "reason": problem.reason if problem else "",
                },
            )
            return "written"
        return "failed"


def _has_dataplane(obj: Mapping[str, Any]) -> bool:
    return any(c.get("type") == DATAPLANE for c in (obj.get("status") or {}).get("conditions") or [])
