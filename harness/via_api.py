"""Laptops that reach the cluster through the API server (`kubectl vpn up --via api`), for the e2e tier
and the benchmarks: a namespace that sends no UDP and no TCP but to the API server, a developer's
ServiceAccount token, and the plugin's relay running in the laptop's namespace until stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.chart import token_kubeconfig
from harness.cluster import in_ns
from harness.kvpn import wait_for
from harness.world import CHART_NAMESPACE, HELLO_URL, PEER_NAMESPACE, PLUGIN, RELAY_NAMESPACE, Laptop, World, run
from kvpn_agent.desired import interface_name

RELAY = "kvpn-relay"
"""The chart's relay Deployment (<fullname>-relay)."""

RELAY_USER = "kvpn-relay-user"
"""The chart's ClusterRole for developers' port-forward, bound in the relay namespace."""

DEVELOPER = "kvpn-developer"
"""The chart's ClusterRole for developers, bound in their team's namespace."""

SERVER_READER = "kvpn-server-reader"
"""The chart's ClusterRole that reads VpnServers, bound in the servers' namespace."""


def create_api_server(world: World, name: str, port: int, pool: str) -> None:
    """A VpnServer exposed as ApiServer (no Service, no UDP port for laptops), once every node serves it."""
    world.apply(
        [
            {
                "apiVersion": "kvpn.dev/v1alpha1",
                "kind": "VpnServer",
                "metadata": {"name": name, "namespace": CHART_NAMESPACE},
                "spec": {
                    "addressPool": [pool],
                    "listenPort": port,
                    "expose": {"type": "ApiServer"},
                    "peerNamespaces": [PEER_NAMESPACE],
                },
            }
        ]
    )
    world.interfaces[name] = interface_name(CHART_NAMESPACE, name)
    wait_for(
        f"every gateway serving {name}",
        lambda: (
            [g["node"] for g in world.server(name).get("status", {}).get("gateways", []) if g["ready"]]
            == [n.name for n in world.nodes]
        ),
        timeout=60,
    )


def developer_kubeconfig(world: World, name: str, relay: bool) -> Path:
    """A ServiceAccount token bound to the chart's own roles for developers, as NOTES.txt tells a platform
    team to bind them: the developer role in the developers' namespace, the server-reader role in the
    servers', and with `relay` the relay-user role in the relay's namespace (the only way its
    port-forward permission reaches anything). Nothing else: `kubectl vpn join` and `up` must work so."""
    roles = [
        (PEER_NAMESPACE, DEVELOPER),
        (CHART_NAMESPACE, SERVER_READER),
        *([(RELAY_NAMESPACE, RELAY_USER)] if relay else []),
    ]
    world.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": PEER_NAMESPACE}},
            *(binding(name, namespace, role) for namespace, role in roles),
        ]
    )
    return token_kubeconfig(
        world.cluster.api, world.cluster.plane, PEER_NAMESPACE, name, world.run_dir / f"{name}.kubeconfig"
    )


def binding(subject: str, namespace: str, role: str) -> dict[str, Any]:
    """A RoleBinding of one of the chart's ClusterRoles to the developers' ServiceAccount `subject`."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"{subject}-{role}", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": subject, "namespace": PEER_NAMESPACE}],
    }


def no_udp(world: World, laptop: Laptop) -> None:
    """Nothing leaves the laptop's namespace but TCP to the API server: no UDP to anywhere, no other TCP."""
    api = world.cluster.plane.server.removeprefix("https://")
    host, _, port = api.rpartition(":")
    rules = (
        "table inet kvpn-e2e-noudp {\n"
        "  chain output { type filter hook output priority 0; policy accept;\n"
        '    oifname "eth0" meta l4proto udp drop;\n'
        f'    oifname "eth0" ip daddr != {host} drop;\n'
        f'    oifname "eth0" tcp dport != {port} drop;\n'
        "  }\n"
        "}\n"
    )
    in_ns(laptop.netns, "nft", "-f", "-", input=rules)


@dataclass
class ApiLaptop:
    laptop: Laptop
    home: Path
    env: dict[str, str]
    proc: subprocess.Popen[str]
    said: str = ""

    @property
    def health_path(self) -> Path:
        return self.home / ".config" / "kvpn" / "via-api" / f"{self.laptop.interface}.json"

    def health(self) -> dict[str, Any]:
        """What the plugin's relay last wrote about itself (what `kubectl vpn status` shows)."""
        with contextlib.suppress(OSError, ValueError):
            found: dict[str, Any] = json.loads(self.health_path.read_text())
            return found
        return {}

    def stop(self) -> str:
        """SIGTERM, as Ctrl-C; what the plugin printed."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            said, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            said, _ = self.proc.communicate()
        return said

    def status(self) -> str:
        argv = ["ip", "netns", "exec", self.laptop.netns, PLUGIN, "status", "-n", PEER_NAMESPACE]
        return run(*argv, env=self.env).stdout


@contextlib.contextmanager
def api_laptop(world: World, name: str, server: str, kubeconfig: Path, index: int = 1) -> Iterator[ApiLaptop]:
    """A laptop with no UDP, joined to `server` with the token of `kubeconfig`; `kubectl vpn up FILE` goes
    via the API by itself (the file has no Endpoint when the server exposes no UDP port). Ctrl-C (SIGTERM)
    at the end must take the tunnel down and leave no health file."""
    ns, address = world.cluster.add_host(f"laptop-{name}")
    laptop = Laptop(world, name, ns, address, f"kvc{world.suffix}a{index}", server)
    world.laptops[name] = laptop
    world.manifest.add("paths", f"/run/wireguard/{laptop.interface}.sock")
    home = world.run_dir / f"home-{name}"
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "HOME": str(home),
        "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go",
    }
    joined = world.run_dir / f"{name}-joined.conf"
    argv = [PLUGIN, "join", f"{CHART_NAMESPACE}/{server}", "-n", PEER_NAMESPACE, "--name", name]
    run(*argv, "--dns", "full", "-o", str(joined), "--timeout", "30", env=env)
    laptop.write_config(joined.read_text())
    no_udp(world, laptop)
    argv = ["ip", "netns", "exec", ns, PLUGIN, "up", str(laptop.config_path)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    world.manifest.add_pid(proc.pid)
    made = ApiLaptop(laptop, home, env, proc)
    try:
        wait_for(f"{name}'s tunnel via the API", lambda: made.health().get("connected_since"), timeout=60)
        world.wait_reachable(laptop, HELLO_URL, timeout=30)
        yield made
    finally:
        made.said = made.stop()
    if f"{laptop.interface} is down" not in made.said:
        raise AssertionError(f"the tunnel stayed up after SIGTERM:\n{made.said}")
    if made.health_path.exists():
        raise AssertionError(f"{made.health_path} stayed behind")
