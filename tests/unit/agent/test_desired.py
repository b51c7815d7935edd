"""The agent's desired state, built from the operator→agent contract objects."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from kvpn_agent.builder import DesiredBuilder
from kvpn_agent.desired import GATEWAY_PREFIX, DesiredStateError, build_desired, interface_name
from kvpn_agent.ruleset import build_ruleset, server_id
from kvpn_agent.wire import sort_networks
from kvpn_cli.wgquick import interface_name as cli_interface_name
from kvpn_core.api import AllowedDestination
from kvpn_core.ceiling import describe
from kvpn_core.contract import LABEL_ROLE, LABEL_SERVER, ROLE_PEER, PeerBinding, encode_data
from kvpn_core.keys import decode_key, generate_private_key, public_key_of
from tests.unit.fakes import random_key

SERVER_KEY = generate_private_key()


def server(**spec: Any) -> dict[str, Any]:
    status = spec.pop("status", {"addresses": ["10.8.0.1"], "routes": ["10.96.0.0/12", "10.244.0.0/16"]})
    return {
        "apiVersion": "kvpn.dev/v1alpha1",
        "kind": "VpnServer",
        "metadata": {"namespace": "team", "name": "office"},
        "spec": {"addressPool": ["10.8.0.0/24"], **spec},
        "status": status,
    }


def key_secret(private_key: str = SERVER_KEY) -> dict[str, Any]:
    return {"metadata": {"name": "kvpn-server-office"}, "data": encode_data({"privateKey": private_key})}


def binding(address: str, created: str = "2024-01-01T00:00:00Z", **fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "peerNamespace": "team",
        "peerName": f"laptop-{address.replace('.', '-').replace(':', '-')}",
        "peerUID": f"uid-{address}",
        "publicKey": random_key(),
        "presharedKey": random_key(),
        "addresses": [address],
        **fields,
    }
    pb = PeerBinding.model_validate(values)
    return {
        "metadata": {"name": pb.secret_name("office"), "creationTimestamp": created},
        "data": encode_data(pb.to_string_data()),
    }


def test_interface_name_is_unique_per_namespace_and_fits_ifnamsiz() -> None:
    a, b = interface_name("team-a", "office"), interface_name("team-b", "office")
    assert a != b
    assert a.startswith("kvgw-")
    assert len(a) <= 15
    assert a == interface_name("team-a", "office")


def test_gateway_interfaces_never_look_like_a_laptops() -> None:
    # The CLI names a laptop's interface kvpn-<server>; the agent's cleanup deletes what carries
    # its prefix, so a gateway running `kubectl vpn up` must keep that tunnel.
    laptop = cli_interface_name("office")
    assert not laptop.startswith(GATEWAY_PREFIX)
    assert interface_name("default", "office").startswith(GATEWAY_PREFIX)


def test_server_settings_come_from_spec_and_status() -> None:
    desired = build_desired(server(listenPort=51000, mtu=1380, masquerade=False), key_secret(), [])
    assert desired.interface == interface_name("team", "office")
    assert desired.listen_port == 51000
    assert desired.mtu == 1380
    assert desired.masquerade is False
    assert desired.addresses == ("10.8.0.1/24",)
    assert desired.pools == ("10.8.0.0/24",)
    assert desired.routes == ("10.96.0.0/12", "10.244.0.0/16")
    assert desired.public_key == public_key_of(SERVER_KEY)
    assert desired.private_key.get_secret_value() == SERVER_KEY


def test_server_address_with_prefix_in_status_and_dual_stack() -> None:
    body = server(
        addressPool=["10.8.0.0/24", "fd00:8::/64"],
        status={"addresses": ["10.8.0.1/24", "fd00:8::1"], "routes": ["10.96.0.0/12", "fd00:96::/108"]},
    )
    desired = build_desired(body, key_secret(), [])
    assert desired.addresses == ("10.8.0.1/24", "fd00:8::1/64")
    assert desired.routes == ("10.96.0.0/12", "fd00:96::/108")


def test_without_status_the_server_takes_the_first_address_and_spec_routes() -> None:
    desired = build_desired(server(routes=["172.16.0.0/16"], status={}), key_secret(), [])
    assert desired.addresses == ("10.8.0.1/24",)
    assert desired.routes == ("172.16.0.0/16",)


def test_overlapping_routes_are_collapsed_for_nft_interval_sets() -> None:
    body = server(status={"addresses": ["10.8.0.1"], "routes": ["10.0.0.0/8", "10.96.0.0/12", "10.1.0.0/16"]})
    assert build_desired(body, key_secret(), []).routes == ("10.0.0.0/8",)


def test_dns_nameserver_in_effect_is_kept_unless_dns_is_off() -> None:
    status = {"addresses": ["10.8.0.1"], "routes": ["10.96.0.0/12"], "dnsNameserver": "10.96.0.10"}
    assert build_desired(server(status=status), key_secret(), []).dns_nameservers == ("10.96.0.10",)
    off = server(status=status, dns={"enabled": False})
    assert build_desired(off, key_secret(), []).dns_nameservers == ()


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        (None, "ServerKeyMissing"),
        ({"data": {}}, "ServerKeyMissing"),
        ({"data": encode_data({"privateKey": "short"})}, "InvalidServerKey"),
        ({"data": {"privateKey": "%%%"}}, "InvalidServerKey"),
    ],
)
def test_unusable_server_key_is_a_server_error(secret: dict[str, Any] | None, reason: str) -> None:
    with pytest.raises(DesiredStateError) as caught:
        build_desired(server(), secret, [])
    assert caught.value.finding.reason == reason


def test_invalid_spec_is_a_server_error() -> None:
    with pytest.raises(DesiredStateError) as caught:
        build_desired(server(addressPool=["not-a-cidr"]), key_secret(), [])
    assert caught.value.finding.reason == "InvalidSpec"


def test_status_address_outside_the_pool_is_a_server_error() -> None:
    with pytest.raises(DesiredStateError) as caught:
        build_desired(server(status={"addresses": ["10.9.0.1"]}), key_secret(), [])
    assert caught.value.finding.reason == "AddressOutsidePool"


def test_peers_are_sorted_by_address_and_keep_their_keys() -> None:
    secrets = [binding("10.8.0.10"), binding("10.8.0.2"), binding("10.8.0.3")]
    desired = build_desired(server(), key_secret(), secrets)
    assert [p.addresses[0] for p in desired.peers] == ["10.8.0.2", "10.8.0.3", "10.8.0.10"]
    assert all(p.public_key and p.preshared_key for p in desired.peers)
    assert desired.problems == ()


def test_disabled_and_keyless_peers_are_left_out_without_a_problem() -> None:
    secrets = [binding("10.8.0.2", enabled=False), binding("10.8.0.3", publicKey=None), binding("10.8.0.4")]
    desired = build_desired(server(), key_secret(), secrets)
    assert [p.addresses[0] for p in desired.peers] == ["10.8.0.4"]
    assert desired.problems == ()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"addresses": ["10.9.0.2"]}, "AddressOutsidePool"),
        ({"addresses": ["10.8.0.1"]}, "AddressConflict"),
        ({"presharedKey": base64.b64encode(b"x" * 31).decode()}, "InvalidPresharedKey"),
    ],
)
def test_a_bad_binding_is_reported_and_the_others_keep_working(fields: dict[str, Any], reason: str) -> None:
    secrets = [binding("10.8.0.2", **fields), binding("10.8.0.3")]
    desired = build_desired(server(), key_secret(), secrets)
    assert [p.addresses[0] for p in desired.peers] == ["10.8.0.3"]
    assert [p.finding.reason for p in desired.problems] == [reason]
    assert desired.problems[0].peer_name == "laptop-10-8-0-2"


def test_invalid_public_key_slipped_past_the_schema_is_reported() -> None:
    bad = binding("10.8.0.2")
    bad["data"]["publicKey"] = base64.b64encode(b"not a key").decode()
    desired = build_desired(server(), key_secret(), [bad, binding("10.8.0.3")])
    assert [p.finding.reason for p in desired.problems] == ["InvalidPublicKey"]
    assert len(desired.peers) == 1


def test_garbage_binding_is_reported_by_secret_name() -> None:
    garbage = {"metadata": {"name": "kvpn-office-10-8-0-9"}, "data": {"addresses": "!!"}}
    desired = build_desired(server(), key_secret(), [garbage, binding("10.8.0.3")])
    assert desired.problems[0].binding == "kvpn-office-10-8-0-9"
    assert desired.problems[0].finding.reason == "InvalidBinding"
    assert len(desired.peers) == 1


def test_duplicate_public_key_the_older_binding_wins() -> None:
    shared = random_key()
    newer = binding("10.8.0.2", created="2024-02-01T00:00:00Z", publicKey=shared)
    older = binding("10.8.0.3", created="2024-01-01T00:00:00Z", publicKey=shared)
    desired = build_desired(server(), key_secret(), [newer, older])
    assert [p.addresses[0] for p in desired.peers] == ["10.8.0.3"]
    assert [(p.peer_name, p.finding.reason) for p in desired.problems] == [("laptop-10-8-0-2", "DuplicatePublicKey")]


def test_a_peer_using_the_servers_own_key_is_refused() -> None:
    desired = build_desired(server(), key_secret(), [binding("10.8.0.2", publicKey=public_key_of(SERVER_KEY))])
    assert desired.peers == ()
    assert desired.problems[0].finding.reason == "DuplicatePublicKey"


def test_second_address_claimed_twice_the_older_binding_wins() -> None:
    body = server(addressPool=["10.8.0.0/24", "fd00:8::/64"], status={"addresses": ["10.8.0.1", "fd00:8::1"]})
    older = binding("10.8.0.2", addresses=["10.8.0.2", "fd00:8::5"])
    newer = binding("10.8.0.3", created="2024-03-01T00:00:00Z", addresses=["10.8.0.3", "fd00:8::5"])
    desired = build_desired(body, key_secret(), [newer, older])
    assert [p.addresses[0] for p in desired.peers] == ["10.8.0.2"]
    assert desired.problems[0].finding.reason == "AddressConflict"


def test_destinations_outside_the_routes_are_dropped_and_reported() -> None:
    inside = AllowedDestination(cidr="10.96.0.10/32").to_api()
    outside = AllowedDestination(cidr="192.168.0.0/16").to_api()
    desired = build_desired(server(), key_secret(), [binding("10.8.0.2", allowedDestinations=[inside, outside])])
    assert [d.cidr for d in desired.peers[0].allowed_destinations] == ["10.96.0.10/32"]
    assert desired.problems[0].finding.reason == "DestinationOutsideRoutes"


def test_a_peer_whose_every_destination_is_outside_gets_nothing_not_everything() -> None:
    outside = AllowedDestination(cidr="192.168.0.0/16").to_api()
    desired = build_desired(server(), key_secret(), [binding("10.8.0.2", allowedDestinations=[outside])])
    assert desired.peers == ()
    assert desired.problems[0].finding.reason == "DestinationOutsideRoutes"


def test_no_key_material_in_repr() -> None:
    secret = binding("10.8.0.2")
    psk = PeerBinding.from_secret(secret).preshared_key
    assert psk
    desired = build_desired(server(), key_secret(), [secret])
    for text in (repr(desired), str(desired)):
        assert SERVER_KEY not in text
        assert psk not in text
    assert SERVER_KEY not in desired.model_dump_json()


def test_key_errors_never_echo_the_value() -> None:
    with pytest.raises(ValueError, match="44 characters") as caught:
        decode_key(base64.b64encode(b"secret-material").decode())
    assert "secret-material" not in str(caught.value)


def test_sort_networks_normalizes_and_orders() -> None:
    assert sort_networks(["10.8.0.10/32", "fd00::1/128", "10.8.0.2/32", "10.8.0.2"]) == (
        "10.8.0.2/32",
        "10.8.0.10/32",
        "fd00::1/128",
    )


def test_an_unclamped_server_key_is_held_as_the_device_reports_it() -> None:
    raw = bytearray(decode_key(SERVER_KEY))
    raw[0] |= 7  # the low bits X25519 clears: same key to WireGuard, different bytes
    unclamped = base64.b64encode(bytes(raw)).decode()
    secret = key_secret()
    secret["data"] = encode_data({"privateKey": unclamped})
    desired = build_desired(server(), secret, [])
    assert desired.private_key.get_secret_value() == SERVER_KEY
    assert desired.public_key == public_key_of(unclamped)


# --- the server's ceiling, again on the gateway: a stale or hand-edited binding cannot exceed it ------------

TEAM_CEILING = {
    "namespaces": ["team"],
    "destinations": [{"cidr": "10.96.5.0/24", "protocol": "TCP", "ports": [{"port": 80}]}],
}


def under_ceiling(*ceilings: dict[str, Any]) -> dict[str, Any]:
    return server(peerCeilings=list(ceilings or (TEAM_CEILING,)))


def labelled(secret: dict[str, Any]) -> dict[str, Any]:
    """A binding as the agent's watch holds it: in the server's namespace, with the server's label."""
    meta = {**secret["metadata"], "namespace": "team", "labels": {LABEL_SERVER: "office", LABEL_ROLE: ROLE_PEER}}
    return {**secret, "metadata": {**meta, "resourceVersion": "1"}}


def test_a_binding_wider_than_its_ceiling_is_narrowed_and_reported() -> None:
    wide = AllowedDestination(cidr="10.96.0.0/12").to_api()
    desired = build_desired(under_ceiling(), key_secret(), [binding("10.8.0.2", allowedDestinations=[wide])])
    [peer] = desired.peers
    assert [describe(d) for d in peer.allowed_destinations] == ["10.96.5.0/24 tcp/80"]
    [problem] = desired.problems
    assert (problem.peer_name, problem.finding.reason) == ("laptop-10-8-0-2", "DestinationOutsideCeiling")
    assert problem.finding.message == (
        "the server's ceiling for namespace team cuts allowedDestinations 10.96.0.0/12 to 10.96.5.0/24 tcp/80"
    )


def test_a_binding_for_every_route_gets_the_routes_under_its_ceiling() -> None:
    """A binding from before the ceiling (empty: every route) is not every route any more."""
    desired = build_desired(under_ceiling(), key_secret(), [binding("10.8.0.2")])
    assert [describe(d) for d in desired.peers[0].allowed_destinations] == ["10.96.5.0/24 tcp/80"]
    assert desired.problems[0].finding.reason == "DestinationOutsideCeiling"


def test_a_binding_the_ceiling_leaves_nothing_of_is_left_out_never_widened() -> None:
    outside = AllowedDestination(cidr="10.244.0.0/16").to_api()
    desired = build_desired(under_ceiling(), key_secret(), [binding("10.8.0.2", allowedDestinations=[outside])])
    assert desired.peers == ()
    [problem] = desired.problems
    assert problem.finding.reason == "DestinationOutsideCeiling"
    assert problem.finding.message.endswith("leaves nothing of allowedDestinations 10.244.0.0/16: the peer is left out")


def test_a_binding_the_operator_narrowed_is_served_as_it_is() -> None:
    narrow = AllowedDestination.model_validate(TEAM_CEILING["destinations"][0]).to_api()
    secret = binding("10.8.0.2", allowedDestinations=[narrow])
    desired = build_desired(under_ceiling(), key_secret(), [secret])
    assert desired.problems == ()
    assert desired.peers[0] == PeerBinding.from_secret(secret)


def test_a_peer_of_a_namespace_no_ceiling_names_is_limited_only_by_the_routes() -> None:
    other = {**TEAM_CEILING, "namespaces": ["team-b"]}
    desired = build_desired(under_ceiling(other), key_secret(), [binding("10.8.0.2")])
    assert desired.peers[0].allowed_destinations == []
    assert desired.problems == ()


def test_outside_the_routes_and_cut_by_the_ceiling_is_one_problem_saying_both() -> None:
    dests = [AllowedDestination(cidr=c).to_api() for c in ("10.96.0.0/12", "192.168.0.0/16")]
    desired = build_desired(under_ceiling(), key_secret(), [binding("10.8.0.2", allowedDestinations=dests)])
    assert [describe(d) for d in desired.peers[0].allowed_destinations] == ["10.96.5.0/24 tcp/80"]
    [problem] = desired.problems
    assert problem.finding.reason == "DestinationOutsideRoutes"
    assert "192.168.0.0/16" in problem.finding.message
    assert "cuts allowedDestinations 10.96.0.0/12 to 10.96.5.0/24 tcp/80" in problem.finding.message


def test_a_binding_patched_in_alone_meets_the_same_ceiling() -> None:
    """The watch-event path judges a changed binding without the server: it must not skip the ceiling."""
    builder = DesiredBuilder(under_ceiling(), key_secret(), [labelled(binding("10.8.0.2"))])
    added = labelled(binding("10.8.0.3"))
    patched = builder.apply({added["metadata"]["name"]: added})
    rebuilt = build_desired(under_ceiling(), key_secret(), builder.secrets.values())
    assert [[describe(d) for d in p.allowed_destinations] for p in patched.peers] == [["10.96.5.0/24 tcp/80"]] * 2
    assert patched.peers == rebuilt.peers
    assert patched.problems == rebuilt.problems


def test_the_firewall_gets_a_chain_with_only_what_the_ceiling_leaves() -> None:
    ceiling = {
        "namespaces": ["*"],
        "destinations": [
            {"cidr": "10.96.5.0/24", "protocol": "TCP", "ports": [{"port": 80}, {"port": 443}]},
            {"cidr": "10.244.0.0/16", "protocol": "ICMP"},
        ],
    }
    asked = [
        {"cidr": "10.96.0.0/12", "ports": [{"port": 443, "endPort": 8443}]},
        {"cidr": "10.244.1.0/24"},
    ]
    desired = build_desired(under_ceiling(ceiling), key_secret(), [binding("10.8.0.2", allowedDestinations=asked)])
    ruleset = build_ruleset([desired])
    [chain] = ruleset.peer_chains
    assert ruleset.peer_map[(f"peers4_{server_id(desired)}", "10.8.0.2")] == chain
    matched = [
        [json.dumps(m["match"]["right"], sort_keys=True) for m in rule["rule"]["expr"] if "match" in m]
        for rule in ruleset.peer_chains[chain]
    ]
    assert matched == [
        ['{"prefix": {"addr": "10.96.5.0", "len": 24}}', '"tcp"', "443"],
        ['{"prefix": {"addr": "10.244.1.0", "len": 24}}', '"icmp"'],
    ]
