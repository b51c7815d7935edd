"""The unit tests' shared fakes and factories: a clock, keys, Secrets, and the operator's Storage without an
API server (objects in a dict, with the API's 404, 409 and resourceVersion)."""

from __future__ import annotations

import base64
import copy
import itertools
import os
from collections.abc import Mapping
from typing import Any

from kvpn_core.api import API_VERSION, PLURALS, Kind
from kvpn_core.kube import NotFoundError

Obj = dict[str, Any]
Key = tuple[str, str, str]
"""(resource, namespace, name); resource is the API's plural (secrets, services, vpnservers, ...)."""

KINDS = {
    "secrets": ("v1", "Secret"),
    "services": ("v1", "Service"),
    "nodes": ("v1", "Node"),
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
        elif isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
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
    `writes` records each write (verb, resource, namespace, name), for "the second run writes nothing".
    """

    def __init__(self, *, service_cidrs: list[str] | None = None) -> None:
        self.objects: dict[Key, Obj] = {}
        self.writes: list[tuple[str, str, str, str]] = []
        self.service_cidrs = service_cidrs
        self._versions = itertools.count(1)
        self._uids = itertools.count(1)

    # --- seeding and reading back, for tests ---------------------------------------------------------

    def put(self, resource: str, obj: Obj) -> Obj:
        """Stores `obj` as if a user created it, filling in what the API server would; returns a copy."""
        meta = obj.setdefault("metadata", {})
        api_version, kind = KINDS[resource]
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        meta.setdefault("uid", f"uid-{next(self._uids)}")
        meta.setdefault("namespace", "")
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
        # An API server without ServiceCIDR objects, refusing the probe's clusterIP as a real one words it.
        if self.service_cidrs is None:
            return None
        return (
            f'Service "{service["metadata"]["name"]}" is invalid: spec.clusterIPs: Invalid value: '
            f'["0.0.0.0"]: failed to allocate IP 0.0.0.0: provided IP is not in the valid range. '
            f"The range of valid IPs is {','.join(self.service_cidrs)}"
        )

    def list_nodes(self) -> list[Obj]:
        return [copy.deepcopy(o) for (r, _, _), o in sorted(self.objects.items()) if r == "nodes"]

    def list_service_cidrs(self, version: str) -> list[Obj] | None:
        return None  # as on clusters before 1.33: the probe's refusal names the range
