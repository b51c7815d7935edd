"""The planner: only what differs, in a safe order; one peer's change touches only that peer."""

from __future__ import annotations

import base64
import copy
import hashlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from kvpn_agent.desired import DesiredServer
from kvpn_agent.observed import Observed, ObservedDevice, ObservedLink, ObservedPeer
from kvpn_agent.plan import (
    Action,
    AddAddress,
    AddPeer,
    AllowedIps,
    ConfigureDevice,
    CreateInterface,
    RemoveAddress,
    RemovePeer,
    ReplaceFirewall,
    SetLinkUp,
    SetMtu,
    UpdateFirewall,
    UpdatePeer,
    allowed_ips,
    plan_firewall,
    plan_server,
)
from kvpn_agent.ruleset import (
    ObservedRuleset,
    PeerUpdate,
    Ruleset,
    build_ruleset,
    parse_table,
    replace_commands,
    server_id,
)
from kvpn_core.api import AllowedDestination
from kvpn_core.contract import PeerBinding
from kvpn_core.keys import public_key_of


def det_key(seed: str) -> str:
    """A deterministic key per seed, so hypothesis examples are reproducible."""
    return base64.b64encode(hashlib.sha256(seed.encode()).digest()).decode()


PRIVATE = det_key("server")
IF = "kvgw-0123456789"


def peer(i: int, *, psk: bool = True, dests: Sequence[AllowedDestination] = (), v6: bool = False) -> PeerBinding:
    addresses = [f"10.8.{i // 250}.{i % 250 + 2}"] + ([f"fd00:8::{i + 2:x}"] if v6 else [])
    return PeerBinding(
        peer_namespace="team",
        peer_name=f"p{i}",
        peer_uid=f"u{i}",
        public_key=det_key(f"pub{i}"),
        preshared_key=det_key(f"psk{i}") if psk else None,
        addresses=addresses,
        allowed_destinations=list(dests),
    )


def desired(peers: Sequence[PeerBinding] = (), **fields: Any) -> DesiredServer:
    values: dict[str, Any] = {
        "namespace": "team",
        "name": "office",
        "interface": IF,
        "private_key": SecretStr(PRIVATE),
        "public_key": public_key_of(PRIVATE),
        "listen_port": 51820,
        "mtu": 1420,
        "addresses": ("10.8.0.1/16",),
        "routes": ("10.96.0.0/12",),
        "masquerade": True,
        "peers": tuple(peers),
    }
    return DesiredServer(**{**values, **fields})


def observed_peer(p: PeerBinding, **fields: Any) -> ObservedPeer:
    assert p.public_key
    values: dict[str, Any] = {
        "public_key": p.public_key,
        "preshared_key": p.preshared_key,
        "allowed_ips": allowed_ips(p),
        "endpoint": "192.0.2.7:40000",
        "last_handshake": 1.7e9,
        "rx_bytes": 10,
        "tx_bytes": 20,
    }
    return ObservedPeer(**{**values, **fields})


def converged(d: DesiredServer) -> Observed:
    """What the node looks like once ``d`` is applied (plus runtime noise the planner must ignore)."""
    return Observed(
        link=ObservedLink(mtu=d.mtu, up=True, addresses=(*d.addresses, "fe80::1/64")),
        device=ObservedDevice(
            private_key=d.private_key.get_secret_value(),
            listen_port=d.listen_port,
            peers={p.public_key: observed_peer(p) for p in d.peers if p.public_key},
        ),
    )


def with_peers(obs: Observed, peers: dict[str, ObservedPeer]) -> Observed:
    assert obs.device is not None
    return replace(obs, device=replace(obs.device, peers=peers))


# --- Interface and device ----------------------------------------------------------------------


def test_fresh_node_creates_everything_in_order() -> None:
    d = desired([peer(0), peer(1)], addresses=("10.8.0.1/16", "fd00:8::1/64"))
    actions = plan_server(d, Observed())
    kinds = [type(a) for a in actions]
    assert kinds == [
        CreateInterface,
        SetMtu,
        AddAddress,
        AddAddress,
        SetLinkUp,
        ConfigureDevice,
        AddPeer,
        AddPeer,
    ]
    configure = actions[5]
    assert isinstance(configure, ConfigureDevice)
    assert configure.device.private_key == PRIVATE
    assert configure.device.listen_port == 51820


def test_converged_node_needs_nothing() -> None:
    d = desired([peer(i) for i in range(20)])
    assert plan_server(d, converged(d)) == []


def test_link_without_device_recreates_the_device() -> None:
    d = desired([peer(0)])
    obs = replace(converged(d), device=None)
    actions = plan_server(d, obs)
    assert isinstance(actions[0], CreateInterface)
    assert any(isinstance(a, AddPeer) for a in actions)


def test_only_the_mtu() -> None:
    d = desired([peer(0)])
    obs = converged(d)
    assert obs.link is not None
    obs = replace(obs, link=replace(obs.link, mtu=1500))
    assert plan_server(d, obs) == [SetMtu(IF, 1420)]


def test_addresses_are_reconciled_and_link_local_left_alone() -> None:
    d = desired(addresses=("10.8.0.1/16",))
    obs = converged(d)
    assert obs.link is not None
    obs = replace(obs, link=replace(obs.link, addresses=("10.8.0.1/24", "fe80::5/64", "10.9.0.1/16")))
    assert plan_server(d, obs) == [
        RemoveAddress(IF, "10.8.0.1/24"),
        RemoveAddress(IF, "10.9.0.1/16"),
        AddAddress(IF, "10.8.0.1/16"),
    ]


def test_link_down_is_brought_up() -> None:
    d = desired()
    obs = converged(d)
    assert obs.link is not None
    assert plan_server(d, replace(obs, link=replace(obs.link, up=False))) == [SetLinkUp(IF)]


def test_only_the_private_key() -> None:
    d = desired()
    obs = converged(d)
    assert obs.device is not None
    actions = plan_server(d, replace(obs, device=replace(obs.device, private_key=det_key("old"))))
    assert len(actions) == 1
    assert isinstance(actions[0], ConfigureDevice)
    assert actions[0].device.private_key == PRIVATE
    assert actions[0].device.listen_port is None


def test_only_the_listen_port() -> None:
    d = desired()
    obs = converged(d)
    assert obs.device is not None
    actions = plan_server(d, replace(obs, device=replace(obs.device, listen_port=51999)))
    assert len(actions) == 1
    assert isinstance(actions[0], ConfigureDevice)
    assert actions[0].device.private_key is None
    assert actions[0].device.listen_port == 51820


# --- Peers -------------------------------------------------------------------------------------


def test_one_peer_added_among_many_touches_only_it() -> None:
    peers = [peer(i) for i in range(1000)]
    d = desired(peers)
    obs = converged(desired(peers[:500] + peers[501:]))
    actions = plan_server(d, obs)
    assert len(actions) == 1
    add = actions[0]
    assert isinstance(add, AddPeer)
    assert add.peer.public_key == peers[500].public_key
    assert add.peer.preshared_key == peers[500].preshared_key
    assert add.peer.allowed_ips == ("10.8.2.2/32",)
    assert add.peer.replace_allowed_ips


def test_one_peer_removed_among_many_touches_only_it() -> None:
    peers = [peer(i) for i in range(1000)]
    actions = plan_server(desired(peers[1:]), converged(desired(peers)))
    assert actions == [RemovePeer(IF, det_key("pub0"))]


def test_a_peer_unknown_to_the_desired_state_is_removed() -> None:
    d = desired([peer(0)])
    obs = converged(desired([peer(0), peer(1)]))
    assert plan_server(d, obs) == [RemovePeer(IF, det_key("pub1"))]


def test_changed_preshared_key_updates_only_that() -> None:
    p = peer(0)
    d = desired([p])
    obs = with_peers(converged(d), {p.public_key or "": observed_peer(p, preshared_key=det_key("old"))})
    (update,) = plan_server(d, obs)
    assert isinstance(update, UpdatePeer)
    assert update.changed == ("preshared_key",)
    assert update.peer.update_only
    assert update.peer.preshared_key == p.preshared_key
    assert not update.peer.replace_allowed_ips
    assert update.peer.allowed_ips == ()
    assert update.peer.persistent_keepalive is None


def test_preshared_key_dropped_from_the_binding_is_cleared() -> None:
    p = peer(0, psk=False)
    d = desired([p])
    obs = with_peers(converged(d), {p.public_key or "": observed_peer(p, preshared_key=det_key("old"))})
    (update,) = plan_server(d, obs)
    assert isinstance(update, UpdatePeer)
    assert update.peer.preshared_key == ""


def test_changed_addresses_replace_the_allowed_ips() -> None:
    p = peer(0, v6=True)
    d = desired([p])
    obs = with_peers(converged(d), {p.public_key or "": observed_peer(p, allowed_ips=("10.8.0.2/32", "10.8.9.9/32"))})
    (update,) = plan_server(d, obs)
    assert isinstance(update, UpdatePeer)
    assert update.changed == ("allowed_ips",)
    assert update.peer.replace_allowed_ips
    assert update.peer.allowed_ips == ("10.8.0.2/32", "fd00:8::2/128")


def test_a_memo_kept_across_plans_follows_a_peer_given_new_addresses() -> None:
    # The agent's loop keeps one AllowedIps for all its syncs: a re-addressed peer must not get its old ones.
    memo = AllowedIps()
    p = peer(0)
    d = desired([p])
    assert plan_server(d, converged(d), memo=memo) == []
    moved = PeerBinding.model_validate({**p.model_dump(by_alias=True), "addresses": ["10.8.7.7"]})
    (update,) = plan_server(desired([moved]), converged(d), memo=memo)
    assert isinstance(update, UpdatePeer)
    assert update.peer.allowed_ips == ("10.8.7.7/32",)
    assert plan_server(desired([moved]), converged(d), memo=memo) == plan_server(desired([moved]), converged(d))


def test_keepalive_set_by_hand_is_reset() -> None:
    p = peer(0)
    d = desired([p])
    obs = with_peers(converged(d), {p.public_key or "": observed_peer(p, persistent_keepalive=25)})
    (update,) = plan_server(d, obs)
    assert isinstance(update, UpdatePeer)
    assert update.changed == ("persistent_keepalive",)
    assert update.peer.persistent_keepalive == 0


def test_runtime_state_is_not_drift() -> None:
    p = peer(0)
    d = desired([p])
    noisy = observed_peer(p, endpoint="198.51.100.9:1", last_handshake=None, rx_bytes=0, tx_bytes=99)
    assert plan_server(d, with_peers(converged(d), {p.public_key or "": noisy})) == []


def test_endpoint_hints_only_for_peers_being_added() -> None:
    old, new = peer(0), peer(1)
    d = desired([old, new])
    hints = {old.public_key or "": "192.0.2.1:1", new.public_key or "": "192.0.2.2:2"}
    actions = plan_server(d, converged(desired([old])), hints)
    assert len(actions) == 1
    assert isinstance(actions[0], AddPeer)
    assert actions[0].peer.endpoint == "192.0.2.2:2"


def test_removals_come_before_updates_before_additions() -> None:
    # An address moves from a removed peer to a new one: it must be freed first.
    a, b, c = peer(0), peer(1), peer(2)
    moved = PeerBinding.model_validate({**c.model_dump(by_alias=True), "addresses": a.addresses})
    d = desired([b, moved])
    obs = converged(desired([a, b]))
    assert obs.device is not None
    obs = with_peers(obs, {**obs.device.peers, b.public_key or "": observed_peer(b, preshared_key=None)})
    kinds = [type(x) for x in plan_server(d, obs)]
    assert kinds == [RemovePeer, UpdatePeer, AddPeer]


# --- Property: the plan, applied, reaches the desired state and touches only differing peers ----


def simulate(obs: Observed, actions: Sequence[Action]) -> Observed:
    """A model of what wireguard-go does with the actions (enough to check the planner)."""
    device = obs.device if obs.device is not None else ObservedDevice()
    peers = dict(device.peers)
    link = obs.link
    for a in actions:
        if isinstance(a, CreateInterface):
            link, peers, device = ObservedLink(mtu=1500, up=False), {}, ObservedDevice()
        elif isinstance(a, SetMtu):
            assert link is not None
            link = replace(link, mtu=a.mtu)
        elif isinstance(a, AddAddress):
            assert link is not None
            link = replace(link, addresses=(*link.addresses, a.address))
        elif isinstance(a, RemoveAddress):
            assert link is not None
            link = replace(link, addresses=tuple(x for x in link.addresses if x != a.address))
        elif isinstance(a, SetLinkUp):
            assert link is not None
            link = replace(link, up=True)
        elif isinstance(a, ConfigureDevice):
            if a.device.private_key is not None:
                device = replace(device, private_key=a.device.private_key)
            if a.device.listen_port is not None:
                device = replace(device, listen_port=a.device.listen_port)
        elif isinstance(a, RemovePeer):
            del peers[a.public_key]
        elif isinstance(a, AddPeer | UpdatePeer):
            cfg = a.peer
            before = peers.get(cfg.public_key, ObservedPeer(public_key=cfg.public_key))
            assert isinstance(a, AddPeer) != (cfg.public_key in peers)
            psk = before.preshared_key if cfg.preshared_key is None else (cfg.preshared_key or None)
            ips = before.allowed_ips if not cfg.replace_allowed_ips else ()
            peers[cfg.public_key] = replace(
                before,
                preshared_key=psk,
                allowed_ips=tuple(sorted({*ips, *cfg.allowed_ips})),
                persistent_keepalive=before.persistent_keepalive
                if cfg.persistent_keepalive is None
                else cfg.persistent_keepalive,
            )
    return Observed(link=link, device=replace(device, peers=peers))


peer_variants = st.fixed_dictionaries(
    {"present": st.booleans(), "psk": st.booleans(), "v6": st.booleans(), "keepalive": st.sampled_from([0, 25])}
)


@settings(max_examples=300, deadline=None)
@given(
    want=st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=0, max_size=12),
    have=st.lists(peer_variants, min_size=0, max_size=12),
    mtu=st.sampled_from([1420, 1500]),
    same_key=st.booleans(),
    exists=st.booleans(),
)
def test_plan_converges_and_touches_only_what_differs(
    want: list[tuple[bool, bool, bool]], have: list[dict[str, Any]], mtu: int, same_key: bool, exists: bool
) -> None:
    desired_peers = [peer(i, psk=psk, v6=v6) for i, (present, psk, v6) in enumerate(want) if present]
    d = desired(desired_peers, addresses=("10.8.0.1/16", "fd00:8::1/64"))
    observed_peers = {}
    for i, h in enumerate(have):
        if h["present"]:
            p = peer(i, psk=h["psk"], v6=h["v6"])
            observed_peers[p.public_key or ""] = observed_peer(p, persistent_keepalive=h["keepalive"])
    obs = Observed()
    if exists:
        obs = Observed(
            link=ObservedLink(mtu=mtu, up=True, addresses=("10.8.0.1/16",)),
            device=ObservedDevice(
                private_key=PRIVATE if same_key else det_key("other"), listen_port=51820, peers=observed_peers
            ),
        )
    actions = plan_server(d, obs)
    after = simulate(obs, actions)
    assert plan_server(d, after) == []
    assert after.device is not None
    assert set(after.device.peers) == {p.public_key for p in desired_peers}
    if exists:
        differing = {
            p.public_key
            for p in desired_peers
            if observed_peers.get(p.public_key or "") != observed_peer(p, persistent_keepalive=0)
        } | (set(observed_peers) - {p.public_key for p in desired_peers})
        touched = {
            a.public_key if isinstance(a, RemovePeer) else a.peer.public_key
            for a in actions
            if isinstance(a, RemovePeer | UpdatePeer | AddPeer)
        }
        assert touched == differing


# --- Firewall ----------------------------------------------------------------------------------

WEB = AllowedDestination.model_validate({"cidr": "10.96.0.10/32", "protocol": "TCP", "ports": [{"port": 80}]})


def observed_table(ruleset: Ruleset) -> ObservedRuleset:
    """What `nft -j list table` shows after ``ruleset`` was loaded: map elements inside their map."""
    objects = [copy.deepcopy(c["add"]) for c in replace_commands(ruleset)[2:]]
    maps = {o["map"]["name"]: o["map"] for o in objects if "map" in o}
    listing = []
    for o in objects:
        if "element" in o and o["element"]["name"] in maps:
            maps[o["element"]["name"]].setdefault("elem", []).extend(o["element"]["elem"])
        else:
            listing.append(o)
    return parse_table({"nftables": listing})


def test_observed_table_helper_matches_ruleset() -> None:
    rs = build_ruleset([desired([peer(0), peer(1, dests=[WEB])])])
    assert plan_firewall(rs, observed_table(rs)) == []


def test_missing_table_is_replaced() -> None:
    rs = build_ruleset([desired([peer(0)])])
    assert plan_firewall(rs, None) == [ReplaceFirewall(rs, reason="table missing")]


def test_server_level_change_replaces_the_table() -> None:
    before = build_ruleset([desired([peer(0)])])
    after = build_ruleset([desired([peer(0)], routes=("10.96.0.0/12", "10.244.0.0/16"))])
    (action,) = plan_firewall(after, observed_table(before))
    assert isinstance(action, ReplaceFirewall)
    unmasked = build_ruleset([desired([peer(0)], masquerade=False)])
    assert isinstance(plan_firewall(unmasked, observed_table(before))[0], ReplaceFirewall)


def test_adding_a_peer_adds_only_its_elements() -> None:
    before = build_ruleset([desired([peer(i) for i in range(100)])])
    after = build_ruleset([desired([peer(i) for i in range(101)])])
    (action,) = plan_firewall(after, observed_table(before))
    assert isinstance(action, UpdateFirewall)
    sid = server_id(desired())
    assert action.update == PeerUpdate(add_elements=(((f"peers4_{sid}", "10.8.0.102"), f"routes_{sid}"),))


def test_adding_a_restricted_peer_adds_its_chain_then_its_elements() -> None:
    before = build_ruleset([desired([peer(0)])])
    after = build_ruleset([desired([peer(0), peer(1, dests=[WEB], v6=True)])])
    (action,) = plan_firewall(after, observed_table(before))
    assert isinstance(action, UpdateFirewall)
    (chain,) = action.update.put_chains
    assert [target for _, target in action.update.add_elements] == [chain, chain]
    assert action.update.delete_elements == ()
    assert action.update.delete_chains == ()


def test_removing_a_restricted_peer_deletes_its_elements_and_chain() -> None:
    before = build_ruleset([desired([peer(0), peer(1, dests=[WEB])])])
    after = build_ruleset([desired([peer(0)])])
    (action,) = plan_firewall(after, observed_table(before))
    assert isinstance(action, UpdateFirewall)
    sid = server_id(desired())
    assert action.update.delete_elements == ((f"peers4_{sid}", "10.8.0.3"),)
    assert len(action.update.delete_chains) == 1
    assert action.update.add_elements == ()


def test_changing_a_peers_destinations_swaps_its_chain() -> None:
    before = build_ruleset([desired([peer(0), peer(1, dests=[WEB])])])
    other = AllowedDestination(cidr="10.96.0.0/16")
    after = build_ruleset([desired([peer(0), peer(1, dests=[other])])])
    (action,) = plan_firewall(after, observed_table(before))
    assert isinstance(action, UpdateFirewall)
    u = action.update
    assert len(u.put_chains) == len(u.delete_chains) == len(u.delete_elements) == len(u.add_elements) == 1
    assert u.put_chains != u.delete_chains


def test_flushed_peer_chain_is_refilled() -> None:
    rs = build_ruleset([desired([peer(1, dests=[WEB])])])
    obs = observed_table(rs)
    (chain,) = obs.peer_chains
    flushed = replace(obs, peer_chains={chain: ()})
    (action,) = plan_firewall(rs, flushed)
    assert isinstance(action, UpdateFirewall)
    assert action.update == PeerUpdate(put_chains=(chain,))


def test_hand_removed_element_is_restored() -> None:
    rs = build_ruleset([desired([peer(0), peer(1)])])
    obs = observed_table(rs)
    missing = dict(obs.peer_map)
    key = next(iter(missing))
    del missing[key]
    (action,) = plan_firewall(rs, replace(obs, peer_map=missing))
    assert isinstance(action, UpdateFirewall)
    assert action.update == PeerUpdate(add_elements=((key, rs.peer_map[key]),))


def test_disabling_a_peer_removes_its_elements() -> None:
    before = build_ruleset([desired([peer(0), peer(1)])])
    after = build_ruleset([desired([peer(1)])])
    (action,) = plan_firewall(after, observed_table(before))
    assert isinstance(action, UpdateFirewall)
    assert list(action.update.delete_elements) == [(f"peers4_{server_id(desired())}", "10.8.0.2")]
