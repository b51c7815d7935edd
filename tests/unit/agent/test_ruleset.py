"""The `inet kvpn` table as nft JSON: what it allows, how it is swapped, how one peer is updated."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import SecretStr

from kvpn_agent.desired import DesiredServer
from kvpn_agent.ruleset import (
    PeerUpdate,
    build_ruleset,
    delete_commands,
    parse_table,
    replace_commands,
    update_commands,
)
from kvpn_core.contract import PeerBinding
from kvpn_core.keys import public_key_of

PRIVATE = base64.b64encode(hashlib.sha256(b"server").digest()).decode()


def peer(i: int, dests: Sequence[dict[str, Any]] = (), v6: bool = False) -> PeerBinding:
    return PeerBinding.model_validate(
        {
            "peerNamespace": "team",
            "peerName": f"p{i}",
            "peerUID": f"u{i}",
            "publicKey": base64.b64encode(hashlib.sha256(f"pub{i}".encode()).digest()).decode(),
            "addresses": [f"10.8.0.{i + 2}", *([f"fd00:8::{i + 2:x}"] if v6 else [])],
            "allowedDestinations": list(dests),
        }
    )


def server(peers: Sequence[PeerBinding] = (), interface: str = "kvgw-aaaaaaaaaa", **fields: Any) -> DesiredServer:
    values: dict[str, Any] = {
        "namespace": "team",
        "name": "office",
        "interface": interface,
        "private_key": SecretStr(PRIVATE),
        "public_key": public_key_of(PRIVATE),
        "listen_port": 51820,
        "mtu": 1420,
        "addresses": ("10.8.0.1/24", "fd00:8::1/64"),
        "routes": ("10.96.0.0/12", "10.244.0.0/16", "fd00:96::/108"),
        "masquerade": True,
        "peers": tuple(peers),
    }
    return DesiredServer(**{**values, **fields})


SID = "kvgw_aaaaaaaaaa"


def rules(commands: Sequence[dict[str, Any]], chain: str) -> list[list[dict[str, Any]]]:
    return [
        c["add"]["rule"]["expr"] for c in commands if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
    ]


def text(expr: Any) -> str:
    return json.dumps(expr, sort_keys=True)


def test_every_command_targets_only_the_kvpn_table() -> None:
    rs = build_ruleset([server([peer(0), peer(1, [{"cidr": "10.96.0.10/32"}])])])
    for command in replace_commands(rs) + update_commands(rs, PeerUpdate(put_chains=tuple(rs.peer_chains))):
        ((_, obj),) = command.items()
        ((kind, body),) = obj.items()
        assert body["family"] == "inet"
        assert (body["name"] if kind == "table" else body["table"]) == "kvpn"


def test_replace_is_one_batch_that_tolerates_a_missing_table() -> None:
    commands = replace_commands(build_ruleset([server([peer(0)])]))
    table = {"table": {"family": "inet", "name": "kvpn"}}
    assert commands[:3] == [{"add": table}, {"delete": table}, {"add": table}]
    assert delete_commands() == [{"add": table}, {"delete": table}]


def test_replace_orders_definitions_before_references() -> None:
    rs = build_ruleset([server([peer(0), peer(1, [{"cidr": "10.96.0.10/32"}])])])
    commands = replace_commands(rs)
    kinds = [next(iter(c["add"])) for c in commands[2:]]
    first_rule = kinds.index("rule")
    assert all(k == "rule" for k in kinds[first_rule : first_rule + len([k for k in kinds if k == "rule"])])
    assert set(kinds[:first_rule]) == {"table", "set", "map", "chain", "element"}
    adds = [c["add"] for c in commands[2:]]
    peer_elements = [i for i, c in enumerate(adds) if "element" in c and "peers" in c["element"]["name"]]
    last_rule = max(i for i, c in enumerate(adds) if "rule" in c)
    assert min(peer_elements) > last_rule


def test_base_chains_hook_forward_input_and_postrouting() -> None:
    commands = replace_commands(build_ruleset([server()]))[2:]
    hooks = {
        c["add"]["chain"]["name"]: (c["add"]["chain"]["hook"], c["add"]["chain"]["policy"])
        for c in commands
        if "chain" in c["add"] and "hook" in c["add"]["chain"]
    }
    # Policy accept: the agent only narrows what passes through its interfaces, never other traffic.
    assert hooks == {
        "forward": ("forward", "accept"),
        "input": ("input", "accept"),
        "postrouting": ("postrouting", "accept"),
    }


def test_masquerade_per_pool_only_when_on() -> None:
    on = replace_commands(build_ruleset([server()]))
    masq = rules(on, "postrouting")
    assert len(masq) == 2
    assert '"masquerade"' in text(masq[0])
    assert '"10.8.0.0"' in text(masq[0])
    assert '"fd00:8::"' in text(masq[1])
    off = replace_commands(build_ruleset([server(masquerade=False)]))
    assert rules(off, "postrouting") == []


def test_from_chain_allows_return_traffic_then_dispatches_by_peer_then_drops() -> None:
    commands = replace_commands(build_ruleset([server(dns_nameservers=("10.96.0.10",))]))
    chain = rules(commands, f"from_{SID}")
    assert '"established"' in text(chain[0])
    assert '"invalid"' in text(chain[1])
    assert '"10.96.0.10"' in text(chain[2])
    assert 53 in chain[2][2]["match"].values()
    assert chain[3][0]["vmap"]["data"] == f"@peers4_{SID}"
    assert chain[4][0]["vmap"]["data"] == f"@peers6_{SID}"
    assert chain[-1] == [{"counter": None}, {"drop": None}]


def test_traffic_into_the_tunnel_is_only_return_traffic() -> None:
    chain = rules(replace_commands(build_ruleset([server()])), f"to_{SID}")
    assert '"established"' in text(chain[0])
    assert chain[1] == [{"counter": None}, {"drop": None}]


def test_input_allows_pinging_the_gateway_and_what_was_dnated_to_it_and_drops_the_rest() -> None:
    """The node's own addresses are no destination (its kubelet and metrics listen on all of them); a
    Service DNATed to a hostNetwork pod is judged by the peer's policy, on its original destination."""
    chain = rules(replace_commands(build_ruleset([server()])), f"in_{SID}")
    assert '"10.8.0.1"' in text(chain[0])
    assert '"echo-request"' in text(chain[0])
    dnat = next(r for r in chain if {"jump": {"target": f"from_{SID}"}} in r)
    assert dnat[0] == {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}
    assert chain[-1] == [{"counter": None}, {"drop": None}]


def test_routes_are_interval_set_elements() -> None:
    commands = replace_commands(build_ruleset([server()]))[2:]
    elements = {c["add"]["element"]["name"]: c["add"]["element"]["elem"] for c in commands if "element" in c["add"]}
    assert elements[f"routes4_{SID}"] == [
        {"prefix": {"addr": "10.96.0.0", "len": 12}},
        {"prefix": {"addr": "10.244.0.0", "len": 16}},
    ]
    assert elements[f"routes6_{SID}"] == [{"prefix": {"addr": "fd00:96::", "len": 108}}]


def test_unrestricted_peer_maps_to_the_routes_chain() -> None:
    rs = build_ruleset([server([peer(0, v6=True)])])
    assert rs.peer_map == {
        (f"peers4_{SID}", "10.8.0.2"): f"routes_{SID}",
        (f"peers6_{SID}", "fd00:8::2"): f"routes_{SID}",
    }
    assert rs.peer_chains == {}


def test_restricted_peer_gets_its_own_chain_keyed_by_its_addresses() -> None:
    rs = build_ruleset([server([peer(0, [{"cidr": "10.96.0.10/32"}], v6=True)])])
    (chain,) = rs.peer_chains
    assert chain.startswith(f"p_{SID}_")
    assert set(rs.peer_map.values()) == {chain}


def test_same_policy_for_two_peers_is_two_chains() -> None:
    dests = [{"cidr": "10.96.0.10/32"}]
    rs = build_ruleset([server([peer(0, dests), peer(1, dests)])])
    assert len(rs.peer_chains) == 2


@pytest.mark.parametrize(
    ("dest", "expected"),
    [
        ({"cidr": "10.96.0.0/16"}, ["10.96.0.0", 16]),
        ({"cidr": "10.96.0.10/32", "protocol": "UDP"}, ['"udp"']),
        ({"cidr": "10.96.0.10/32", "protocol": "TCP", "ports": [{"port": 443}]}, ['"tcp"', "443"]),
        (
            {"cidr": "10.96.0.10/32", "ports": [{"port": 80}, {"port": 8000, "endPort": 8080}]},
            ['["tcp", "udp"]', "[8000, 8080]"],
        ),
        ({"cidr": "10.96.0.10/32", "protocol": "ICMP", "ports": [{"port": 80}]}, ['"icmp"']),
        ({"cidr": "fd00:96::10/128", "protocol": "ICMP"}, ['"ipv6-icmp"', '"ip6 daddr"']),
    ],
)
def test_destination_rules(dest: dict[str, Any], expected: list[Any]) -> None:
    rs = build_ruleset([server([peer(0, [dest])])])
    ((rule,),) = rs.peer_chains.values()
    expr = rule["rule"]["expr"]
    rendered = text(expr)
    for piece in expected:
        assert str(piece) in rendered
    # The original destination, so a Service's pods stay reachable after kube-proxy's DNAT.
    assert expr[0]["match"]["left"]["ct"]["dir"] == "original"
    assert expr[-1] == {"accept": None}
    if dest.get("protocol") == "ICMP":
        assert "proto-dst" not in rendered


def test_rule_comments_are_digests_of_their_expressions() -> None:
    a = build_ruleset([server([peer(0, [{"cidr": "10.96.0.10/32"}])])])
    b = build_ruleset([server([peer(0, [{"cidr": "10.96.0.10/32"}])])])
    c = build_ruleset([server([peer(0, [{"cidr": "10.96.0.11/32"}])])])
    assert a == b
    comment_a = next(iter(a.peer_chains.values()))[0]["rule"]["comment"]
    comment_c = next(iter(c.peer_chains.values()))[0]["rule"]["comment"]
    assert comment_a != comment_c


def test_two_servers_share_the_table_with_separate_names() -> None:
    one = server([peer(0)], interface="kvgw-aaaaaaaaaa")
    two = server([peer(0)], interface="kvgw-bbbbbbbbbb", addresses=("10.9.0.1/24",))
    rs = build_ruleset([one, two])
    assert set(rs.peer_map) == {("peers4_kvgw_aaaaaaaaaa", "10.8.0.2"), ("peers4_kvgw_bbbbbbbbbb", "10.8.0.2")}
    jumps = rules(replace_commands(rs), "forward")
    assert len(jumps) == 4


def test_update_commands_order_chains_elements_then_stale_chains() -> None:
    rs = build_ruleset([server([peer(0, [{"cidr": "10.96.0.10/32"}])])])
    (chain,) = rs.peer_chains
    update = PeerUpdate(
        put_chains=(chain,),
        delete_elements=((f"peers4_{SID}", "10.8.0.2"),),
        add_elements=(((f"peers4_{SID}", "10.8.0.2"), chain),),
        delete_chains=("p_old",),
    )
    commands = update_commands(rs, update)
    verbs = [(verb, next(iter(obj))) for c in commands for verb, obj in c.items()]
    assert verbs == [
        ("add", "chain"),
        ("flush", "chain"),
        ("add", "rule"),
        ("delete", "element"),
        ("add", "element"),
        ("flush", "chain"),
        ("delete", "chain"),
    ]
    assert commands[3]["delete"]["element"]["elem"] == ["10.8.0.2"]
    assert commands[4]["add"]["element"]["elem"] == [["10.8.0.2", {"jump": {"target": chain}}]]


def test_empty_update_is_falsy() -> None:
    assert not PeerUpdate()
    assert PeerUpdate(delete_chains=("x",))


def test_parse_table_normalizes_the_way_nft_prints() -> None:
    """nft prints a /32 as a plain address, protocols by name; the fingerprint must not care."""
    srv = server(routes=("10.96.0.10/32", "10.244.0.0/16"), addresses=("10.8.0.1/24",))
    rs = build_ruleset([srv])
    listing: list[dict[str, Any]] = [{"metainfo": {"version": "1.0.6"}}]
    for command in replace_commands(rs)[2:]:
        obj = json.loads(json.dumps(command["add"]))
        ((kind, body),) = obj.items()
        body["handle"] = 1
        if kind == "element" and body["name"].startswith("routes4"):
            listing.append(
                {
                    "set": {
                        "family": "inet",
                        "name": body["name"],
                        "table": "kvpn",
                        "type": "ipv4_addr",
                        "handle": 2,
                        "flags": ["interval"],
                        "elem": ["10.96.0.10", {"prefix": {"addr": "10.244.0.0", "len": 16}}],
                    }
                }
            )
            continue
        listing.append(obj)
    listing = [
        o for o in listing if not ("set" in o and o["set"]["name"].startswith("routes4") and "elem" not in o["set"])
    ]
    observed = parse_table({"nftables": listing})
    assert observed.fingerprint == rs.fingerprint


def test_fingerprint_notices_a_missing_rule_and_a_foreign_rule() -> None:
    rs = build_ruleset([server()])
    objects = [c["add"] for c in replace_commands(rs)[2:]]
    without = [o for o in objects if not ("rule" in o and o["rule"]["chain"] == f"to_{SID}")]
    assert parse_table({"nftables": without}).fingerprint != rs.fingerprint
    foreign = {"rule": {"family": "inet", "table": "kvpn", "chain": f"to_{SID}", "expr": [{"accept": None}]}}
    assert parse_table({"nftables": [*objects, foreign]}).fingerprint != rs.fingerprint
