"""Gateway takeover: who takes over, which peers it calls, and that the calls make WireGuard initiate."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from kvpn_agent.desired import interface_name
from kvpn_agent.observed import ObservedDevice, ObservedPeer
from kvpn_agent.status_report import rfc3339
from kvpn_agent.takeover import (
    SESSION_LIFETIME,
    Takeover,
    lease_verdicts,
    lost_gateways,
    peers_to_initiate,
    takeover_node,
)
from kvpn_agent.wire import DeviceConfig, PeerConfig
from kvpn_core.api import Kind, VpnServerStatus
from kvpn_core.kube import KubeError, kvpn_path
from tests.unit.fakes import FakeKube

T = 1_700_000_000.0
SERVER = ("vpn", "office")
INTERFACE = interface_name(*SERVER)
ALICE, BOB = "A" * 43 + "=", "B" * 43 + "="


def gw(node: str, *, ready: bool = True, endpoint: str | None = None) -> dict[str, Any]:
    return {"node": node, "ready": ready, "reason": "Serving" if ready else "LeaseExpired", "endpoint": endpoint}


def status(endpoint: str | None, *gateways: dict[str, Any]) -> VpnServerStatus:
    return VpnServerStatus.model_validate({"endpoint": endpoint, "gateways": list(gateways)})


# --- takeover_node --------------------------------------------------------------------------------


def test_with_nodeport_the_gateway_configs_point_to_takes_over() -> None:
    s = status("203.0.113.2:31820", gw("a", endpoint="203.0.113.1:31820"), gw("b", endpoint="203.0.113.2:31820"))
    assert takeover_node(s) == "b"


def test_a_not_ready_gateway_at_the_endpoint_leaves_it_to_the_first_ready_by_name() -> None:
    s = status(
        "203.0.113.1:31820",
        gw("c", endpoint="203.0.113.3:31820"),
        gw("a", ready=False, endpoint="203.0.113.1:31820"),
        gw("b", endpoint="203.0.113.2:31820"),
    )
    assert takeover_node(s) == "b"


def test_two_ready_gateways_at_the_endpoint_tie_by_name() -> None:
    s = status("203.0.113.9:31820", gw("b", endpoint="203.0.113.9:31820"), gw("a", endpoint="203.0.113.9:31820"))
    assert takeover_node(s) == "a"


def test_behind_a_load_balancer_the_first_ready_gateway_by_name_takes_over() -> None:
    s = status("198.51.100.10:51820", gw("zeta"), gw("alpha", ready=False), gw("mid"))
    assert takeover_node(s) == "mid"


def test_an_explicit_endpoint_no_gateway_has_goes_by_name_too() -> None:
    s = status("vpn.example.com:51820", gw("b", endpoint="203.0.113.2:31820"), gw("a", endpoint="203.0.113.1:31820"))
    assert takeover_node(s) == "a"


def test_no_ready_gateway_means_nobody() -> None:
    assert takeover_node(status("203.0.113.1:31820", gw("a", ready=False))) is None
    assert takeover_node(status(None)) is None
    assert takeover_node(None) is None


def test_an_ipv6_endpoint_matches_however_it_is_spelled() -> None:
    s = status(
        "[2001:DB8:0::2]:31820", gw("a", endpoint="[2001:db8::1]:31820"), gw("b", endpoint="[2001:db8::2]:31820")
    )
    assert takeover_node(s) == "b"


# --- lost_gateways --------------------------------------------------------------------------------


def test_a_gateway_that_turns_unready_or_disappears_is_lost() -> None:
    before = status(None, gw("a"), gw("b"), gw("c", ready=False))
    after = status(None, gw("a", ready=False), gw("c"), gw("d"))
    assert lost_gateways(before, after) == {"a", "b"}


def test_nothing_is_lost_without_a_previous_status_or_while_nothing_changes() -> None:
    s = status(None, gw("a"), gw("b", ready=False))
    assert lost_gateways(None, s) == set()
    assert lost_gateways(s, s) == set()


# --- peers_to_initiate ----------------------------------------------------------------------------


def peer(
    name: str,
    key: str,
    *,
    namespace: str = "vpn",
    server: str = "office",
    server_namespace: str | None = "vpn",
    gateway: str | None = "a",
    handshake: float | None = T - 30,
    endpoint: str | None = "192.0.2.7:4000",
) -> dict[str, Any]:
    ref = {"name": server, **({"namespace": server_namespace} if server_namespace else {})}
    observed = {
        "publicKey": key,
        "gateway": gateway,
        "lastHandshake": rfc3339(handshake) if handshake is not None else None,
        "endpoint": endpoint,
    }
    return {
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"serverRef": ref},
        "status": {k: v for k, v in observed.items() if v is not None},
    }


def device(*keys: str, handshake: float | None = T - 600, keepalive: int = 0) -> ObservedDevice:
    return ObservedDevice(
        peers={k: ObservedPeer(k, last_handshake=handshake, persistent_keepalive=keepalive) for k in keys}
    )


def initiate(
    peers: Sequence[dict[str, Any]], dev: ObservedDevice | None, lost: set[str] | None = None
) -> list[tuple[str, str]]:
    return peers_to_initiate(peers, SERVER, lost or {"a"}, "b", dev, now=T)


def test_the_lost_gateways_recent_peers_are_called_at_their_last_endpoint() -> None:
    peers = [peer("bob", BOB, endpoint="198.51.100.4:1234"), peer("alice", ALICE)]
    assert initiate(peers, device(ALICE, BOB)) == [(ALICE, "192.0.2.7:4000"), (BOB, "198.51.100.4:1234")]


def test_an_ipv6_endpoint_is_passed_on_bracketed() -> None:
    peers = [peer("alice", ALICE, endpoint="[2001:db8:0:0::7]:4000")]
    assert initiate(peers, device(ALICE)) == [(ALICE, "[2001:db8::7]:4000")]


def test_an_idle_peer_is_left_to_itself() -> None:
    stale = T - SESSION_LIFETIME - 1
    assert initiate([peer("alice", ALICE, handshake=stale)], device(ALICE)) == []
    assert initiate([peer("alice", ALICE, handshake=None)], device(ALICE)) == []


def test_a_peer_that_has_handshaked_with_me_since_needs_nothing() -> None:
    assert initiate([peer("alice", ALICE, handshake=T - 30)], device(ALICE, handshake=T - 10)) == []
    assert initiate([peer("alice", ALICE, handshake=T - 30)], device(ALICE, handshake=T - 31)) != []
    assert initiate([peer("alice", ALICE)], device(ALICE, handshake=None)) != []


def test_peers_of_other_gateways_without_an_endpoint_or_not_on_my_device_are_skipped() -> None:
    assert initiate([peer("alice", ALICE, gateway="c")], device(ALICE)) == []
    assert initiate([peer("alice", ALICE, gateway=None)], device(ALICE)) == []
    assert initiate([peer("alice", ALICE, endpoint=None)], device(ALICE)) == []
    assert initiate([peer("alice", ALICE, endpoint="laptop.example:4000")], device(ALICE)) == []
    assert initiate([peer("alice", ALICE)], device(BOB)) == []
    assert initiate([peer("alice", ALICE)], None) == []


def test_peers_of_another_server_are_skipped() -> None:
    assert initiate([peer("alice", ALICE, server="lab")], device(ALICE)) == []
    assert initiate([peer("alice", ALICE, server_namespace="other")], device(ALICE)) == []


def test_a_server_ref_without_a_namespace_means_the_peers_own() -> None:
    mine = peer("alice", ALICE, namespace="vpn", server_namespace=None)
    theirs = peer("bob", BOB, namespace="team", server_namespace=None)  # team/office, not vpn/office
    assert initiate([mine, theirs], device(ALICE, BOB)) == [(ALICE, "192.0.2.7:4000")]


# --- the executor ---------------------------------------------------------------------------------


class RecordingWireGuard:
    """A WireGuardBackend that records each set; ``gate`` holds every set until it is set; ``refuse`` fails a key."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[PeerConfig]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.refuse: set[str] = set()
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def get(self, interface: str) -> ObservedDevice | None:
        raise AssertionError("the takeover reads the device through its own callable")

    def set(self, interface: str, device: DeviceConfig | None, peers: Sequence[PeerConfig]) -> None:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            assert device is None
            self.gate.wait(5)
            if any(p.public_key in self.refuse for p in peers):
                raise OSError("uapi: no such peer")
            self.calls.append((interface, list(peers)))
        finally:
            with self._lock:
                self.active -= 1


def server_obj(
    s: VpnServerStatus, *, namespace: str = "vpn", peer_namespaces: list[str] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": "office"},
        "spec": {"peerNamespaces": peer_namespaces or []},
        "status": s.to_api(),
    }


HEALTHY = status("203.0.113.1:31820", gw("a", endpoint="203.0.113.1:31820"), gw("b", endpoint="203.0.113.2:31820"))
A_LOST = status(
    "203.0.113.2:31820", gw("a", ready=False, endpoint="203.0.113.1:31820"), gw("b", endpoint="203.0.113.2:31820")
)


def add_peer(kube: FakeKube, obj: dict[str, Any]) -> None:
    kube.put(kvpn_path(Kind.VPN_PEER, obj["metadata"]["namespace"], obj["metadata"]["name"]), obj)


@pytest.fixture
def kube() -> FakeKube:
    made = FakeKube()
    add_peer(made, peer("alice", ALICE))
    return made


def takeover(kube: FakeKube, wg: RecordingWireGuard, dev: ObservedDevice | None, node: str = "b") -> Takeover:
    return Takeover(kube, node, wg, lambda interface: dev if interface == INTERFACE else None, clock=lambda: T)  # type: ignore[arg-type]


def initiated(public_key: str, endpoint: str) -> list[tuple[str, list[PeerConfig]]]:
    """The two calls that make the backend initiate: keepalive on (with the endpoint), then back to 0."""
    return [
        (INTERFACE, [PeerConfig(public_key, update_only=True, endpoint=endpoint, persistent_keepalive=1)]),
        (INTERFACE, [PeerConfig(public_key, update_only=True, persistent_keepalive=0)]),
    ]


def test_the_takeover_node_makes_the_lost_gateways_peers_handshake_with_it(
    kube: FakeKube, caplog: pytest.LogCaptureFixture
) -> None:
    wg = RecordingWireGuard()
    t = takeover(kube, wg, device(ALICE))
    caplog.set_level(logging.INFO, logger="kvpn_agent.takeover")
    t.on_server(server_obj(HEALTHY))
    t.on_server(server_obj(A_LOST))
    assert t.wait_idle(5)
    assert wg.calls == initiated(ALICE, "192.0.2.7:4000")
    assert kube.lists == [(kvpn_path(Kind.VPN_PEER, "vpn"), {"label_selector": None, "cached": True, "limit": None})]
    (record,) = [r for r in caplog.records if r.message == "took over"]
    assert (record.server_namespace, record.server, record.lost, record.peers) == ("vpn", "office", "a", 1)  # type: ignore[attr-defined]

    t.on_server(server_obj(A_LOST))  # the same loss again: done already
    assert t.wait_idle(5)
    assert len(wg.calls) == 2


def test_the_first_status_seen_is_only_a_baseline_and_other_nodes_leave_it_alone(kube: FakeKube) -> None:
    wg = RecordingWireGuard()
    t = takeover(kube, wg, device(ALICE))
    t.on_server(server_obj(A_LOST))  # e.g. after an agent restart: nothing to compare with
    other = takeover(kube, wg, device(ALICE), node="c")
    other.on_server(server_obj(HEALTHY))
    other.on_server(server_obj(A_LOST))  # b takes over, not c
    assert t.wait_idle(5)
    assert other.wait_idle(5)
    assert wg.calls == []
    assert kube.lists == []


def test_a_peer_with_a_keepalive_on_is_switched_off_first(kube: FakeKube) -> None:
    wg = RecordingWireGuard()
    t = takeover(kube, wg, device(ALICE, keepalive=25))
    t.on_server(server_obj(HEALTHY))
    t.on_server(server_obj(A_LOST))
    assert t.wait_idle(5)
    off = (INTERFACE, [PeerConfig(ALICE, update_only=True, persistent_keepalive=0)])
    assert wg.calls == [off, *initiated(ALICE, "192.0.2.7:4000")]


def test_with_every_namespace_allowed_all_vpnpeers_are_listed_and_filtered(kube: FakeKube) -> None:
    add_peer(kube, peer("bob", BOB, namespace="team", endpoint="[2001:db8::7]:4000"))
    add_peer(kube, peer("carol", "C" * 43 + "=", namespace="team", server="lab"))
    wg = RecordingWireGuard()
    t = takeover(kube, wg, device(ALICE, BOB, "C" * 43 + "="))
    t.on_server(server_obj(HEALTHY, peer_namespaces=["*"]))
    t.on_server(server_obj(A_LOST, peer_namespaces=["*"]))
    assert t.wait_idle(5)
    assert [path for path, _ in kube.lists] == ["/apis/kvpn.dev/v1alpha1/vpnpeers"]
    assert wg.calls == initiated(ALICE, "192.0.2.7:4000") + initiated(BOB, "[2001:db8::7]:4000")


def test_named_peer_namespaces_are_listed_with_the_servers_own(kube: FakeKube) -> None:
    wg = RecordingWireGuard()
    t = takeover(kube, wg, device(ALICE))
    t.on_server(server_obj(HEALTHY, peer_namespaces=["team"]))
    t.on_server(server_obj(A_LOST, peer_namespaces=["team"]))
    assert t.wait_idle(5)
    assert [path for path, _ in kube.lists] == [kvpn_path(Kind.VPN_PEER, "team"), kvpn_path(Kind.VPN_PEER, "vpn")]


def test_an_api_error_is_logged_and_the_next_loss_is_handled(kube: FakeKube, caplog: pytest.LogCaptureFixture) -> None:
    wg = RecordingWireGuard()
    t = takeover(kube, wg, device(ALICE))
    kube.down = True
    t.on_server(server_obj(HEALTHY))
    t.on_server(server_obj(A_LOST))
    assert t.wait_idle(5)
    assert wg.calls == []
    assert any(r.message == "takeover: VpnPeers not listed" for r in caplog.records)
    kube.down = False
    t.on_server(server_obj(HEALTHY))
    t.on_server(server_obj(A_LOST))
    assert t.wait_idle(5)
    assert wg.calls == initiated(ALICE, "192.0.2.7:4000")


def test_a_refused_peer_spares_the_others(kube: FakeKube, caplog: pytest.LogCaptureFixture) -> None:
    add_peer(kube, peer("bob", BOB))
    wg = RecordingWireGuard()
    wg.refuse = {ALICE}
    t = takeover(kube, wg, device(ALICE, BOB))
    t.on_server(server_obj(HEALTHY))
    t.on_server(server_obj(A_LOST))
    assert t.wait_idle(5)
    assert wg.calls == initiated(BOB, "192.0.2.7:4000")
    (refused,) = [r for r in caplog.records if r.message == "takeover: handshake not initiated"]
    assert refused.public_key == ALICE  # type: ignore[attr-defined]


def test_the_work_runs_beside_the_watch_thread_one_run_at_a_time_per_server(kube: FakeKube) -> None:
    wg = RecordingWireGuard()
    wg.gate.clear()
    t = takeover(kube, wg, device(ALICE))
    t.on_server(server_obj(HEALTHY))
    t.on_server(server_obj(A_LOST))  # returns while the backend is held
    t.on_server(server_obj(HEALTHY))
    t.on_server(server_obj(A_LOST))  # a second loss during the first run: queued behind it
    assert not t.wait_idle(0.1)
    wg.gate.set()
    assert t.wait_idle(5)
    assert wg.most_active == 1
    assert wg.calls == initiated(ALICE, "192.0.2.7:4000") * 2


def test_a_loss_with_no_gateway_ready_is_taken_over_by_the_first_to_return(kube: FakeKube) -> None:
    wg = RecordingWireGuard()
    t = takeover(kube, wg, device(ALICE))
    nobody = status("203.0.113.1:31820", gw("a", ready=False), gw("b", ready=False))
    t.on_server(server_obj(HEALTHY))
    t.on_server(server_obj(nobody))
    assert t.wait_idle(5)
    assert wg.calls == []
    t.on_server(server_obj(status("203.0.113.2:31820", gw("a", ready=False), gw("b", endpoint="203.0.113.2:31820"))))
    assert t.wait_idle(5)
    assert wg.calls == initiated(ALICE, "192.0.2.7:4000")


def test_an_unreadable_status_is_skipped_without_counting_as_a_loss(kube: FakeKube) -> None:
    wg = RecordingWireGuard()
    t = takeover(kube, wg, device(ALICE))
    t.on_server(server_obj(HEALTHY))
    t.on_server({**server_obj(HEALTHY), "status": {"gateways": [{"node": "a"}]}})  # ready and reason missing
    t.on_server(server_obj(HEALTHY))
    assert t.wait_idle(5)
    assert kube.lists == []


def test_a_missing_device_is_logged(kube: FakeKube, caplog: pytest.LogCaptureFixture) -> None:
    wg = RecordingWireGuard()
    t = takeover(kube, wg, None)
    t.on_server(server_obj(HEALTHY))
    t.on_server(server_obj(A_LOST))
    assert t.wait_idle(5)
    assert wg.calls == []
    assert any(r.message == "takeover: no device on this node" for r in caplog.records)


def test_kube_errors_other_than_unreachable_are_swallowed_too() -> None:
    kube = FakeKube(errors=lambda path: KubeError(403, "forbidden"))
    wg = RecordingWireGuard()
    t = takeover(kube, wg, device(ALICE))
    t.on_server(server_obj(HEALTHY))
    t.on_server(server_obj(A_LOST))
    assert t.wait_idle(5)
    assert wg.calls == []


# --- a gateway cut off ends its silent sessions ------------------------------------------------------


def test_ended_sessions_are_the_same_peers_without_their_keys() -> None:
    """Removed and added back as they were (key, preshared key, allowed IPs, endpoint), no keepalive: no
    session left to pull a laptop back, and nothing started from here."""
    kube = FakeKube()
    alice = ObservedPeer(
        ALICE, preshared_key="P" * 43 + "=", endpoint="192.0.2.7:4000", allowed_ips=("10.8.0.2/32",), last_handshake=T
    )
    wg = RecordingWireGuard()
    wg.refuse = {BOB}
    t = takeover(kube, wg, ObservedDevice(peers={ALICE: alice}))
    assert t.drop_sessions(INTERFACE, [alice, ObservedPeer(BOB, last_handshake=T)]) == 1
    assert wg.calls == [
        (INTERFACE, [PeerConfig(ALICE, remove=True)]),
        (
            INTERFACE,
            [
                PeerConfig(
                    ALICE,
                    preshared_key="P" * 43 + "=",
                    endpoint="192.0.2.7:4000",
                    replace_allowed_ips=True,
                    allowed_ips=("10.8.0.2/32",),
                )
            ],
        ),
    ]


# --- a lost gateway seen in the leases, operator or not ---------------------------------------------


def lease(node: str, *, renewed: float, ready: bool = True, duration: int = 10) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "vpn",
            "labels": {"kvpn.dev/server": "office"},
            "annotations": {"kvpn.dev/gateway": json.dumps({"ready": ready})},
        },
        "spec": {"holderIdentity": node, "renewTime": rfc3339(renewed), "leaseDurationSeconds": duration},
    }


def test_lease_verdicts_say_current_and_ready_per_node() -> None:
    leases = [lease("a", renewed=T - 11), lease("b", renewed=T - 1), lease("c", renewed=T - 1, ready=False)]
    assert lease_verdicts(leases, T) == {SERVER: {"a": False, "b": True, "c": False}}


def test_a_gateway_whose_lease_ran_out_is_taken_over_without_the_operators_status(kube: FakeKube) -> None:
    """The operator ran on the lost node: the server's status still says both are ready. The leases say
    otherwise, and the first ready gateway by name (b, the endpoint's being lost) takes over."""
    wg = RecordingWireGuard()
    t = takeover(kube, wg, device(ALICE))
    t.on_server(server_obj(HEALTHY))
    t.on_leases(SERVER, {"a": True, "b": True})
    assert wg.calls == []
    t.on_leases(SERVER, {"a": False, "b": True})
    assert t.wait_idle(5)
    assert wg.calls == initiated(ALICE, "192.0.2.7:4000")
