"""A small cluster world out of real parts, for tests/e2e and `make demo`.

- the real control plane (etcd, kube-apiserver, kube-controller-manager);
- the chart rendered with `helm template`: its CRDs, ServiceAccounts and RBAC applied; the operator
  and the agents run with TokenRequest tokens of the chart's ServiceAccounts and the chart's arguments;
- two gateway "nodes" (network namespaces) with a Node object each (InternalIP, podCIDR) and a
  `kvpn-agent run --netns` each; every agent runs in a mount namespace of its own whose
  /run/wireguard is a folder of the run directory, because both serve the same interface name and
  the UAPI socket folder is otherwise shared by every namespace;
- a pod network (namespace "pods", a bridge both nodes are on) with a "hello" HTTP pod and dnsmasq
  as the cluster DNS, Service and Endpoints objects for both, and in each node a DNAT table
  `ip kube-proxy-standin` built from those objects: the harness's stand-in for kube-proxy;
- an underlay bridge (namespace "lan") joining the nodes and the laptops; a laptop runs the stock
  `wg-quick up` (wireguard-go) on the config of its VpnPeer's Secret.

Every name carries a random suffix. Everything the world creates is recorded as it goes (and, with
`manifest=`, written to a JSON file) so that `stop()` -- or `sweep()` from another process -- removes
it, whatever state a start left it in. Traffic stays inside the world's namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kvpn_agent.model import interface_name
from kvpn_agent.uapi import UapiClient
from tests.support.agent_process import AgentProcess
from tests.support.chart import (
    AsServiceAccount,
    apply_crds,
    apply_rbac,
    container_args,
    helm_template,
    pod_spec,
    token_kubeconfig,
    tool_dir,
)
from tests.support.controlplane import ControlPlane, die_with_parent, log_tail
from tests.support.kvpn import Kvpn, decode, wait_for
from tests.support.operator_process import OperatorProcess

RUN_TIMEOUT = 15.0
NETNS_PREFIX = "kvw"
SOCKET_DIR = Path("/run/wireguard")
ETC_NETNS = Path("/etc/netns")

CLUSTER_DOMAIN = "cluster.local"
CHART_NAMESPACE = "kvpn-system"  # the release, its ServiceAccounts, the VpnServer
PEER_NAMESPACE = "dev"  # the developers' VpnPeers
PLUGIN = str(Path(sys.executable).with_name("kubectl-vpn"))  # installed with the project into the venv
SERVER = "cluster"
LISTEN_PORT = 51820
POOL = "10.8.0.0/24"
GATEWAY_LABEL = "kvpn.dev/gateway"

# The underlay: a bridge in namespace "lan"; the nodes and the laptops have an address on it.
UNDERLAY_PREFIX = 24
NODE_UNDERLAY = {"node-a": "172.30.0.11", "node-b": "172.30.0.12"}
LAPTOP_UNDERLAY_BASE = 100  # laptop n: 172.30.0.(100 + n)

# The pod network: one L2 segment (a bridge in namespace "pods"); each node's pod CIDR a /24 of it.
POD_NETWORK_PREFIX = 16
POD_CIDRS = {"node-a": "10.244.1.0/24", "node-b": "10.244.2.0/24"}
NODE_POD_SIDE = {"node-a": "10.244.1.1", "node-b": "10.244.2.1"}
HELLO_POD_IP, HELLO_PORT = "10.244.1.10", 8080  # "runs on" node-a
DNS_POD_IP = "10.244.2.10"  # "runs on" node-b

# ClusterIPs chosen inside the apiserver's 10.96.0.0/16.
HELLO_CLUSTER_IP, HELLO_SERVICE_PORT = "10.96.100.80", 80
DNS_CLUSTER_IP = "10.96.0.10"
HELLO_NAME = f"hello.default.svc.{CLUSTER_DOMAIN}"
HELLO_URL = f"http://{HELLO_NAME}/"
HELLO_CLUSTER_IP_URL = f"http://{HELLO_CLUSTER_IP}/"
HELLO_POD_URL = f"http://{HELLO_POD_IP}:{HELLO_PORT}/"

KUBE_PROXY_STANDIN = "kube-proxy-standin"  # nft table `ip kube-proxy-standin` in each node

HELLO_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from pod {sys.argv[1]} (client {self.client_address[0]})\\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


class WorldError(RuntimeError):
    pass


def run(
    *argv: str, check: bool = True, timeout: float = RUN_TIMEOUT, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    proc = subprocess.run(argv, text=True, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise WorldError(f"{' '.join(argv)} failed ({proc.returncode}): {(proc.stderr or '').strip()}")
    return proc


def in_ns(ns: str, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *argv, **kwargs)


def curl(ns: str, url: str, max_time: float = 3) -> str | None:
    """The body, or None when nothing answered within ``max_time``."""
    proc = in_ns(ns, "curl", "-s", "-f", "--max-time", str(max_time), url, check=False, timeout=max_time + 5)
    return proc.stdout if proc.returncode == 0 else None


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: tells a process from a later one with the same pid. None when
    there is no such process or it has exited (a zombie nobody reaped yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _kill_netns_processes(ns: str, grace: float = 3.0) -> None:
    pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


# --- what was created, recorded as it goes ---------------------------------------------------------


@dataclass
class Manifest:
    """Everything a world created, in a form another process can remove (see `sweep`)."""

    path: Path | None = None
    run_dir: str = ""
    remove_run_dir: bool = False
    netns: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # /etc/netns folders, UAPI sockets
    pids: list[tuple[int, str]] = field(default_factory=list)  # (pid, start time)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        if self.path is None:
            return
        data = {k: v for k, v in vars(self).items() if k != "path"}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        data = json.loads(path.read_text())
        data["pids"] = [tuple(p) for p in data.get("pids", [])]
        return cls(path=path, **data)

    def add_pid(self, pid: int) -> None:
        if start := _start_time(pid):
            self.pids.append((pid, start))
            self.save()


def sweep(manifest: Manifest) -> list[str]:
    """Remove everything the manifest names; safe to repeat, and after a partial start. What it did."""
    done = []
    for pid, start in manifest.pids:
        if _start_time(pid) == start:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
            done.append(f"killed pid {pid}")
    existing = set(run("ip", "netns", "list", check=False).stdout.split())
    for ns in manifest.netns:
        if ns in existing:
            _kill_netns_processes(ns)
            run("ip", "netns", "del", ns, check=False)
            done.append(f"deleted netns {ns}")
    for name in manifest.paths:
        path = Path(name)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}")
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
            done.append(f"removed {path}")
    if manifest.remove_run_dir and manifest.run_dir and Path(manifest.run_dir).exists():
        shutil.rmtree(manifest.run_dir, ignore_errors=True)
        done.append(f"removed {manifest.run_dir}")
    return done


# --- processes -------------------------------------------------------------------------------------


class NodeAgent(AgentProcess):
    """`kvpn-agent run --netns <node>` as the DaemonSet would run it, in a mount namespace of its own."""

    def __init__(self, node: str, netns: str, argv: list[str], env: dict[str, str], wg_dir: Path, log: Path) -> None:
        super().__init__(argv, env, log, name=f"agent on {node}")
        self.node, self.netns, self.wg_dir = node, netns, wg_dir

    def command(self) -> list[str]:
        # A private /run/wireguard: `ip netns exec` (the agent's wireguard-go) inherits this mount namespace.
        script = 'mount --bind "$0" /run/wireguard && exec "$@"'
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(self.wg_dir),
            *super().command(),
        ]

    def uapi(self, interface: str) -> UapiClient:
        return UapiClient(interface, socket_dir=self.wg_dir)


@dataclass
class Laptop:
    """A namespace on the underlay running stock wg-quick on a VpnPeer's config."""

    world: World
    name: str  # the VpnPeer
    netns: str
    address: str
    interface: str
    config: str = ""

    def up(self, config: str) -> None:
        """wg-quick on the operator's wg0.conf. Its DNS line would make wg-quick call resolvconf, which
        this machine lacks: the line is stripped and the harness writes the namespace's resolv.conf
        from it instead (what resolvconf would do)."""
        self.config = config
        match = re.search(r"^DNS = (.*)$", config, re.M)
        if match is None:
            raise WorldError(f"no DNS line in the config of {self.name}:\n{config}")
        entries = [e.strip() for e in match.group(1).split(",") if e.strip()]
        servers = [e for e in entries if re.fullmatch(r"[0-9a-fA-F:.]+", e)]
        search = [e for e in entries if e not in servers]
        folder = ETC_NETNS / self.netns
        folder.mkdir(parents=True, exist_ok=True)
        lines = [*(f"nameserver {s}" for s in servers), *([f"search {' '.join(search)}"] if search else [])]
        (folder / "resolv.conf").write_text("\n".join([*lines, "options timeout:1 attempts:2"]) + "\n")
        path = self.config_path
        path.write_text(re.sub(r"^DNS = .*\n", "", config, flags=re.M))
        path.chmod(0o600)
        with (self.world.run_dir / "wg-quick.log").open("a") as log:
            in_ns(
                self.netns, "wg-quick", "up", str(path),
                env={**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go"},
                stdout=log, stderr=log,
            )  # fmt: skip

    @property
    def config_path(self) -> Path:
        """wg-quick names the interface after the file: the laptop's unique interface name."""
        return self.world.run_dir / f"{self.interface}.conf"

    def plugin(self, action: str) -> None:
        """`kubectl vpn up|down` inside the laptop's namespace, as the developer runs it."""
        env = {**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go"}
        in_ns(self.netns, PLUGIN, action, str(self.config_path), env=env)

    def curl(self, url: str = HELLO_URL, max_time: float = 3) -> str | None:
        return curl(self.netns, url, max_time)

    def server_public_key(self) -> str:
        return in_ns(self.netns, "wg", "show", self.interface, "peers").stdout.split()[0]

    def endpoint(self) -> str:
        return in_ns(self.netns, "wg", "show", self.interface, "endpoints").stdout.split()[1]

    def switch_endpoint(self, node: str) -> None:
        """`wg set <if> peer <server> endpoint <other node>:port`, as a roaming client would."""
        endpoint = f"{NODE_UNDERLAY[node]}:{LISTEN_PORT}"
        in_ns(self.netns, "wg", "set", self.interface, "peer", self.server_public_key(), "endpoint", endpoint)


class TrafficLoop:
    """Requests from a laptop in a loop while something happens: `with TrafficLoop(laptop) as t: ...`."""

    def __init__(self, laptop: Laptop, url: str = HELLO_URL, max_time: float = 2.0, pause: float = 0.1) -> None:
        self.laptop, self.url, self.max_time, self.pause = laptop, url, max_time, pause
        self.attempts = 0
        self.failures: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.attempts += 1
            body = self.laptop.curl(self.url, self.max_time)
            if not (body or "").startswith("hello"):
                self.failures.append(time.monotonic())
            time.sleep(self.pause)

    def __enter__(self) -> TrafficLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.max_time + 10)


# --- the world -------------------------------------------------------------------------------------


class World:
    """`with World() as world: ...`, or start()/stop(); see the module docstring."""

    def __init__(self, run_dir: Path | None = None, manifest: Path | None = None, suffix: str | None = None) -> None:
        self.suffix = suffix or secrets.token_hex(3)
        self.manifest = Manifest(path=manifest)
        self._given_run_dir = run_dir
        self._run_dir: Path | None = None
        self.plane: ControlPlane | None = None
        self.api: client.ApiClient | None = None
        self.operator: OperatorProcess | None = None
        self.agents: dict[str, NodeAgent] = {}
        self.laptops: dict[str, Laptop] = {}
        self.kubeconfigs: dict[str, Path] = {}
        self.netns: dict[str, str] = {}
        self.docs: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.interface = interface_name(CHART_NAMESPACE, SERVER)

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        if self._run_dir is None:
            raise WorldError("world not started")
        return self._run_dir

    @property
    def kvpn(self) -> Kvpn:
        assert self.api is not None
        return Kvpn(self.api)

    @property
    def core(self) -> Any:
        """CoreV1Api (Any: bodies go as plain dicts, which the client sends unchanged)."""
        assert self.api is not None
        return client.CoreV1Api(self.api)

    def __enter__(self) -> World:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        began = time.monotonic()
        if self._given_run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix=f"kvpn-world-{self.suffix}-"))
            self.manifest.remove_run_dir = True
        else:
            self._run_dir = self._given_run_dir
            self._run_dir.mkdir(parents=True, exist_ok=True)
        self.manifest.run_dir = str(self._run_dir)
        self.manifest.save()
        try:
            self._step("control plane", self._start_control_plane)
            self._step("chart", self._apply_chart)
            self._step("network", self._build_network)
            self._step("cluster objects", self._create_cluster_objects)
            self._step("pods", self._start_pods)
            self._step("kube-proxy stand-in", self._install_kube_proxy_standin)
            self._step("operator", self._start_operator)
            self._step("vpnserver", self._create_server)
            self._step("agents", self._start_agents)
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - began

    def _step(self, name: str, action: Callable[[], None]) -> None:
        began = time.monotonic()
        action()
        self.timings[name] = time.monotonic() - began

    def stop(self) -> None:
        """Remove everything; each part is tried whatever happened to the others."""
        errors: list[str] = []

        def attempt(action: Callable[[], object]) -> None:
            try:
                action()
            except Exception as error:
                errors.append(f"{action}: {error}")

        for agent in self.agents.values():
            attempt(agent.stop)
        if self.operator is not None:
            attempt(self.operator.stop)
        attempt(lambda: sweep(Manifest(netns=self.manifest.netns, paths=self.manifest.paths)))
        if self.api is not None:
            attempt(self.api.close)
        if self.plane is not None:
            attempt(self.plane.stop)
        if self.manifest.remove_run_dir and self._run_dir is not None:
            attempt(lambda: shutil.rmtree(self.run_dir, ignore_errors=True))
        self.agents, self.operator, self.plane, self.api = {}, None, None, None
        if errors:
            print("kvpn world: cleanup problems:\n  " + "\n  ".join(errors), file=sys.stderr)

    # -- building ----------------------------------------------------------------------------------

    def _start_control_plane(self) -> None:
        self.plane = ControlPlane(run_dir=self.run_dir / "control-plane")
        self.plane.start()
        if etcd_dir := getattr(self.plane, "_etcd_dir", None):  # on /dev/shm: recorded for `sweep`
            self.manifest.paths.append(str(etcd_dir))
        for process in getattr(self.plane, "_processes", []):
            self.manifest.add_pid(process.popen.pid)
        self.api = self.plane.api_client()

    def _apply_chart(self) -> None:
        assert self.plane is not None
        assert self.api is not None
        tools = tool_dir()
        self.docs = helm_template(
            tools / "helm",
            self.run_dir / "helm-home",
            f"agent.serverNamespaces={{{CHART_NAMESPACE}}}",
            f"operator.clusterDomain={CLUSTER_DOMAIN}",
            namespace=CHART_NAMESPACE,
        )
        for ns in (CHART_NAMESPACE, PEER_NAMESPACE):
            self.core.create_namespace({"metadata": {"name": ns}})
        apply_crds(self.api, self.docs)
        apply_rbac(self.api, self.docs)
        for role, kind in (("operator", "Deployment"), ("agent", "DaemonSet")):
            account = pod_spec(self.docs, kind)["serviceAccountName"]
            path = self.run_dir / f"{role}.kubeconfig"
            self.kubeconfigs[role] = token_kubeconfig(self.api, self.plane, CHART_NAMESPACE, account, path)

    def _netns(self, role: str) -> str:
        name = f"{NETNS_PREFIX}-{self.suffix}-{role}"
        self.manifest.netns.append(name)
        self.manifest.save()
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        self.netns[role] = name
        return name

    def _veth(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
        # Created under random names in this namespace, then moved and renamed: no clash with anything.
        tmp_a, tmp_b = f"kvw{secrets.token_hex(5)}", f"kvw{secrets.token_hex(5)}"
        run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        for tmp, ns, dev in ((tmp_a, ns_a, dev_a), (tmp_b, ns_b, dev_b)):
            run("ip", "link", "set", tmp, "netns", ns)
            run("ip", "-n", ns, "link", "set", tmp, "name", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")

    def _bridge(self, ns: str) -> None:
        run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", ns, "link", "set", "br0", "up")

    def _build_network(self) -> None:
        lan, pods = self._netns("lan"), self._netns("pods")
        self._bridge(lan)
        self._bridge(pods)
        for pod_ip in (HELLO_POD_IP, DNS_POD_IP):
            run("ip", "-n", pods, "addr", "add", f"{pod_ip}/{POD_NETWORK_PREFIX}", "dev", "br0")
        for node, underlay in NODE_UNDERLAY.items():
            ns = self._netns(node)
            self._veth(ns, "eth0", lan, node)
            run("ip", "-n", lan, "link", "set", node, "master", "br0")
            run("ip", "-n", ns, "addr", "add", f"{underlay}/{UNDERLAY_PREFIX}", "dev", "eth0")
            self._veth(ns, "cni0", pods, node)
            run("ip", "-n", pods, "link", "set", node, "master", "br0")
            run("ip", "-n", ns, "addr", "add", f"{NODE_POD_SIDE[node]}/{POD_NETWORK_PREFIX}", "dev", "cni0")
            in_ns(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            # A private UAPI socket folder for this node's agent (see NodeAgent).
            wg_dir = self.run_dir / f"{node}-wireguard"
            wg_dir.mkdir(mode=0o700, exist_ok=True)
        SOCKET_DIR.mkdir(parents=True, exist_ok=True)

    def _create_cluster_objects(self) -> None:
        core = self.core
        for node, underlay in NODE_UNDERLAY.items():
            name = self.node_name(node)
            labels = {GATEWAY_LABEL: self.suffix, "kubernetes.io/os": "linux", "kubernetes.io/hostname": name}
            core.create_node(
                {
                    "metadata": {"name": name, "labels": labels},
                    "spec": {"podCIDR": POD_CIDRS[node], "podCIDRs": [POD_CIDRS[node]]},
                }
            )
            status = {"addresses": [{"type": "InternalIP", "address": underlay}, {"type": "Hostname", "address": name}]}
            core.patch_node_status(name, {"status": status})
        services = [
            ("default", "hello", HELLO_CLUSTER_IP, HELLO_POD_IP, [("http", "TCP", HELLO_SERVICE_PORT, HELLO_PORT)]),
            (
                "kube-system",
                "kube-dns",
                DNS_CLUSTER_IP,
                DNS_POD_IP,
                [("dns", "UDP", 53, 53), ("dns-tcp", "TCP", 53, 53)],
            ),
        ]
        for namespace, name, cluster_ip, pod_ip, ports in services:
            core.create_namespaced_service(
                namespace,
                {
                    "metadata": {"name": name},
                    "spec": {
                        "clusterIP": cluster_ip,
                        "ports": [{"name": n, "protocol": p, "port": port, "targetPort": t} for n, p, port, t in ports],
                    },
                },
            )
            # No selector and no kubelet: the Endpoints as the endpoints controller would write them.
            core.create_namespaced_endpoints(
                namespace,
                {
                    "metadata": {"name": name},
                    "subsets": [
                        {
                            "addresses": [{"ip": pod_ip}],
                            "ports": [{"name": n, "protocol": p, "port": t} for n, p, _, t in ports],
                        }
                    ],
                },
            )

    def _spawn_in(self, ns: str, log_name: str, *argv: str) -> subprocess.Popen[bytes]:
        with (self.run_dir / log_name).open("ab") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # noqa: PLW1509 -- one prctl call
            )
        self.manifest.add_pid(proc.pid)
        return proc

    def _start_pods(self) -> None:
        pods = self.netns["pods"]
        self._spawn_in(pods, "hello.log", sys.executable, "-c", HELLO_SERVER, HELLO_POD_IP, str(HELLO_PORT))
        records = []
        for service in self.core.list_service_for_all_namespaces().items:
            if service.spec.cluster_ip and service.spec.cluster_ip != "None":
                fqdn = f"{service.metadata.name}.{service.metadata.namespace}.svc.{CLUSTER_DOMAIN}"
                records.append(f"--host-record={fqdn},{service.spec.cluster_ip}")
        self._spawn_in(
            pods, "dnsmasq.log",
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--bind-interfaces", f"--listen-address={DNS_POD_IP}", f"--pid-file={self.run_dir / 'dnsmasq.pid'}",
            "--log-facility=-", "--log-queries", f"--local=/{CLUSTER_DOMAIN}/", *records,
        )  # fmt: skip
        wait_for("the hello pod", lambda: curl(pods, HELLO_POD_URL, 1), timeout=10)
        dig = ["python3", "-c", "import socket,sys; print(socket.gethostbyname(sys.argv[1]))", HELLO_NAME]

        def resolves() -> bool:
            folder = ETC_NETNS / pods
            if not folder.exists():
                folder.mkdir(parents=True)
                self.manifest.paths.append(str(folder))
                self.manifest.save()
                (folder / "resolv.conf").write_text(f"nameserver {DNS_POD_IP}\noptions timeout:1 attempts:1\n")
            return in_ns(pods, *dig, check=False).stdout.strip() == HELLO_CLUSTER_IP

        wait_for("dnsmasq to answer", resolves, timeout=10)

    def kube_proxy_standin_ruleset(self) -> str:
        """nft rules for every Service with Endpoints: ClusterIP:port → first endpoint (what kube-proxy does)."""
        rules = []
        for service in self.core.list_service_for_all_namespaces().items:
            try:
                endpoints = self.core.read_namespaced_endpoints(service.metadata.name, service.metadata.namespace)
            except ApiException:
                continue
            for subset in endpoints.subsets or []:
                target = subset.addresses[0].ip
                for port in service.spec.ports:
                    backend = next(p.port for p in subset.ports if p.name == port.name)
                    proto = port.protocol.lower()
                    rules.append(
                        f"    ip daddr {service.spec.cluster_ip} {proto} dport {port.port} dnat to {target}:{backend}"
                    )
        return "\n".join(
            [
                f"table ip {KUBE_PROXY_STANDIN} {{",
                '  comment "kvpn test harness: stand-in for kube-proxy (ClusterIP to endpoint DNAT), not kvpn"',
                "  chain services {",
                *rules,
                "  }",
                "  chain prerouting { type nat hook prerouting priority -100; policy accept; jump services; }",
                "  chain output { type nat hook output priority -100; policy accept; jump services; }",
                "}",
            ]
        )

    def _install_kube_proxy_standin(self) -> None:
        ruleset = self.kube_proxy_standin_ruleset()
        (self.run_dir / f"{KUBE_PROXY_STANDIN}.nft").write_text(ruleset + "\n")
        for node in NODE_UNDERLAY:
            in_ns(self.netns[node], "nft", "-f", str(self.run_dir / f"{KUBE_PROXY_STANDIN}.nft"))

    def _start_operator(self) -> None:
        assert self.plane is not None
        args = container_args(self.docs, "Deployment")
        plane: Any = AsServiceAccount(self.plane, self.kubeconfigs["operator"])  # duck-typed for OperatorProcess
        self.operator = OperatorProcess(plane, args=args, log_path=self.run_dir / "operator.log")
        self.operator.start()
        if self.operator._popen is not None:
            self.manifest.add_pid(self.operator._popen.pid)

    def _create_server(self) -> None:
        self.kvpn.create(
            "vpnservers",
            CHART_NAMESPACE,
            SERVER,
            {
                "addressPool": [POOL],
                "listenPort": LISTEN_PORT,
                "expose": {"type": "HostPort"},  # endpoint, routes and DNS: discovered
                "nodeSelector": {GATEWAY_LABEL: self.suffix},
                "peerNamespaces": [PEER_NAMESPACE],
            },
        )
        self.kvpn.wait_ready("vpnservers", CHART_NAMESPACE, SERVER, timeout=30)

    def _start_agents(self) -> None:
        args = container_args(self.docs, "DaemonSet")
        for node in NODE_UNDERLAY:
            state = self.run_dir / f"{node}-state"
            argv = [
                sys.executable, "-m", "kvpn_agent.main", *args,
                "--netns", self.netns[node], "--node-name", self.node_name(node),
                "--state-dir", str(state), "--log-format", "plain",
            ]  # fmt: skip
            env = {**os.environ, "KUBECONFIG": str(self.kubeconfigs["agent"])}
            agent = NodeAgent(
                node,
                self.netns[node],
                argv,
                env,
                self.run_dir / f"{node}-wireguard",
                self.run_dir / f"agent-{node}.log",
            )
            self.agents[node] = agent
            agent.start(wait_ready=False)
            self.manifest.add_pid(agent.pid)
        for agent in self.agents.values():
            wait_for(f"agent on {agent.node} /readyz", agent.ready, timeout=30)
            wait_for(f"{self.interface} on {agent.node}", agent.uapi(self.interface).exists, timeout=15)

    # -- using it ----------------------------------------------------------------------------------

    def node_name(self, node: str) -> str:
        return f"{NETNS_PREFIX}-{self.suffix}-{node}"

    def server(self) -> dict[str, Any]:
        found = self.kvpn.get("vpnservers", CHART_NAMESPACE, SERVER)
        assert found is not None
        return found

    def add_peer(self, name: str, **spec: Any) -> tuple[dict[str, Any], str]:
        """A VpnPeer in the developers' namespace; (its object once Ready, its wg0.conf). Waits until
        both gateway nodes carry it."""
        spec.setdefault("serverRef", {"name": SERVER, "namespace": CHART_NAMESPACE})
        self.kvpn.create("vpnpeers", PEER_NAMESPACE, name, spec)
        peer = self.kvpn.wait_ready("vpnpeers", PEER_NAMESPACE, name, timeout=30)
        secret = self.kvpn.secret(PEER_NAMESPACE, peer["status"]["configSecretName"])
        config = decode(secret, "wg0.conf") if secret is not None else None
        if not config:
            raise WorldError(f"no wg0.conf for VpnPeer {name}")
        public_key = peer["status"]["publicKey"]
        for agent in self.agents.values():
            wait_for(
                f"the agent on {agent.node} to add {name}",
                lambda a=agent: public_key in a.uapi(self.interface).get().peers,  # type: ignore[misc]
                timeout=10,
            )
        return peer, config

    def join(self, name: str, path: Path, dns: str = "full") -> str:
        """What a developer does: `kubectl vpn join`, with the key pair made on the laptop; the file it wrote.

        --dns full gives the DNS line, which Laptop.up turns into the namespace's resolv.conf (this machine
        has no resolvconf); --dns none leaves DNS alone.
        """
        assert self.plane is not None
        argv = [PLUGIN, "join", f"{CHART_NAMESPACE}/{SERVER}", "-n", PEER_NAMESPACE, "--name", name]
        run(*argv, "--dns", dns, "-o", str(path), "--timeout", "30", env=self.plane.env())
        public_key = self.kvpn.get("vpnpeers", PEER_NAMESPACE, name)["status"]["publicKey"]  # type: ignore[index]
        for agent in self.agents.values():
            wait_for(
                f"the agent on {agent.node} to add {name}",
                lambda a=agent: public_key in a.uapi(self.interface).get().peers,  # type: ignore[misc]
                timeout=10,
            )
        return path.read_text()

    def add_laptop(self, name: str, *, join: bool = False, plugin_up: bool = False, **spec: Any) -> Laptop:
        """A laptop namespace on the underlay running wg-quick on a VpnPeer's config: the one the operator
        wrote, or with `join` the one `kubectl vpn join` wrote with a key made on the laptop. With
        `plugin_up` the laptop joins without DNS and brings the tunnel up with `kubectl vpn up`."""
        index = len(self.laptops) + 1
        ns = self._netns(f"laptop{index}" if index > 1 else "laptop")
        lan = self.netns["lan"]
        address = f"172.30.0.{LAPTOP_UNDERLAY_BASE + index}"
        self._veth(ns, "eth0", lan, f"laptop{index}")
        run("ip", "-n", lan, "link", "set", f"laptop{index}", "master", "br0")
        run("ip", "-n", ns, "addr", "add", f"{address}/{UNDERLAY_PREFIX}", "dev", "eth0")
        interface = f"{NETNS_PREFIX}{self.suffix}l{index}"
        self.manifest.paths += [str(ETC_NETNS / ns), str(SOCKET_DIR / f"{interface}.sock")]
        self.manifest.save()
        laptop = Laptop(self, name, ns, address, interface)
        self.laptops[name] = laptop
        if plugin_up:
            laptop.config = self.join(name, laptop.config_path, dns="none")
            laptop.plugin("up")
        else:
            laptop.up(self.join(name, self.run_dir / f"{name}-joined.conf") if join else self.add_peer(name, **spec)[1])
        return laptop

    def wait_reachable(self, laptop: Laptop, url: str = HELLO_URL, timeout: float = 15) -> str:
        body: str = wait_for(f"{url} from {laptop.name}", lambda: laptop.curl(url, 2), timeout=timeout)
        return body

    def diagnose(self) -> str:
        """What a failing assertion shows: WireGuard state, tables, routes, the logs' tails."""
        parts = []
        for node, agent in self.agents.items():
            with contextlib.suppress(Exception):
                parts.append(f"--- {node}: uapi peers\n{agent.uapi(self.interface).get().peers}")
        for role, ns in self.netns.items():
            for argv in (["nft", "list", "ruleset"], ["ip", "-br", "addr"], ["ip", "route"], ["wg", "show", "all"]):
                if argv[0] == "wg" and not role.startswith("laptop"):
                    continue
                proc = in_ns(ns, *argv, check=False)
                parts.append(f"--- {role}: {' '.join(argv)}\n{proc.stdout}{proc.stderr}")
        for log in sorted(self.run_dir.glob("*.log")):
            parts.append(f"--- {log.name}\n{log_tail(log, 30)}")
        return "\n".join(parts)

    def describe(self) -> dict[str, Any]:
        """What a person needs to poke at the world (the demo prints it)."""
        assert self.plane is not None
        server = self.server()
        return {
            "kubeconfig": str(self.plane.kubeconfig),
            "run_dir": str(self.run_dir),
            "netns": dict(self.netns),
            "nodes": {node: self.node_name(node) for node in NODE_UNDERLAY},
            "server": {"endpoint": server["status"].get("endpoint"), "routes": server["status"].get("routes")},
            "dns": server["status"].get("dnsNameserver"),
            "laptops": {name: {"netns": lap.netns, "interface": lap.interface} for name, lap in self.laptops.items()},
            "agents": {
                node: {"pid": a.pid, "log": str(a.log_path), "wg_dir": str(a.wg_dir)} for node, a in self.agents.items()
            },
            "interface": self.interface,
            "operator_log": str(self.run_dir / "operator.log"),
        }


@contextlib.contextmanager
def world(run_dir: Path | None = None) -> Iterator[World]:
    made = World(run_dir)
    made.start()
    try:
        yield made
    finally:
        made.stop()
