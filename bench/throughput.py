"""iperf3 through wireguard-go configured by the agent, by hand, and over the bare veth (figures, not pass/fail).

    .venv/bin/python -m bench.throughput [--rounds 3] [--seconds 5] [--json FILE]

Needs root, wireguard-go, wg, nft and iperf3. Two pairs of network namespaces, each a node and a
laptop joined by a veth (kvb-<token>-{a,h}{node,lap}):

(a) agent: the node's server interface is programmed by the agent's own modules (``sync`` with
    UserspaceLink/wireguard-go, UapiBackend and Nft), so the table ``inet kvpn`` filters the
    traffic as in production (conntrack, the per-peer verdict map, the routes set);
(b) hand: the same wireguard-go on the node configured with ``wg setconf`` and ``ip`` only, same
    MTU (1420), same key shape (private key, peer with a preshared key and a /32), no nft table;
(c) veth: the bare veth of pair (b), laptop to node.

In both tunnels the laptop is a wireguard-go configured by hand (as wg-quick would) and iperf3's
server listens on the node, reached through the tunnel at an address inside the server's routes
(172.31.238.1 on the node's loopback). One iperf3 TCP run, -P 1, per measurement; each round runs
(a), (b), (c) in turn, so (a) and (b) alternate and the report shows medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.figures import load_average
from harness.commands import run
from harness.netlab import Interrupted, Lab, guard, wait_for
from kvpn_agent.desired import DesiredServer, build_desired
from kvpn_agent.linux import SOCKET_DIR
from kvpn_agent.netlink import Netlink
from kvpn_agent.nft import Nft
from kvpn_agent.plan import AddPeer, ReplaceFirewall
from kvpn_agent.processes import WireGuardGo
from kvpn_agent.sync import UapiBackend, sync
from kvpn_agent.wggo import UserspaceLink
from kvpn_core.contract import PeerBinding, encode_data
from kvpn_core.keys import generate_preshared_key, generate_private_key, public_key_of

REQUIRED = ("ip", "ss", "nft", "wireguard-go", "wg", "iperf3")
UNDERLAY_NODE, UNDERLAY_LAPTOP = "192.168.238.1", "192.168.238.2"
POOL, SERVER_ADDRESS, LAPTOP_ADDRESS = "10.238.0.0/24", "10.238.0.1", "10.238.0.2"
ROUTES = "172.31.238.0/24"
TARGET = "172.31.238.1"
LISTEN_PORT, IPERF_PORT, MTU = 51820, 5201, 1420
TARGET_RATIO = 0.95


@dataclass
class Keys:
    server_private: str = field(default_factory=generate_private_key, repr=False)
    laptop_private: str = field(default_factory=generate_private_key, repr=False)
    preshared: str = field(default_factory=generate_preshared_key, repr=False)

    @property
    def server_public(self) -> str:
        return public_key_of(self.server_private)

    @property
    def laptop_public(self) -> str:
        return public_key_of(self.laptop_private)


@dataclass
class Pair:
    node: str
    laptop: str
    server_if: str
    laptop_if: str


def write_conf(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.conf"
    path.touch(mode=0o600)
    path.write_text(text)
    return path


def start_wireguard_go(lab: Lab, ns: str, interface: str) -> None:
    lab.spawn(ns, "wireguard-go", "-f", interface, env={**os.environ, "LOG_LEVEL": "error"})
    wait_for((SOCKET_DIR / f"{interface}.sock").is_socket, 5, f"wireguard-go {interface}")


def make_pair(lab: Lab, tag: str) -> Pair:
    node, laptop = lab.netns(f"{tag}node"), lab.netns(f"{tag}lap")
    lab.veth(node, f"{UNDERLAY_NODE}/24", laptop, f"{UNDERLAY_LAPTOP}/24", role=tag.upper())
    run("ip", "-n", node, "addr", "add", f"{TARGET}/32", "dev", "lo")
    return Pair(node, laptop, lab.ifname(f"{tag}s"), lab.ifname(f"{tag}l"))


def laptop_up(lab: Lab, tmp: Path, pair: Pair, keys: Keys) -> None:
    """The laptop's tunnel, configured as wg-quick would: wg setconf, address, MTU, route to the routes."""
    start_wireguard_go(lab, pair.laptop, pair.laptop_if)
    conf = write_conf(
        tmp,
        pair.laptop_if,
        "[Interface]\n"
        f"PrivateKey = {keys.laptop_private}\n\n"
        "[Peer]\n"
        f"PublicKey = {keys.server_public}\n"
        f"PresharedKey = {keys.preshared}\n"
        f"Endpoint = {UNDERLAY_NODE}:{LISTEN_PORT}\n"
        f"AllowedIPs = {POOL}, {ROUTES}\n"
        "PersistentKeepalive = 25\n",
    )
    ns = ("ip", "netns", "exec", pair.laptop)
    run(*ns, "wg", "setconf", pair.laptop_if, str(conf))
    run("ip", "-n", pair.laptop, "addr", "add", f"{LAPTOP_ADDRESS}/24", "dev", pair.laptop_if)
    run("ip", "-n", pair.laptop, "link", "set", pair.laptop_if, "mtu", str(MTU), "up")
    run("ip", "-n", pair.laptop, "route", "add", ROUTES, "dev", pair.laptop_if)


def server_by_hand(lab: Lab, tmp: Path, pair: Pair, keys: Keys) -> None:
    start_wireguard_go(lab, pair.node, pair.server_if)
    conf = write_conf(
        tmp,
        pair.server_if,
        "[Interface]\n"
        f"PrivateKey = {keys.server_private}\n"
        f"ListenPort = {LISTEN_PORT}\n\n"
        "[Peer]\n"
        f"PublicKey = {keys.laptop_public}\n"
        f"PresharedKey = {keys.preshared}\n"
        f"AllowedIPs = {LAPTOP_ADDRESS}/32\n",
    )
    run("ip", "netns", "exec", pair.node, "wg", "setconf", pair.server_if, str(conf))
    run("ip", "-n", pair.node, "addr", "add", f"{SERVER_ADDRESS}/24", "dev", pair.server_if)
    run("ip", "-n", pair.node, "link", "set", pair.server_if, "mtu", str(MTU), "up")


def desired_server(keys: Keys, interface: str) -> DesiredServer:
    """The benchmark's server with its one laptop peer, as the agent builds it from the API's objects."""
    server = {
        "metadata": {"namespace": "team", "name": "bench"},
        "spec": {"addressPool": [POOL], "listenPort": LISTEN_PORT, "routes": [ROUTES], "mtu": MTU},
        "status": {"addresses": [SERVER_ADDRESS], "routes": [ROUTES]},
    }
    pb = PeerBinding(
        peer_namespace="team",
        peer_name="laptop",
        peer_uid="uid-laptop",
        public_key=keys.laptop_public,
        preshared_key=keys.preshared,
        addresses=[LAPTOP_ADDRESS],
    )
    binding = {
        "metadata": {"name": pb.secret_name("bench"), "creationTimestamp": "2024-01-01T00:00:00Z"},
        "data": encode_data(pb.to_string_data()),
    }
    key_secret = {"data": encode_data({"privateKey": keys.server_private})}
    return build_desired(server, key_secret, [binding], interface=interface)


def server_by_agent(lab: Lab, pair: Pair, keys: Keys) -> list[str]:
    """The node's side through the agent's sync; returns the actions it ran."""
    desired = desired_server(keys, pair.server_if)
    assert len(desired.peers) == 1, desired.problems
    prefix = ("ip", "netns", "exec", pair.node)
    wggo = WireGuardGo(prefix=prefix)
    netlink = Netlink(netns=pair.node)
    lab.closers.extend([wggo.stop_all, netlink.close])
    link, firewall = UserspaceLink(netlink, wggo), Nft(prefix=prefix)
    result = sync([desired], link, UapiBackend(), firewall)
    kinds = [type(a).__name__ for a in result.actions]
    assert AddPeer.__name__ in kinds, kinds
    assert ReplaceFirewall.__name__ in kinds, kinds
    assert sync([desired], link, UapiBackend(), firewall).actions == []  # what it wrote reads back the same
    return kinds


def iperf3_server(lab: Lab, ns: str) -> None:
    lab.spawn(ns, "iperf3", "--server", "--port", str(IPERF_PORT))

    def listening() -> bool:
        out = run("ip", "netns", "exec", ns, "ss", "-Hltn", f"sport = :{IPERF_PORT}", check=False).stdout
        return bool(out.strip())

    wait_for(listening, 5, f"iperf3 server in {ns}")


def tunnel_ready(pair: Pair) -> None:
    """The laptop's first handshake (PersistentKeepalive starts it at once) done before iperf3 starts."""

    def shaken() -> bool:
        out = run("ip", "netns", "exec", pair.laptop, "wg", "show", pair.laptop_if, "latest-handshakes").stdout
        return any(int(stamp) > 0 for _, stamp in (line.split() for line in out.splitlines()))

    wait_for(shaken, 15, f"a handshake of {pair.laptop_if}")


def iperf3(ns: str, address: str, seconds: int, omit: int) -> dict[str, Any]:
    argv = ["iperf3", "--client", address, "--port", str(IPERF_PORT), "--time", str(seconds), "--omit", str(omit)]
    proc = run(
        "ip", "netns", "exec", ns, *argv, "--parallel", "1", "--json", check=False, timeout=seconds + omit + 30
    )  # fmt: skip
    result: dict[str, Any] = json.loads(proc.stdout or "{}")
    if proc.returncode != 0 or "error" in result:
        raise RuntimeError(f"iperf3 to {address} from {ns}: {result.get('error') or proc.stderr.strip()}")
    end = result["end"]
    return {
        "gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
        "sender_gbit_s": end["sum_sent"]["bits_per_second"] / 1e9,
        "retransmits": end["sum_sent"].get("retransmits", 0),
        "cpu_sender": end.get("cpu_utilization_percent", {}).get("host_total"),
    }


@dataclass
class Figures:
    seconds: int
    omit: int
    rounds: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    agent_actions: list[str] = field(default_factory=list)
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"agent": [], "hand": [], "veth": []})

    def gbit(self, path: str) -> list[float]:
        return [r["gbit_s"] for r in self.runs[path]]

    def median(self, path: str) -> float:
        return statistics.median(self.gbit(path))


LABELS = {
    "agent": "(a) wireguard-go, node configured by the agent (sync: UAPI + nft)",
    "hand": "(b) wireguard-go, node configured by hand (`wg setconf`, `ip`)",
    "veth": "(c) bare veth underneath",
}


def report(f: Figures) -> str:
    veth = f.median("veth")
    lines = [
        f"iperf3 TCP, -P 1, {f.seconds} s (+{f.omit} s omitted) per run, {f.rounds} rounds of (a), (b), (c):",
        "",
        "| path | runs, Gbit/s | median Gbit/s | retransmits (median) | of veth |",
        "|---|---|---:|---:|---:|",
    ]
    for path, label in LABELS.items():
        runs = " ".join(f"{g:.3f}" for g in f.gbit(path))
        retr = statistics.median(r["retransmits"] for r in f.runs[path])
        lines.append(f"| {label} | {runs} | {f.median(path):.3f} | {retr:g} | {f.median(path) / veth:.1%} |")
    ratio = f.median("agent") / f.median("hand")
    lines += [
        "",
        f"agent/hand = {ratio:.3f} (target >= {TARGET_RATIO}); tunnel/veth = {f.median('hand') / veth:.4f} (hand),"
        f" {f.median('agent') / veth:.4f} (agent).",
        f"Load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in f.load_before)};"
        f" after: {' '.join(f'{x:.2f}' for x in f.load_after)}.",
    ]
    return "\n".join(lines)


def measure(lab: Lab, tmp: Path, rounds: int, seconds: int, omit: int) -> Figures:
    agent, hand = make_pair(lab, "a"), make_pair(lab, "h")
    agent_keys, hand_keys = Keys(), Keys()
    figures = Figures(seconds=seconds, omit=omit, rounds=rounds, load_before=load_average())
    figures.agent_actions = server_by_agent(lab, agent, agent_keys)
    server_by_hand(lab, tmp, hand, hand_keys)
    for pair, keys in ((agent, agent_keys), (hand, hand_keys)):
        laptop_up(lab, tmp, pair, keys)
        iperf3_server(lab, pair.node)
        tunnel_ready(pair)
    plan = (("agent", agent.laptop, TARGET), ("hand", hand.laptop, TARGET), ("veth", hand.laptop, UNDERLAY_NODE))
    for i in range(rounds):
        for path, ns, address in plan:
            result = iperf3(ns, address, seconds, omit)
            figures.runs[path].append(result)
            print(f"round {i + 1}/{rounds} {path}: {result['gbit_s']:.3f} Gbit/s", file=sys.stderr, flush=True)
    figures.load_after = load_average()
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each path (>= 3)")
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 --time of each run")
    parser.add_argument("--omit", type=int, default=1, help="iperf3 --omit: first seconds not counted (slow start)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--max-seconds", type=int, default=600, help="hard limit for the whole run")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, TUN, nftables)", file=sys.stderr)
        return 2
    if missing := [b for b in REQUIRED if shutil.which(b) is None]:
        print(f"missing {', '.join(missing)}: run `make setup`", file=sys.stderr)
        return 2
    lab = Lab("kvb-")
    started = time.monotonic()
    try:
        with guard(args.max_seconds), tempfile.TemporaryDirectory(prefix="kvb-") as tmp:
            figures = measure(lab, Path(tmp), args.rounds, args.seconds, args.omit)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"interrupted ({type(exc).__name__} {exc}); removing everything it started", file=sys.stderr)
        return 130
    finally:
        lab.close()
    print(report(figures))
    print(f"({time.monotonic() - started:.0f} s in all)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
