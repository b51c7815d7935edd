"""The watch-event path (DesiredBuilder, then a sync planned against the previous sync) against from-scratch builds."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kvpn_agent.builder import DesiredBuilder
from kvpn_agent.desired import DesiredServer
from kvpn_agent.desired import build_desired as build
from kvpn_agent.observed import ObservedDevice, ObservedLink
from kvpn_agent.ruleset import ObservedRuleset, PeerUpdate, Ruleset, build_ruleset
from kvpn_agent.sync import NodeState, SyncResult, assumed, assumed_ruleset, sync
from kvpn_agent.wire import DeviceConfig, PeerConfig
from kvpn_core.contract import encode_data
from kvpn_core.keys import public_key_of

SERVER_KEY = base64.b64encode(hashlib.sha256(b"server").digest()).decode()
KEYS = [base64.b64encode(hashlib.sha256(f"k{i}".encode()).digest()).decode() for i in range(4)]
SERVER_OBJ = {
    "metadata": {"namespace": "team", "name": "office", "resourceVersion": "1"},
    "spec": {"addressPool": ["10.8.0.0/24"], "routes": ["10.96.0.0/12"]},
    "status": {"addresses": ["10.8.0.1"]},
}
KEY_SECRET = {"data": encode_data({"privateKey": SERVER_KEY})}
ADDRESSES = ["10.8.0.2", "10.8.0.3", "10.8.0.4", "10.8.0.1", "10.9.0.5"]  # the server's own, outside the pool
DESTINATIONS = [
    [],
    [{"cidr": "10.96.1.0/24", "protocol": "TCP", "ports": [{"port": 443}]}],
    [{"cidr": "192.168.0.0/24"}],  # outside the routes: dropped, the peer left out
    [{"cidr": "10.96.2.0/24"}, {"cidr": "192.168.0.0/24"}],
]
_versions = itertools.count(2)


@st.composite
def secrets(draw: st.DrawFn) -> dict[str, Any]:
    """A binding Secret whose key and addresses often clash with the others'."""
    data = {
        "peerNamespace": "team",
        "peerName": draw(st.sampled_from(["a", "b"])),
        "peerUID": "u",
        "addresses": ",".join(
            draw(
                st.lists(
                    st.sampled_from(["10.8.0.2", "10.8.0.3", "10.8.0.4", "10.8.0.1", "10.9.0.5"]),
                    min_size=1,
                    max_size=2,
                )
            )
        ),
        "enabled": draw(st.sampled_from(["true", "true", "false"])),
        "allowedDestinations": json.dumps(draw(st.sampled_from(DESTINATIONS))),
    }
    public = draw(st.sampled_from([*KEYS, public_key_of(SERVER_KEY), "not-a-key", ""]))
    if public:
        data["publicKey"] = public
    if psk := draw(st.sampled_from(["", KEYS[0], KEYS[1]])):
        data["presharedKey"] = psk
    if draw(st.integers(0, 9)) == 0:
        data["allowedDestinations"] = "{broken"
    return {
        "metadata": {
            "namespace": "team",
            "name": draw(st.sampled_from([f"b{i}" for i in range(6)])),
            "resourceVersion": str(next(_versions)),
            "creationTimestamp": draw(st.sampled_from(["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z", ""])),
        },
        "data": encode_data(data),
    }


changes = st.lists(
    st.dictionaries(
        st.sampled_from([f"b{i}" for i in range(6)]), st.one_of(st.none(), secrets()), min_size=1, max_size=3
    ),
    min_size=1,
    max_size=12,
)


def named(secret: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    return None if secret is None else {**secret, "metadata": {**secret["metadata"], "name": name}}


class Null:
    """Backends that accept everything; nothing is read back (the syncs below always have a known state)."""

    def observe(self, interface: str) -> ObservedLink | None:
        return None

    def create(self, interface: str) -> None: ...
    def delete(self, interface: str) -> None: ...
    def set_mtu(self, interface: str, mtu: int) -> None: ...
    def add_address(self, interface: str, address: str) -> None: ...
    def remove_address(self, interface: str, address: str) -> None: ...
    def set_up(self, interface: str) -> None: ...

    def get(self, interface: str) -> ObservedDevice | None:
        return None

    def set(self, interface: str, device: DeviceConfig | None, peers: Sequence[PeerConfig]) -> None: ...

    def list_table(self) -> ObservedRuleset | None:
        return None

    def replace(self, ruleset: Ruleset) -> None: ...
    def update(self, ruleset: Ruleset, update: PeerUpdate) -> None: ...


def full_sync(servers: list[DesiredServer], known: NodeState) -> SyncResult:
    """The sync before the incremental path: the previous state without what it was built from."""
    n = Null()
    return sync(servers, n, n, n, known=NodeState(servers=known.servers, ruleset=known.ruleset))


def other_server() -> DesiredServer:
    """A second server on the node, served in some steps and not in others."""
    obj = {
        "metadata": {"namespace": "team", "name": "lab"},
        "spec": {"addressPool": ["10.7.0.0/24"], "routes": ["10.96.0.0/12"]},
        "status": {"addresses": ["10.7.0.1"]},
    }
    data = {"peerNamespace": "team", "peerName": "l", "peerUID": "u", "addresses": "10.7.0.2", "publicKey": KEYS[0]}
    data["allowedDestinations"] = json.dumps(DESTINATIONS[1])
    return build(obj, KEY_SECRET, [{"metadata": {"name": "l0"}, "data": encode_data(data)}])


OTHER = other_server()


@settings(max_examples=300, deadline=None)
@given(initial=st.lists(secrets(), max_size=6), steps=changes)
def test_patched_bindings_give_the_from_scratch_desired_state_and_plan(
    initial: list[dict[str, Any]], steps: list[dict[str, dict[str, Any] | None]]
) -> None:
    current = {s["metadata"]["name"]: s for s in initial}
    builder = DesiredBuilder(SERVER_OBJ, KEY_SECRET, current.values())
    assert builder.desired == build(SERVER_OBJ, KEY_SECRET, current.values())
    n = Null()
    state = sync([builder.desired], n, n, n).state
    assert state is not None
    for drawn in steps:
        step = {name: named(secret, name) for name, secret in drawn.items()}
        for name, secret in step.items():
            if secret is None:
                current.pop(name, None)
            else:
                current[name] = secret
        desired = builder.apply(step)
        expected = build(SERVER_OBJ, KEY_SECRET, current.values())
        assert desired == expected
        assert desired.problems == expected.problems

        servers = [desired, OTHER] if len(step) % 2 else [desired]
        result = sync(servers, n, n, n, known=state)
        reference = full_sync(servers, state)
        assert result.actions == reference.actions
        assert result.state is not None
        assert reference.state is not None
        assert result.state.servers == reference.state.servers == {s.interface: assumed(s) for s in servers}
        assert result.state.ruleset == reference.state.ruleset
        assert result.state.rules == build_ruleset(servers)
        assert result.state.ruleset == assumed_ruleset(build_ruleset(servers))
        state = result.state


def test_a_one_peer_change_plans_one_peer_and_one_element() -> None:
    def secret(i: int) -> dict[str, Any]:
        data = {
            "peerNamespace": "team",
            "peerName": f"p{i}",
            "peerUID": f"u{i}",
            "addresses": f"10.8.0.{i + 2}",
            "enabled": "true",
            "allowedDestinations": "[]",
            "publicKey": base64.b64encode(hashlib.sha256(f"p{i}".encode()).digest()).decode(),
        }
        meta = {"namespace": "team", "name": f"b{i}", "resourceVersion": str(i + 10)}
        return {"metadata": meta, "data": encode_data(data)}

    builder = DesiredBuilder(SERVER_OBJ, KEY_SECRET, [secret(i) for i in range(50)])
    n = Null()
    state = sync([builder.desired], n, n, n).state
    desired = builder.apply({"b50": secret(50)})
    result = sync([desired], n, n, n, known=state)
    assert [type(a).__name__ for a in result.actions] == ["AddPeer", "UpdateFirewall"]
    assert result.actions == full_sync([desired], state).actions  # type: ignore[arg-type]
