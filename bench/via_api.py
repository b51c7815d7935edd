"""The tunnel through the API server against direct UDP, side by side on the real-node cluster (figures,
not pass/fail).

    sudo .venv/bin/python -m bench.via_api [--megabytes 50] [--rounds 3] [--json FILE]

Two laptops on the node network, one run, one cluster (harness/world.py, the relay enabled):

- `direct`: the operator's config of the HostPort server, wg-quick over UDP to the gateway;
- `via api`: `kubectl vpn up --via api` with a developer's token, in a namespace that sends no UDP and
  no TCP but to the API server (harness/via_api.py): laptop → kube-apiserver → kubelet → containerd →
  relay pod → gateway.

Each, against the same hello pod: download and upload (curl of GET /bytes/N and POST /sink, N MB,
--rounds times, the median), and the round-trip time at idle (the median of 50 lines to hello's TCP
echo). During the API laptop's transfers, the CPU time kube-apiserver, the kubelets and containerd
spent, per Mbit moved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.cluster import in_ns
from harness.via_api import RELAY, api_laptop, create_api_server, developer_kubeconfig
from harness.world import ECHO_PORT, HELLO_PORT, RELAY_NAMESPACE, Laptop, World

API_SERVER, API_PORT = "api", 51824
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Figures:
    name: str
    download_mbit: float = 0.0
    upload_mbit: float = 0.0
    rtt_ms: float = 0.0
    downloads: list[float] = field(default_factory=list)
    uploads: list[float] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def processes(world: World) -> dict[str, list[int]]:
    """kube-apiserver's pid, and every node's kubelet and containerd."""
    plane = world.cluster.plane
    assert plane is not None
    found: dict[str, list[int]] = {"kube-apiserver": [], "kubelet": [], "containerd": []}
    for process in getattr(plane, "_processes", []):
        if process.name == "kube-apiserver":
            found["kube-apiserver"].append(process.popen.pid)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            name = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if name in ("kubelet", "containerd") and any(
            str(n.process.pid) in _ancestry(int(proc.name)) for n in world.nodes if n.process is not None
        ):
            found[name].append(int(proc.name))
    return found


def _ancestry(pid: int) -> set[str]:
    seen: set[str] = set()
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        seen.add(str(pid))
    return seen


def curl_mbit(laptop: Laptop, args: list[str], what: str) -> float:
    proc = in_ns(
        laptop.netns, "curl", "-s", "-f", "-o", "/dev/null", "--max-time", "120", "-w", what, *args, timeout=150
    )
    return float(proc.stdout) * 8 / 1e6


def transfer(laptop: Laptop, url: str, megabytes: int, rounds: int, result: Figures) -> None:
    body = laptop.world.run_dir / f"upload-{megabytes}.bin"
    if not body.exists():
        body.write_bytes(os.urandom(megabytes << 20))
    for _ in range(rounds):
        result.downloads.append(curl_mbit(laptop, [f"{url}bytes/{megabytes << 20}"], "%{speed_download}"))
        result.uploads.append(curl_mbit(laptop, ["--data-binary", f"@{body}", f"{url}sink"], "%{speed_upload}"))
    result.download_mbit = statistics.median(result.downloads)
    result.upload_mbit = statistics.median(result.uploads)


RTT_SCRIPT = """
import socket, statistics, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(int(sys.argv[3])):
    began = time.perf_counter()
    conn.sendall(b"ping\\n")
    got = b""
    while not got.endswith(b"\\n"):
        got += conn.recv(64)
    times.append((time.perf_counter() - began) * 1000)
    time.sleep(0.05)
print(statistics.median(times))
"""


def rtt_ms(laptop: Laptop, host: str, count: int = 50) -> float:
    """The median round trip of a line to hello's TCP echo, at idle (no ping on this machine)."""
    out = in_ns(laptop.netns, sys.executable, "-c", RTT_SCRIPT, host, str(ECHO_PORT), str(count), timeout=60)
    return round(float(out.stdout), 3)


def measure(
    laptop: Laptop, name: str, pod_ip: str, *, megabytes: int, rounds: int, cpu: Callable[[], dict[str, float]]
) -> tuple[Figures, dict[str, float]]:
    result = Figures(name)
    result.rtt_ms = rtt_ms(laptop, pod_ip)
    before = cpu()
    transfer(laptop, f"http://{pod_ip}:{HELLO_PORT}/", megabytes, rounds, result)
    after = cpu()
    spent = {k: after[k] - before[k] for k in after}
    return result, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    world = World(helm_values=["relay.enabled=true"])
    try:
        world.start()
        world.wait_ready("deployment", RELAY, namespace=RELAY_NAMESPACE)
        create_api_server(world, API_SERVER, API_PORT, "10.13.0.0/24")
        pids = processes(world)

        def cpu() -> dict[str, float]:
            return {name: sum(cpu_seconds(p) for p in found) for name, found in pids.items()}

        pod_ip = world.hello_pods()[0]["status"]["podIP"]
        direct = world.add_laptop("alice")
        developer = developer_kubeconfig(world, "bench-dev", relay=True)
        results = {}
        results["direct"], direct_cpu = measure(
            direct, "direct UDP", pod_ip, megabytes=args.megabytes, rounds=args.rounds, cpu=cpu
        )
        with api_laptop(world, "uma", API_SERVER, developer) as uma:
            results["api"], api_cpu = measure(
                uma.laptop, "via the API", pod_ip, megabytes=args.megabytes, rounds=args.rounds, cpu=cpu
            )
        moved_mbit = args.megabytes * 8 * 1.048576 * 2 * args.rounds  # down and up, Mbit
        report = {
            "paths": {k: asdict(v) for k, v in results.items()},
            "cpu_s_during_api_transfers": api_cpu,
            "cpu_s_during_direct_transfers": direct_cpu,
            # CPU seconds per Mbit moved = ms of CPU per second per Mbit/s, the figure the README gives.
            "cpu_ms_per_mbit": {k: round(1000 * v / moved_mbit, 2) for k, v in api_cpu.items()},
            "added_rtt_ms": round(results["api"].rtt_ms - results["direct"].rtt_ms, 2),
        }
        print(json.dumps(report, indent=1))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        world.stop()


if __name__ == "__main__":
    main()
