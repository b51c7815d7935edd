"""Kernel WireGuard vs wireguard-go, side by side in one run: throughput and the cost of a one-peer change.

    sudo .venv/bin/python -m harness.vm --timeout 900 -- python -m bench.backends [--json FILE]

Meant for the VM tier's guest (Debian 12's kernel, which has the module; these machines' kernel has
none), where Python runs 10-20 times slower and the CPU is emulated: absolute numbers mean little
there, so the table shows ratios measured in the same run. Needs root, wireguard-go, wg, nft, iperf3.

- Throughput: iperf3 TCP (-P 1) from a laptop namespace to an address on the node, through (a) kernel
  WireGuard at both ends, (b) wireguard-go at both ends, (c) the bare veth underneath. The node's
  interface is programmed by the agent's own ``sync`` with that backend (link, key, peer, table
  ``inet kvpn`` filtering the traffic); the laptop's by hand, as wg-quick would. Rounds alternate
  (a), (b), (c); medians.
- One-peer change: a device holding N peers (10, 1,000, 10,000: put there by one batched set), then
  one peer added per call of the backend's ``set``, as the agent's per-change path does (its nft
  element update is the same for both backends and left out); and the full read-back of N peers.
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.figures import load_average
from bench.throughput import (
    LAPTOP_ADDRESS,
    LISTEN_PORT,
    MTU,
    POOL,
    ROUTES,
    TARGET,
    UNDERLAY_LAPTOP,
    UNDERLAY_NODE,
    Keys,
    desired_server,
    iperf3,
    iperf3_server,
    write_conf,
)
from harness.commands import run
from harness.factories import key
from harness.netlab import Interrupted, Lab, guard, wait_for
from kvpn_agent.kernel import KernelLink, KernelWireGuard
from kvpn_agent.linux import SOCKET_DIR
from kvpn_agent.netlink import Netlink
from kvpn_agent.nft import Nft
from kvpn_agent.processes import WireGuardGo
from kvpn_agent.sync import LinkBackend, UapiBackend, WireGuardBackend, sync
from kvpn_agent.wggo import UserspaceLink
from kvpn_agent.wire import DeviceConfig, PeerConfig

REQUIRED = ("ip", "ss", "nft", "wireguard-go", "wg", "iperf3")
BACKENDS = ("kernel", "userspace")
LABEL = {"kernel": "kernel WireGuard", "userspace": "wireguard-go"}


def backends(backend: str, ns: str | None, lab: Lab) -> tuple[LinkBackend, WireGuardBackend]:
    netlink = Netlink(netns=ns)
    lab.closers.append(netlink.close)
    if backend == "kernel":
        wireguard = KernelWireGuard(ns)
        lab.closers.append(wireguard.close)
        return KernelLink(netlink), wireguard
    wggo = WireGuardGo(prefix=("ip", "netns", "exec", ns) if ns else ())
    lab.closers.append(wggo.stop_all)
    return UserspaceLink(netlink, wggo), UapiBackend()


# --- throughput ------------------------------------------------------------------------------------


@dataclass
class Pair:
    backend: str
    node: str
    laptop: str
    server_if: str
    laptop_if: str


def make_pair(lab: Lab, backend: str) -> Pair:
    tag = backend[0]
    node, laptop = lab.netns(f"{tag}node"), lab.netns(f"{tag}lap")
    lab.veth(node, f"{UNDERLAY_NODE}/24", laptop, f"{UNDERLAY_LAPTOP}/24", role=tag.upper())
    run("ip", "-n", node, "addr", "add", f"{TARGET}/32", "dev", "lo")
    return Pair(backend, node, laptop, lab.ifname(f"{tag}s"), lab.ifname(f"{tag}l"))


def server_by_agent(lab: Lab, pair: Pair, keys: Keys) -> None:
    desired = desired_server(keys, pair.server_if)
    link, wireguard = backends(pair.backend, pair.node, lab)
    firewall = Nft(prefix=("ip", "netns", "exec", pair.node))
    result = sync([desired], link, wireguard, firewall)
    assert not result.errors, result.errors
    assert sync([desired], link, wireguard, firewall).actions == []


def laptop_up(lab: Lab, tmp: Path, pair: Pair, keys: Keys) -> None:
    """The laptop's end, by hand: a link of the pair's kind, `wg setconf`, address, MTU, route."""
    if pair.backend == "kernel":
        run("ip", "-n", pair.laptop, "link", "add", pair.laptop_if, "type", "wireguard")
    else:
        lab.spawn(pair.laptop, "wireguard-go", "-f", pair.laptop_if, env={**os.environ, "LOG_LEVEL": "error"})
        wait_for((SOCKET_DIR / f"{pair.laptop_if}.sock").is_socket, 30, f"wireguard-go {pair.laptop_if}")
    conf = write_conf(
        tmp,
        pair.laptop_if,
        f"[Interface]\nPrivateKey = {keys.laptop_private}\n\n[Peer]\nPublicKey = {keys.server_public}\n"
        f"PresharedKey = {keys.preshared}\nEndpoint = {UNDERLAY_NODE}:{LISTEN_PORT}\n"
        f"AllowedIPs = {POOL}, {ROUTES}\nPersistentKeepalive = 25\n",
    )
    run("ip", "netns", "exec", pair.laptop, "wg", "setconf", pair.laptop_if, str(conf))
    run("ip", "-n", pair.laptop, "addr", "add", f"{LAPTOP_ADDRESS}/24", "dev", pair.laptop_if)
    run("ip", "-n", pair.laptop, "link", "set", pair.laptop_if, "mtu", str(MTU), "up")
    run("ip", "-n", pair.laptop, "route", "add", ROUTES, "dev", pair.laptop_if)

    def shaken() -> bool:
        out = run("ip", "netns", "exec", pair.laptop, "wg", "show", pair.laptop_if, "latest-handshakes").stdout
        return any(int(stamp) > 0 for _, stamp in (line.split() for line in out.splitlines()))

    wait_for(shaken, 30, f"a handshake of {pair.laptop_if}")


def throughput(lab: Lab, tmp: Path, rounds: int, seconds: int, omit: int) -> dict[str, list[float]]:
    pairs = {b: make_pair(lab, b) for b in BACKENDS}
    for pair in pairs.values():
        keys = Keys()
        server_by_agent(lab, pair, keys)
        laptop_up(lab, tmp, pair, keys)
        iperf3_server(lab, pair.node)
    plan = [(b, pairs[b].laptop, TARGET) for b in BACKENDS] + [("veth", pairs["kernel"].laptop, UNDERLAY_NODE)]
    runs: dict[str, list[float]] = {path: [] for path, _, _ in plan}
    for i in range(rounds):
        for path, ns, address in plan:
            result = iperf3(ns, address, seconds, omit)
            runs[path].append(result["gbit_s"])
            print(f"round {i + 1}/{rounds} {path}: {result['gbit_s']:.3f} Gbit/s", file=sys.stderr, flush=True)
    return runs


# --- one-peer changes --------------------------------------------------------------------------------


@dataclass
class Apply:
    backend: str
    peers: int
    fill_ms: float = 0.0
    add_ms: list[float] = field(default_factory=list)
    read_ms: float = 0.0


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def address(i: int) -> str:
    return f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}/32"


def apply_costs(lab: Lab, backend: str, n: int, reps: int) -> Apply:
    ns = lab.netns(f"{backend[0]}{n}")
    interface = lab.ifname(f"{backend[0]}{len(lab.interfaces)}")
    link, wireguard = backends(backend, ns, lab)
    link.create(interface)
    wireguard.set(interface, DeviceConfig(private_key=key(), listen_port=51820), [])
    figures = Apply(backend, n)
    batch = [PeerConfig(public_key=key(), preshared_key=key(), allowed_ips=(address(i),)) for i in range(n)]
    figures.fill_ms = timed(lambda: wireguard.set(interface, None, batch))
    for i in range(reps):
        peer = PeerConfig(
            public_key=key(), preshared_key=key(), replace_allowed_ips=True, allowed_ips=(address(n + i),)
        )
        figures.add_ms.append(timed(lambda peer=peer: wireguard.set(interface, None, [peer])))  # type: ignore[misc]
    device: list[Any] = []
    figures.read_ms = timed(lambda: device.append(wireguard.get(interface)))
    assert device[0] is not None
    assert len(device[0].peers) == n + reps
    link.delete(interface)
    return figures


# --- the report ------------------------------------------------------------------------------------


@dataclass
class Figures:
    kernel: str
    rounds: int
    seconds: int
    reps: int
    load_before: tuple[float, float, float]
    throughput: dict[str, list[float]] = field(default_factory=dict)
    applies: list[Apply] = field(default_factory=list)


def fmt(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def report(f: Figures) -> str:
    med = {path: statistics.median(runs) for path, runs in f.throughput.items()}
    veth = med["veth"]
    lines = [
        f"Kernel {f.kernel} under software emulation (qemu TCG, 2 vCPUs): ratios measured in one run;"
        " absolute figures are the emulator's.",
        "",
        "| measure | kernel WireGuard | wireguard-go | kernel ÷ wireguard-go |",
        "|---|---:|---:|---:|",
        f"| iperf3 TCP through the tunnel, median of {f.rounds} x {f.seconds} s, share of the bare veth"
        f" | {med['kernel'] / veth:.1%} | {med['userspace'] / veth:.1%} | {med['kernel'] / med['userspace']:.2f} |",
    ]
    by = {(a.backend, a.peers): a for a in f.applies}
    for n in sorted({a.peers for a in f.applies}):
        k, u = by[("kernel", n)], by[("userspace", n)]
        km, um = statistics.median(k.add_ms), statistics.median(u.add_ms)
        lines.append(
            f"| add one peer at {n:,} peers, median of {f.reps} (ms) | {fmt(km)} | {fmt(um)} | {km / um:.2f} |"
        )
    for n in sorted({a.peers for a in f.applies}):
        k, u = by[("kernel", n)], by[("userspace", n)]
        lines.append(
            f"| read back {n:,} peers (ms) | {fmt(k.read_ms)} | {fmt(u.read_ms)} | {k.read_ms / u.read_ms:.2f} |"
        )
    for n in sorted({a.peers for a in f.applies}):
        k, u = by[("kernel", n)], by[("userspace", n)]
        lines.append(
            f"| set {n:,} peers in one call (ms) | {fmt(k.fill_ms)} | {fmt(u.fill_ms)} | {k.fill_ms / u.fill_ms:.2f} |"
        )
    small, big = min(a.peers for a in f.applies), max(a.peers for a in f.applies)
    lines += [
        "",
        "Flatness of a one-peer add, median at {:,} ÷ at {:,} peers: kernel {:.2f}, wireguard-go {:.2f}.".format(
            big,
            small,
            statistics.median(by[("kernel", big)].add_ms) / statistics.median(by[("kernel", small)].add_ms),
            statistics.median(by[("userspace", big)].add_ms) / statistics.median(by[("userspace", small)].add_ms),
        ),
        "iperf3 medians, Gbit/s (emulated): "
        + ", ".join(f"{LABEL.get(p, 'bare veth')} {med[p]:.3f}" for p in ("kernel", "userspace", "veth")),
        f"Load average before: {' '.join(f'{x:.2f}' for x in f.load_before)}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[10, 1_000, 10_000])
    parser.add_argument("--reps", type=int, default=25, help="one-peer adds per backend and N")
    parser.add_argument("--rounds", type=int, default=3, help="iperf3 runs of each path")
    parser.add_argument("--seconds", type=int, default=5, help="iperf3 --time of each run")
    parser.add_argument("--omit", type=int, default=1, help="iperf3 --omit (slow start)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--max-seconds", type=int, default=840, help="hard limit for the whole run")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, TUN, nftables)", file=sys.stderr)
        return 2
    if missing := [b for b in REQUIRED if shutil.which(b) is None]:
        print(f"missing {', '.join(missing)}: run `make setup`", file=sys.stderr)
        return 2
    if not Path("/sys/module/wireguard").exists() and run("modprobe", "wireguard", check=False).returncode != 0:
        print("no WireGuard module in this kernel: run it in the VM tier (see the docstring)", file=sys.stderr)
        return 2
    lab = Lab("kvb-")
    figures = Figures(os.uname().release, args.rounds, args.seconds, args.reps, load_average())
    started = time.monotonic()
    try:
        with guard(args.max_seconds), tempfile.TemporaryDirectory(prefix="kvb-") as tmp:
            figures.throughput = throughput(lab, Path(tmp), args.rounds, args.seconds, args.omit)
            for n in args.peers:
                for backend in BACKENDS:
                    print(f"{backend}: N={n:,} ...", file=sys.stderr, flush=True)
                    figures.applies.append(apply_costs(lab, backend, n, args.reps))
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
