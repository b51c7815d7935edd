"""The real-node test cluster itself (harness/cluster.py): it runs pods, and it leaves nothing behind.

Nothing of a cluster may outlive it on this machine: no process, network namespace, link, mount, cgroup
or host firewall rule, whether it stopped normally, failed half-way through its start, or its owner was
SIGKILLed and `sweep` ran from the manifest (what `make demo-down` does).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.cluster import CGROUP_FS, PAUSE_IMAGE, Cluster, ClusterError, Manifest, in_ns, run, sweep
from harness.kvpn import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.apiserver]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the cluster tests need root (network namespaces, cgroups, mounts)", pytrace=False)


def host_firewall() -> str:
    """The host's rules, without iptables-save's dated comments and the packet counters."""
    rules = run("iptables-save").stdout + run("nft", "list", "ruleset").stdout
    lines = (line for line in rules.splitlines() if not line.startswith("#"))
    return "\n".join(re.sub(r"\[\d+:\d+\]|counter packets \d+ bytes \d+", "", line) for line in lines)


def traces(suffix: str, run_dir: str) -> dict[str, list[str]]:
    """What of one cluster is visible on the host: everything named after its suffix or inside its folder."""
    found: dict[str, list[str]] = {}
    found["netns"] = [n for n in run("ip", "netns", "list").stdout.split() if suffix in n]
    found["links"] = [
        lk["ifname"] for lk in json.loads(run("ip", "-j", "link", "show").stdout) if suffix in lk["ifname"]
    ]
    found["cgroups"] = [str(p) for p in CGROUP_FS.glob(f"*/*{suffix}*")]
    found["mounts"] = [m for m in Path("/proc/self/mountinfo").read_text().splitlines() if suffix in m or run_dir in m]
    processes = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if (suffix in cmdline or run_dir in cmdline) and int(proc.name) != os.getpid():
                processes.append(f"{proc.name}: {cmdline[:200]}")
    found["processes"] = processes
    found["files"] = [run_dir] if Path(run_dir).exists() else []
    return {k: v for k, v in found.items() if v}


@pytest.fixture
def firewall() -> Iterator[str]:
    before = host_firewall()
    yield before
    assert host_firewall() == before, "the host's iptables or nftables rules changed"


def test_a_cluster_runs_a_pod_and_leaves_nothing_behind(firewall: str) -> None:
    cluster = Cluster(1)
    try:
        cluster.start()
        node = cluster.nodes[0]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sleeper"},
            "spec": {"containers": [{"name": "pause", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}]},
        }
        cluster.core.create_namespaced_pod("default", pod)

        def running() -> bool:
            status = cluster.core.read_namespaced_pod("sleeper", "default").status
            return status.phase == "Running"

        wait_for("a pod running on the node", running, timeout=60)
        assert cluster.core.read_namespaced_pod("sleeper", "default").spec.node_name == node.name
        # kube-proxy programs the `kubernetes` Service in the node's own namespace, not the host's.
        wait_for("kube-proxy's rules", lambda: "KUBE-SERVICES" in in_ns(node.netns, "iptables-save").stdout, timeout=30)
        suffix, run_dir = cluster.suffix, str(cluster.run_dir)
        assert traces(suffix, run_dir)["processes"]
    finally:
        cluster.stop()
    assert traces(suffix, run_dir) == {}


class FailingCluster(Cluster):
    """Fails once its nodes run containerd, kubelet and kube-proxy: a start that breaks half-way."""

    def _wait_nodes_ready(self) -> None:
        wait_for("kubelet started", lambda: all((n.dir / "kubelet.log").exists() for n in self.nodes), timeout=30)
        raise ClusterError("injected failure after the nodes started")


def test_a_failed_start_leaves_nothing_behind(firewall: str) -> None:
    cluster = FailingCluster(2)
    with pytest.raises(ClusterError, match="injected failure"):
        cluster.start()
    assert traces(cluster.suffix, str(cluster.run_dir)) == {}


SIGKILLED_OWNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from harness.cluster import Cluster
cluster = Cluster(1, manifest=Path(sys.argv[2]))
cluster.start()
print(cluster.suffix, cluster.run_dir, flush=True)
time.sleep(600)
"""


def test_sweep_from_the_manifest_removes_a_cluster_whose_owner_was_killed(tmp_path: Path, firewall: str) -> None:
    manifest = tmp_path / "manifest.json"
    owner = subprocess.Popen(
        [sys.executable, "-c", SIGKILLED_OWNER, str(REPO), str(manifest)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline().split()
        assert len(line) == 2, f"the cluster did not start (exit {owner.poll()})"
        suffix, run_dir = line
        assert traces(suffix, run_dir)["processes"]
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    time.sleep(0.5)
    done = sweep(Manifest.load(manifest))
    assert any("deleted netns" in d for d in done), done
    assert traces(suffix, run_dir) == {}
