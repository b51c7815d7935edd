"""kvpn on the real-node cluster (harness/world.py): the figures a platform team and its developers see.

    sudo .venv/bin/python -m bench.cluster [--peers 1 100] [--rounds 20] [--json FILE] [--skip-lifecycle]

- **Apply to Ready, apply to live.** VpnPeers with their own public key (what `kubectl vpn join`
  creates) in the developers' namespace: time from the create call's return to the operator's
  Ready=True (a watch), and to the key being on the server's interface of *every* gateway node (the
  nodes' UAPI sockets, polled every 10 ms). N=1: one peer at a time, `--rounds` times; N>1: N at
  once from 8 threads. p50/p99 over the peers.
- **Pods coming and going.** The gaps a laptop sees (an open TCP connection to hello's echo port, and
  new HTTP requests in a loop) while the gateway node's agent pod is deleted, the chart is upgraded
  to a new image tag, the operator pod is deleted, and the node is cordoned and its agent evicted.
- **Memory.** RSS of each node's containerd, kubelet and kube-proxy, of each control-plane process,
  and of each kvpn pod (the processes in its cgroup), read from /proc.

The cluster is built and removed by the run (about a minute warm; the first run also builds the image).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, watch

from harness.cluster import Node
from harness.world import CHART_NAMESPACE, ECHO_PORT, PEER_NAMESPACE, SERVER, TcpProbe, TrafficLoop, World
from kvpn_core.api import GROUP, VERSION
from kvpn_core.keys import generate_private_key, public_key_of

Obj = dict[str, Any]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Latency:
    """Apply → Ready and apply → live on every gateway, for one N."""

    n: int
    rounds: int
    ready_p50: float = math.nan
    ready_p99: float = math.nan
    live_p50: float = math.nan
    live_p99: float = math.nan
    missing: int = 0


class ReadyWatch:
    """Records when each VpnPeer of the namespace is first seen Ready=True (this process's clock)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.ready_at: dict[str, float] = {}
        self._stop = threading.Event()
        listed = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "vpnpeers")
        self._version = listed["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            stream = watch.Watch().stream(
                self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, "vpnpeers",
                resource_version=self._version, timeout_seconds=5,
            )  # fmt: skip
            for event in stream:
                obj: Obj = event["object"]
                seen = time.monotonic()
                self._version = obj["metadata"]["resourceVersion"]
                conditions = (obj.get("status") or {}).get("conditions") or []
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                    self.ready_at.setdefault(obj["metadata"]["name"], seen)

    def stop(self) -> None:
        self._stop.set()


class LiveWatch:
    """Records when each public key is first on the server's interface of every gateway node."""

    def __init__(self, world: World, server: str = SERVER, period: float = 0.01) -> None:
        self.world, self.server, self.period = world, server, period
        self.first_seen: dict[str, dict[str, float]] = {n.role: {} for n in world.nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        clients = {n.role: self.world.uapi(n, self.server) for n in self.world.nodes}
        while not self._stop.wait(self.period):
            for role, uapi in clients.items():
                seen = time.monotonic()
                for key in uapi.get().peers:
                    self.first_seen[role].setdefault(key, seen)

    def live_at(self, key: str) -> float | None:
        times = [seen.get(key) for seen in self.first_seen.values()]
        return None if any(t is None for t in times) else max(t for t in times if t is not None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def measure_latency(world: World, n: int, rounds: int) -> Latency:
    api = world.cluster.api
    custom = client.CustomObjectsApi(api)
    ready = ReadyWatch(api, PEER_NAMESPACE)
    live = LiveWatch(world)
    created_at: dict[str, float] = {}
    keys: dict[str, str] = {}

    def create(name: str) -> None:
        key = public_key_of(generate_private_key())
        keys[name] = key
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "VpnPeer",
            "metadata": {"name": name},
            "spec": {"serverRef": {"name": SERVER, "namespace": CHART_NAMESPACE}, "publicKey": key},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, PEER_NAMESPACE, "vpnpeers", body)
        created_at[name] = time.monotonic()

    def settled(names: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(nm in ready.ready_at and live.live_at(keys[nm]) for nm in names):
                return
            time.sleep(0.02)

    tag = secrets.token_hex(2)
    names: list[str] = []
    try:
        if n == 1:
            for i in range(rounds):
                name = f"bench-{tag}-{i}"
                names.append(name)
                create(name)
                settled([name], 30)
        else:
            names = [f"bench-{tag}-{i}" for i in range(n)]
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(create, names))
            settled(names, 120)
    finally:
        ready.stop()
        live.stop()
    to_ready = [ready.ready_at[nm] - created_at[nm] for nm in names if nm in ready.ready_at]
    to_live = [t - created_at[nm] for nm in names if (t := live.live_at(keys[nm])) is not None]
    for name in names:
        custom.delete_namespaced_custom_object(GROUP, VERSION, PEER_NAMESPACE, "vpnpeers", name)
    return Latency(
        n=n,
        rounds=rounds if n == 1 else 1,
        ready_p50=percentile(to_ready, 50),
        ready_p99=percentile(to_ready, 99),
        live_p50=percentile(to_live, 50),
        live_p99=percentile(to_live, 99),
        missing=len(names) - min(len(to_ready), len(to_live)),
    )


@dataclass
class Gap:
    event: str
    took_s: float
    tcp_broken: str | None
    tcp_longest_silence_s: float
    requests: int
    failed: int
    longest_gap_s: float


def measure_lifecycle(world: World) -> list[Gap]:
    laptop = world.add_laptop("bench-laptop")
    world.wait_reachable(laptop)
    hello = str(world.core.read_namespaced_service("hello", "default").spec.cluster_ip)
    events: dict[str, Callable[[Node], object]] = {
        "agent pod deleted": world.delete_agent_pod,
        "rolling update to a new image tag": lambda _node: world.rolling_update("bench-rolled"),
        "operator pod deleted": world.delete_operator_pod,
        "node cordoned, agent evicted": world.cordon_and_evict_agent,
    }
    gaps = []
    for event, action in events.items():
        node = world.node_of_endpoint(laptop)
        with TcpProbe(laptop, hello, ECHO_PORT) as tcp, TrafficLoop(laptop) as loop:
            time.sleep(1)
            began = time.monotonic()
            action(node)
            took = time.monotonic() - began
            time.sleep(2)
        gaps.append(
            Gap(
                event=event,
                took_s=round(took, 1),
                tcp_broken=tcp.result.get("broken"),
                tcp_longest_silence_s=float(tcp.result.get("max_gap_s") or math.nan),
                requests=loop.outage.attempts,
                failed=loop.failures,
                longest_gap_s=loop.outage.longest_s,
            )
        )
    return gaps


@dataclass
class Memory:
    node_components_mib: dict[str, dict[str, float]] = field(default_factory=dict)
    control_plane_mib: dict[str, float] = field(default_factory=dict)
    pods_mib: dict[str, float] = field(default_factory=dict)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return math.nan


def children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(proc.name))
    return found


def measure_memory(world: World) -> Memory:
    memory = Memory()
    for node in world.nodes:
        assert node.process is not None
        parts = {}
        for pid in children(node.process.pid):
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            if name in ("containerd", "kubelet", "kube-proxy"):
                parts[name] = rss_mib(pid)
        memory.node_components_mib[node.role] = parts
    plane = world.cluster.plane
    assert plane is not None
    for process in getattr(plane, "_processes", []):
        memory.control_plane_mib[process.name] = rss_mib(process.popen.pid)
    # Per pod: the RSS of the processes in its cgroup (pause and containers), read on this machine.
    # (kubelet's summary API reports a working set of 0 for some pods in this hybrid cgroup layout.)
    pods = {p["metadata"]["uid"]: p for p in world.pods()}
    per_pod: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cgroups = (proc / "cgroup").read_text()
        except OSError:
            continue
        for uid, pod in pods.items():
            if f"pod{uid}" in cgroups:
                node = world.cluster.node(pod["spec"]["nodeName"]).role
                label = f"{pod['metadata']['name']} ({node})"
                with contextlib.suppress(OSError):
                    per_pod[label] = per_pod.get(label, 0.0) + rss_mib(int(proc.name))
    memory.pods_mib = {k: round(v, 1) for k, v in per_pod.items()}
    return memory


def report(latencies: Sequence[Latency], gaps: Sequence[Gap], memory: Memory) -> str:
    lines = [
        "| peers | apply → Ready p50 | p99 | apply → live on every gateway p50 | p99 |",
        "|--:|--:|--:|--:|--:|",
    ]
    for lat in latencies:
        label = f"1 ({lat.rounds} times, one at a time)" if lat.n == 1 else f"{lat.n} at once"
        lines.append(
            f"| {label} | {lat.ready_p50:.3f} s | {lat.ready_p99:.3f} s | {lat.live_p50:.3f} s | {lat.live_p99:.3f} s |"
        )
    if gaps:
        lines += [
            "",
            "| event | took | open TCP connection | its longest silence | new requests (failed) | longest gap |",
            "|---|--:|---|--:|--:|--:|",
        ]
        for gap in gaps:
            kept = "kept" if gap.tcp_broken is None else f"broken: {gap.tcp_broken}"
            lines.append(
                f"| {gap.event} | {gap.took_s:.1f} s | {kept} | {gap.tcp_longest_silence_s:.2f} s "
                f"| {gap.requests} ({gap.failed}) | {gap.longest_gap_s:.2f} s |"
            )
    lines += ["", "| node | containerd | kubelet | kube-proxy |", "|---|--:|--:|--:|"]
    for role, parts in memory.node_components_mib.items():
        cells = " | ".join(f"{parts.get(k, math.nan):.0f} MiB" for k in ("containerd", "kubelet", "kube-proxy"))
        lines.append(f"| {role} | {cells} |")
    lines += ["", "| process or pod | memory |", "|---|--:|"]
    lines += [f"| {name} (RSS) | {mib:.0f} MiB |" for name, mib in memory.control_plane_mib.items()]
    lines += [f"| {name} (RSS) | {mib:.0f} MiB |" for name, mib in sorted(memory.pods_mib.items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--rounds", type=int, default=20, help="N=1 is measured this many times (default 20)")
    parser.add_argument("--skip-lifecycle", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    world = World()
    try:
        world.start()
        print(f"cluster up in {world.timings['total']:.0f} s {world.timings}", flush=True)
        latencies = [measure_latency(world, n, args.rounds) for n in args.peers]
        memory = measure_memory(world)
        gaps = [] if args.skip_lifecycle else measure_lifecycle(world)
        print(report(latencies, gaps, memory))
        if args.json:
            data = {"latency": [asdict(x) for x in latencies], "lifecycle": [asdict(g) for g in gaps]}
            args.json.write_text(json.dumps({**data, "memory": asdict(memory), "timings": world.timings}, indent=1))
    finally:
        world.stop()


if __name__ == "__main__":
    main()
