"""One server's desired state kept current one binding change at a time (the watch-event path)."""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from kvpn_agent.desired import BindingCache, DesiredServer, Judged, binding_age, build_desired, judge_binding

Claim = str | ipaddress.IPv4Address | ipaddress.IPv6Address
"""What a binding competes for with the others: its public key and its addresses."""


class DesiredBuilder:
    """One server's desired state kept current one binding change at a time (the watch-event path).

    ``apply`` gives exactly what ``build_desired`` over the current bindings gives. A binding's
    outcome depends on the others only through the public key and addresses it claims (older
    bindings win), so a change whose claims no other binding shares is patched in and out alone;
    any other change rebuilds from all bindings. Not thread-safe: used by the sync loop only.

    ``cache`` is the owner's parsed bindings, shared by the builders of all its servers and kept
    across rebuilds; without it the builder keeps its own.
    """

    def __init__(
        self,
        server: Mapping[str, Any],
        key_secret: Mapping[str, Any] | None,
        bindings: Iterable[Mapping[str, Any]],
        *,
        interface: str | None = None,
        cache: BindingCache | None = None,
    ) -> None:
        self._server, self._key_secret, self._interface = server, key_secret, interface
        self._cache = cache if cache is not None else BindingCache()
        self.secrets: dict[str, Mapping[str, Any]] = {_secret_name(b): b for b in bindings}
        self.desired = self._rebuild()  # raises DesiredStateError like build_desired
        self._pools = [ipaddress.ip_network(p) for p in self.desired.pools]
        self._routes = [ipaddress.ip_network(r) for r in self.desired.routes]
        self._server_ips = {ipaddress.ip_interface(a).ip for a in self.desired.addresses}

    def _rebuild(self) -> DesiredServer:
        judged: dict[str, Judged] = {}
        desired = build_desired(
            self._server,
            self._key_secret,
            self.secrets.values(),
            interface=self._interface,
            judged=judged,
            cache=self._cache,
        )
        self._claims = {name: self._claims_of(secret) for name, secret in self.secrets.items()}
        self._count: dict[Claim, int] = {}
        for claims in self._claims.values():
            for claim in claims:
                self._count[claim] = self._count.get(claim, 0) + 1
        self._peer = {name: peer for name, (_, peer, _) in judged.items() if peer is not None}
        self._problem = {name: (age, problem) for name, (age, _, problem) in judged.items() if problem is not None}
        self._keys = [self._cache.address_key(p.addresses[0]) for p in desired.peers]
        self._peers = list(desired.peers)
        return desired

    def apply(self, changes: Mapping[str, Mapping[str, Any] | None]) -> DesiredServer:
        """Binding Secret name → its new version, or None when it is gone; the new desired state."""
        full = False
        for name, secret in changes.items():
            old = self._claims.pop(name, ())
            for claim in old:
                self._count[claim] -= 1
                if not self._count[claim]:
                    del self._count[claim]
            self.secrets.pop(name, None)
            new = self._claims_of(secret) if secret is not None else ()
            full = full or any(c in self._count for c in (*old, *new))
            if secret is not None:
                self.secrets[name] = secret
                self._claims[name] = new
                for claim in new:
                    self._count[claim] = self._count.get(claim, 0) + 1
            if not full:
                self._patch(name, secret)
        if full:
            self.desired = self._rebuild()
            return self.desired
        problems = sorted(self._problem.values(), key=lambda item: item[0])
        self.desired = self.desired.model_copy(
            update={"peers": tuple(self._peers), "problems": tuple(p for _, p in problems)}
        )
        return self.desired

    def _patch(self, name: str, secret: Mapping[str, Any] | None) -> None:
        if (gone := self._peer.pop(name, None)) is not None:
            i = bisect.bisect_left(self._keys, self._cache.address_key(gone.addresses[0]))
            del self._keys[i], self._peers[i]
        self._problem.pop(name, None)
        if secret is None:
            return
        peer, problem = judge_binding(
            secret, self._pools, self._routes, {self.desired.public_key}, set(self._server_ips), cache=self._cache
        )
        if problem is not None:
            self._problem[name] = (binding_age(secret), problem)
        if peer is not None:
            self._peer[name] = peer
            key = self._cache.address_key(peer.addresses[0])
            i = bisect.bisect_left(self._keys, key)
            self._keys.insert(i, key)
            self._peers.insert(i, peer)

    def _claims_of(self, secret: Mapping[str, Any]) -> tuple[Claim, ...]:
        try:
            binding = self._cache.binding(secret)
        except (ValidationError, ValueError, UnicodeDecodeError):
            return ()  # refused whatever the others hold
        claims: list[Claim] = [binding.public_key] if binding.public_key else []
        for address in binding.addresses:
            with contextlib.suppress(ValueError):
                claims.append(self._cache.ip(address))
        return tuple(claims)


def _secret_name(secret: Mapping[str, Any]) -> str:
    return str((secret.get("metadata") or {}).get("name", ""))
