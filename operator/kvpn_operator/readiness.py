"""The operator's readiness: kopf runs and watches both kinds, and the API server answers its reads of them."""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from kvpn_core.api import GROUP, PLURALS, Kind
from kvpn_core.kube import ForbiddenError, KubeError, NotFoundError
from kvpn_operator.storage import Storage

# A kubelet probes every 10 s: the reads behind a verdict are reused for 5 s, so most probes cost none.
CACHE_SECONDS = 5.0
# Within the chart's probe timeout (5 s), so a probe gets the reason rather than a timeout.
READ_TIMEOUT_SECONDS = 3.0
# With a namespace glob the scope may hold hundreds of namespaces; RBAC is granted per kind in practice
# (the chart's ClusterRole), so a few of them tell what all would, and a probe stays cheap.
MAX_NAMESPACES = 8
# kopf learns of a CRD created while it runs by rescanning API discovery on each CRD event; when discovery
# lags the CRD's last event, kopf never watches that kind (seen here with both CRDs applied one after the
# other; azimuth-cloud/zenith#15). A kind served for this long without a watch is that, not a slow start.
STALL_SECONDS = 20.0
KINDS = (Kind.VPN_SERVER, Kind.VPN_PEER)

log = logging.getLogger("kvpn.operator.readiness")


def resource_name(kind: Kind) -> str:
    """vpnservers.kvpn.dev: how kubectl, RBAC and CRDs name a kind."""
    return f"{PLURALS[kind]}.{GROUP}"


@dataclass(frozen=True)
class Check:
    """One line of the verdict: what was checked, and the problem, or None with what was seen."""

    name: str
    problem: str | None
    detail: str = ""


@dataclass(frozen=True)
class Verdict:
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return all(c.problem is None for c in self.checks)

    def body(self) -> str:
        """kube-apiserver's /readyz?verbose style: one [+] or [-] line per check, then the summary."""
        lines = [
            f"[+]{c.name} ok" + (f": {c.detail}" if c.detail else "")
            if c.problem is None
            else f"[-]{c.name} failed: {c.problem}"
            for c in self.checks
        ]
        lines.append("readyz check passed" if self.ready else "readyz check failed")
        return "\n".join(lines) + "\n"


def _read_problem(kind: Kind, namespace: str | None, exc: Exception) -> str:
    name = resource_name(kind)
    where = f"in namespace {namespace}" if namespace else "in all namespaces"
    if isinstance(exc, NotFoundError):
        return (
            f"the API server does not serve {name} (404): its CRD is not installed; install it "
            f"(the chart's crds.install, or kubectl apply -f crds/)"
        )
    if isinstance(exc, ForbiddenError):
        return f"the operator may not list {name} {where} (403): grant it in the operator's RBAC: {exc}"
    if isinstance(exc, KubeError):
        return str(exc) if exc.status == 0 else f"listing {name} {where} failed ({exc.status}): {exc}"
    return f"listing {name} {where} failed: {type(exc).__name__}: {exc}"


class Readiness:
    """Ready only when the operator is reconciling: kopf has run its startup handlers and watches both
    kinds, and the API server answers the operator's own list of each kind in its scope.

    `watching` names the resources kopf watches (vpnservers.kvpn.dev, ...); `namespaces` is the scope,
    None for all namespaces. Only the API reads are cached: the rest is a lookup.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        started: Callable[[], bool],
        watching: Callable[[], Collection[str]],
        namespaces: Callable[[], Collection[str] | None],
        clock: Callable[[], float] = time.monotonic,
        ttl: float = CACHE_SECONDS,
    ) -> None:
        self._storage = storage
        self._started = started
        self._watching = watching
        self._namespaces = namespaces
        self._clock = clock
        self._ttl = ttl
        # One probe reads, probes arriving meanwhile wait for its answer instead of reading again.
        self._lock = threading.Lock()
        self._reads: tuple[Check, ...] = ()
        self._served: frozenset[str] = frozenset()
        self._read_at: float | None = None
        self._stalled_since: dict[str, float] = {}

    def verdict(self) -> Verdict:
        return Verdict((self._kopf(), *self._cached_reads()))

    def stalled(self, grace: float = STALL_SECONDS) -> list[str]:
        """Kinds the API server serves that kopf has not watched for `grace` seconds since kopf started.

        A restart makes kopf scan again; nothing else does. Free while kopf watches both kinds: the API
        is read only while one is missing.
        """
        missing = self._unwatched() if self._started() else []
        if not missing:
            self._stalled_since.clear()
            return []
        self._cached_reads()
        now = self._clock()
        for name in list(self._stalled_since):
            if name not in missing or name not in self._served:
                del self._stalled_since[name]
        for name in missing:
            if name in self._served:
                self._stalled_since.setdefault(name, now)
        return [name for name, since in self._stalled_since.items() if now - since >= grace]

    def _unwatched(self) -> list[str]:
        watched = set(self._watching())
        return [n for n in (resource_name(k) for k in KINDS) if n not in watched]

    def _kopf(self) -> Check:
        if not self._started():
            return Check("kopf", "kopf's startup handlers have not finished")
        if missing := self._unwatched():
            return Check(
                "kopf",
                f"kopf does not watch {', '.join(missing)} (it starts when the CRD exists and it may list it)",
            )
        return Check("kopf", None, f"started, watching {', '.join(resource_name(k) for k in KINDS)}")

    def _cached_reads(self) -> tuple[Check, ...]:
        with self._lock:
            if self._read_at is None or self._clock() - self._read_at >= self._ttl:
                self._reads, self._served = self._read()
                self._read_at = self._clock()
            return self._reads

    def _read(self) -> tuple[tuple[Check, ...], frozenset[str]]:
        """A check per kind, and the kinds a read showed served (none when no namespace was read)."""
        scope = self._namespaces()
        namespaces: list[str | None] = [None] if scope is None else [*sorted(scope)[:MAX_NAMESPACES]]
        if scope is None:
            seen = "listed in all namespaces"
        elif not scope:
            seen = "no namespace in scope yet"
        elif len(scope) > MAX_NAMESPACES:
            seen = f"listed in {MAX_NAMESPACES} of {len(scope)} namespaces"
        else:
            seen = f"listed in {len(scope)} namespace{'s' if len(scope) > 1 else ''}"
        checks = []
        served = set()
        unreachable: str | None = None
        for kind in KINDS:
            problem = unreachable
            for namespace in [] if unreachable else namespaces:
                try:
                    self._storage.sample(kind, namespace)
                except Exception as exc:  # any failure is a reason in the body, never a crash of the endpoint
                    problem = _read_problem(kind, namespace, exc)
                    if isinstance(exc, KubeError) and exc.status == 0:
                        unreachable = problem  # every further read would wait out its own timeout
                    break
            checks.append(Check(resource_name(kind), problem, "" if problem else seen))
            if problem is None and namespaces:
                served.add(resource_name(kind))
        return tuple(checks), frozenset(served)


def serve(readiness: Readiness, *, host: str = "0.0.0.0", port: int) -> http.server.ThreadingHTTPServer:  # noqa: S104 - a probe comes from the node
    """Serves GET /readyz (200 or 503, the verdict as text) from a daemon thread; the caller shuts it down.

    Its own thread, not kopf's event loop: the API reads block, and must never hold up the handlers.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/readyz":
                self.send_error(404)
                return
            verdict = readiness.verdict()
            payload = verdict.body().encode()
            self.send_response(200 if verdict.ready else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:  # the stdlib's signature, names included
            log.debug("readiness probe from %s: %s", self.address_string(), format % args)

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="readiness endpoint", daemon=True).start()
    return server
