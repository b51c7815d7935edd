"""Acting on kvpn objects through the API as a user would, and waiting for what the operator does."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

GROUP, VERSION = "kvpn.dev", "v1alpha1"
T = TypeVar("T")
Obj = dict[str, Any]


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.1) -> T:
    """Polls `probe` until it returns something truthy; fails naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")


def ready(obj: Obj | None) -> tuple[str, str] | None:
    """(status, reason) of the Ready condition, or None."""
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition["status"], condition["reason"]
    return None


def decode(secret: Obj | client.V1Secret, key: str) -> str | None:
    data = secret.data if isinstance(secret, client.V1Secret) else secret.get("data")
    value = (data or {}).get(key)
    return base64.b64decode(value).decode() if value else None


class Kvpn:
    """VpnServers and VpnPeers through the CustomObjects API, plus the Secrets and Events around them."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def create(self, plural: str, namespace: str, name: str, spec: Obj) -> Obj:
        kind = {"vpnservers": "VpnServer", "vpnpeers": "VpnPeer"}[plural]
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
        result: Obj = self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
        return result

    def server(self, namespace: str, name: str, **spec: Any) -> Obj:
        spec.setdefault("addressPool", ["10.8.0.0/24"])
        spec.setdefault("routes", ["10.96.0.0/16"])
        spec.setdefault("expose", {"endpoint": "vpn.example.com:51820"})
        return self.create("vpnservers", namespace, name, spec)

    def peer(self, namespace: str, name: str, server: str = "dev", **spec: Any) -> Obj:
        spec.setdefault("serverRef", {"name": server})
        return self.create("vpnpeers", namespace, name, spec)

    def get(self, plural: str, namespace: str, name: str) -> Obj | None:
        try:
            result: Obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return result

    def list(self, plural: str, namespace: str) -> list[Obj]:
        items: list[Obj] = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]
        return items

    def patch(self, plural: str, namespace: str, name: str, spec: Obj) -> Obj:
        result: Obj = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name, {"spec": spec}
        )
        return result

    def delete(self, plural: str, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)

    def wait_ready(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: str = "True",
        reason: str | None = None,
        timeout: float = 20.0,
    ) -> Obj:
        def probe() -> Obj | None:
            obj = self.get(plural, namespace, name)
            condition = ready(obj)
            if condition and condition[0] == status and (reason is None or condition[1] == reason):
                return obj
            return None

        want = f"Ready={status}" + (f" ({reason})" if reason else "")
        return wait_for(f"{plural} {namespace}/{name} {want}", probe, timeout)

    def secret(self, namespace: str, name: str) -> client.V1Secret | None:
        try:
            return self.core.read_namespaced_secret(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def secrets(self, namespace: str, selector: str = "") -> list[client.V1Secret]:
        items: list[client.V1Secret] = self.core.list_namespaced_secret(namespace, label_selector=selector).items
        return items

    def events(self, namespace: str, name: str) -> list[client.CoreV1Event]:
        items = self.core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
        return list(items)
