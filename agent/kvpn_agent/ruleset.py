"""The agent's nftables table `inet kvpn` in nft JSON: built, patched per peer, parsed back, and its commands."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvpn_agent.desired import DesiredServer, PeerChange, changed_peers, host_prefix
from kvpn_core.api import AllowedDestination, Protocol
from kvpn_core.contract import PeerBinding

FAMILY = "inet"
TABLE = "kvpn"
PEER_CHAIN_PREFIX = "p_"

Json = dict[str, Any]
MapKey = tuple[str, str]
"""(map name, peer address) of one verdict-map element."""

# Why this shape:
# - Per server, a verdict map keyed by peer address sends a peer's packets to its own policy: the
#   shared chain routes_<sid> when it may reach every route, else a chain p_<sid>_<digest> holding
#   its allowedDestinations. Adding, changing or removing a peer is a few element and chain
#   commands; the digest in the chain's name changes with the policy, so the map element says which
#   policy is loaded.
# - Destinations match the *original* destination (ct original ip daddr): kube-proxy DNATs a
#   ClusterIP to a pod IP before the forward hook, and a peer allowed a Service must reach its pods.
# - A chain per peer rather than one concatenated interval set: pipapo sets refuse overlapping
#   elements, and a peer's destinations (10.96.0.0/12 any, 10.96.0.10/32 tcp/53) overlap freely.
# - Masquerade matches the pool as source: the input interface is not known in postrouting.
# - Every rule carries a comment with the digest of its expression, so a read-back can tell a
#   hand-edited or flushed rule from the one the agent wrote without re-deriving nft's printing.

_FILTER_PRIO = 0
_SRCNAT_PRIO = 100
_BASE_CHAINS: tuple[Json, ...] = (
    {"name": "forward", "type": "filter", "hook": "forward", "prio": _FILTER_PRIO, "policy": "accept"},
    {"name": "input", "type": "filter", "hook": "input", "prio": _FILTER_PRIO, "policy": "accept"},
    {"name": "postrouting", "type": "nat", "hook": "postrouting", "prio": _SRCNAT_PRIO, "policy": "accept"},
)


def _obj(kind: str, **fields: Any) -> Json:
    if kind == "table":
        return {"table": {"family": FAMILY, "name": TABLE}}
    return {kind: {"family": FAMILY, "table": TABLE, **fields}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _ct_original_daddr(version: int) -> Json:
    return {"ct": {"key": "ip daddr" if version == 4 else "ip6 daddr", "dir": "original"}}


_CT_ORIGINAL_DPORT: Json = {"ct": {"key": "proto-dst", "dir": "original"}}
_ACCEPT: Json = {"accept": None}
_ESTABLISHED = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
_INVALID = _match({"ct": {"key": "state"}}, "invalid", "in")


def _prefix(cidr: str) -> Json:
    net = ipaddress.ip_network(cidr)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _family(version: int) -> str:
    return "ip" if version == 4 else "ip6"


def _rule(chain: str, expr: list[Json]) -> Json:
    digest = hashlib.sha256(json.dumps(expr, sort_keys=True).encode()).hexdigest()[:16]
    return _obj("rule", chain=chain, comment=f"kvpn:{digest}", expr=expr)


def server_id(server: DesiredServer) -> str:
    """Suffix of a server's chains and sets: its interface name, which is unique on the node."""
    return server.interface.replace("-", "_")


def _destination_expr(dest: AllowedDestination) -> list[Json]:
    net = ipaddress.ip_network(dest.cidr)
    expr = [_match(_ct_original_daddr(net.version), _prefix(dest.cidr))]
    if dest.protocol == Protocol.ICMP:
        # Ports mean nothing to ICMP; the destination is honoured as ICMP to that network.
        return [*expr, _match(_meta("l4proto"), "icmp" if net.version == 4 else "ipv6-icmp"), _ACCEPT]
    if dest.ports:
        protos: Any = dest.protocol.value.lower() if dest.protocol else {"set": ["tcp", "udp"]}
        ports = [
            p.port if not p.end_port or p.end_port == p.port else {"range": [p.port, p.end_port]} for p in dest.ports
        ]
        return [
            *expr,
            _match(_meta("l4proto"), protos),
            _match(_CT_ORIGINAL_DPORT, ports[0] if len(ports) == 1 else {"set": ports}),
            _ACCEPT,
        ]
    if dest.protocol:
        return [*expr, _match(_meta("l4proto"), dest.protocol.value.lower()), _ACCEPT]
    return [*expr, _ACCEPT]


@dataclass(frozen=True)
class Ruleset:
    """The desired table: the server-level part as one block, the per-peer part addressable by peer."""

    base: tuple[Json, ...]
    """``add`` payloads of table, sets, chains, route elements and rules that are not per peer, in order."""

    peer_chains: Mapping[str, tuple[Json, ...]]
    """Per-peer chain name → its rules (``add`` payloads)."""

    peer_map: Mapping[MapKey, str]
    """(map, peer address) → verdict chain."""

    fingerprint: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class ObservedRuleset:
    """The table as read back from the kernel, reduced to what the planner compares."""

    fingerprint: tuple[str, ...]
    peer_chains: Mapping[str, tuple[str, ...]]
    """Per-peer chain name → the comments of its rules."""

    peer_map: Mapping[MapKey, str]


def build_ruleset(servers: Sequence[DesiredServer], *, with_peers: bool = True) -> Ruleset:
    """The whole `inet kvpn` table for the servers this node serves (``with_peers=False``: no per-peer part)."""
    sets: list[Json] = []
    chains: list[Json] = [_obj("chain", **c) for c in _BASE_CHAINS]
    elements: list[Json] = []
    rules: list[Json] = []
    peer_chains: dict[str, tuple[Json, ...]] = {}
    peer_map: dict[MapKey, str] = {}
    for server in sorted(servers, key=lambda s: s.interface):
        sid, ifname = server_id(server), server.interface
        for version in (4, 6):
            routes = [r for r in server.routes if ipaddress.ip_network(r).version == version]
            addr_type = "ipv4_addr" if version == 4 else "ipv6_addr"
            sets.append(_obj("set", name=f"routes{version}_{sid}", type=addr_type, flags=["interval"]))
            sets.append(_obj("map", name=f"peers{version}_{sid}", type=addr_type, map="verdict"))
            if routes:
                elements.append(_obj("element", name=f"routes{version}_{sid}", elem=[_prefix(r) for r in routes]))
        for name in ("from", "to", "in", "routes"):
            chains.append(_obj("chain", name=f"{name}_{sid}"))
        rules.append(_rule("forward", [_match(_meta("iifname"), ifname), {"jump": {"target": f"from_{sid}"}}]))
        rules.append(_rule("forward", [_match(_meta("oifname"), ifname), {"jump": {"target": f"to_{sid}"}}]))
        rules.append(_rule("input", [_match(_meta("iifname"), ifname), {"jump": {"target": f"in_{sid}"}}]))
        if server.masquerade:
            for pool in server.pools:
                net = ipaddress.ip_network(pool)
                rules.append(
                    _rule(
                        "postrouting",
                        [
                            _match(
                                {"payload": {"protocol": _family(net.version), "field": "saddr"}},
                                _prefix(pool),
                            ),
                            _match(_meta("oifname"), ifname, "!="),
                            {"masquerade": None},
                        ],
                    )
                )
        rules.extend(_server_rules(server, sid))
        if with_peers:
            for peer in server.peers:
                _add_peer(sid, peer, peer_chains, peer_map)
    base = (_obj("table"), *sets, *chains, *elements, *rules)
    return Ruleset(base=base, peer_chains=peer_chains, peer_map=peer_map, fingerprint=_fingerprint(base))


def _peer_entries(sid: str, peer: PeerBinding) -> tuple[str, tuple[Json, ...] | None, list[MapKey]]:
    """A peer's verdict chain, its rules (None: the server's routes chain) and its map keys."""
    rules = None
    if peer.allowed_destinations:
        digest_src = json.dumps([sid, peer.addresses, [d.to_api() for d in peer.allowed_destinations]], sort_keys=True)
        chain = f"{PEER_CHAIN_PREFIX}{sid}_{hashlib.sha256(digest_src.encode()).hexdigest()[:12]}"
        rules = tuple(_rule(chain, _destination_expr(d)) for d in peer.allowed_destinations)
    else:
        chain = f"routes_{sid}"
    keys = []
    for address in peer.addresses:
        ip = ipaddress.ip_address(address)
        keys.append((f"peers{ip.version}_{sid}", str(ip)))
    return chain, rules, keys


def _add_peer(
    sid: str, peer: PeerBinding, peer_chains: dict[str, tuple[Json, ...]], peer_map: dict[MapKey, str]
) -> tuple[str, list[MapKey]]:
    chain, rules, keys = _peer_entries(sid, peer)
    if rules is not None:
        peer_chains[chain] = rules
    for key in keys:
        peer_map[key] = chain
    return chain, keys


@dataclass(frozen=True)
class RulesetChange:
    """A ruleset patched from the previous one, and the per-peer part that may differ from it."""

    ruleset: Ruleset
    chains: frozenset[str]
    elements: frozenset[MapKey]


def patch_ruleset(
    previous: Ruleset,
    previous_servers: Mapping[str, DesiredServer],
    servers: Sequence[DesiredServer],
    *,
    changes: Callable[[DesiredServer | None, DesiredServer | None], PeerChange] = changed_peers,
) -> RulesetChange:
    """``build_ruleset(servers)`` from the ruleset of ``previous_servers``, touching only the peers that changed.

    Peers are compared by identity (a DesiredBuilder keeps unchanged ones) through ``changes``; the
    server-level part is rebuilt, it does not grow with peers.
    """
    fresh = build_ruleset(servers, with_peers=False)
    peer_chains, peer_map = dict(previous.peer_chains), dict(previous.peer_map)
    chains: set[str] = set()
    elements: set[MapKey] = set()
    now = {s.interface: s for s in servers}
    for interface in sorted(previous_servers.keys() | now.keys()):
        old, new = previous_servers.get(interface), now.get(interface)
        if old is new:
            continue
        gone, added = changes(old, new)
        for server, peers, adding in ((old, gone, False), (new, added, True)):
            if server is None:
                continue
            sid = server_id(server)
            for peer in peers:
                if adding:
                    chain, keys = _add_peer(sid, peer, peer_chains, peer_map)
                else:
                    chain, _, keys = _peer_entries(sid, peer)
                    peer_chains.pop(chain, None)
                    for key in keys:
                        peer_map.pop(key, None)
                chains.add(chain)
                elements.update(keys)
    ruleset = Ruleset(base=fresh.base, peer_chains=peer_chains, peer_map=peer_map, fingerprint=fresh.fingerprint)
    return RulesetChange(ruleset, frozenset(chains), frozenset(elements))


def _dns_expr(nameserver: str) -> list[Json]:
    version = ipaddress.ip_address(nameserver).version
    return [
        _match(_ct_original_daddr(version), nameserver),
        _match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
        _match(_CT_ORIGINAL_DPORT, 53),
        _ACCEPT,
    ]


def _server_rules(server: DesiredServer, sid: str) -> list[Json]:
    rules = [
        _rule(f"from_{sid}", [_ESTABLISHED, _ACCEPT]),
        _rule(f"from_{sid}", [_INVALID, {"drop": None}]),
    ]
    for nameserver in server.dns_nameservers:
        # Every peer gets DNS: wg-quick points the laptop's resolver at it, so blocking it would
        # break the laptop's name resolution, not only the cluster's.
        rules.append(_rule(f"from_{sid}", _dns_expr(nameserver)))
    for version in (4, 6):
        saddr = {"payload": {"protocol": _family(version), "field": "saddr"}}
        rules.append(_rule(f"from_{sid}", [{"vmap": {"key": saddr, "data": f"@peers{version}_{sid}"}}]))
    rules.append(_rule(f"from_{sid}", [{"counter": None}, {"drop": None}]))
    rules.append(_rule(f"to_{sid}", [_ESTABLISHED, _ACCEPT]))
    rules.append(_rule(f"to_{sid}", [{"counter": None}, {"drop": None}]))
    for address in server.addresses:
        ip = ipaddress.ip_interface(address).ip
        proto, echo = ("icmp", "echo-request") if ip.version == 4 else ("icmpv6", "echo-request")
        rules.append(
            _rule(
                f"in_{sid}",
                [
                    _match({"payload": {"protocol": _family(ip.version), "field": "daddr"}}, str(ip)),
                    _match({"payload": {"protocol": proto, "field": "type"}}, echo),
                    _ACCEPT,
                ],
            )
        )
    # The node itself is no destination: a peer allowed the pod network would otherwise reach the
    # kubelet, the agent's metrics and anything else listening on the node, through the node's own
    # address on the pod bridge (inside the routes) or any other. What was DNATed to the node (a
    # Service backed by a hostNetwork pod) obeys the peer's policy on its original destination, and
    # DNS to a nameserver on the node (a node-local cache) stays open, as it does forwarded.
    rules.append(
        _rule(f"in_{sid}", [_match({"ct": {"key": "status"}}, "dnat", "in"), {"jump": {"target": f"from_{sid}"}}])
    )
    for nameserver in server.dns_nameservers:
        rules.append(_rule(f"in_{sid}", _dns_expr(nameserver)))
    rules.append(_rule(f"in_{sid}", [_ESTABLISHED, _ACCEPT]))
    rules.append(_rule(f"in_{sid}", [{"counter": None}, {"drop": None}]))
    for version in (4, 6):
        rules.append(_rule(f"routes_{sid}", [_match(_ct_original_daddr(version), f"@routes{version}_{sid}"), _ACCEPT]))
    return rules


# --- Reading back -----------------------------------------------------------------------------


def _normalize_element(value: Any) -> list[str]:
    if isinstance(value, dict) and "prefix" in value:
        p = value["prefix"]
        return [str(ipaddress.ip_network(f"{p['addr']}/{p['len']}", strict=False))]
    if isinstance(value, dict) and "range" in value:
        lo, hi = (ipaddress.ip_address(v) for v in value["range"])
        return [str(n) for n in ipaddress.summarize_address_range(lo, hi)]
    if isinstance(value, dict) and "elem" in value:
        return _normalize_element(value["elem"]["val"])
    return [host_prefix(str(value))] if _is_address(value) else [json.dumps(value, sort_keys=True)]


def _is_address(value: Any) -> bool:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return False
    return True


def _fingerprint(objects: Iterable[Json]) -> tuple[str, ...]:
    """A comparable description of the server-level part, the same for what we add and what nft lists."""
    prints: list[str] = []
    position: dict[str, int] = {}
    set_elements: dict[str, set[str]] = {}
    for obj in objects:
        ((kind, body),) = obj.items()
        if kind == "table":
            prints.append("table")
        elif kind == "chain" and not body["name"].startswith(PEER_CHAIN_PREFIX):
            spec = [str(body.get(k, "")) for k in ("type", "hook", "prio", "policy")]
            prints.append(f"chain {body['name']} {' '.join(spec)}")
        elif kind in ("set", "map"):
            type_ = body["type"] if isinstance(body["type"], str) else ".".join(body["type"])
            flags = ",".join(sorted(body.get("flags", [])))
            prints.append(f"set {body['name']} {type_} {body.get('map', '')} {flags}")
            if "map" not in body:
                set_elements.setdefault(body["name"], set()).update(
                    e for v in body.get("elem", []) for e in _normalize_element(v)
                )
        elif kind == "element":
            set_elements.setdefault(body["name"], set()).update(e for v in body["elem"] for e in _normalize_element(v))
        elif kind == "rule" and not body["chain"].startswith(PEER_CHAIN_PREFIX):
            index = position[body["chain"]] = position.get(body["chain"], -1) + 1
            prints.append(f"rule {body['chain']} {index} {body.get('comment', '')}")
    prints.extend(f"elements {name} {' '.join(sorted(elems))}" for name, elems in set_elements.items() if elems)
    return tuple(sorted(prints))


def parse_table(listing: Json) -> ObservedRuleset:
    """Reduces the output of ``nft -j list table inet kvpn`` to what the planner compares."""
    objects = [o for o in listing.get("nftables", []) if "metainfo" not in o]
    peer_chains: dict[str, list[str]] = {}
    peer_map: dict[MapKey, str] = {}
    for obj in objects:
        ((kind, body),) = obj.items()
        if kind == "chain" and body["name"].startswith(PEER_CHAIN_PREFIX):
            peer_chains.setdefault(body["name"], [])
        elif kind == "rule" and body["chain"].startswith(PEER_CHAIN_PREFIX):
            peer_chains.setdefault(body["chain"], []).append(str(body.get("comment", "")))
        elif kind == "map" and body.get("map") == "verdict":
            for key, verdict in body.get("elem", []):
                target = next(iter(verdict.values()))
                peer_map[(body["name"], str(key))] = target.get("target", "") if isinstance(target, dict) else ""
    return ObservedRuleset(
        fingerprint=_fingerprint(objects),
        peer_chains={name: tuple(comments) for name, comments in peer_chains.items()},
        peer_map=peer_map,
    )


# --- Commands ---------------------------------------------------------------------------------


def replace_commands(ruleset: Ruleset) -> list[Json]:
    """One transaction that swaps the whole table: absent or not before, exactly ``ruleset`` after.

    Adding the table first makes the delete succeed when it does not exist; all three in one
    batch means packets never see a missing or half-built table.
    """
    commands: list[Json] = [{"add": _obj("table")}, {"delete": _obj("table")}]
    rules = [o for o in ruleset.base if "rule" in o]
    commands.extend({"add": o} for o in ruleset.base if "rule" not in o)
    commands.extend({"add": _obj("chain", name=name)} for name in ruleset.peer_chains)
    commands.extend({"add": r} for r in rules)
    for chain_rules in ruleset.peer_chains.values():
        commands.extend({"add": r} for r in chain_rules)
    commands.extend(_element_commands("add", ruleset.peer_map.items()))
    return commands


def _element_commands(verb: str, items: Iterable[tuple[MapKey, str]]) -> list[Json]:
    by_map: dict[str, list[Any]] = {}
    for (map_name, address), target in items:
        by_map.setdefault(map_name, []).append(address if verb == "delete" else [address, {"jump": {"target": target}}])
    return [{verb: _obj("element", name=name, elem=elems)} for name, elems in sorted(by_map.items())]


@dataclass(frozen=True)
class PeerUpdate:
    """Element-level change of the per-peer part; applied in one transaction."""

    put_chains: tuple[str, ...] = ()
    """Per-peer chains to (re)write: created if missing, flushed and refilled."""

    delete_elements: tuple[MapKey, ...] = ()
    add_elements: tuple[tuple[MapKey, str], ...] = ()
    delete_chains: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.put_chains or self.delete_elements or self.add_elements or self.delete_chains)


def update_commands(ruleset: Ruleset, update: PeerUpdate) -> list[Json]:
    """Chains before the elements that jump to them; stale chains after the elements that did."""
    commands: list[Json] = []
    for name in update.put_chains:
        commands += [{"add": _obj("chain", name=name)}, {"flush": _obj("chain", name=name)}]
        commands += [{"add": r} for r in ruleset.peer_chains[name]]
    commands += _element_commands("delete", ((k, "") for k in update.delete_elements))
    commands += _element_commands("add", update.add_elements)
    for name in update.delete_chains:
        # A chain with rules cannot be deleted; flushing it first is one more command, same batch.
        commands += [{"flush": _obj("chain", name=name)}, {"delete": _obj("chain", name=name)}]
    return commands


def delete_commands() -> list[Json]:
    return [{"add": _obj("table")}, {"delete": _obj("table")}]
