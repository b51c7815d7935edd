"""kopf registration only: each handler parses, calls one service function, maps errors, posts the Event."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import kopf

from kvpn_core.api import GROUP, VERSION
from kvpn_core.conditions import Reason
from kvpn_core.contract import LABEL_MANAGED_BY, LABEL_ROLE, MANAGED_BY
from kvpn_core.kube import ForbiddenError, KubeError, Retry
from kvpn_operator import peer, server
from kvpn_operator.memory import AddressBooks, PeerEntry
from kvpn_operator.reporting import Report
from kvpn_operator.storage import PeerObject, ServerObject, Storage

PEERS = (GROUP, VERSION, "vpnpeers")
SERVERS = (GROUP, VERSION, "vpnservers")
SERVER_RESYNC_SECONDS = 15.0
WORKER_THREADS = 16
WATCH_SERVER_SECONDS = 50
SECRETS_RETRY_SECONDS = 60

log = logging.getLogger("kvpn.operator")


@dataclass
class Services:
    """What the handlers share, handed to kopf as its memo."""

    storage: Storage
    facts: server.ClusterFacts = field(default_factory=server.ClusterFacts)
    books: AddressBooks = field(default_factory=AddressBooks)
    service_networks: server.ServiceNetworks = field(default_factory=server.ServiceNetworks)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def plain(body: kopf.Body) -> dict[str, Any]:
    """The object as plain dicts, as the service layer expects."""
    return {k: body[k] for k in body}


@contextmanager
def api_errors() -> Iterator[None]:
    """Turns what can go wrong talking to the API into kopf retries; nothing here is the user's mistake."""
    try:
        yield
    except Retry as exc:
        raise kopf.TemporaryError(str(exc), delay=exc.delay) from exc
    except ForbiddenError as exc:
        log.error("the operator lacks a permission (check its RBAC): %s", exc)  # noqa: TRY400 - no traceback: not a bug
        raise kopf.TemporaryError(str(exc), delay=30) from exc
    except KubeError as exc:
        raise kopf.TemporaryError(f"API request failed: {exc}", delay=5 if exc.status == 0 else 2) from exc


def post(body: kopf.Body, report: Report) -> None:
    """One Event per piece of news: Ready when it changed, a discovery condition when it flipped."""
    for outcome in ((report.outcome,) if report.transition else ()) + report.news:
        kind = "Warning" if outcome.warning else "Normal"
        kopf.event(body, type=kind, reason=outcome.finding.reason, message=outcome.finding.message)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "kvpn.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvpn.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kvpn.dev", key="last-handled-configuration"
    )
    # Handlers are synchronous and spend their time waiting on the API server: more threads, more overlap.
    settings.execution.max_workers = WORKER_THREADS
    # No batching.worker_limit: kopf's workers wait for the indexes to be complete, and with a limit
    # below the number of objects at start-up, the objects that would complete them never get a worker.
    settings.posting.level = logging.INFO
    # Every watch request ends after WATCH_SERVER_SECONDS (the API server closes it; kopf resumes from the
    # last resourceVersion, no new list), and the client gives a stream up a little later: a connection
    # that a network partition left dead is noticed within a minute. Without these kopf waits on it for
    # as long as the kernel keeps the TCP connection, and reconciles nothing meanwhile.
    settings.watching.server_timeout = WATCH_SERVER_SECONDS
    settings.watching.client_timeout = WATCH_SERVER_SECONDS + 10
    settings.watching.connect_timeout = 10


# The indexes are async: kopf calls them in its event loop. Sync ones would each take a trip through
# the handler threads, on every watch event, costing more CPU than the few dict lookups they do.
@kopf.index(*SERVERS)
async def servers_by_name(body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Every VpnServer as last seen, so a peer's reconcile need not read its server from the API."""
    return {(body.metadata.namespace or "", body.metadata.name or ""): plain(body)}


@kopf.index(*PEERS)
async def peers_by_server(body: kopf.Body, **_: Any) -> dict[tuple[str, str], PeerEntry]:
    key, entry = peer.index_entry(plain(body))
    return {key: entry}


@kopf.index(*PEERS)
async def peers_by_key(body: kopf.Body, **_: Any) -> dict[tuple[str, str, str], PeerEntry]:
    """The peers of each server by the public keys they ask for or hold: a server's key is one peer's."""
    (namespace, name), entry = peer.index_entry(plain(body))
    return {(namespace, name, key): entry for key in entry.public_keys}


def _peers_of(handler_kwargs: dict[str, Any], namespace: str, name: str) -> list[PeerEntry]:
    """The peers of a server, from the index kopf passes to every handler as a keyword argument."""
    index: kopf.Index[tuple[str, str], PeerEntry] = handler_kwargs["peers_by_server"]
    return list(index.get((namespace, name), []))


def _holders(handler_kwargs: dict[str, Any]) -> peer.KeyLookup:
    """Who asks for or holds a public key in a server, from the index kopf passes to every handler."""
    index: kopf.Index[tuple[str, str, str], PeerEntry] = handler_kwargs["peers_by_key"]

    def holders(namespace: str, name: str, key: str) -> list[PeerEntry]:
        return list(index.get((namespace, name, key), []))

    return holders


@kopf.on.resume(*SERVERS)
@kopf.on.create(*SERVERS)
@kopf.on.update(*SERVERS)
@kopf.timer(*SERVERS, interval=SERVER_RESYNC_SECONDS, initial_delay=SERVER_RESYNC_SECONDS)
def reconcile_vpnserver(body: kopf.Body, memo: Services, **kwargs: Any) -> None:
    with api_errors():
        report = server.reconcile_server(
            memo.storage,
            ServerObject.model_validate(plain(body)),
            facts=memo.facts,
            service_networks=memo.service_networks,
            peers=lambda: _peers_of(kwargs, body.metadata.namespace or "", body.metadata.name or ""),
            now=now(),
        )
    post(body, report)


@kopf.on.event("v1", "services", labels={LABEL_ROLE: "server", LABEL_MANAGED_BY: MANAGED_BY})
def watch_server_service(body: kopf.Body, memo: Services, **_: Any) -> None:
    """A cloud controller gives a LoadBalancer its address: the server learns its endpoint now, not at resync."""
    with api_errors():
        server.nudge_for_service(memo.storage, plain(body))


@kopf.on.delete(*SERVERS, optional=True)
def forget_vpnserver(body: kopf.Body, memo: Services, **kwargs: Any) -> None:
    """The server's bindings go with it (owner references); its peers learn of it by a nudge."""
    memo.books.forget(body.metadata.uid or "")
    with api_errors():
        dependents = _peers_of(kwargs, body.metadata.namespace or "", body.metadata.name or "")
        server.nudge(memo.storage, dependents, f"deleted-{body.metadata.uid}")


@kopf.on.resume(*PEERS)
@kopf.on.create(*PEERS)
@kopf.on.update(*PEERS)
def reconcile_vpnpeer(body: kopf.Body, memo: Services, **kwargs: Any) -> None:
    report = _reconcile_peer(body, memo, kwargs)
    if report.outcome.finding.reason == Reason.SECRETS_NOT_GRANTED:
        # Granted by a helm upgrade, which tells the operator nothing: it looks again.
        raise kopf.TemporaryError(report.outcome.finding.message, delay=SECRETS_RETRY_SECONDS)


def _reconcile_peer(body: kopf.Body, memo: Services, handler_kwargs: dict[str, Any]) -> Report:
    servers: kopf.Index[tuple[str, str], dict[str, Any]] = handler_kwargs["servers_by_name"]

    def cached_server(namespace: str, name: str) -> dict[str, Any] | None:
        return next(iter(servers.get((namespace, name), [])), None)

    holders = _holders(handler_kwargs)
    obj = PeerObject.model_validate(plain(body))
    with api_errors():
        report = peer.reconcile_peer(
            memo.storage, memo.books, obj, now=now(), cached_server=cached_server, holders=holders
        )
    post(body, report)
    with api_errors():
        # Another peer of the server with this one's key may be Ready or refused because of this one.
        sharers = peer.to_nudge_after(obj, report, holders)
        server.nudge(memo.storage, sharers, f"key-{obj.uid}-{obj.metadata.resource_version}")
    return report


@kopf.on.delete(*PEERS)
def release_vpnpeer(body: kopf.Body, memo: Services, **kwargs: Any) -> None:
    """Frees the peer's address (its binding may live in another namespace, so no owner reference can), and
    its key: a peer refused for using it may claim it now."""
    obj = PeerObject.model_validate(plain(body))
    with api_errors():
        released = peer.release_peer(memo.storage, memo.books, obj)
        server.nudge(memo.storage, peer.sharing_a_key(obj, _holders(kwargs)), f"key-freed-{body.metadata.uid}")
        if released:
            dependents = _peers_of(kwargs, *peer.server_of(obj))
            server.nudge(memo.storage, peer.waiting_for_addresses(dependents), f"freed-{body.metadata.uid}")


def _expiry(spec: kopf.Spec) -> dt.datetime | None:
    value = spec.get("expiresAt")
    try:
        parsed = dt.datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None  # the reconcile reports the bad value as InvalidSpec
    return parsed.replace(tzinfo=parsed.tzinfo or dt.UTC) if parsed else None


def _has_expiry(spec: kopf.Spec, **_: Any) -> bool:
    return _expiry(spec) is not None


@kopf.daemon(*PEERS, when=_has_expiry, cancellation_timeout=2.0)
async def expire_vpnpeer(body: kopf.Body, memo: Services, stopped: kopf.DaemonStopped, **kwargs: Any) -> None:
    """Sleeps until the peer's expiresAt, then reconciles it, which switches it off within a second.

    The body is live: a changed expiresAt is picked up at the next wake-up, at most a minute away.
    """
    while not stopped:
        expires = _expiry(body.spec)
        if expires is None:
            return
        remaining = (expires - dt.datetime.now(dt.UTC)).total_seconds()
        if remaining <= 0:
            # to_thread carries the context kopf.event needs; the reconcile is idempotent if already done.
            await asyncio.to_thread(_reconcile_peer, body, memo, kwargs)
            return
        await stopped.wait(min(remaining, 60.0))
