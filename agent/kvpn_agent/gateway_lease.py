"""This node's gateway leases: one coordination.k8s.io Lease per server it serves, renewed with its verdict."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from kvpn_core.api import API_VERSION, Kind
from kvpn_core.contract import (
    ANNOTATION_GATEWAY,
    GATEWAY_HANDOVER_SECONDS,
    GATEWAY_LEASE_SECONDS,
    GATEWAY_REPLACEMENT_SECONDS,
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    LABEL_SERVER,
    MANAGED_BY,
    ROLE_GATEWAY,
    GatewayReport,
    gateway_lease_name,
)
from kvpn_core.kube import ConflictError, Kube, KubeError, NotFoundError, Obj, core_path

log = logging.getLogger(__name__)

ServerKey = tuple[str, str]
"""A VpnServer: namespace, name."""

HANDOVER_MESSAGE = "agent stopping; the dataplane stays"


def handover_seconds(kube: Kube | None, namespace: str, pod: str) -> tuple[int, str]:
    """How long a stopping agent's handover lasts, and why: GATEWAY_REPLACEMENT_SECONDS when its pod
    (``namespace``/``pod``, from the downward API) is being deleted, so that its DaemonSet replaces it on
    this node; GATEWAY_HANDOVER_SECONDS when it is not, or when that cannot be read."""
    if kube is None or not namespace or not pod:
        return GATEWAY_HANDOVER_SECONDS, "own pod unknown"
    try:
        obj = kube.get(core_path("pods", namespace, pod))
    except KubeError as exc:
        return GATEWAY_HANDOVER_SECONDS, f"own pod not read: {exc}"
    if obj is None:
        return GATEWAY_HANDOVER_SECONDS, "own pod not found"
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return GATEWAY_REPLACEMENT_SECONDS, "pod deleted: its replacement comes to this node"
    return GATEWAY_HANDOVER_SECONDS, "pod not deleted"


def lease_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return path + (f"/{quote(name)}" if name else "")


def micro_time(when: dt.datetime) -> str:
    """A Kubernetes MicroTime (RFC 3339, microseconds, UTC): what Lease renewTime and acquireTime hold."""
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def report_json(report: GatewayReport) -> str:
    """The report as the lease's annotation carries it: compact JSON, by alias."""
    return report.model_dump_json(by_alias=True)


def build_gateway_lease(
    namespace: str,
    server: str,
    server_uid: str,
    node: str,
    report: GatewayReport,
    *,
    duration: int,
    now: dt.datetime,
) -> Obj:
    """The lease ``node`` holds for the server: owned by the VpnServer, so it goes when the server goes."""
    renewed = micro_time(now)
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "namespace": namespace,
            "name": gateway_lease_name(server, node),
            "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_SERVER: server, LABEL_ROLE: ROLE_GATEWAY},
            "annotations": {ANNOTATION_GATEWAY: report_json(report)},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": Kind.VPN_SERVER.value,
                    "name": server,
                    "uid": server_uid,
                    "controller": False,
                    # The agent may not update the server's finalizers, which blocking would require.
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": duration,
            "acquireTime": renewed,
            "renewTime": renewed,
        },
    }


def renewal(lease: Obj) -> Obj:
    """The merge patch that renews ``lease`` (as built) in place: what changes from one round to the next."""
    spec = lease["spec"]
    return {
        "metadata": {"annotations": lease["metadata"]["annotations"]},
        "spec": {k: spec[k] for k in ("holderIdentity", "leaseDurationSeconds", "renewTime")},
    }


def takeover(lease: Obj) -> Obj:
    """The merge patch that makes a lease found in place (a previous agent's, an older server's) ours.

    Its acquireTime is left as it is: the same node held it before this process.
    """
    meta = lease["metadata"]
    return {
        "metadata": {k: meta[k] for k in ("labels", "annotations", "ownerReferences")},
        "spec": {k: v for k, v in lease["spec"].items() if k != "acquireTime"},
    }


@dataclass(frozen=True)
class _Written:
    uid: str
    """The VpnServer's uid the lease is owned by: a server recreated under its name needs a new owner."""

    report: GatewayReport


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class GatewayLeases:
    """The leases of one node, one per served server; each round writes one request per lease.

    What was last written is kept, so that a renewal is one merge patch; a lease of a server no
    longer reported is deleted (this node stopped serving it). An unreachable API server
    (KubeError status 0) is raised; other errors are logged once per change and the lease is tried
    again next round. After ``handover`` nothing is written any more: the handover lease stands.
    """

    def __init__(self, kube: Kube, node: str, *, now: Callable[[], dt.datetime] = _utcnow) -> None:
        self.kube = kube
        self.node = node
        self.now = now
        self._lock = threading.Lock()
        """Held for a whole round: the lease thread's renewals and the stop's handover never interleave."""
        self._written: dict[ServerKey, _Written] = {}
        self._errors: dict[ServerKey, str] = {}
        self._closed = False

    def written(self) -> dict[ServerKey, GatewayReport]:
        """What each lease says, as last written by this object."""
        with self._lock:
            return {key: w.report for key, w in self._written.items()}

    def renew(
        self, reports: Mapping[ServerKey, tuple[str, GatewayReport]], duration: int = GATEWAY_LEASE_SECONDS
    ) -> None:
        """Writes each server's lease (``reports``: its uid and report); deletes those no longer reported."""
        with self._lock:
            if self._closed:
                return
            for key in sorted(self._written.keys() - reports.keys()):
                self._delete(key)
            for key, (uid, report) in sorted(reports.items()):
                self._write(key, uid, report, duration)

    def handover(self, servers: Iterable[ServerKey] | None = None, seconds: int = GATEWAY_HANDOVER_SECONDS) -> None:
        """Renews the leases of ``servers`` (default: all written) once for ``seconds`` (handover_seconds),
        and writes nothing after: the node's successor finds them current, and no laptop moves meanwhile.

        A lease not handed over is left to run out.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            keys = set(self._written) if servers is None else set(servers) & set(self._written)
            for key in sorted(keys):
                written = self._written[key]
                report = GatewayReport(
                    ready=written.report.ready, message=HANDOVER_MESSAGE, backend=written.report.backend
                )
                self._write(key, written.uid, report, seconds)

    def _write(self, key: ServerKey, uid: str, report: GatewayReport, duration: int) -> None:
        namespace, server = key
        lease = build_gateway_lease(namespace, server, uid, self.node, report, duration=duration, now=self.now())
        path = lease_path(namespace, lease["metadata"]["name"])
        known = self._written.get(key)
        try:
            if known is None:
                self._create(lease)
            else:
                try:
                    self.kube.merge_patch(path, renewal(lease) if known.uid == uid else takeover(lease))
                except NotFoundError:  # deleted by someone else, or with an older server of that name
                    self._create(lease)
        except KubeError as exc:
            if exc.status == 0:
                raise
            self._failed(key, "gateway lease not written", exc)
            return
        self._written[key] = _Written(uid, report)
        self._works(key)

    def _create(self, lease: Obj) -> None:
        meta = lease["metadata"]
        try:
            self.kube.create(lease_path(meta["namespace"]), lease)
        except ConflictError:  # left by this node's previous agent, or for an earlier server of that name
            self.kube.merge_patch(lease_path(meta["namespace"], meta["name"]), takeover(lease))

    def _delete(self, key: ServerKey) -> None:
        namespace, server = key
        try:
            self.kube.delete(lease_path(namespace, gateway_lease_name(server, self.node)))
        except KubeError as exc:
            if exc.status == 0:
                raise
            self._failed(key, "gateway lease not deleted", exc)
            return
        log.info(
            "gateway lease deleted: no longer served here", extra={"server_namespace": namespace, "server": server}
        )
        del self._written[key]
        self._errors.pop(key, None)

    def _failed(self, key: ServerKey, message: str, exc: KubeError) -> None:
        error = f"{exc.status}: {exc}"
        if self._errors.get(key) != error:
            log.warning(message, extra={"server_namespace": key[0], "server": key[1], "error": error})
        self._errors[key] = error

    def _works(self, key: ServerKey) -> None:
        if self._errors.pop(key, None) is not None:
            log.info("gateway lease written again", extra={"server_namespace": key[0], "server": key[1]})
