"""kvpn as users run it, on a cluster with real nodes (harness/cluster.py), for tests/e2e, the demo and bench/.

- the project's image, built from its Dockerfile by hack/image.sh and imported into every node;
- cluster workloads as pods from that image: `hello` (a Deployment with a pod on each node, and its
  ClusterIP Service) and a DNS stand-in for CoreDNS (kube-system/kube-dns; CoreDNS is not packaged
  here), both scripts in harness/pods/ shipped as a ConfigMap;
- kvpn installed with `helm install` of helm/kvpn into a namespace labelled for Pod Security, changing
  only values (image, pull policy, HostPort); VpnServers applied with kubectl: `cluster` (HostPort,
  51820) and `nodeport` (NodePort, 51821), their routes and DNS discovered;
- laptops: machines on the node network running the stock `wg-quick up` (wireguard-go) on a VpnPeer's
  config, or `kubectl vpn join`/`up` as a developer does.

Everything is recorded in the cluster's Manifest as it is made (see `sweep`). Traffic stays inside
the cluster's namespaces.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml
from kubernetes import client

from harness.chart import CHART, tool_dir
from harness.cluster import (
    CLUSTER_DOMAIN,
    DNS_SERVICE_IP,
    PREFIX,
    Cluster,
    Manifest,
    Node,
    in_ns,
    run,
)
from harness.controlplane import log_tail
from harness.kvpn import Kvpn, decode, wait_for
from kvpn_agent.desired import interface_name
from kvpn_agent.uapi import UapiClient, UapiError
from kvpn_core.contract import LABEL_ROLE, ROLE_GATEWAY

REPO = Path(__file__).resolve().parents[1]
IMAGE_SCRIPT = REPO / "hack" / "image.sh"
PODS_DIR = Path(__file__).with_name("pods")
TCP_PROBE = Path(__file__).with_name("tcp_probe.py")
REQUEST_LOOP = Path(__file__).with_name("request_loop.py")
PLUGIN = str(Path(sys.executable).with_name("kubectl-vpn"))  # installed with the project into the venv
ETC_NETNS = Path("/etc/netns")

RELEASE = "kvpn"
CHART_NAMESPACE = "kvpn-system"  # the release, the VpnServers
PEER_NAMESPACE = "dev"  # the developers' VpnPeers
SERVER = "cluster"  # HostPort
NODEPORT_SERVER = "nodeport"
RELAY_NAMESPACE = "kvpn-relay"  # the chart's relay.namespace, when a world enables the relay
LISTEN_PORTS = {SERVER: 51820, NODEPORT_SERVER: 51821}
POOLS = {SERVER: "10.8.0.0/24", NODEPORT_SERVER: "10.9.0.0/24"}
POOLS6 = {SERVER: "fd00:8::/120", NODEPORT_SERVER: "fd00:9::/120"}  # a dual-stack world's servers'

HELLO_PORT, ECHO_PORT = 8080, 9000
HELLO_SERVICE_PORT = 80
HELLO_NAME = f"hello.default.svc.{CLUSTER_DOMAIN}"
HELLO_URL = f"http://{HELLO_NAME}/"
DNS_PORT = 5353


class WorldError(RuntimeError):
    pass


# --- the image -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """The project's image as hack/image.sh built it: an OCI archive and the references in it."""

    archive: Path
    repository: str  # what the chart's image.repository names (containerd's normalised form)
    tag: str

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"


def build_image(tag: str | None = None) -> Image:
    """hack/image.sh (cached: about a second when nothing changed); `tag` builds another tag of it."""
    argv = [str(IMAGE_SCRIPT), *(["--tag", tag] if tag else [])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise WorldError(f"hack/image.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    pairs = [line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line]
    archives = [v for k, v in pairs if k == "archive"]
    references = [v for k, v in pairs if k == "image"]
    if not archives or not references:
        raise WorldError(f"hack/image.sh printed no archive= or image= line:\n{proc.stdout}")
    # The last reference is the one that names exactly this content (src-<hash>, or the --tag asked for).
    repository, _, tag_ = references[-1].rpartition(":")
    archive = Path(archives[-1])
    return Image(archive, repository, tag_)


# --- laptops ---------------------------------------------------------------------------------------


@dataclass
class Laptop:
    """A machine on the node network running stock wg-quick on a VpnPeer's config."""

    world: World
    name: str  # the VpnPeer
    netns: str
    address: str
    interface: str
    server: str = SERVER
    config: str = ""

    @property
    def config_path(self) -> Path:
        """wg-quick names the interface after the file: the laptop's unique interface name."""
        return self.world.run_dir / f"{self.interface}.conf"

    def up(self, config: str) -> None:
        """wg-quick on a wg0.conf. Its DNS line would make wg-quick call resolvconf, which this machine
        lacks: the line is stripped and the harness writes the namespace's resolv.conf from it instead
        (what resolvconf would do)."""
        self.write_config(config)
        with (self.world.run_dir / "wg-quick.log").open("a") as log:
            in_ns(
                self.netns, "wg-quick", "up", str(self.config_path),
                env={**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go"},
                stdout=log, stderr=log,
            )  # fmt: skip

    def write_config(self, config: str) -> None:
        """The file at config_path without its DNS line, whose resolvers go into the namespace's
        resolv.conf (what wg-quick's call of resolvconf would do)."""
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
        self.config_path.write_text(re.sub(r"^DNS = .*\n", "", config, flags=re.M))
        self.config_path.chmod(0o600)

    def plugin(self, action: str) -> None:
        """`kubectl vpn up|down` inside the laptop's namespace, as the developer runs it."""
        env = {**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go"}
        in_ns(self.netns, PLUGIN, action, str(self.config_path), env=env)

    def curl(self, url: str = HELLO_URL, max_time: float = 3) -> str | None:
        """The body, or None when nothing answered within ``max_time``."""
        proc = in_ns(
            self.netns, "curl", "-s", "-f", "--max-time", str(max_time), url, check=False, timeout=max_time + 5
        )
        return proc.stdout if proc.returncode == 0 else None

    def server_public_key(self) -> str:
        return in_ns(self.netns, "wg", "show", self.interface, "peers").stdout.split()[0]

    def endpoint(self) -> str:
        """The gateway address the tunnel sends to; "" while it has no peer (`kubectl vpn up --follow`
        re-adds it when it moves the tunnel) or no endpoint yet."""
        fields = in_ns(self.netns, "wg", "show", self.interface, "endpoints").stdout.split()
        return fields[1] if len(fields) > 1 and fields[1] != "(none)" else ""


@dataclass
class Outage:
    """What a laptop saw while something happened: requests made, failed, and the longest time
    without an answer (between two answered requests, or since the start or until the end)."""

    attempts: int = 0
    failures: int = 0
    longest_s: float = 0.0
    gaps: list[list[float]] = field(default_factory=list)
    """The long ones, as [seconds since the start, length] pairs."""


def start_probe(laptop: Laptop, script: Path, *args: str, ready: str, what: str) -> subprocess.Popen[str]:
    """One of the probe scripts (tcp_probe.py, request_loop.py) in the laptop's namespace, once its first
    line says ``ready``; recorded in the manifest, so a killed test leaves none behind."""
    argv = ["ip", "netns", "exec", laptop.netns, sys.executable, str(script), *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline() or "{}")
    if not first.get(ready):
        proc.wait(timeout=10)
        raise WorldError(f"{what} of {laptop.name} did not start: {first}")
    laptop.world.manifest.add_pid(proc.pid)
    return proc


def stop_probe(proc: subprocess.Popen[str], timeout: float = 20) -> dict[str, Any]:
    """SIGTERM, then the probe's last line: its result ({} when it printed none)."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    found: dict[str, Any] = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return found


class TrafficLoop:
    """New requests from a laptop in a loop while something happens (harness/request_loop.py, in the
    laptop's namespace): `with TrafficLoop(laptop) as t: ...`, then `t.outage`."""

    def __init__(self, laptop: Laptop, url: str = HELLO_URL, max_time: float = 1.0, pause: float = 0.05) -> None:
        self.laptop, self.url, self.max_time, self.pause = laptop, url, max_time, pause
        self.outage = Outage()
        self._proc: subprocess.Popen[str] | None = None

    @property
    def failures(self) -> int:
        return self.outage.failures

    def __enter__(self) -> TrafficLoop:
        args = (self.url, "--max-time", str(self.max_time), "--pause", str(self.pause))
        self._proc = start_probe(self.laptop, REQUEST_LOOP, *args, ready="started", what="the request loop")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        found = stop_probe(self._proc, timeout=self.max_time + 20)
        self.outage = Outage(
            attempts=int(found.get("attempts", 0)),
            failures=int(found.get("failures", 0)),
            longest_s=float(found.get("longest_gap_s", float("inf"))),
            gaps=list(found.get("gaps", [])),
        )


class Poll:
    """A thread calling `poll` every `period` seconds while the `with` block runs; a call that fails (an
    API hiccup) counts as no observation."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def poll(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            with contextlib.suppress(Exception):
                self.poll()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class EndpointsWatch(Poll):
    """The ready addresses of a Service's Endpoints, polled while something happens: `dropped` names every
    address that was an endpoint at the start and missing at some point (kube-proxy then moves UDP flows)."""

    def __init__(self, world: World, namespace: str, service: str, period: float = 0.2) -> None:
        super().__init__(period)
        self.world, self.namespace, self.service = world, namespace, service
        self.start: set[str] = set()
        self.dropped: set[str] = set()

    def addresses(self) -> set[str]:
        endpoints = self.world.core.read_namespaced_endpoints(self.service, self.namespace)
        return {a.ip for subset in endpoints.subsets or [] for a in subset.addresses or []}

    def poll(self) -> None:
        self.dropped |= self.start - self.addresses()

    def __enter__(self) -> Self:
        self.start = self.addresses()
        return super().__enter__()


class HandoverWatch(Poll):
    """The gateway leases of one node, polled while something happens: `durations` holds every lease
    duration they had, so a stopping agent's handover (GATEWAY_HANDOVER_SECONDS or, for a pod being
    deleted, GATEWAY_REPLACEMENT_SECONDS) shows between its successor's renewals (GATEWAY_LEASE_SECONDS)."""

    def __init__(self, world: World, node: Node, period: float = 0.5) -> None:
        super().__init__(period)
        self.node = node
        self.durations: set[int] = set()
        self._leases = client.CoordinationV1Api(world.cluster.api)

    def poll(self) -> None:
        found = self._leases.list_namespaced_lease(CHART_NAMESPACE, label_selector=f"{LABEL_ROLE}={ROLE_GATEWAY}")
        self.durations |= {
            lease.spec.lease_duration_seconds for lease in found.items if lease.spec.holder_identity == self.node.name
        }


class TcpProbe:
    """One TCP connection from a laptop to hello's echo port, kept open while something happens
    (harness/tcp_probe.py); `result` says whether it broke and its longest silence."""

    def __init__(self, laptop: Laptop, host: str, port: int = ECHO_PORT, interval: float = 0.05) -> None:
        self.laptop, self.host, self.port, self.interval = laptop, host, port, interval
        self.result: dict[str, Any] = {}
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> TcpProbe:
        args = (self.host, str(self.port), "--interval", str(self.interval))
        self._proc = start_probe(self.laptop, TCP_PROBE, *args, ready="connected", what=f"the tcp probe to {self.host}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self.result = stop_probe(self._proc) or {"broken": "no result"}


# --- the world -------------------------------------------------------------------------------------


class World:
    """`with World() as world: ...`, or start()/stop(); see the module docstring."""

    def __init__(
        self,
        run_dir: Path | None = None,
        manifest: Path | None = None,
        suffix: str | None = None,
        nodes: int = 2,
        helm_values: Sequence[str] = (),
        namespaces: Sequence[str] = (),
        dual_stack: bool = False,
    ) -> None:
        """`namespaces`: more (team) namespaces, made before the chart is installed (its RoleBindings go there).
        `dual_stack`: the cluster's too (Cluster), hello's Service gets an IPv6 ClusterIP as well, and both
        servers an IPv6 pool (POOLS6)."""
        self.suffix = suffix or secrets.token_hex(3)
        self.dual_stack = dual_stack
        self.cluster = Cluster(nodes, run_dir=run_dir, manifest=manifest, suffix=self.suffix, dual_stack=dual_stack)
        self.image: Image | None = None
        self.laptops: dict[str, Laptop] = {}
        self.timings: dict[str, float] = {}
        self.helm_values = list(helm_values)
        self.namespaces = list(namespaces)
        self._tools: Path | None = None
        self.interfaces = {name: interface_name(CHART_NAMESPACE, name) for name in LISTEN_PORTS}

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        return self.cluster.manifest

    @property
    def run_dir(self) -> Path:
        return self.cluster.run_dir

    @property
    def kvpn(self) -> Kvpn:
        return Kvpn(self.cluster.api)

    @property
    def core(self) -> Any:
        return self.cluster.core

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes

    def __enter__(self) -> World:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        began = time.monotonic()
        try:
            self._step("image", self._build_image)
            self._step("cluster", self._start_cluster)
            self._step("workloads", self._start_workloads)
            self._step("helm install", self._install)
            self._step("kvpn pods ready", self._wait_kvpn_ready)
            self._step("vpnservers", self._create_servers)
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = round(time.monotonic() - began, 2)

    def _step(self, name: str, action: Callable[[], None]) -> None:
        began = time.monotonic()
        action()
        self.timings[name] = round(time.monotonic() - began, 2)

    def stop(self) -> None:
        for laptop in self.laptops.values():
            with contextlib.suppress(Exception):
                in_ns(laptop.netns, "wg-quick", "down", str(laptop.config_path), check=False)
        self.cluster.stop()

    # -- building ----------------------------------------------------------------------------------

    @property
    def tools(self) -> Path:
        if self._tools is None:
            self._tools = tool_dir()
        return self._tools

    def _build_image(self) -> None:
        self.image = build_image()

    def _start_cluster(self) -> None:
        assert self.image is not None
        self.cluster._images = [self.image.archive]
        self.cluster.start()
        self.manifest.info["world"] = True
        self.manifest.save()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
        proc = run(
            str(self.tools / "kubectl"), *args, input=input, check=check, timeout=timeout, env=self.cluster.env()
        )
        return proc.stdout

    def helm(self, *args: str, timeout: float = 300) -> str:
        home = self.run_dir / "helm-home"
        private = {f"HELM_{kind}_HOME": str(home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}
        env = {**self.cluster.env(), **private}
        return run(str(self.tools / "helm"), *args, timeout=timeout, env=env).stdout

    def apply(self, docs: Sequence[dict[str, Any]]) -> None:
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))

    def _start_workloads(self) -> None:
        scripts = {p.name: p.read_text() for p in sorted(PODS_DIR.glob("*.py"))}
        assert self.image is not None
        image = self.image.reference
        docs: list[dict[str, Any]] = []
        for ns in ("default", "kube-system"):
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "kvpn-test-pods", "namespace": ns},
                    "data": scripts,
                }
            )
        volume = {"name": "scripts", "configMap": {"name": "kvpn-test-pods"}}
        mount = {"name": "scripts", "mountPath": "/pods", "readOnly": True}
        downward = [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ]
        hello_labels = {"app": "hello"}
        docs.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "hello", "namespace": "default"},
                "spec": {
                    "replicas": len(self.nodes),
                    "selector": {"matchLabels": hello_labels},
                    "template": {
                        "metadata": {"labels": hello_labels},
                        "spec": {
                            # One on each node: a pod IP on another node than the gateway's is always there.
                            "affinity": {
                                "podAntiAffinity": {
                                    "requiredDuringSchedulingIgnoredDuringExecution": [
                                        {
                                            "labelSelector": {"matchLabels": hello_labels},
                                            "topologyKey": "kubernetes.io/hostname",
                                        }
                                    ]
                                }
                            },
                            "containers": [
                                {
                                    "name": "hello",
                                    "image": image,
                                    "imagePullPolicy": "Never",
                                    "command": ["python3", "/pods/hello.py", str(HELLO_PORT), str(ECHO_PORT)],
                                    "env": downward,
                                    "ports": [{"containerPort": HELLO_PORT}, {"containerPort": ECHO_PORT}],
                                    "readinessProbe": {"tcpSocket": {"port": HELLO_PORT}, "periodSeconds": 2},
                                    "volumeMounts": [mount],
                                }
                            ],
                            "volumes": [volume],
                        },
                    },
                },
            }
        )
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "hello", "namespace": "default"},
                "spec": {
                    **({"ipFamilyPolicy": "RequireDualStack"} if self.dual_stack else {}),
                    "selector": hello_labels,
                    "ports": [
                        {"name": "http", "port": HELLO_SERVICE_PORT, "targetPort": HELLO_PORT},
                        {"name": "echo", "port": ECHO_PORT, "targetPort": ECHO_PORT},
                    ],
                },
            }
        )
        dns_labels = {"k8s-app": "kube-dns"}
        docs += [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "dns-standin", "namespace": "kube-system"},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "kvpn-test-dns-standin"},
                "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["list"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "kvpn-test-dns-standin"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "kvpn-test-dns-standin",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "dns-standin", "namespace": "kube-system"}],
            },
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "dns-standin", "namespace": "kube-system", "labels": dns_labels},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": dns_labels},
                    "template": {
                        "metadata": {"labels": dns_labels},
                        "spec": {
                            "serviceAccountName": "dns-standin",
                            "dnsPolicy": "Default",
                            "containers": [
                                {
                                    "name": "dns",
                                    "image": image,
                                    "imagePullPolicy": "Never",
                                    "command": [
                                        "python3",
                                        "/pods/dns_standin.py",
                                        "--port",
                                        str(DNS_PORT),
                                        "--domain",
                                        CLUSTER_DOMAIN,
                                    ],
                                    "ports": [
                                        {"containerPort": DNS_PORT, "protocol": "UDP"},
                                        {"containerPort": DNS_PORT, "protocol": "TCP"},
                                    ],
                                    "readinessProbe": {"tcpSocket": {"port": DNS_PORT}, "periodSeconds": 2},
                                    "volumeMounts": [mount],
                                }
                            ],
                            "volumes": [volume],
                        },
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": dns_labels},
                "spec": {
                    "clusterIP": DNS_SERVICE_IP,
                    "selector": dns_labels,
                    "ports": [
                        {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": DNS_PORT},
                        {"name": "dns-tcp", "protocol": "TCP", "port": 53, "targetPort": DNS_PORT},
                    ],
                },
            },
        ]
        self.apply(docs)
        self.wait_rollout("default", "deployment/hello")
        self.wait_rollout("kube-system", "deployment/dns-standin")

    def wait_rollout(self, namespace: str, what: str, timeout: float = 120) -> None:
        self.kubectl("-n", namespace, "rollout", "status", what, f"--timeout={timeout:.0f}s", timeout=timeout + 10)

    def _install(self) -> None:
        assert self.image is not None
        self.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "name": CHART_NAMESPACE,
                        # What the README tells platform teams: the agent needs hostNetwork and NET_ADMIN.
                        "labels": {"pod-security.kubernetes.io/enforce": "privileged"},
                    },
                },
                *(
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
                    for name in (PEER_NAMESPACE, *self.namespaces)
                ),
            ]
        )
        self.helm(
            "install", RELEASE, str(CHART), "--namespace", CHART_NAMESPACE,
            "--set", f"image.repository={self.image.repository}",
            "--set", f"image.tag={self.image.tag}",
            "--set", "image.pullPolicy=Never",
            "--set", "agent.hostPort=true",  # the `cluster` server is exposed by HostPort
            "--set", f"operator.secretNamespaces={{{PEER_NAMESPACE}}}",  # where the peers' config Secrets go
            *(a for v in self.helm_values for a in ("--set", v)),
        )  # fmt: skip

    def _wait_kvpn_ready(self) -> None:
        for kind, name in self.workloads():
            self.wait_ready(kind, name)

    def wait_ready(self, kind: str, name: str, namespace: str = CHART_NAMESPACE, timeout: float = 120) -> None:
        """A Deployment or DaemonSet with every pod of its current template Ready (`rollout status` does not
        follow OnDelete DaemonSets)."""

        def done() -> bool:
            obj = json.loads(self.kubectl("-n", namespace, "get", kind, name, "-o", "json"))
            status, generation = obj.get("status") or {}, obj["metadata"]["generation"]
            if status.get("observedGeneration", 0) < generation:
                return False
            if kind == "daemonset":
                want = status.get("desiredNumberScheduled", -1)
                # OnDelete: pods of an older template are the current ones until someone deletes them.
                rolling = (obj["spec"].get("updateStrategy") or {}).get("type", "RollingUpdate") == "RollingUpdate"
                updated = status.get("updatedNumberScheduled") == want if rolling else True
                return bool(updated and want == status.get("numberReady") == status.get("numberAvailable"))
            want = obj["spec"].get("replicas", 1)
            return bool(want == status.get("readyReplicas") == status.get("updatedReplicas"))

        wait_for(f"{kind}/{name} ready", done, timeout=timeout, interval=0.5)

    def workloads(self) -> list[tuple[str, str]]:
        """The chart's Deployments and DaemonSets, as (kind, name)."""
        out = self.kubectl("-n", CHART_NAMESPACE, "get", "deployment,daemonset", "-o", "json")
        return [(i["kind"].lower(), i["metadata"]["name"]) for i in json.loads(out)["items"]]

    def _create_servers(self) -> None:
        docs = []
        for name, port in LISTEN_PORTS.items():
            expose: dict[str, Any] = {"type": "HostPort" if name == SERVER else "NodePort"}
            docs.append(
                {
                    "apiVersion": "kvpn.dev/v1alpha1",
                    "kind": "VpnServer",
                    "metadata": {"name": name, "namespace": CHART_NAMESPACE},
                    # Endpoint, routes and DNS: discovered from the cluster.
                    "spec": {
                        "addressPool": [POOLS[name], *([POOLS6[name]] if self.dual_stack else [])],
                        "listenPort": port,
                        "expose": expose,
                        "peerNamespaces": [PEER_NAMESPACE],
                    },
                }
            )
        self.apply(docs)
        for name in LISTEN_PORTS:
            self.kvpn.wait_ready("vpnservers", CHART_NAMESPACE, name, timeout=60)
            # Every gateway serving, before any laptop: the endpoint is then the first node's.
            wait_for(
                f"every gateway serving {name}",
                lambda s=name: (
                    [  # type: ignore[misc]
                        g["node"] for g in (self.server(s).get("status") or {}).get("gateways", []) if g["ready"]
                    ]
                    == [n.name for n in self.nodes]
                ),
                timeout=30,
            )
            for node in self.nodes:
                wait_for(
                    f"{self.interfaces[name]} on {node.role}",
                    lambda n=node, s=name: self.uapi(n, s).exists(),
                    timeout=30,
                )

    # -- using it ----------------------------------------------------------------------------------

    def uapi(self, node: Node, server: str = SERVER) -> UapiClient:
        """The UAPI socket of a server's interface on a node (the node's /var/run/wireguard)."""
        return UapiClient(self.interfaces[server], socket_dir=node.dir / "run" / "wireguard")

    def uapi_peers(self, node: Node, server: str = SERVER) -> set[str]:
        """The peers on a server's interface on a node; none while the node's agent has not made it yet."""
        try:
            return set(self.uapi(node, server).get().peers)
        except UapiError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):  # no socket (yet), or no device behind it
                return set()
            raise

    def server(self, name: str = SERVER) -> dict[str, Any]:
        found = self.kvpn.get("vpnservers", CHART_NAMESPACE, name)
        assert found is not None
        return found

    def pods(self, namespace: str = CHART_NAMESPACE, selector: str = "") -> list[dict[str, Any]]:
        out = self.kubectl("-n", namespace, "get", "pods", "-o", "json", *(["-l", selector] if selector else []))
        items: list[dict[str, Any]] = json.loads(out)["items"]
        return items

    @property
    def chart(self) -> Path:
        return CHART

    def pod_by_name(self, name: str, namespace: str = CHART_NAMESPACE) -> dict[str, Any]:
        pod: dict[str, Any] = json.loads(self.kubectl("-n", namespace, "get", "pod", name, "-o", "json"))
        return pod

    def component_pods(self, component: str) -> list[dict[str, Any]]:
        return self.pods(selector=f"app.kubernetes.io/component={component}")

    def pod_on_node(self, component: str) -> str:
        """The node name of the component's (only) pod."""
        (pod,) = self.component_pods(component)
        return str(pod["spec"].get("nodeName") or "")

    def pod_on(self, component: str, node: Node) -> dict[str, Any]:
        return next(p for p in self.component_pods(component) if p["spec"].get("nodeName") == node.name)

    def save_pod_logs(self) -> Path:
        """Every container log of the chart's pods (and of their previous runs) into run_dir/pod-logs:
        called before a pod is deleted and at the end, so the final check covers deleted pods too."""
        folder = self.run_dir / "pod-logs"
        folder.mkdir(exist_ok=True)
        pods = [(namespace, pod) for namespace in (CHART_NAMESPACE, RELAY_NAMESPACE) for pod in self.pods(namespace)]
        for namespace, pod in pods:
            name = pod["metadata"]["name"]
            for status in pod.get("status", {}).get("containerStatuses") or []:
                for previous in (False, True):
                    if previous and not status.get("restartCount"):
                        continue
                    args = [
                        "-n",
                        namespace,
                        "logs",
                        name,
                        "-c",
                        status["name"],
                        *(["--previous"] if previous else []),
                    ]
                    text = self.kubectl(*args, check=False, timeout=30)
                    suffix = ".previous" if previous else ""
                    (folder / f"{name}.{status['name']}{suffix}.log").write_text(text)
        return folder

    # -- kvpn's pods coming and going, as a platform team makes them --------------------------------

    def agent_uids(self) -> set[str]:
        return {p["metadata"]["uid"] for p in self.component_pods("agent")}

    def delete_agent_pod(self, node: Node) -> None:
        """`kubectl delete pod` of the node's agent; returns once its replacement is Ready."""
        pod = self.pod_on("agent", node)
        self.kubectl("-n", CHART_NAMESPACE, "delete", "pod", pod["metadata"]["name"], "--wait=true", timeout=90)
        self.wait_ready("daemonset", f"{RELEASE}-agent")

    def rolling_update(self, tag: str = "rolled") -> Image:
        """A new image tag (hack/image.sh --tag), imported into the nodes, then `helm upgrade` to it;
        returns once the agent DaemonSet and the operator Deployment run it."""
        image = build_image(tag=tag)
        self.cluster.import_images([image.archive])
        self.helm(
            "upgrade", RELEASE, str(CHART), "-n", CHART_NAMESPACE, "--reuse-values", "--set", f"image.tag={image.tag}"
        )
        self.wait_ready("daemonset", f"{RELEASE}-agent", timeout=180)
        self.wait_ready("deployment", f"{RELEASE}-operator", timeout=120)
        return image

    def delete_operator_pod(self, node: Node | None = None) -> None:
        """`kubectl delete pod` of the operator; returns once its replacement is Ready."""
        (pod,) = self.component_pods("operator")
        self.kubectl("-n", CHART_NAMESPACE, "delete", "pod", pod["metadata"]["name"], "--wait=true", timeout=90)
        self.wait_ready("deployment", f"{RELEASE}-operator")

    def cordon_and_evict_agent(self, node: Node) -> None:
        """`kubectl cordon`, then the Eviction API on the node's agent pod (what a drain does to a pod it
        may evict); returns once the DaemonSet's replacement on that node is Ready, then uncordons."""
        self.kubectl("cordon", node.name)
        try:
            pod = self.pod_on("agent", node)
            name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
            eviction = {
                "apiVersion": "policy/v1beta1",
                "kind": "Eviction",
                "metadata": {"name": name, "namespace": CHART_NAMESPACE},
            }
            self.core.create_namespaced_pod_eviction(name, CHART_NAMESPACE, eviction)
            # Usually 10-20 s (the grace period, then the kubelet's cleanup); once in a CI run the kubelet
            # took 60 s to confirm the deletion after the pod's volumes were gone.
            wait_for("the evicted agent pod gone", lambda: uid not in self.agent_uids(), timeout=150)
            self.wait_ready("daemonset", f"{RELEASE}-agent")  # DaemonSet pods tolerate a cordoned node
        finally:
            self.kubectl("uncordon", node.name)

    @contextlib.contextmanager
    def network_cut(self, node: Node) -> Iterator[None]:
        """The node's cable pulled for the block (Cluster.cut_network), put back however the block ends."""
        self.cluster.cut_network(node)
        try:
            yield
        finally:
            self.cluster.restore_network(node)

    def node_of_endpoint(self, laptop: Laptop) -> Node:
        node = self.endpoint_node(laptop)
        if node is None:
            raise WorldError(f"{laptop.name}'s tunnel sends to no node ({laptop.endpoint() or 'no endpoint'})")
        return node

    def endpoint_node(self, laptop: Laptop) -> Node | None:
        """The node the laptop's tunnel sends to now, if any (None between a `--follow` move's two steps)."""
        host = laptop.endpoint().rsplit(":", 1)[0]
        return next((n for n in self.nodes if n.address == host), None)

    def add_peer(
        self, name: str, server: str = SERVER, namespace: str = PEER_NAMESPACE, **spec: Any
    ) -> tuple[dict[str, Any], str]:
        """A VpnPeer in the developers' namespace (or another team's); (its object once Ready, its wg0.conf).
        Waits until every gateway node carries it."""
        spec.setdefault("serverRef", {"name": server, "namespace": CHART_NAMESPACE})
        self.kvpn.create("vpnpeers", namespace, name, spec)
        peer = self.kvpn.wait_ready("vpnpeers", namespace, name, timeout=30)
        secret = self.kvpn.secret(namespace, peer["status"]["configSecretName"])
        config = decode(secret, "wg0.conf") if secret is not None else None
        if not config:
            raise WorldError(f"no wg0.conf for VpnPeer {name}")
        self.wait_on_gateways(peer["status"]["publicKey"], server)
        return peer, config

    def wait_on_gateways(self, public_key: str, server: str = SERVER, timeout: float = 15) -> None:
        for node in self.nodes:
            wait_for(
                f"the agent on {node.role} to add {public_key}",
                lambda n=node: public_key in self.uapi_peers(n, server),  # type: ignore[misc]
                timeout=timeout,
            )

    def join(self, name: str, path: Path, dns: str = "full", server: str = SERVER) -> str:
        """What a developer does: `kubectl vpn join`, the key pair made on the laptop; the file it wrote."""
        argv = [PLUGIN, "join", f"{CHART_NAMESPACE}/{server}", "-n", PEER_NAMESPACE, "--name", name]
        run(*argv, "--dns", dns, "-o", str(path), "--timeout", "30", env=self.cluster.env())
        peer = self.kvpn.get("vpnpeers", PEER_NAMESPACE, name)
        assert peer is not None
        self.wait_on_gateways(peer["status"]["publicKey"], server)
        return path.read_text()

    def add_laptop(
        self, name: str, *, server: str = SERVER, join: bool = False, plugin_up: bool = False, **spec: Any
    ) -> Laptop:
        """A laptop on the node network running wg-quick on a VpnPeer's config: the one the operator wrote,
        or with `join` the one `kubectl vpn join` wrote with a key made on the laptop. With `plugin_up`
        the laptop joins without DNS and brings the tunnel up with `kubectl vpn up`."""
        index = len(self.laptops) + 1
        ns, address = self.cluster.add_host(f"laptop{index}")
        interface = f"{PREFIX}{self.suffix}l{index}"  # /run/wireguard is the machine's: unique names
        self.manifest.add("paths", str(ETC_NETNS / ns))
        self.manifest.add("paths", f"/run/wireguard/{interface}.sock")
        laptop = Laptop(self, name, ns, address, interface, server)
        self.laptops[name] = laptop
        if plugin_up:
            laptop.config = self.join(name, laptop.config_path, dns="none", server=server)
            laptop.plugin("up")
        elif join:
            laptop.up(self.join(name, self.run_dir / f"{name}-joined.conf", server=server))
        else:
            laptop.up(self.add_peer(name, server=server, **spec)[1])
        return laptop

    def wait_reachable(self, laptop: Laptop, url: str = HELLO_URL, timeout: float = 20) -> str:
        body: str = wait_for(f"{url} from {laptop.name}", lambda: laptop.curl(url, 2), timeout=timeout)
        return body

    def hello_pods(self) -> list[dict[str, Any]]:
        return [p for p in self.pods("default", "app=hello") if p.get("status", {}).get("podIP")]

    def diagnose(self) -> str:
        """What a failing assertion shows: pods, WireGuard state, the logs' tails."""
        parts = [self.kubectl("get", "pods,vpnservers,vpnpeers", "-A", "-o", "wide", check=False)]
        for node in self.nodes:
            for server in LISTEN_PORTS:
                with contextlib.suppress(Exception):
                    parts.append(f"--- {node.role} {server}: uapi peers\n{list(self.uapi(node, server).get().peers)}")
            parts.append(node.logs(10))
        with contextlib.suppress(Exception):
            folder = self.save_pod_logs()
            parts += [f"--- {log.name}\n{log_tail(log, 20)}" for log in sorted(folder.glob("*.log"))]
        return "\n".join(parts)

    def describe(self) -> dict[str, Any]:
        """What a person needs to poke at the world (the demo prints it)."""
        server = self.server()
        return {
            **self.cluster.describe(),
            "image": self.image.reference if self.image else "",
            "kubectl": str(self.tools / "kubectl"),
            "server": {"endpoint": server["status"].get("endpoint"), "routes": server["status"].get("routes")},
            "dns": server["status"].get("dnsNameserver"),
            "laptops": {
                n: {"netns": lap.netns, "interface": lap.interface, "address": lap.address}
                for n, lap in self.laptops.items()
            },
            "interfaces": self.interfaces,
        }


@contextlib.contextmanager
def world(run_dir: Path | None = None) -> Iterator[World]:
    made = World(run_dir)
    made.start()
    try:
        yield made
    finally:
        made.stop()
