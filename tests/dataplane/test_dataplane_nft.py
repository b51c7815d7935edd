"""The real nft loads the agent's table, and what it lists back plans to nothing (dual stack, restricted peers)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from harness.factories import key
from harness.netlab import Lab
from kvpn_agent.desired import DesiredServer
from kvpn_agent.nft import Nft
from kvpn_agent.plan import UpdateFirewall, plan_firewall
from kvpn_agent.ruleset import build_ruleset
from kvpn_core.api import AllowedDestination
from kvpn_core.contract import PeerBinding
from kvpn_core.keys import public_key_of

pytestmark = [pytest.mark.root]


def test_dual_stack_table_round_trips_through_nft(lab: Lab) -> None:
    dests = [
        AllowedDestination(cidr="fd00:96::10/128", protocol="ICMP"),
        AllowedDestination.model_validate({"cidr": "fd00:96::/108", "protocol": "UDP", "ports": [{"port": 53}]}),
        AllowedDestination.model_validate({"cidr": "fd00:96::/112", "ports": [{"port": 1, "endPort": 1024}]}),
        AllowedDestination(cidr="10.96.0.0/12", protocol="ICMP"),
    ]
    peers = [
        PeerBinding(
            peer_namespace="t",
            peer_name=f"p{i}",
            peer_uid=f"u{i}",
            public_key=key(),
            addresses=[f"10.8.0.{i + 2}", f"fd00:8::{i + 2:x}"],
            allowed_destinations=dests if i % 2 else [],
        )
        for i in range(20)
    ]
    private = key()
    server = DesiredServer(
        namespace="t",
        name="dual",
        interface="kvgw-dualstack0",
        private_key=SecretStr(private),
        public_key=public_key_of(private),
        listen_port=51820,
        mtu=1420,
        addresses=("10.8.0.1/24", "fd00:8::1/64"),
        routes=("10.96.0.0/12", "fd00:96::/108"),
        masquerade=True,
        dns_nameservers=("10.96.0.10", "fd00:96::a"),
        peers=tuple(peers),
    )
    ns = lab.netns("nft")
    firewall = Nft(prefix=("ip", "netns", "exec", ns))
    ruleset = build_ruleset([server])
    firewall.replace(ruleset)
    assert plan_firewall(ruleset, firewall.list_table()) == []

    fewer = build_ruleset([server.model_copy(update={"peers": tuple(peers[:-1])})])
    (action,) = plan_firewall(fewer, firewall.list_table())
    assert isinstance(action, UpdateFirewall)
    firewall.update(fewer, action.update)
    assert plan_firewall(fewer, firewall.list_table()) == []
