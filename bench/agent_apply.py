"""Cost of applying changes with the agent's own modules on a real wireguard-go (figures, not pass/fail).

    .venv/bin/python -m bench.agent_apply [--peers 10 1000 10000] [--reps 30] [--json FILE]

Needs root, wireguard-go and nft. For each N, a fresh network namespace (kvb-<token>-n<N>); this
process enters it, as the agent runs in the node's namespace, so nft and wireguard-go start without
an ``ip netns exec`` in front. Then, with the agent's ``sync`` and its backends (UserspaceLink over
wireguard-go + pyroute2, UapiBackend, Nft):

- cold sync: N peers onto nothing (wireguard-go start, link, one UAPI set, one nft table swap);
- full read-back: link + UAPI ``get=1`` + ``nft -j list table`` parsed, what every sync of a
  stateless agent pays; and the no-op sync (read-back + plan, no action);
- one-peer change, two ways, alternating (each adds one peer): the old path rebuilds the desired
  state from all N+1 Secrets (``build_desired``, which reuses parsed bindings by resourceVersion) and
  syncs against the state the previous sync left but without what it was built from, so it plans
  all N peers and rebuilds the whole ruleset; the agent's path patches the Secret into the server's
  ``DesiredBuilder`` and syncs with the full previous state, planning only the changed peer. Both
  plans are [AddPeer, UpdateFirewall]: one UAPI ``set`` transaction and one nft batch adding the
  peer's map element. "apply" is the time spent in those two calls; "sync" adds the planning (pure
  Python); "total" adds the desired-state step. At the end a full read-back must plan nothing.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.figures import load_average, median_p90
from harness.commands import run
from harness.factories import binding_secret as make_binding_secret
from harness.factories import key
from harness.netlab import Interrupted, Lab, guard
from kvpn_agent.builder import DesiredBuilder
from kvpn_agent.desired import DesiredServer, build_desired
from kvpn_agent.netlink import Netlink
from kvpn_agent.nft import Nft
from kvpn_agent.observed import ObservedDevice, ObservedLink
from kvpn_agent.plan import AddPeer, AllowedIps, UpdateFirewall
from kvpn_agent.processes import WireGuardGo
from kvpn_agent.ruleset import ObservedRuleset, PeerUpdate, Ruleset
from kvpn_agent.sync import NodeState, SyncResult, UapiBackend, sync
from kvpn_agent.wggo import UserspaceLink
from kvpn_agent.wire import DeviceConfig, PeerConfig
from kvpn_core.contract import PeerBinding, encode_data
from kvpn_core.keys import generate_private_key

POOL = "10.64.0.0/16"
ROUTES = ["10.96.0.0/12"]
SERVER = "bench"
TARGET_MS, TARGET_FLAT = 50.0, 2.0

T = TypeVar("T")


def peer_address(i: int) -> str:
    return str(ipaddress.ip_network(POOL).network_address + 2 + i)


def binding_secret(i: int) -> dict[str, Any]:
    """Peer i's binding Secret as the API returns it (with a preshared key, as servers default to)."""
    pb = PeerBinding(
        peer_namespace="team",
        peer_name=f"p{i}",
        peer_uid=f"u{i}",
        public_key=key(),
        preshared_key=key(),
        addresses=[peer_address(i)],
    )
    return make_binding_secret(SERVER, pb, namespace="team", resource_version=str(i + 1))


def server_object() -> dict[str, Any]:
    return {
        "metadata": {"namespace": "team", "name": SERVER},
        "spec": {"addressPool": [POOL], "routes": ROUTES},
        "status": {"addresses": [str(ipaddress.ip_network(POOL).network_address + 1)]},
    }


class Node:
    """The agent's three backends behind one object that adds up the time spent in each kind of call."""

    def __init__(self, link: UserspaceLink, wireguard: UapiBackend, firewall: Nft) -> None:
        self.link, self.wireguard, self.firewall = link, wireguard, firewall
        self.spent: dict[str, float] = {}

    def _timed(self, what: str, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return fn()
        finally:
            self.spent[what] = self.spent.get(what, 0.0) + time.perf_counter() - started

    # LinkBackend
    def observe(self, interface: str) -> ObservedLink | None:
        return self._timed("read link", lambda: self.link.observe(interface))

    def create(self, interface: str) -> None:
        self._timed("wireguard-go start", lambda: self.link.create(interface))

    def delete(self, interface: str) -> None:
        self._timed("link", lambda: self.link.delete(interface))

    def set_mtu(self, interface: str, mtu: int) -> None:
        self._timed("link", lambda: self.link.set_mtu(interface, mtu))

    def add_address(self, interface: str, address: str) -> None:
        self._timed("link", lambda: self.link.add_address(interface, address))

    def remove_address(self, interface: str, address: str) -> None:
        self._timed("link", lambda: self.link.remove_address(interface, address))

    def set_up(self, interface: str) -> None:
        self._timed("link", lambda: self.link.set_up(interface))

    # WireGuardBackend
    def get(self, interface: str) -> ObservedDevice | None:
        return self._timed("read uapi", lambda: self.wireguard.get(interface))

    def set(self, interface: str, device: DeviceConfig | None, peers: Sequence[PeerConfig]) -> None:
        self._timed("apply uapi", lambda: self.wireguard.set(interface, device, peers))

    # Firewall
    def list_table(self) -> ObservedRuleset | None:
        return self._timed("read nft", self.firewall.list_table)

    def replace(self, ruleset: Ruleset) -> None:
        self._timed("apply nft", lambda: self.firewall.replace(ruleset))

    def update(self, ruleset: Ruleset, update: PeerUpdate) -> None:
        self._timed("apply nft", lambda: self.firewall.update(ruleset, update))


@dataclass
class Scale:
    peers: int
    build_desired_ms: float = 0.0
    cold_sync_ms: float = 0.0
    cold_breakdown_ms: dict[str, float] = field(default_factory=dict)
    readback_ms: float = 0.0
    readback_uapi_ms: float = 0.0
    readback_nft_ms: float = 0.0
    noop_sync_ms: float = 0.0
    apply_ms: list[float] = field(default_factory=list)
    apply_uapi_ms: list[float] = field(default_factory=list)
    apply_nft_ms: list[float] = field(default_factory=list)
    sync_ms: list[float] = field(default_factory=list)
    rebuild_ms: list[float] = field(default_factory=list)
    new_apply_ms: list[float] = field(default_factory=list)
    new_sync_ms: list[float] = field(default_factory=list)
    patch_ms: list[float] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)


def ms(seconds: float) -> float:
    return seconds * 1000


def kinds(result: SyncResult) -> list[type]:
    return [type(a) for a in result.actions]


def measure(lab: Lab, n: int, reps: int, warmup: int, readbacks: int) -> Scale:
    scale = Scale(peers=n, load_before=load_average())
    ns = lab.netns(f"n{n}")
    interface = lab.ifname(f"s{len(lab.interfaces)}")
    secrets = [binding_secret(i) for i in range(n)]
    key_secret = {"data": encode_data({"privateKey": generate_private_key()})}
    started = time.perf_counter()
    desired = build_desired(server_object(), key_secret, secrets, interface=interface)
    scale.build_desired_ms = ms(time.perf_counter() - started)
    assert len(desired.peers) == n, desired.problems[:3]

    with lab.inside(ns):
        wggo = WireGuardGo()
        netlink = Netlink()
        lab.closers.extend([wggo.stop_all, netlink.close])
        node = Node(UserspaceLink(netlink, wggo), UapiBackend(), Nft())
        memo = AllowedIps()  # one across the syncs, as the agent's loop keeps it
        state = cold_and_readback(scale, node, desired, readbacks, memo)

        desired = one_peer_changes(
            scale, node, state, secrets, key_secret=key_secret, interface=interface, reps=reps, warmup=warmup, memo=memo
        )

        check = sync([desired], node, node, node, memo=memo)  # a full read-back: the known state told the truth
        assert check.actions == [], f"the node differs from the state the syncs assumed: {check.actions[:3]}"
        device = node.get(interface)
        assert device is not None
        assert len(device.peers) == n + 2 * (warmup + reps)
        listed = run("wg", "show", interface, "peers").stdout.split()
        assert set(listed) == set(device.peers)
        wggo.stop_all()
        netlink.close()
    run("ip", "netns", "del", ns)
    lab.namespaces.remove(ns)
    return scale


def one_peer_changes(
    scale: Scale,
    node: Node,
    state: NodeState,
    secrets: list[dict[str, Any]],
    *,
    key_secret: dict[str, Any],
    interface: str,
    reps: int,
    warmup: int,
    memo: AllowedIps,
) -> DesiredServer:
    """Adds peers one at a time, alternating the old path and the agent's; the last desired state."""
    builder = DesiredBuilder(server_object(), key_secret, secrets, interface=interface)
    added = len(secrets)
    for i in range(warmup + reps):
        # The old path: desired state from all Secrets, a plan over all peers.
        secret = binding_secret(added)
        added += 1
        secrets.append(secret)
        started = time.perf_counter()
        desired = build_desired(server_object(), key_secret, secrets, interface=interface)
        rebuild = time.perf_counter() - started
        result = one_change(node, desired, NodeState(servers=state.servers, ruleset=state.ruleset), memo)
        assert result.state is not None
        state = result.state
        builder.apply({secret["metadata"]["name"]: secret})
        if i >= warmup:
            scale.rebuild_ms.append(ms(rebuild))
            scale.sync_ms.append(ms(result.seconds))
            scale.apply_uapi_ms.append(ms(node.spent["apply uapi"]))
            scale.apply_nft_ms.append(ms(node.spent["apply nft"]))
            scale.apply_ms.append(scale.apply_uapi_ms[-1] + scale.apply_nft_ms[-1])

        # The agent's path: the Secret patched in, a plan over the changed peer only.
        secret = binding_secret(added)
        added += 1
        secrets.append(secret)
        started = time.perf_counter()
        desired = builder.apply({secret["metadata"]["name"]: secret})
        patch = time.perf_counter() - started
        result = one_change(node, desired, state, memo)
        assert result.state is not None
        state = result.state
        if i >= warmup:
            scale.patch_ms.append(ms(patch))
            scale.new_sync_ms.append(ms(result.seconds))
            scale.new_apply_ms.append(ms(node.spent["apply uapi"] + node.spent["apply nft"]))
    assert desired == build_desired(server_object(), key_secret, secrets, interface=interface)
    return desired


def one_change(node: Node, desired: DesiredServer, known: NodeState, memo: AllowedIps) -> SyncResult:
    node.spent.clear()
    result = sync([desired], node, node, node, known=known, memo=memo)
    assert kinds(result) == [AddPeer, UpdateFirewall], kinds(result)
    assert not {"read uapi", "read nft", "read link"} & node.spent.keys(), node.spent
    return result


def cold_and_readback(scale: Scale, node: Node, desired: DesiredServer, readbacks: int, memo: AllowedIps) -> NodeState:
    """The cold sync of all peers, the full read-back (several times) and one no-op sync; its state."""
    interface = desired.interface
    cold = sync([desired], node, node, node, memo=memo)
    scale.cold_sync_ms = ms(cold.seconds)
    scale.cold_breakdown_ms = {k: ms(v) for k, v in node.spent.items()}

    totals, uapi, nft = [], [], []
    for _ in range(readbacks):
        node.spent.clear()
        started = time.perf_counter()
        node.observe(interface)
        device = node.get(interface)
        table = node.list_table()
        totals.append(ms(time.perf_counter() - started))
        uapi.append(ms(node.spent["read uapi"]))
        nft.append(ms(node.spent["read nft"]))
        assert device is not None
        assert len(device.peers) == scale.peers
        assert table is not None
        assert len(table.peer_map) == scale.peers
    scale.readback_ms = statistics.median(totals)
    scale.readback_uapi_ms, scale.readback_nft_ms = statistics.median(uapi), statistics.median(nft)

    noop = sync([desired], node, node, node, memo=memo)
    assert noop.actions == [], noop.actions[:3]
    assert noop.state is not None
    scale.noop_sync_ms = ms(noop.seconds)
    return noop.state


def fmt(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def report(scales: list[Scale], reps: int) -> str:
    lines = [
        f"One-peer add, {reps} repetitions of each path, ms. Old: build_desired from all Secrets + sync planning"
        " all peers; agent: DesiredBuilder.apply + sync planning the changed peer (both with the known state):",
        "",
        "| peers on the server | apply median (old / agent) | UAPI set median | nft element median"
        " | old: rebuild desired | old: sync median / p90 | old: total median / p90"
        " | agent: patch desired | agent: sync median / p90 | agent: total median / p90 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scales:
        s50, s90 = median_p90(s.sync_ms)
        t50, t90 = median_p90([a + b for a, b in zip(s.rebuild_ms, s.sync_ms, strict=True)])
        n50, n90 = median_p90(s.new_sync_ms)
        nt50, nt90 = median_p90([a + b for a, b in zip(s.patch_ms, s.new_sync_ms, strict=True)])
        u50, f50 = statistics.median(s.apply_uapi_ms), statistics.median(s.apply_nft_ms)
        lines.append(
            f"| {s.peers:,} | {fmt(statistics.median(s.apply_ms))} / {fmt(statistics.median(s.new_apply_ms))}"
            f" | {fmt(u50)} | {fmt(f50)} | {fmt(statistics.median(s.rebuild_ms))} | {fmt(s50)} / {fmt(s90)}"
            f" | {fmt(t50)} / {fmt(t90)} | {fmt(statistics.median(s.patch_ms))} | {fmt(n50)} / {fmt(n90)}"
            f" | {fmt(nt50)} / {fmt(nt90)} |"
        )
    lines += [
        "",
        "Full syncs and read-back, ms:",
        "",
        "| peers | build desired from Secrets | cold sync | of which wireguard-go start / UAPI set / nft swap"
        " | full read-back (UAPI get / nft list) | no-op sync |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scales:
        b = s.cold_breakdown_ms
        parts = " / ".join(fmt(b.get(k, 0.0)) for k in ("wireguard-go start", "apply uapi", "apply nft"))
        lines.append(
            f"| {s.peers:,} | {fmt(s.build_desired_ms)} | {fmt(s.cold_sync_ms)} | {parts}"
            f" | {fmt(s.readback_ms)} ({fmt(s.readback_uapi_ms)} / {fmt(s.readback_nft_ms)}) | {fmt(s.noop_sync_ms)} |"
        )
    by_n = {s.peers: s for s in scales}
    if by_n:
        small, big = by_n[min(by_n)], by_n[max(by_n)]

        def total(s: Scale) -> float:
            return statistics.median(a + b for a, b in zip(s.patch_ms, s.new_sync_ms, strict=True))

        ratio = total(big) / total(small)
        worst = max(total(s) for s in scales)
        lines += [
            "",
            f"Targets: agent total at {big.peers:,} / at {small.peers:,} = {ratio:.2f} (flat: <= {TARGET_FLAT});"
            f" worst agent total median {fmt(worst)} ms (< {TARGET_MS:.0f} ms).",
            "Load average (1 min) before each N: " + ", ".join(f"{s.peers:,}: {s.load_before[0]:.2f}" for s in scales),
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_apply", description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[10, 1_000, 10_000])
    parser.add_argument("--reps", type=int, default=30, help="measured one-peer changes per N (>= 25)")
    parser.add_argument("--warmup", type=int, default=2, help="one-peer changes before measuring")
    parser.add_argument("--readbacks", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--max-seconds", type=int, default=900, help="hard limit for the whole run")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, TUN, nftables)", file=sys.stderr)
        return 2
    lab = Lab("kvb-")
    scales: list[Scale] = []
    try:
        with guard(args.max_seconds):
            for n in args.peers:
                print(f"N={n:,} ...", file=sys.stderr, flush=True)
                scales.append(measure(lab, n, args.reps, args.warmup, args.readbacks))
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"interrupted ({type(exc).__name__} {exc}); removing everything it started", file=sys.stderr)
        return 130
    finally:
        lab.close()
    print(report(scales, args.reps))
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in scales], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
