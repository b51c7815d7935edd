"""Reconciles a VpnPeer: its address claim (the peer binding), keys, config Secret and status; releases on delete."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from pydantic import ValidationError

from kvpn_core import ceiling, keys
from kvpn_core.api import AllowedDestination, ExposeType, Kind, VpnPeerSpec, VpnServerSpec, VpnServerStatus
from kvpn_core.conditions import (
    CEILING,
    PEER_CONDITIONS,
    READY,
    Finding,
    Outcome,
    Reason,
    find,
    find_current,
    is_ready,
    remove_condition,
    set_condition,
)
from kvpn_core.contract import (
    LABEL_PEER_UID,
    LABEL_SERVER,
    PeerBinding,
    binding_age,
    binding_secret_name,
    binding_selector,
    peer_config_secret_name,
)
from kvpn_core.kube import ForbiddenError, Retry
from kvpn_core.wgquick import ClientConfig, render_client_config
from kvpn_operator import builders
from kvpn_operator.ipam import AllocationError
from kvpn_operator.memory import ANNOTATION_NUDGE, AddressBook, AddressBooks, PeerEntry, is_revision
from kvpn_operator.reporting import Report, describe_validation_error
from kvpn_operator.storage import ObjectMeta, PeerObject, ServerObject, Storage, write_status

Obj = dict[str, Any]

# Status fields the operator owns; the agents own the rest (handshake, traffic, endpoint).
_OWNED = (
    "address",
    "addresses",
    "public_key",
    "config_secret_name",
    "server_revision",
    "observed_generation",
    "conditions",
)


def index_entry(obj: Obj) -> tuple[tuple[str, str], PeerEntry]:
    """The peer's entry in the operator's index of peers by server: ((namespace, server), entry).

    From the object as kopf holds it, not a PeerObject: kopf calls this on every watch event of every
    peer, where parsing the whole status would cost more than the lookups, and an index must take any
    object, even one whose status another writer left malformed.
    """
    spec, status, meta = obj.get("spec") or {}, obj.get("status") or {}, obj["metadata"]
    ref = spec.get("serverRef") or {}
    # The reason as last written, even for an older generation: it only picks peers to nudge, and a
    # nudge is harmless. Ready counts only when it was written for the spec the peer has now.
    last: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == READY), {})
    entry = PeerEntry(
        namespace=meta["namespace"],
        name=meta["name"],
        ready=is_ready(obj),
        reason=str(last.get("reason", "")),
        address=status.get("address") or None,
        server_revision=status.get("serverRevision"),
        nudge=(meta.get("annotations") or {}).get(ANNOTATION_NUDGE),
        public_keys=_keys(spec, status),
    )
    return (ref.get("namespace") or meta["namespace"], str(ref.get("name", ""))), entry


def _keys(spec: Obj, status: Obj) -> frozenset[str]:
    """The key a peer's spec asks for and the one its status says its binding holds."""
    return frozenset(str(k) for k in (spec.get("publicKey"), status.get("publicKey")) if k)


def server_of(peer: PeerObject) -> tuple[str, str]:
    """The (namespace, name) of the peer's server, from the spec as written: its key in the peer index."""
    ref = peer.spec.get("serverRef") or {}
    return str(ref.get("namespace") or peer.namespace), str(ref.get("name", ""))


def _decode(secret: Obj | None, key: str) -> str | None:
    value = ((secret or {}).get("data") or {}).get(key)
    return base64.b64decode(value).decode() if value else None


def _namespace_allowed(peer_ns: str, server_ns: str, spec: VpnServerSpec) -> bool:
    return peer_ns == server_ns or "*" in spec.peer_namespaces or peer_ns in spec.peer_namespaces


def _unrouted(spec: VpnPeerSpec, routes: list[str]) -> list[str]:
    nets = [ipaddress.ip_network(r) for r in routes]
    return [
        d.cidr
        for d in spec.allowed_destinations
        if not any(
            (dest := ipaddress.ip_network(d.cidr)).version == n.version and dest.subnet_of(n)  # type: ignore[arg-type]
            for n in nets
        )
    ]


def validate_peer(peer: PeerObject) -> VpnPeerSpec | Outcome:
    """The peer's spec, parsed; or, when its name or spec cannot be served, the refusal for Ready."""
    if problem := builders.peer_name_problem(peer.name):
        return Outcome.rejected(Reason.INVALID_NAME, problem)
    try:
        return VpnPeerSpec.model_validate(peer.spec)
    except ValidationError as exc:
        return Outcome.rejected(Reason.INVALID_SPEC, describe_validation_error(exc))


class Verdict(Exception):  # noqa: N818 - not an error: how a reconcile stops early with what to report
    """Ends a reconcile early with the outcome to report, and the status fields it changed (`fields`)."""

    def __init__(self, outcome: Outcome, fields: dict[str, Any] | None = None) -> None:
        super().__init__(outcome.finding.message)
        self.outcome = outcome
        self.fields = fields or {}


@dataclass(frozen=True)
class PeerServer:
    """The server a peer connects to, as read for this reconcile."""

    server: ServerObject
    spec: VpnServerSpec

    @property
    def status(self) -> VpnServerStatus:
        return self.server.status

    @property
    def namespace(self) -> str:
        return self.server.namespace

    @property
    def name(self) -> str:
        return self.server.name


ServerLookup = Callable[[str, str], Obj | None]
"""The operator's cached copy of a VpnServer by (namespace, name), or None when it has none."""

KeyLookup = Callable[[str, str, str], Iterable[PeerEntry]]
"""The operator's index of peers by (server namespace, server name, public key): those that ask for or hold it."""


class SecretExists(Exception):  # noqa: N818 - a signal inside this module, not an error a caller sees
    """A new peer's config Secret turned out to exist already (from before a restart): read it, redo."""


def reconcile_peer(
    storage: Storage,
    books: AddressBooks,
    peer: PeerObject,
    *,
    now: dt.datetime,
    cached_server: ServerLookup | None = None,
    holders: KeyLookup | None = None,
) -> Report:
    """Brings the peer's binding, config Secret and status in line with its spec and its server.

    `holders` finds the other peers of the server that may hold the peer's public key (without it,
    only the server's own key is checked).
    """
    fields: dict[str, Any] = {}
    # The Ceiling condition as this reconcile judges it (None: no ceiling holds the peer); left as it was
    # when the reconcile stops before it reads the server's ceiling.
    others: dict[str, Outcome | None] = {}
    spec = validate_peer(peer)
    if isinstance(spec, Outcome):
        return _finish(storage, peer, spec, now, fields)
    try:
        peer_server = _peer_server(storage, peer, spec, cached_server)
        fields["server_revision"] = peer_server.status.revision
        _check_against(spec, peer_server)
        narrowing = _narrow(peer, spec, peer_server)
        others[CEILING] = held = _ceiling_outcome(narrowing, peer.namespace)
        if held is not None and narrowing.nothing_left:
            # Nothing left is not every route: the peer gets no binding at all, never an empty one.
            _refuse(storage, books, peer, peer_server, held)
        args = (storage, books, peer, spec, peer_server)
        dests = narrowing.destinations
        try:
            # A peer without a config Secret in its status is new: its Secret is created, not read first;
            # unless the last attempt found it may not be written, which a read tells before any claim.
            new = not peer.status.config_secret_name and not _was_refused_secrets(peer)
            fields.update(_apply(*args, destinations=dests, now=now, new=new, holders=holders))
        except SecretExists:
            fields.update(_apply(*args, destinations=dests, now=now, new=False, holders=holders))
        except ForbiddenError:
            _refuse(storage, books, peer, peer_server, _secrets_not_granted(peer.namespace))
        outcome = _serving(spec, fields, narrowing, now)
    except Verdict as verdict:
        outcome = verdict.outcome
        fields.update(verdict.fields)
    return _finish(storage, peer, outcome, now, fields, others=others)


def _serving(spec: VpnPeerSpec, fields: dict[str, Any], narrowing: ceiling.Narrowing, now: dt.datetime) -> Outcome:
    """Ready once the binding and config are written: True, unless the peer is switched off."""
    if spec.disabled:
        return Outcome.waiting(Reason.DISABLED, "spec.disabled is true: the gateways drop this peer's traffic")
    if _expired(spec, now):
        return Outcome.waiting(Reason.EXPIRED, f"expired at {spec.expires_at}: the gateways drop its traffic")
    message = f"address {', '.join(fields['addresses'])}; config in Secret {fields['config_secret_name']}"
    if narrowing.narrowed:
        message += "; the server's ceiling narrows allowedDestinations (see condition Ceiling)"
    return Outcome.ready(Reason.READY, message)


def _expired(spec: VpnPeerSpec, now: dt.datetime) -> bool:
    return spec.expires_at is not None and spec.expires_at <= now


def _find_server(
    storage: Storage, cached: ServerLookup | None, namespace: str, name: str, nudge: str | None
) -> Obj | None:
    """The server from the operator's index; from the API when the index may be behind.

    A nudge carrying a newer revision than the cached copy means the server's status has been
    written and its watch event has not arrived yet; a server that looks missing or not Ready is
    read again so a peer never settles on a stale verdict.
    """
    server = cached(namespace, name) if cached else None
    revision = ((server or {}).get("status") or {}).get("revision")
    if server is not None and is_ready(server) and (not is_revision(nudge) or nudge == revision):
        return server
    return storage.get(Kind.VPN_SERVER, namespace, name)


def _peer_server(storage: Storage, peer: PeerObject, spec: VpnPeerSpec, cached: ServerLookup | None) -> PeerServer:
    """The peer's server, if it exists, is valid and admits peers from the peer's namespace."""
    server_ns = spec.server_ref.namespace or peer.namespace
    server_id = f"{server_ns}/{spec.server_ref.name}"
    nudge = peer.metadata.annotations.get(ANNOTATION_NUDGE)
    found = _find_server(storage, cached, server_ns, spec.server_ref.name, nudge)
    if found is None:
        raise Verdict(
            Outcome.rejected(
                Reason.SERVER_NOT_FOUND, f"VpnServer {server_id} does not exist; the peer becomes Ready once it does"
            )
        )
    server = ServerObject.model_validate(found)
    status = server.status
    try:
        peer_server = PeerServer(server, VpnServerSpec.model_validate(server.spec))
    except ValidationError:
        raise Verdict(
            Outcome.waiting(
                Reason.SERVER_NOT_READY, f"VpnServer {server_id} has an invalid spec; see its Ready condition"
            )
        ) from None
    if not _namespace_allowed(peer.namespace, server_ns, peer_server.spec):
        allowed = peer_server.spec.peer_namespaces or [server_ns]
        raise Verdict(
            Outcome.rejected(
                Reason.NAMESPACE_NOT_ALLOWED,
                f"VpnServer {server_id} accepts peers from namespaces {allowed} only; "
                f"ask its owner to add {peer.namespace!r} to spec.peerNamespaces",
            )
        )
    ready = find_current(status.conditions, READY, server.generation)
    if ready is None and find(status.conditions, READY) is not None:
        # Ready was written for an older spec: the server's own reconcile is due and settles it; a verdict
        # taken now from the stale status would stand until something else wakes this peer.
        raise Retry(f"VpnServer {server_id}'s status is for an older generation than its spec")
    # With ApiServer there is no endpoint: the config has no Endpoint line, `kubectl vpn up --via api` sets one.
    reachable = status.endpoint or peer_server.spec.expose.type is ExposeType.API_SERVER
    complete = status.public_key and reachable and status.addresses and status.routes
    if not (complete and ready and ready.status == "True"):
        raise Verdict(
            Outcome.waiting(Reason.SERVER_NOT_READY, f"VpnServer {server_id} is not Ready yet; see its Ready condition")
        )
    return peer_server


def _check_against(spec: VpnPeerSpec, peer_server: PeerServer) -> None:
    """What the schema cannot say about a peer: a usable key, destinations inside the server's routes."""
    if spec.public_key:
        try:
            keys.validate_public_key(spec.public_key)
        except keys.InvalidKeyError as exc:
            raise Verdict(Outcome.rejected(Reason.INVALID_PUBLIC_KEY, str(exc))) from None
    if unrouted := _unrouted(spec, peer_server.status.routes):
        raise Verdict(
            Outcome.rejected(
                Reason.DESTINATION_NOT_ROUTED,
                f"allowedDestinations {', '.join(unrouted)} lie outside the server's routes "
                f"{', '.join(peer_server.status.routes)}",
            )
        )


def _was_refused_secrets(peer: PeerObject) -> bool:
    ready = find(peer.status.conditions, READY)
    return ready is not None and ready.reason == Reason.SECRETS_NOT_GRANTED


def _secrets_not_granted(namespace: str) -> Outcome:
    """The refusal for a peer whose config Secret the operator may not read or write: a platform team's
    setting, not the developer's mistake. The peer loses its binding (with a generated key, no one would
    hold its private half) and its address; the handler tries again every minute."""
    return Outcome.rejected(
        Reason.SECRETS_NOT_GRANTED,
        f"the operator may not write Secrets in namespace {namespace}, where this peer's config goes: the "
        f"platform team lists {namespace} in the chart's operator.secretNamespaces (or developers.namespaces), "
        "or sets operator.clusterWideSecrets=true; the operator tries again every minute",
    )


def _narrow(peer: PeerObject, spec: VpnPeerSpec, peer_server: PeerServer) -> ceiling.Narrowing:
    """What the peer may reach under the ceiling its server sets for its namespace: what its binding carries.

    Written into the binding, rather than left for the gateways to work out, so that the operator's
    condition, the Event and the gateways' firewall say the same; the agents narrow again all the same.
    """
    held_by = ceiling.ceiling_for(peer_server.spec, peer.namespace)
    return ceiling.effective_destinations(spec.allowed_destinations, peer_server.status.routes, held_by)


def _ceiling_outcome(narrowing: ceiling.Narrowing, namespace: str) -> Outcome | None:
    """The Ceiling condition: none without a ceiling; True when it cut nothing; False, a warning, saying what it cut."""
    if narrowing.ceiling is None:
        return None
    if narrowing.nothing_left:
        return Outcome.rejected(Reason.OUTSIDE_CEILING, _nothing_left(narrowing, namespace))
    if narrowing.narrowed:
        return Outcome.rejected(Reason.CUT_BY_CEILING, ceiling.cuts_message(narrowing, namespace))
    return Outcome.ready(Reason.WITHIN_CEILING, ceiling.within_message(narrowing, namespace))


def _nothing_left(narrowing: ceiling.Narrowing, namespace: str) -> str:
    return (
        f"{ceiling.nothing_left_message(narrowing, namespace)}: the peer would reach nothing, so no gateway serves it; "
        "ask for destinations within the ceiling, or ask the server's owner to widen spec.peerCeilings"
    )


def _check_key(
    storage: Storage,
    books: AddressBooks,
    peer: PeerObject,
    peer_server: PeerServer,
    public_key: str,
    *,
    holders: KeyLookup | None,
) -> None:
    """Refuses a public key that the server, or an older binding of another peer of the server, holds.

    The agents' rule, so that the peer refused here is the one the gateways leave out: they judge a
    server's bindings oldest first (`binding_age`), and an enabled binding whose key the server or an
    older enabled binding holds is skipped. A peer refused here loses its binding (and address): the
    gateways never see it, and when the holder goes or changes its key, this peer claims a new one.
    The candidates come from the index (peers of the server that ask for or hold the key); their
    bindings are read, since a binding, not a status, is what the gateways judge. Another server's peers
    are not candidates: each server has an interface of its own, where the same key is no conflict.
    """
    server = peer_server.server
    server_id = f"{server.namespace}/{server.name}"
    if peer.spec.get("publicKey"):
        remedy = "generate a new key pair and put its public key in spec.publicKey (kubectl vpn join makes one)"
    else:  # a generated key someone else copied into theirs: a new one is generated when its Secret lacks it
        remedy = f"delete Secret {peer_config_secret_name(peer.name)} and kvpn generates a new key pair"
    if public_key == peer_server.status.public_key:
        _refuse_key(storage, books, peer, peer_server, f"this public key is VpnServer {server_id}'s own; {remedy}")
    rivals = [
        entry.address
        for entry in (holders(server.namespace, server.name, public_key) if holders else ())
        if entry.address and (entry.namespace, entry.name) != (peer.namespace, peer.name)
    ]
    if not rivals:
        return
    # Its own binding's age: none yet means it would be the newest.
    mine = min((binding_age(s) for s in _bindings_of(storage, server.namespace, server.name, peer.uid)), default=None)
    for address in rivals:
        try:
            name = binding_secret_name(server.name, address)
        except ValueError:
            continue  # not an address: a status someone else wrote, and no binding's name
        secret = storage.get_secret(server.namespace, name)
        if secret is None or (secret["metadata"].get("labels") or {}).get(LABEL_PEER_UID) == peer.uid:
            continue
        try:
            binding = PeerBinding.from_secret(secret)
        except (ValidationError, ValueError, UnicodeDecodeError):
            continue  # the agents refuse it whatever it holds, so it holds nothing
        if binding.enabled and binding.public_key == public_key and (mine is None or binding_age(secret) < mine):
            # Whose key it is stays unsaid: the user may not be allowed to see that peer.
            _refuse_key(
                storage,
                books,
                peer,
                peer_server,
                f"another VpnPeer of VpnServer {server_id} already uses this public key; {remedy}",
            )


def _bindings_of(storage: Storage, server_ns: str, server_name: str, uid: str) -> list[Obj]:
    """The bindings the peer with that UID holds in the server, found by their labels."""
    claims = storage.list_secrets(server_ns, label_selector=f"{LABEL_PEER_UID}={uid}")
    return [s for s in claims if (s["metadata"].get("labels") or {}).get(LABEL_SERVER) == server_name]


def _refuse_key(
    storage: Storage, books: AddressBooks, peer: PeerObject, peer_server: PeerServer, message: str
) -> NoReturn:
    _refuse(storage, books, peer, peer_server, Outcome.rejected(Reason.DUPLICATE_PUBLIC_KEY, message))


def _refuse(
    storage: Storage, books: AddressBooks, peer: PeerObject, peer_server: PeerServer, outcome: Outcome
) -> NoReturn:
    """Removes the peer's bindings, so that no gateway sees it, and ends the reconcile with the refusal.

    Removed, not left as they were: a binding written before the refusal may let the peer reach more than
    it may now (a ceiling that narrowed to nothing), and an empty one would mean every route.
    """
    server = peer_server.server
    for secret in _bindings_of(storage, server.namespace, server.name, peer.uid):
        storage.delete_secret(server.namespace, secret["metadata"]["name"], uid=secret["metadata"]["uid"])
    book = books.peek(server.uid, tuple(peer_server.spec.address_pool))
    if book is not None and (index := book.index_of_peer(peer.uid)) is not None:
        book.release(peer.uid, index)
    raise Verdict(outcome, {"address": None, "addresses": []})


def _apply(
    storage: Storage,
    books: AddressBooks,
    peer: PeerObject,
    spec: VpnPeerSpec,
    peer_server: PeerServer,
    *,
    destinations: list[AllowedDestination],
    now: dt.datetime,
    new: bool,
    holders: KeyLookup | None,
) -> dict[str, Any]:
    """Claims the address, settles the keys, writes binding and config Secret; returns the status fields.

    `destinations` are what the binding lets the peer reach: its allowedDestinations under its ceiling.
    """
    config_name = peer_config_secret_name(peer.name)
    config_secret = None if new else storage.get_secret(peer.namespace, config_name)
    if config_secret is not None and not builders.owned_by(config_secret, peer.uid):
        refs = config_secret["metadata"].get("ownerReferences") or []
        if any(r.get("kind") == Kind.VPN_PEER and r.get("name") == peer.name for r in refs):
            raise Retry(
                f"Secret {peer.namespace}/{config_name} of an earlier VpnPeer {peer.name} is still being deleted"
            )
        raise Verdict(
            Outcome.rejected(
                Reason.SECRET_CONFLICT,
                f"Secret {peer_config_secret_name(peer.name)} exists and is not this peer's; rename or delete it",
            )
        )

    # A generated private key is kept in the config Secret; the key is made only when the Secret lacks one.
    private_key = None if spec.public_key else (_decode(config_secret, "privateKey") or keys.generate_private_key())
    public_key = spec.public_key or keys.public_key_of(private_key or "")
    if not (spec.disabled or _expired(spec, now)):
        # As the agents judge: a switched-off binding holds no key, and is refused for none.
        _check_key(storage, books, peer, peer_server, public_key, holders=holders)
    preshared_key = None
    if peer_server.spec.preshared_keys:
        preshared_key = _decode(config_secret, "presharedKey") or keys.generate_preshared_key()
    book = books.get(
        peer_server.server.uid,
        tuple(peer_server.spec.address_pool),
        lambda: storage.list_secrets(
            peer_server.namespace, label_selector=binding_selector(peer_server.name), cached=True
        ),
    )

    def binding_for(addresses: list[str]) -> PeerBinding:
        return PeerBinding(
            peer_namespace=peer.namespace,
            peer_name=peer.name,
            peer_uid=peer.uid,
            public_key=public_key,
            preshared_key=preshared_key,
            addresses=addresses,
            enabled=not (spec.disabled or _expired(spec, now)),
            allowed_destinations=list(destinations),
        )

    try:
        binding = claim(storage, book, peer_server.server, peer, requested=spec.address, binding_for=binding_for)
    except AllocationError as exc:
        raise Verdict(Outcome.rejected(*exc.finding)) from None

    status = peer_server.status
    config = render_client_config(
        ClientConfig(
            name=f"{peer.namespace}/{peer.name}",
            private_key=private_key,
            public_key=public_key,
            addresses=binding.addresses,
            dns_servers=[status.dns_nameserver] if status.dns_nameserver else [],
            dns_search=status.dns_search,
            mtu=peer_server.spec.mtu,
            server_public_key=status.public_key or "",
            preshared_key=binding.preshared_key,
            endpoint=status.endpoint or "",
            allowed_ips=status.routes,
            persistent_keepalive=peer_server.spec.persistent_keepalive,
        )
    )
    data = {"wg0.conf": config, "publicKey": public_key, "address": binding.addresses[0]}
    if private_key:
        data["privateKey"] = private_key
    if binding.preshared_key:
        data["presharedKey"] = binding.preshared_key
    _ensure_config_secret(storage, peer, peer_server.name, config_secret, data, new=new)
    return {
        "address": binding.addresses[0],
        "addresses": binding.addresses,
        "public_key": public_key,
        "config_secret_name": peer_config_secret_name(peer.name),
    }


def claim(
    storage: Storage,
    book: AddressBook,
    server: ServerObject,
    peer: PeerObject,
    *,
    requested: str | None,
    binding_for: Callable[[list[str]], PeerBinding],
) -> PeerBinding:
    """The peer's binding, with an address claimed for it: the one it holds, the requested one, or a free one.

    The API server arbitrates: a claim is created under the address's name, and a 409 means the
    address is someone else's (or this peer's, from before a restart: then it is adopted).
    """
    server_ns = server.namespace
    current = book.index_of_peer(peer.uid)
    if current is None and peer.status.address:
        current = _adopt(storage, book, server, peer, peer.status.address)
    if current is not None and (requested is None or book.pool.index_of(requested) == current):
        return _update_binding(storage, server, binding_for(book.pool.addresses(current)))
    while True:
        index = book.reserve(peer.uid, requested)
        binding: PeerBinding = binding_for(book.pool.addresses(index))
        try:
            created = storage.create_secret(server_ns, builders.binding_secret(server.body, binding))
        except Exception:
            book.release(peer.uid, index)
            raise
        if created is None:  # a binding of that name exists: the address is claimed, maybe by this peer
            if _adopt(storage, book, server, peer, binding.addresses[0]) == index:
                binding = _update_binding(storage, server, binding)
                break
            book.taken_by_other(index, "")
            if requested:
                raise AllocationError(Finding(Reason.ADDRESS_CONFLICT, f"address {requested} is taken by another peer"))
            continue
        book.confirm(peer.uid, index)
        break
    if current is not None and current != index:
        _delete_binding(storage, server, peer.uid, book.pool.addresses(current)[0])
        book.release(peer.uid, current)
    elif current is None and peer.status.address and peer.status.address != binding.addresses[0]:
        # The address it held is no longer in the pool (the server's addressPool changed): free its name too.
        _delete_binding(storage, server, peer.uid, peer.status.address)
    return binding


def _adopt(storage: Storage, book: AddressBook, server: ServerObject, peer: PeerObject, address: str) -> int | None:
    """The index of `address` if its binding exists and belongs to `peer` (recorded in the book)."""
    try:
        index = book.pool.index_of(address)
    except AllocationError:
        return None
    secret = storage.get_secret(server.namespace, binding_secret_name(server.name, address))
    if secret is None or (secret["metadata"].get("labels") or {}).get(LABEL_PEER_UID) != peer.uid:
        return None
    book.confirm(peer.uid, index)
    return index


def _update_binding(storage: Storage, server: ServerObject, binding: PeerBinding) -> PeerBinding:
    """Patches the binding's data where it differs; a preshared key already in it is kept."""
    namespace, name = server.namespace, binding.secret_name(server.name)
    existing = storage.get_secret(namespace, name)
    if existing is None:
        raise Retry(f"peer binding {namespace}/{name} disappeared; claiming again", delay=0.5)
    stored = PeerBinding.from_secret(existing)
    if stored.preshared_key and binding.preshared_key:
        binding = binding.model_copy(update={"preshared_key": stored.preshared_key})
    desired = builders.binding_secret(server.body, binding)["data"]
    if existing.get("data") != desired:
        storage.patch_secret_data(namespace, name, {**dict.fromkeys(existing.get("data") or {}), **desired})
    return binding


def _delete_binding(storage: Storage, server: ServerObject, uid: str, address: str) -> None:
    """Deletes the binding named after `address` if it is this peer's (by UID), and only then."""
    name = binding_secret_name(server.name, address)
    secret = storage.get_secret(server.namespace, name)
    if secret and (secret["metadata"].get("labels") or {}).get(LABEL_PEER_UID) == uid:
        storage.delete_secret(server.namespace, name, uid=secret["metadata"]["uid"])


def _ensure_config_secret(
    storage: Storage, peer: PeerObject, server: str, existing: Obj | None, data: dict[str, str], *, new: bool
) -> None:
    desired = builders.peer_config_secret(peer.body, server, data)
    if existing is None:
        if storage.create_secret(peer.namespace, desired) is None:
            if new:
                raise SecretExists
            raise Retry(f"Secret {desired['metadata']['name']} appeared meanwhile", delay=0.5)
    elif existing.get("data") != desired["data"]:
        stale: dict[str, str | None] = {k: None for k in existing.get("data") or {} if k not in desired["data"]}
        storage.patch_secret_data(peer.namespace, desired["metadata"]["name"], {**stale, **desired["data"]})


def _finish(
    storage: Storage,
    peer: PeerObject,
    outcome: Outcome,
    now: dt.datetime,
    fields: dict[str, Any] | None = None,
    *,
    others: Mapping[str, Outcome | None] | None = None,
) -> Report:
    """Writes Ready from `outcome`, and each of `others` (Ceiling) from its outcome, or removes it (None).

    A condition `others` does not name stays as it was. One that says what Ready says is no news of its
    own: the refusal is posted once.
    """
    previous = peer.status.conditions
    conditions = set_condition(previous, type_=READY, outcome=outcome, generation=peer.generation, now=now)
    for type_, other in (others or {}).items():
        if other is None:
            conditions = remove_condition(conditions, type_)
        else:
            conditions = set_condition(conditions, type_=type_, outcome=other, generation=peer.generation, now=now)
    status = peer.status.model_copy(
        update={**(fields or {}), "conditions": conditions, "observed_generation": peer.generation}
    )
    desired = status.model_dump(by_alias=True, mode="json", include=set(_OWNED))
    write_status(storage, Kind.VPN_PEER, peer.body, desired, owned=PEER_CONDITIONS)
    news = {t: o for t, o in (others or {}).items() if o is not None and o.finding != outcome.finding}
    return Report.of(previous, conditions, outcome, news)


def release_peer(storage: Storage, books: AddressBooks, peer: PeerObject) -> bool:
    """Deletes the peer's binding, freeing its address. True when an address was released.

    From the spec as written: a peer whose spec never was valid may hold no address, but it is deleted all the same.
    """
    server_ns, server_name = server_of(peer)
    released = False
    for secret in _bindings_of(storage, server_ns, server_name, peer.uid):
        released |= storage.delete_secret(server_ns, secret["metadata"]["name"], uid=secret["metadata"]["uid"])
    server = storage.get(Kind.VPN_SERVER, server_ns, server_name)
    if server is not None:
        # Not a ServerObject: the server's status has no say here, and a malformed one must not keep a
        # deleted peer's address reserved in memory.
        try:
            pool = tuple(VpnServerSpec.model_validate(server.get("spec") or {}).address_pool)
        except ValidationError:
            return released
        book = books.peek(ObjectMeta.model_validate(server["metadata"]).uid, pool)
        if book is not None and (index := book.index_of_peer(peer.uid)) is not None:
            book.release(peer.uid, index)
    return released


def sharing_a_key(peer: PeerObject, holders: KeyLookup) -> list[PeerEntry]:
    """The other peers of the server that ask for or hold a key this peer asks for or holds.

    Whose verdict may turn when this peer goes, changes its key or is switched on or off: the older of
    two bindings holds a key, so a change on one side can make the other Ready or refuse it.
    """
    found: dict[tuple[str, str], PeerEntry] = {}
    for key in sorted(_keys(peer.spec, {"publicKey": peer.status.public_key})):
        for entry in holders(*server_of(peer), key):
            if (entry.namespace, entry.name) != (peer.namespace, peer.name):
                found.setdefault((entry.namespace, entry.name), entry)
    return list(found.values())


def to_nudge_after(peer: PeerObject, report: Report, holders: KeyLookup) -> list[PeerEntry]:
    """After a reconcile: the peers `sharing_a_key`, when this one's verdict or spec changed; else none.

    A nudge wakes a peer whose verdict did not change without waking this one again, so nudges settle.
    """
    changed = report.transition or peer.generation != peer.status.observed_generation
    return sharing_a_key(peer, holders) if changed else []


def waiting_for_addresses(peers: Iterable[PeerEntry]) -> list[PeerEntry]:
    """Peers of a server that are waiting for a free address."""
    return [p for p in peers if p.reason == Reason.POOL_EXHAUSTED]
