"""The unit tests' shared fakes and factories: a clock, keys, Secrets, and the API without an API server,
behind the operator's Storage and behind kvpn_core.kube.Kube (objects in a dict, with the API's 404, 409
and resourceVersion)."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import itertools
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from kvpn_core.api import API_VERSION, PLURALS, Kind
from kvpn_core.contract import (
    ANNOTATION_GATEWAY,
    GATEWAY_LEASE_SECONDS,
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    LABEL_SERVER,
    MANAGED_BY,
    ROLE_GATEWAY,
    GatewayReport,
    gateway_lease_name,
    gateway_selector,
)
from kvpn_core.kube import ConflictError, KubeError, NotFoundError

Obj = dict[str, Any]
Key = tuple[str, str, str]
"""(resource, namespace, name); resource is the API's plural (secrets, services, vpnservers, ...)."""

KINDS = {
    "secrets": ("v1", "Secret"),
    "services": ("v1", "Service"),
    "nodes": ("v1", "Node"),
    "pods": ("v1", "Pod"),
    "endpoints": ("v1", "Endpoints"),
    "leases": ("coordination.k8s.io/v1", "Lease"),
    **{PLURALS[k]: (API_VERSION, k.value) for k in Kind},
}


class Clock:
    """A monotonic clock the test moves by hand (``clock.now += 5``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def random_key() -> str:
    """Any 32 bytes in base64: a WireGuard key as far as a parser or the wire format is concerned."""
    return base64.b64encode(os.urandom(32)).decode()


def labelled_secret(name: str, version: str = "1", server: str = "office") -> dict[str, object]:
    """A Secret of server ``server`` in namespace team as the API returns it, managedFields and all."""
    return {
        "metadata": {
            "namespace": "team",
            "name": name,
            "resourceVersion": version,
            "labels": {"kvpn.dev/server": server},
            "managedFields": [{"manager": "kvpn"}],
        },
        "data": {"privateKey": "c2VjcmV0"},
    }


def merge(target: Obj, patch: Mapping[str, Any]) -> Obj:
    """RFC 7386 merge patch, as the API server applies application/merge-patch+json: None deletes a key."""
    result = dict(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            # Into a key that holds no object, as into an empty one: its nulls delete nothing, and are dropped.
            current = result.get(key)
            result[key] = merge(current if isinstance(current, Mapping) else {}, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _matches(obj: Obj, label_selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    terms = [t.partition("=") for t in label_selector.split(",") if t]
    return all(labels.get(k) == v for k, _, v in terms)


class FakeStorage:
    """Storage as the API server would behave for it, in memory.

    Creating a name that exists gives 409 (None); a status patch at a stale resourceVersion is refused;
    a spec change bumps metadata.generation; every write gets a new resourceVersion; a delete with a
    uid precondition spares a newer object of the same name. Reads return copies, as the API does.
    Every object gets a creationTimestamp, a second after the one created before it.
    `writes` records each write (verb, resource, namespace, name), for "the second run writes nothing".
    """

    def __init__(self, *, service_cidrs: list[str] | None = None) -> None:
        self.objects: dict[Key, Obj] = {}
        self.writes: list[tuple[str, str, str, str]] = []
        self.service_cidrs = service_cidrs
        self._versions = itertools.count(1)
        self._uids = itertools.count(1)
        self._created = itertools.count()

    # --- seeding and reading back, for tests ---------------------------------------------------------

    def put(self, resource: str, obj: Obj) -> Obj:
        """Stores `obj` as if a user created it, filling in what the API server would; returns a copy."""
        meta = obj.setdefault("metadata", {})
        api_version, kind = KINDS[resource]
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        meta.setdefault("uid", f"uid-{next(self._uids)}")
        meta.setdefault("namespace", "")
        created = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=next(self._created))
        meta.setdefault("creationTimestamp", created.strftime("%Y-%m-%dT%H:%M:%SZ"))
        if resource in {PLURALS[k] for k in Kind}:
            meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[(resource, meta["namespace"], meta["name"])] = copy.deepcopy(obj)
        return copy.deepcopy(obj)

    def edit(self, resource: str, namespace: str, name: str, patch: Mapping[str, Any]) -> Obj:
        """A merge patch by someone else (a user's kubectl edit, another controller)."""
        return self._patch(resource, namespace, name, patch)

    def read(self, resource: str, namespace: str, name: str) -> Obj | None:
        found = self.objects.get((resource, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def count(self, resource: str) -> int:
        return sum(1 for r, _, _ in self.objects if r == resource)

    # --- the generic API behaviour -------------------------------------------------------------------

    def _create(self, resource: str, namespace: str, obj: Obj) -> Obj | None:
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["namespace"] = namespace
        if (resource, namespace, obj["metadata"]["name"]) in self.objects:
            return None
        self.writes.append(("create", resource, namespace, obj["metadata"]["name"]))
        return self.put(resource, obj)

    def _patch(self, resource: str, namespace: str, name: str, patch: Mapping[str, Any]) -> Obj:
        current = self.objects.get((resource, namespace, name))
        if current is None:
            raise NotFoundError(404, f'{resource} "{name}" not found')
        patched = merge(current, patch)
        meta = patched["metadata"]
        if "generation" in meta and patched.get("spec") != current.get("spec"):
            meta["generation"] += 1
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[(resource, namespace, name)] = patched
        self.writes.append(("patch", resource, namespace, name))
        return copy.deepcopy(patched)

    def _delete(self, resource: str, namespace: str, name: str, uid: str | None) -> bool:
        current = self.objects.get((resource, namespace, name))
        if current is None or (uid is not None and current["metadata"]["uid"] != uid):
            return False
        del self.objects[(resource, namespace, name)]
        self.writes.append(("delete", resource, namespace, name))
        return True

    # --- Storage -------------------------------------------------------------------------------------

    def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        return self.read(PLURALS[kind], namespace, name)

    def sample(self, kind: Kind, namespace: str | None) -> list[Obj]:
        found = [o for (r, ns, _), o in sorted(self.objects.items()) if r == PLURALS[kind] and namespace in (None, ns)]
        return [copy.deepcopy(o) for o in found[:1]]

    def patch_status(self, kind: Kind, namespace: str, name: str, status: Obj, *, resource_version: str) -> bool:
        current = self.objects.get((PLURALS[kind], namespace, name))
        if current is None:
            raise NotFoundError(404, f'{PLURALS[kind]} "{name}" not found')
        if current["metadata"]["resourceVersion"] != resource_version:
            return False
        self._patch(PLURALS[kind], namespace, name, {"status": status})
        return True

    def annotate(self, kind: Kind, namespace: str, name: str, annotations: Mapping[str, str]) -> bool:
        try:
            self._patch(PLURALS[kind], namespace, name, {"metadata": {"annotations": dict(annotations)}})
        except NotFoundError:
            return False
        return True

    def get_secret(self, namespace: str, name: str) -> Obj | None:
        return self.read("secrets", namespace, name)

    def list_secrets(self, namespace: str, *, label_selector: str, cached: bool = False) -> list[Obj]:
        return [
            copy.deepcopy(o)
            for (r, ns, _), o in sorted(self.objects.items())
            if r == "secrets" and ns == namespace and _matches(o, label_selector)
        ]

    def create_secret(self, namespace: str, secret: Obj) -> Obj | None:
        return self._create("secrets", namespace, secret)

    def patch_secret_data(self, namespace: str, name: str, data: Mapping[str, str | None]) -> None:
        self._patch("secrets", namespace, name, {"data": dict(data)})

    def delete_secret(self, namespace: str, name: str, *, uid: str) -> bool:
        return self._delete("secrets", namespace, name, uid)

    def get_service(self, namespace: str, name: str) -> Obj | None:
        return self.read("services", namespace, name)

    def create_service(self, namespace: str, service: Obj) -> Obj | None:
        return self._create("services", namespace, service)

    def patch_service(self, namespace: str, name: str, patch: Obj) -> Obj:
        return self._patch("services", namespace, name, patch)

    def delete_service(self, namespace: str, name: str, *, uid: str) -> bool:
        return self._delete("services", namespace, name, uid)

    def refusal_of_service(self, namespace: str, service: Obj) -> str | None:
        # An API server without ServiceCIDR objects, refusing the probe's clusterIP as a real one words it:
        # naming the Service network of the clusterIP's family, or saying that family is not configured.
        if self.service_cidrs is None:
            return None
        name, ip = service["metadata"]["name"], service["spec"]["clusterIP"]
        family = [c for c in self.service_cidrs if (":" in c) == (":" in ip)]
        if not family:
            refused = 'spec.ipFamilies[0]: Invalid value: "IPv6": not configured on this cluster'
            return f'Service "{name}" is invalid: {refused}'
        return (
            f'Service "{name}" is invalid: spec.clusterIPs: Invalid value: '
            f'["{ip}"]: failed to allocate IP {ip}: provided IP is not in the valid range. '
            f"The range of valid IPs is {','.join(family)}"
        )

    def list_nodes(self) -> list[Obj]:
        return [copy.deepcopy(o) for (r, _, _), o in sorted(self.objects.items()) if r == "nodes"]

    def list_pods(self) -> list[Obj]:
        return [copy.deepcopy(o) for (r, _, _), o in sorted(self.objects.items()) if r == "pods"]

    def list_gateway_leases(self, namespace: str, server: str) -> list[Obj]:
        return [
            copy.deepcopy(o)
            for (r, ns, _), o in sorted(self.objects.items())
            if r == "leases" and ns == namespace and _matches(o, gateway_selector(server))
        ]

    def list_all_gateway_leases(self) -> list[Obj]:
        return [copy.deepcopy(o) for (r, _, _), o in sorted(self.objects.items()) if r == "leases"]

    def get_endpoints(self, namespace: str, name: str) -> Obj | None:
        return self.read("endpoints", namespace, name)

    def create_endpoints(self, namespace: str, endpoints: Obj) -> Obj | None:
        return self._create("endpoints", namespace, endpoints)

    def patch_endpoints(self, namespace: str, name: str, patch: Obj) -> Obj:
        return self._patch("endpoints", namespace, name, patch)

    def list_service_cidrs(self, version: str) -> list[Obj] | None:
        return None  # as on clusters before 1.33: the probe's refusal names the range


class FakeKube:
    """kvpn_core.kube.Kube's get, list, create, merge_patch and delete, answered as the API server would, in memory.

    Objects are kept by REST path (``kvpn_path`` or ``core_path`` of the object). Every write gets a
    new, higher resourceVersion (a patch that changes nothing writes nothing, as on the API server);
    a merge patch carrying a stale metadata.resourceVersion is refused with 409; a patch of a missing
    object is a 404; a create (POST to the collection) of a name that exists is a 409; a delete of a
    missing object answers False, as Kube.delete does on 404; a patch of ``<path>/status`` changes
    only the status, one of ``<path>`` anything but the status (the status subresource). Reads
    return copies.

    What the tests steer: ``conflicts``, the next N patches refused with 409 whatever they carry (as
    if another writer had just changed the object, or deleted it); ``down``, every request fails as
    when the API server cannot be reached; ``errors(path)``, an exception a request of that path
    raises instead of an answer (None: answered); ``meanwhile(path)``, another writer acting after a
    get is answered, before the caller can act on what it read.
    What the tests read back: ``gets`` (paths), ``lists`` (path and keyword arguments), ``patches``
    (path and patch), ``creates`` (collection path and object) and ``deletes`` (paths), every request
    the client made, whatever its answer.
    """

    def __init__(self, *, conflicts: int = 0, errors: Callable[[str], Exception | None] | None = None) -> None:
        self.objects: dict[str, Obj] = {}
        self.gets: list[str] = []
        self.lists: list[tuple[str, dict[str, Any]]] = []
        self.patches: list[tuple[str, Obj]] = []
        self.creates: list[tuple[str, Obj]] = []
        self.deletes: list[str] = []
        self.conflicts = conflicts
        self.down = False
        self.errors = errors
        self.meanwhile: Callable[[str], object] | None = None
        self._version = 0
        self._uids = itertools.count(1)

    # --- seeding and reading back, for tests ---------------------------------------------------------

    def put(self, path: str, obj: Obj) -> Obj:
        """Stores `obj` at `path` as if a user created it, filling in what the API server would; returns a
        copy. A resourceVersion it carries is kept (for a test that names it); later writes go above it."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        namespace = re.search(r"/namespaces/([^/]+)/", path)
        meta.setdefault("name", path.rsplit("/", 1)[1])
        if namespace:
            meta.setdefault("namespace", namespace.group(1))
        meta.setdefault("uid", f"uid-{next(self._uids)}")
        if "resourceVersion" in meta:
            self._version = max(self._version, int(meta["resourceVersion"]))
        else:
            meta["resourceVersion"] = self._next_version()
        self.objects[path] = obj
        return copy.deepcopy(obj)

    def edit(self, path: str, patch: Mapping[str, Any]) -> Obj:
        """A merge patch by someone else (a user's kubectl edit, another controller): not recorded, never refused."""
        return self._apply(path, patch)

    def read(self, path: str) -> Obj | None:
        """The object as stored now, without a request."""
        found = self.objects.get(path)
        return copy.deepcopy(found) if found is not None else None

    # --- Kube ----------------------------------------------------------------------------------------

    def get(self, path: str) -> Obj | None:
        self.gets.append(path)
        self._refuse(path)
        found = self.read(path)
        if self.meanwhile is not None:
            self.meanwhile(path)
        return found

    def list(
        self, path: str, *, label_selector: str | None = None, cached: bool = False, limit: int | None = None
    ) -> list[Obj]:
        self.lists.append((path, {"label_selector": label_selector, "cached": cached, "limit": limit}))
        self._refuse(path)
        items = [
            copy.deepcopy(o)
            for p, o in sorted(self.objects.items())
            if path in _collections(p) and _matches(o, label_selector or "")
        ]
        # The watch cache (resourceVersion=0) ignores the limit, as kvpn_core.kube.Kube.list says.
        return items if cached or limit is None else items[:limit]

    def merge_patch(self, path: str, patch: Obj) -> Obj:
        self.patches.append((path, copy.deepcopy(patch)))
        self._refuse(path)
        if self.conflicts:
            self.conflicts -= 1
            raise ConflictError(409, "the object has been modified; please apply your changes to the latest version")
        current = self.objects.get(path.removesuffix("/status"))
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if current is not None and wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            raise ConflictError(409, "the object has been modified; please apply your changes to the latest version")
        return self._apply(path, patch)

    def create(self, path: str, body: Obj, *, dry_run: bool = False) -> Obj:
        self.creates.append((path, copy.deepcopy(body)))
        self._refuse(path)
        object_path = f"{path}/{body['metadata']['name']}"
        if object_path in self.objects:
            raise ConflictError(409, f'"{body["metadata"]["name"]}" already exists')
        if dry_run:
            return copy.deepcopy(body)
        return self.put(object_path, body)

    def delete(self, path: str, *, uid: str | None = None) -> bool:
        self.deletes.append(path)
        self._refuse(path)
        current = self.objects.get(path)
        if current is None or (uid is not None and current["metadata"]["uid"] != uid):
            return False
        del self.objects[path]
        return True

    # --- the API server's behaviour ------------------------------------------------------------------

    def _refuse(self, path: str) -> None:
        if self.down:
            raise KubeError(0, "API server unreachable: connection refused")
        if self.errors is not None and (error := self.errors(path)) is not None:
            raise error

    def _apply(self, path: str, patch: Mapping[str, Any]) -> Obj:
        object_path = path.removesuffix("/status")
        current = self.objects.get(object_path)
        if current is None:
            raise NotFoundError(404, f'"{object_path.rsplit("/", 1)[1]}" not found')
        meta = dict(patch.get("metadata") or {})
        meta.pop("resourceVersion", None)  # a precondition, not a change
        if path.endswith("/status"):
            patched = merge(current, {"status": patch["status"]} if "status" in patch else {})
        else:
            patched = merge(current, {**{k: v for k, v in patch.items() if k != "status"}, "metadata": meta})
        if patched == current:
            return copy.deepcopy(current)
        patched = copy.deepcopy(patched)
        if "generation" in patched["metadata"] and patched.get("spec") != current.get("spec"):
            patched["metadata"]["generation"] += 1
        patched["metadata"]["resourceVersion"] = self._next_version()
        self.objects[object_path] = patched
        return copy.deepcopy(patched)

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)


def _collections(path: str) -> tuple[str, str]:
    """The collection paths an object's path is listed under: its namespace's, and all namespaces'."""
    collection = path.rsplit("/", 1)[0]
    return collection, re.sub(r"/namespaces/[^/]+/", "/", collection)


def a_gateway(
    storage: FakeStorage,
    namespace: str,
    server: str,
    node: str = "node-a",
    *,
    renewed: dt.datetime,
    ready: bool = True,
    message: str = "",
    address: str = "192.0.2.10",
    duration: int = GATEWAY_LEASE_SECONDS,
) -> Obj:
    """A gateway node for a server, as an agent reports it: the Node (made when missing) and the lease."""
    if storage.read("nodes", "", node) is None:
        status = {"addresses": [{"type": "InternalIP", "address": address}]}
        storage.put("nodes", {"metadata": {"name": node}, "status": status})
    lease = {
        "metadata": {
            "name": gateway_lease_name(server, node),
            "namespace": namespace,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_SERVER: server, LABEL_ROLE: ROLE_GATEWAY},
            "annotations": {ANNOTATION_GATEWAY: GatewayReport(ready=ready, message=message).model_dump_json()},
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": duration,
            "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        },
    }
    return storage.put("leases", lease)
