"""The plugin's door to the Kubernetes API: the kubeconfig as kubectl reads it, errors a person reads."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import kubernetes.config
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.config.kube_config import list_kube_config_contexts
from urllib3.exceptions import HTTPError

from kvpn_core.api import API_VERSION, GROUP, PLURALS, Kind
from kvpn_core.kube import ForbiddenError, Kube, KubeError, core_path, kvpn_path

Obj = dict[str, Any]


class CliError(Exception):
    """Ends the command with this one-line message and a non-zero exit code."""


def connect(context: str | None) -> tuple[Cluster, str]:
    """A client for the kubeconfig's (or the given) context, and that context's namespace."""
    try:
        contexts, current = list_kube_config_contexts()  # type: ignore[no-untyped-call]
        chosen = next((c for c in contexts if c["name"] == context), None) if context else current
        if chosen is None:
            raise CliError(f"no context {context!r} in the kubeconfig; see `kubectl config get-contexts`")
        api_client = kubernetes.config.new_client_from_config(context=context)  # type: ignore[no-untyped-call]
    except (kubernetes.config.ConfigException, OSError) as exc:
        raise CliError(f"no cluster to talk to: no usable kubeconfig (KUBECONFIG or ~/.kube/config): {exc}") from None
    namespace = (chosen.get("context") or {}).get("namespace") or "default"
    return Cluster(api_client), namespace


class Cluster(Kube):
    """Kube with every failure turned into a CliError that names what the user tried."""

    def __init__(self, api_client: ApiClient) -> None:
        super().__init__(api_client, timeout=15.0)
        self.host = api_client.configuration.host
        self.configuration = api_client.configuration

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header the kubeconfig's credentials make (none for a client certificate)."""
        return dict(self._auth_headers())

    def call(self, verb: str, resource: str, namespace: str | None, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except ForbiddenError:
            where = f" in namespace {namespace}" if namespace else " in any namespace"
            group = "" if resource == "secrets" else f".{GROUP}"
            raise CliError(f"you may not {verb} {resource}{where} (RBAC: {verb} {resource}{group})") from None
        except KubeError as exc:
            if exc.status == 0:
                raise CliError(f"no cluster reachable at {self.host}: {exc}") from None
            if exc.status == 401:
                raise CliError(f"the cluster at {self.host} refused your credentials (401): log in again") from None
            raise CliError(f"{verb} {resource} failed ({exc.status}): {exc}") from None

    def get_kvpn(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        path = kvpn_path(kind, namespace, name)
        result: Obj | None = self.call("get", PLURALS[kind], namespace, lambda: self.get(path))
        return result

    def list_kvpn(self, kind: Kind, namespace: str | None) -> list[Obj]:
        path = kvpn_path(kind, namespace) if namespace else f"/apis/{API_VERSION}/{PLURALS[kind]}"
        items: list[Obj] = self.call("list", PLURALS[kind], namespace, lambda: self.list(path))
        return items

    def create_kvpn(self, kind: Kind, namespace: str, name: str, spec: Obj) -> Obj:
        body = {"apiVersion": API_VERSION, "kind": str(kind), "metadata": {"name": name}, "spec": spec}
        path = kvpn_path(kind, namespace)
        result: Obj = self.call("create", PLURALS[kind], namespace, lambda: self.create(path, body))
        return result

    def delete_kvpn(self, kind: Kind, namespace: str, name: str) -> None:
        self.call("delete", PLURALS[kind], namespace, lambda: self.delete(kvpn_path(kind, namespace, name)))

    def secret(self, namespace: str, name: str) -> Obj | None:
        path = core_path("secrets", namespace, name)
        result: Obj | None = self.call("get", "secrets", namespace, lambda: self.get(path))
        return result

    def watch_kvpn(self, kind: Kind, namespace: str, name: str, version: str, seconds: int) -> Iterator[Obj]:
        """The watch events ({type, object}) of one object from `version` on, until the API server ends the
        watch after `seconds`. Raises KubeError (status 410 when `version` is too old to watch from)."""
        query = {
            "watch": "1",
            "fieldSelector": f"metadata.name={name}",
            "resourceVersion": version,
            "timeoutSeconds": str(seconds),
        }
        url = f"{self.host}{kvpn_path(kind, namespace)}?{urlencode(query)}"
        headers = {"Accept": "application/json", **self.auth_headers()}
        try:
            # The read timeout outlasts the server's own end of the watch: a silent connection is a dead one.
            response = self._client.call_api("GET", url, header_params=headers, _request_timeout=(10, seconds + 30))
        except ApiException as exc:
            raise KubeError(int(exc.status or 0), str(exc.reason)) from None
        except HTTPError as exc:
            raise KubeError(0, f"API server unreachable: {exc}") from None
        raw = response.response
        try:
            if response.status != 200:
                raise KubeError(response.status, f"watch {PLURALS[kind]}: HTTP {response.status}")
            buffer = b""
            for chunk in raw.stream(amt=None, decode_content=False):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event: Obj = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise KubeError(int(status.get("code") or 0), str(status.get("message") or status))
                    yield event
        except HTTPError as exc:
            raise KubeError(0, f"API server unreachable: {exc}") from None
        finally:
            raw.close()
            raw.release_conn()
