"""The API client the operator and the agent share: raw JSON requests, API errors turned into domain errors."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any
from urllib.parse import quote, urlencode

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from kvpn_core.api import API_VERSION, PLURALS, Kind

Obj = dict[str, Any]

# How long the Authorization header is reused. The client's own refresh (a token file re-read, at most
# once a minute) ran on every request; a token is valid for an hour at least after it is rotated.
AUTH_REFRESH_SECONDS = 10.0


class KubeError(Exception):
    """An API request failed; `status` is the HTTP status (0 when the API server was not reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NotFoundError(KubeError):
    pass


class ConflictError(KubeError):
    """409: the object already exists, or it changed since it was read."""


class InvalidError(KubeError):
    """422: the API server refused the object; the message says why."""


class ForbiddenError(KubeError):
    pass


class Retry(Exception):  # noqa: N818 - a verdict, not an error: "try again in `delay` seconds"
    """The reconcile cannot finish now but will later, without any user action."""

    def __init__(self, message: str, delay: float = 2.0) -> None:
        super().__init__(message)
        self.delay = delay


def _error(status: int, reason: str, body: bytes | str | None) -> KubeError:
    message = reason
    with contextlib.suppress(ValueError):  # not JSON: the HTTP reason is all there is
        message = json.loads(body or "{}").get("message") or message
    cls = {404: NotFoundError, 409: ConflictError, 422: InvalidError, 403: ForbiddenError}.get(status, KubeError)
    return cls(status, message)


def core_path(resource: str, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
    path = "/api/v1" + (f"/namespaces/{namespace}" if namespace else "") + f"/{resource}"
    return path + (f"/{quote(name)}" if name else "") + (f"/{sub}" if sub else "")


def kvpn_path(kind: Kind, namespace: str, name: str | None = None, sub: str = "") -> str:
    path = f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURALS[kind]}"
    return path + (f"/{quote(name)}" if name else "") + (f"/{sub}" if sub else "")


class Kube:
    """Thin JSON client. Returns plain dicts: the operator compares objects, it never needs model classes."""

    def __init__(self, api_client: ApiClient, timeout: float = 30.0) -> None:
        self._client = api_client
        self._timeout = timeout
        self._auth: dict[str, str] = {}
        self._auth_until = -1.0

    def _auth_headers(self) -> dict[str, str]:
        now = time.monotonic()
        if now >= self._auth_until:  # two threads may both refresh: harmless
            headers: dict[str, str] = {}
            self._client.update_params_for_auth(headers, None, ["BearerToken"], None, None, None)
            self._auth, self._auth_until = headers, now + AUTH_REFRESH_SECONDS
        return self._auth

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Obj | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        url = self._client.configuration.host + path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json", "Content-Type": content_type, **self._auth_headers()}
        try:
            response = self._client.call_api(
                method, url, header_params=headers, body=body, _request_timeout=self._timeout
            )
            data = response.read()  # type: ignore[no-untyped-call]
        except ApiException as exc:
            raise _error(int(exc.status or 0), str(exc.reason), exc.body) from None
        except HTTPError as exc:
            raise KubeError(0, f"API server unreachable: {exc}") from None
        if not 200 <= response.status <= 299:
            raise _error(response.status, str(response.reason), data)
        result: Obj = json.loads(data) if data else {}
        return result

    def get(self, path: str) -> Obj | None:
        try:
            return self.request("GET", path)
        except NotFoundError:
            return None

    def list(
        self, path: str, *, label_selector: str | None = None, cached: bool = False, limit: int | None = None
    ) -> list[Obj]:
        """The items (the first `limit` of them, when given). `cached` and `limit` do not mix: the watch
        cache ignores the limit and returns every item."""
        query = {}
        if label_selector:
            query["labelSelector"] = label_selector
        if limit is not None:
            query["limit"] = str(limit)
        if cached:
            # Served from the API server's watch cache: no etcd read, at most milliseconds stale.
            query["resourceVersion"] = "0"
        items: list[Obj] = self.request("GET", path, query=query).get("items", [])
        return items

    def create(self, path: str, body: Obj, *, dry_run: bool = False) -> Obj:
        return self.request("POST", path, body=body, query={"dryRun": "All"} if dry_run else None)

    def merge_patch(self, path: str, patch: Obj) -> Obj:
        return self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")

    def delete(self, path: str, *, uid: str | None = None) -> bool:
        """Deletes; False when it was already gone. With `uid`, only that incarnation of the object."""
        body = {"preconditions": {"uid": uid}} if uid else None
        try:
            self.request("DELETE", path, body=body)
        except NotFoundError:
            return False
        except ConflictError:  # the uid precondition failed: a new object of that name, not ours
            return False
        return True
