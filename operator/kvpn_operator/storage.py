"""The service layer's door to the API: domain methods behind a Protocol, implemented over kvpn_core.kube.

server.py, peer.py and readiness.py ask for Secrets, Services, Nodes and kvpn objects by namespace and
name; only this module builds REST paths. Expected outcomes come back as values (None for "not there" or "name taken",
False for "stale resourceVersion"); anything else stays a KubeError, which the handlers turn into retries.
The unit tests put a fake with the API's 404, 409 and resourceVersion behaviour behind the same Protocol.

A VpnServer or VpnPeer a reconcile works on is parsed once, at the door, into a ServerObject or PeerObject:
typed metadata and status, the spec still as written (judging it is the reconcile's verdict, not a crash).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvpn_core.api import API_VERSION, PLURALS, Kind, VpnPeerStatus, VpnServerStatus
from kvpn_core.conditions import READY
from kvpn_core.contract import LABEL_MANAGED_BY, LABEL_ROLE, MANAGED_BY, ROLE_GATEWAY, gateway_selector
from kvpn_core.kube import ConflictError, InvalidError, Kube, KubeError, NotFoundError, core_path, kvpn_path

Obj = dict[str, Any]


class ObjectMeta(BaseModel):
    """The metadata a reconcile reads: who the object is, which version of it, and its marks."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    namespace: str
    name: str
    uid: str
    generation: int | None = None
    resource_version: str = Field(alias="resourceVersion")
    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        # The API omits empty maps, and a patch may leave them null.
        if isinstance(data, Mapping):
            return {**data, **{k: data.get(k) or {} for k in ("annotations", "labels")}}
        return data


class KubeObject(BaseModel):
    """A kvpn object as a reconcile sees it: typed metadata, the spec as written, and the object itself.

    `body` is the object as the API returned it: the builders take their owner from it, and the status
    write compares against the status as stored, not as the model would render it.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    metadata: ObjectMeta
    spec: Obj = Field(default_factory=dict)
    body: Obj = Field(repr=False)

    @model_validator(mode="before")
    @classmethod
    def _keep_body(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "body" not in data:
            return {**data, "spec": data.get("spec") or {}, "status": data.get("status") or {}, "body": dict(data)}
        return data

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def uid(self) -> str:
        return self.metadata.uid

    @property
    def generation(self) -> int | None:
        return self.metadata.generation


class ServerObject(KubeObject):
    """A VpnServer: `ServerObject.model_validate(body)`."""

    status: VpnServerStatus = Field(default_factory=VpnServerStatus)


class PeerObject(KubeObject):
    """A VpnPeer: `PeerObject.model_validate(body)`."""

    status: VpnPeerStatus = Field(default_factory=VpnPeerStatus)


class Storage(Protocol):
    """What the reconcilers read and write. Objects are plain dicts, as the API returns them."""

    def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        """A VpnServer or VpnPeer; None when there is none."""
        ...

    def sample(self, kind: Kind, namespace: str | None) -> list[Obj]:
        """At most one VpnServer or VpnPeer of `namespace` (of every namespace when None), read past the watch
        cache: whether the API server serves the kind and lets the operator list it. A KubeError says why not."""
        ...

    def patch_status(self, kind: Kind, namespace: str, name: str, status: Obj, *, resource_version: str) -> bool:
        """Merge-patches the status, only if the object is still at `resource_version`; False when it is not."""
        ...

    def annotate(self, kind: Kind, namespace: str, name: str, annotations: Mapping[str, str]) -> bool:
        """Merge-patches annotations onto a VpnServer or VpnPeer; False when it is gone."""
        ...

    def get_secret(self, namespace: str, name: str) -> Obj | None: ...

    def list_secrets(self, namespace: str, *, label_selector: str, cached: bool = False) -> list[Obj]:
        """The Secrets matching `label_selector` (equality terms, comma-separated); `cached` may be a little stale."""
        ...

    def create_secret(self, namespace: str, secret: Obj) -> Obj | None:
        """The created Secret; None when a Secret of that name exists already (409)."""
        ...

    def patch_secret_data(self, namespace: str, name: str, data: Mapping[str, str | None]) -> None:
        """Merge-patches the Secret's data; a None value deletes that key."""
        ...

    def delete_secret(self, namespace: str, name: str, *, uid: str) -> bool:
        """Deletes that incarnation of the Secret; False when it was gone or is another one by now."""
        ...

    def get_service(self, namespace: str, name: str) -> Obj | None: ...

    def create_service(self, namespace: str, service: Obj) -> Obj | None:
        """The created Service; None when a Service of that name exists already (409)."""
        ...

    def patch_service(self, namespace: str, name: str, patch: Obj) -> Obj: ...

    def delete_service(self, namespace: str, name: str, *, uid: str) -> bool: ...

    def refusal_of_service(self, namespace: str, service: Obj) -> str | None:
        """Creates `service` to learn why the API server refuses it: the refusal, or None when it was
        accepted (and deleted again) or its name was taken."""
        ...

    def list_nodes(self) -> list[Obj]:
        """Every Node, from the watch cache."""
        ...

    def list_pods(self) -> list[Obj]:
        """Every Pod of the cluster (what pod-network discovery reads of it: hostNetwork, phase, podIPs), at
        most POD_LIST_SECONDS old. ForbiddenError when RBAC says no."""
        ...

    def list_gateway_leases(self, namespace: str, server: str) -> list[Obj]:
        """The gateway leases the agents hold for a server (kvpn_core.contract), read past the watch cache."""
        ...

    def list_all_gateway_leases(self) -> list[Obj]:
        """Every gateway lease in the cluster, from the watch cache (a moment old at most)."""
        ...

    def get_endpoints(self, namespace: str, name: str) -> Obj | None: ...

    def create_endpoints(self, namespace: str, endpoints: Obj) -> Obj | None:
        """The created Endpoints; None when one of that name exists already (409)."""
        ...

    def patch_endpoints(self, namespace: str, name: str, patch: Obj) -> Obj: ...

    def list_service_cidrs(self, version: str) -> list[Obj] | None:
        """The ServiceCIDR objects of networking.k8s.io/`version`; None when the API server serves none."""
        ...


POD_LIST_SECONDS = 10.0
"""How old the pod list behind pod-network discovery may be: one list serves every server's resync."""


def _pod_addresses(pod: Obj) -> Obj:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    return {
        "spec": {"hostNetwork": bool(spec.get("hostNetwork"))},
        "status": {k: status[k] for k in ("phase", "podIP", "podIPs") if k in status},
    }


class KubeStorage:
    """Storage over the operator's JSON client."""

    def __init__(self, kube: Kube) -> None:
        self._kube = kube
        self._pods_lock = threading.Lock()
        self._pods: tuple[float, list[Obj]] | None = None

    def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        return self._kube.get(kvpn_path(kind, namespace, name))

    def sample(self, kind: Kind, namespace: str | None) -> list[Obj]:
        # limit=1 and no cache: the watch cache would ignore the limit and return every object.
        path = kvpn_path(kind, namespace) if namespace else f"/apis/{API_VERSION}/{PLURALS[kind]}"
        return self._kube.list(path, limit=1)

    def patch_status(self, kind: Kind, namespace: str, name: str, status: Obj, *, resource_version: str) -> bool:
        try:
            self._kube.merge_patch(
                kvpn_path(kind, namespace, name, "status"),
                {"metadata": {"resourceVersion": resource_version}, "status": status},
            )
        except ConflictError:
            return False
        return True

    def annotate(self, kind: Kind, namespace: str, name: str, annotations: Mapping[str, str]) -> bool:
        try:
            self._kube.merge_patch(kvpn_path(kind, namespace, name), {"metadata": {"annotations": dict(annotations)}})
        except NotFoundError:
            return False
        return True

    def get_secret(self, namespace: str, name: str) -> Obj | None:
        return self._kube.get(core_path("secrets", namespace, name))

    def list_secrets(self, namespace: str, *, label_selector: str, cached: bool = False) -> list[Obj]:
        return self._kube.list(core_path("secrets", namespace), label_selector=label_selector, cached=cached)

    def create_secret(self, namespace: str, secret: Obj) -> Obj | None:
        try:
            return self._kube.create(core_path("secrets", namespace), secret)
        except ConflictError:
            return None

    def patch_secret_data(self, namespace: str, name: str, data: Mapping[str, str | None]) -> None:
        self._kube.merge_patch(core_path("secrets", namespace, name), {"data": dict(data)})

    def delete_secret(self, namespace: str, name: str, *, uid: str) -> bool:
        return self._kube.delete(core_path("secrets", namespace, name), uid=uid)

    def get_service(self, namespace: str, name: str) -> Obj | None:
        return self._kube.get(core_path("services", namespace, name))

    def create_service(self, namespace: str, service: Obj) -> Obj | None:
        try:
            return self._kube.create(core_path("services", namespace), service)
        except ConflictError:
            return None

    def patch_service(self, namespace: str, name: str, patch: Obj) -> Obj:
        return self._kube.merge_patch(core_path("services", namespace, name), patch)

    def delete_service(self, namespace: str, name: str, *, uid: str) -> bool:
        return self._kube.delete(core_path("services", namespace, name), uid=uid)

    def refusal_of_service(self, namespace: str, service: Obj) -> str | None:
        try:
            self._kube.create(core_path("services", namespace), service)
        except InvalidError as exc:
            return str(exc)
        except ConflictError:
            return None
        self._kube.delete(core_path("services", namespace, service["metadata"]["name"]))
        return None

    def list_nodes(self) -> list[Obj]:
        return self._kube.list(core_path("nodes"), cached=True)

    def list_pods(self) -> list[Obj]:
        # From the watch cache (no etcd read), one list for every server reconciled within
        # POD_LIST_SECONDS, and only what discovery reads of each pod kept: at thousands of pods a list
        # is tens of MB of JSON to parse.
        with self._pods_lock:
            now = time.monotonic()
            if self._pods is None or now - self._pods[0] > POD_LIST_SECONDS:
                self._pods = (now, [_pod_addresses(p) for p in self._kube.list(core_path("pods"), cached=True)])
            return self._pods[1]

    def list_gateway_leases(self, namespace: str, server: str) -> list[Obj]:
        # Not from the watch cache: a lease renewed a moment ago must count as renewed.
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        return self._kube.list(path, label_selector=gateway_selector(server))

    def list_all_gateway_leases(self) -> list[Obj]:
        selector = f"{LABEL_ROLE}={ROLE_GATEWAY},{LABEL_MANAGED_BY}={MANAGED_BY}"
        return self._kube.list("/apis/coordination.k8s.io/v1/leases", label_selector=selector, cached=True)

    def get_endpoints(self, namespace: str, name: str) -> Obj | None:
        return self._kube.get(core_path("endpoints", namespace, name))

    def create_endpoints(self, namespace: str, endpoints: Obj) -> Obj | None:
        try:
            return self._kube.create(core_path("endpoints", namespace), endpoints)
        except ConflictError:
            return None

    def patch_endpoints(self, namespace: str, name: str, patch: Obj) -> Obj:
        return self._kube.merge_patch(core_path("endpoints", namespace, name), patch)

    def list_service_cidrs(self, version: str) -> list[Obj] | None:
        try:
            return self._kube.list(f"/apis/networking.k8s.io/{version}/servicecidrs", cached=True)
        except KubeError:
            return None


def _same(current: Obj, desired: Obj) -> bool:
    return all(current.get(k) == v for k, v in desired.items())


def _with_their_conditions(desired: Obj, current: Obj, owned: Collection[str]) -> Obj:
    """`desired` with the conditions of types the operator does not own taken from `current`.

    Others write conditions too (the agents' Dataplane): a list built from a stale copy must not
    undo what they wrote since.
    """
    if "conditions" not in desired:
        return desired
    ours = [c for c in desired["conditions"] or [] if c.get("type") in owned]
    theirs = [c for c in current.get("conditions") or [] if c.get("type") not in owned]
    return {**desired, "conditions": ours + theirs}


def write_status(storage: Storage, kind: Kind, obj: Obj, desired: Obj, *, owned: Collection[str] = (READY,)) -> bool:
    """Merge-patches the status fields in `desired` (None deletes one), unless they already hold.

    `owned` are the condition types the operator writes on this kind; the others are someone else's.

    The patch carries the resourceVersion it was computed from, so a reconcile working from a stale
    copy cannot overwrite a newer status: on conflict it reads the object again, keeps the conditions
    others wrote meanwhile, and compares again. `obj` is the object as the API returned it (a
    KubeObject's `body`): the comparison is with the status as stored, not as a model would render it.
    """
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    for _ in range(3):
        if _same(obj.get("status") or {}, desired):
            return False
        if storage.patch_status(kind, namespace, name, desired, resource_version=obj["metadata"]["resourceVersion"]):
            return True
        fresh = storage.get(kind, namespace, name)
        if fresh is None:
            return False
        obj = fresh
        desired = _with_their_conditions(desired, obj.get("status") or {}, owned)
    raise ConflictError(409, f"status of {name} kept changing under three attempts")
