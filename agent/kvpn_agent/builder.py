"""One server's desired state kept current one binding change at a time (the watch-event path)."""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from kvpn_agent.desired import BindingCache, DesiredServer, Judged, build_desired, judge_binding
from kvpn_core.api import VpnServerSpec
from kvpn_core.contract import binding_age

ExclusiveValue = str | ipaddress.IPv4Address | ipaddress.IPv6Address
"""A value only one binding of a server may hold, which bindings compete for: a public key or an address."""


class DesiredBuilder:
    """One server's desired state kept current one binding change at a time (the watch-event path).

    ``apply`` gives exactly what ``build_desired`` over the current bindings gives. A binding's
    outcome depends on the others only through its exclusive values, the public key and addresses
    (older bindings win), so a change whose values no other binding shares is patched in and out alone;
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
        self._spec = VpnServerSpec.model_validate(server.get("spec") or {})  # valid: the build above parsed it
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
        self._exclusive = {name: self._exclusive_values(secret) for name, secret in self.secrets.items()}
        self._count: dict[ExclusiveValue, int] = {}
        for values in self._exclusive.values():
            for value in values:
                self._count[value] = self._count.get(value, 0) + 1
        self._peer = {name: peer for name, (_, peer, _) in judged.items() if peer is not None}
        self._problem = {name: (age, problem) for name, (age, _, problem) in judged.items() if problem is not None}
        self._keys = [self._cache.address_key(p.addresses[0]) for p in desired.peers]
        self._peers = list(desired.peers)
        return desired

    def apply(self, changes: Mapping[str, Mapping[str, Any] | None]) -> DesiredServer:
        """Binding Secret name → its new version, or None when it is gone; the new desired state."""
        full = False
        for name, secret in changes.items():
            old = self._exclusive.pop(name, ())
            for value in old:
                self._count[value] -= 1
                if not self._count[value]:
                    del self._count[value]
            self.secrets.pop(name, None)
            new = self._exclusive_values(secret) if secret is not None else ()
            full = full or any(c in self._count for c in (*old, *new))
            if secret is not None:
                self.secrets[name] = secret
                self._exclusive[name] = new
                for value in new:
                    self._count[value] = self._count.get(value, 0) + 1
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
            secret,
            self._pools,
            self._routes,
            {self.desired.public_key},
            set(self._server_ips),
            cache=self._cache,
            server=self._spec,
        )
        if problem is not None:
            self._problem[name] = (binding_age(secret), problem)
        if peer is not None:
            self._peer[name] = peer
            key = self._cache.address_key(peer.addresses[0])
            i = bisect.bisect_left(self._keys, key)
            self._keys.insert(i, key)
            self._peers.insert(i, peer)

    def _exclusive_values(self, secret: Mapping[str, Any]) -> tuple[ExclusiveValue, ...]:
        try:
            binding = self._cache.binding(secret)
        except (ValidationError, ValueError, UnicodeDecodeError):
            return ()  # refused whatever the others hold
        values: list[ExclusiveValue] = [binding.public_key] if binding.public_key else []
        for address in binding.addresses:
            with contextlib.suppress(ValueError):
                values.append(self._cache.ip(address))
        return tuple(values)


def _secret_name(secret: Mapping[str, Any]) -> str:
    return str((secret.get("metadata") or {}).get("name", ""))
