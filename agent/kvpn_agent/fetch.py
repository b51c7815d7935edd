"""Reads a batch of kvpn objects of one kind and namespace: a GET each, or one LIST when many are due."""

from __future__ import annotations

from typing import Any

from kvpn_core.api import Kind
from kvpn_core.kube import Kube, kvpn_path

LIST_ABOVE = 20
"""More objects than this due in one namespace: one LIST instead of a GET each."""

Obj = dict[str, Any]


def fetch(kube: Kube, kind: Kind, namespace: str, names: list[str]) -> dict[str, Obj]:
    """The named objects that exist, by name."""
    if len(names) > LIST_ABOVE:
        return {str(o["metadata"]["name"]): o for o in kube.list(kvpn_path(kind, namespace))}
    found = {}
    for name in names:
        obj = kube.get(kvpn_path(kind, namespace, name))
        if obj is not None:
            found[name] = obj
    return found
