"""A Kubernetes cluster with real nodes on this machine, without Docker, for tests/e2e, the demo and bench/.

- the control plane (etcd, kube-apiserver, kube-controller-manager allocating node pod CIDRs,
  kube-scheduler), on an address of a veth the harness adds to the host (the nodes' way to it);
- a node network: a bridge in namespace "lan" joining that veth, the nodes and any extra hosts
  (`add_host`: a laptop, for instance); `cut_network` pulls a node's cable, `restore_network` puts it back;
- two or more nodes, each a network namespace with a mount namespace of its own running containerd,
  kubelet and kube-proxy (iptables mode) (harness/node.sh); pods on a CNI bridge (the reference
  `bridge` and `host-local` plugins) in the node's pod CIDR, routes between the nodes' pod networks,
  and pods reaching the host (the API server) masqueraded to their node's address;
- with `dual_stack`, IPv6 as well: the IPv6DualStack feature gate on every component (alpha in 1.20), a
  second Service network and pod CIDR per node, IPv6 on the node network and the pod bridge;
- images without a registry: a pause image built here from a static C program, and OCI archives
  (`import_image`, e.g. the project's image from hack/image.sh) imported into every node's containerd.

Every name carries a random suffix; nodes never share a cgroup root, a state folder, a socket or a pod
log folder. Everything made is recorded as it goes in a Manifest (a JSON file with `manifest=`), so
`stop()`, or `sweep()` from another process, removes all of it, whatever state a start left it in:
processes (by pid and by cgroup), namespaces (and with them links, iptables rules, pod networks),
cgroups, the host's veth, files. Traffic stays inside these namespaces and the host's veth.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import commands
from harness.controlplane import (
    SERVICE_CIDR,
    SERVICE_CIDR6,
    ControlPlane,
    cache_bin_dir,
    die_with_parent,
    find_binaries,
    log_tail,
)

NODE_SCRIPT = Path(__file__).with_name("node.sh")
CLUSTER_CIDR = "10.244.0.0/16"
NODE_CIDR_MASK = 24
# A dual-stack cluster's IPv6 halves (Kubernetes 1.20: the IPv6DualStack feature gate, alpha there).
CLUSTER_CIDR6 = "fd00:10:244::/56"
NODE_CIDR_MASK6 = 64
NODE_NETWORK6 = ipaddress.IPv6Network("fd00:10:31::/64")  # each cluster's lan is a namespace of its own
CLUSTER_DOMAIN = "cluster.local"
DNS_SERVICE_IP = "10.96.0.10"  # the kube-dns Service's clusterIP, as kubelet tells pods
PREFIX = "kvc"
CGROUP_FS = Path("/sys/fs/cgroup")
PAUSE_IMAGE = "localhost/kvpn-test/pause:1.0"
RUN_TIMEOUT = 30.0
NODE_READY_TIMEOUT = 120.0
# What node.sh replaces inside a node with folders of the node's own: a run folder there would vanish.
NODE_PRIVATE = (Path("/run"), Path("/var/lib"), Path("/var/log"))

PAUSE_C = r"""
/* The pod sandbox's process: holds the pod's namespaces, reaps orphans, exits on SIGTERM/SIGINT. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void down(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  struct sigaction stop = {.sa_handler = down}, child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  sigaction(SIGINT, &stop, 0);
  sigaction(SIGTERM, &stop, 0);
  sigaction(SIGCHLD, &child, 0);
  for (;;) pause();
}
"""


class ClusterError(RuntimeError):
    """The cluster could not start; the message carries the relevant log tail."""


def run(
    *argv: str, check: bool = True, timeout: float = RUN_TIMEOUT, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """harness.commands.run, failing with ClusterError: what the cluster's callers (the demo, World) catch."""
    return commands.run(*argv, check=check, timeout=timeout, error=ClusterError, **kwargs)


def in_ns(ns: str, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *argv, **kwargs)


def cache_dir() -> Path:
    """${KVPN_CACHE:-~/.cache/kvpn}, as the hack/ scripts use it."""
    return cache_bin_dir().parent.parent


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat: tells a process from a later one with the same pid. None when
    there is no such process or it has exited (a zombie nobody reaped yet)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


# --- what was created, recorded as it goes ---------------------------------------------------------


@dataclass
class Manifest:
    """Everything a cluster (and what runs on it) created, in a form another process can remove."""

    path: Path | None = None
    run_dir: str = ""
    remove_run_dir: bool = False
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # in the host's namespace
    cgroups: list[str] = field(default_factory=list)  # names of cgroup roots, one per node, in every hierarchy
    paths: list[str] = field(default_factory=list)
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
        if start := start_time(pid):
            self.pids.append((pid, start))
            self.save()

    def add(self, kind: str, value: str) -> None:
        getattr(self, kind).append(value)
        self.save()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def _netns_pids(ns: str) -> list[int]:
    return [int(p) for p in run("ip", "netns", "pids", ns, check=False).stdout.split()]


def cgroup_dirs(name: str) -> list[Path]:
    """The folder of cgroup root `name` in every hierarchy mounted under /sys/fs/cgroup (v1 and v2)."""
    return [h / name for h in sorted(CGROUP_FS.iterdir()) if (h / "cgroup.procs").exists()]


def _cgroup_pids(name: str) -> list[int]:
    pids = []
    for top in cgroup_dirs(name):
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids += [int(p) for p in procs.read_text().split()]
    return pids


def _remove_cgroup(name: str) -> bool:
    """rmdir every folder of the cgroup root, deepest first; True when none is left."""
    left = False
    for top in cgroup_dirs(name):
        if not top.is_dir():
            continue
        for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        try:
            top.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            left = True
    return not left


def sweep(manifest: Manifest, grace: float = 3.0) -> list[str]:
    """Removes everything the manifest names; safe to repeat and after a partial start. What it did."""
    existing = set(run("ip", "netns", "list", check=False).stdout.split())
    done = _stop_processes(manifest, existing, grace)
    done += _remove_cgroups(manifest.cgroups)
    for ns in manifest.netns:
        if ns in existing:
            run("ip", "netns", "del", ns, check=False)
            done.append(f"deleted netns {ns}")
    host_links = {link["ifname"] for link in json.loads(run("ip", "-j", "link", "show", check=False).stdout or "[]")}
    for link in manifest.links:
        if link in host_links:
            run("ip", "link", "del", link, check=False)
            done.append(f"deleted link {link}")
    done += _remove_paths(
        [*manifest.paths, *([manifest.run_dir] if manifest.remove_run_dir and manifest.run_dir else [])]
    )
    return done


def _stop_processes(manifest: Manifest, existing: set[str], grace: float) -> list[str]:
    """Those started (by pid), everything in a node's cgroups (pods, shims), everything left in the
    namespaces. SIGTERM first, so that containerd and kubelet get to stop what they started."""
    victims = {pid for pid, start in manifest.pids if start_time(pid) == start}
    for ns in manifest.netns:
        if ns in existing:
            victims |= set(_netns_pids(ns))
    for name in manifest.cgroups:
        victims |= set(_cgroup_pids(name))
    victims.discard(os.getpid())
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(start_time(p) for p in victims):
        time.sleep(0.05)
    for _ in range(20):  # pods may fork while they die: repeat until the cgroups are empty
        left = {p for p in victims if start_time(p)} | {p for n in manifest.cgroups for p in _cgroup_pids(n)}
        left.discard(os.getpid())
        if not left:
            break
        for pid in left:
            _kill(pid)
        time.sleep(0.1)
    return [f"stopped {len(victims)} processes"] if victims else []


def _remove_cgroups(names: Iterable[str]) -> list[str]:
    done = []
    for name in names:
        for _ in range(50):  # a process just killed leaves its cgroup a moment later
            if _remove_cgroup(name):
                done.append(f"removed cgroup {name}")
                break
            time.sleep(0.1)
        else:
            done.append(f"cgroup {name} not fully removed")
    return done


def _remove_paths(names: Iterable[str]) -> list[str]:
    done = []
    for name in names:
        path = Path(name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
        else:
            continue
        done.append(f"removed {path}")
    return done


# --- certificates ----------------------------------------------------------------------------------


def _certificate(
    subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0] if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write_pem(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = path.with_suffix(".key")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)


# --- images ----------------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def oci_archive(name: str, files: dict[str, tuple[bytes, int]], entrypoint: Sequence[str]) -> bytes:
    """An OCI image layout as a tar, as `ctr images import` takes it: one layer holding `files`
    (path -> (content, mode)), named `name` by the io.containerd.image.name annotation."""
    layer_io = io.BytesIO()
    with tarfile.open(fileobj=layer_io, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.mtime = len(content), mode, 0
            tar.addfile(info, io.BytesIO(content))
    layer = layer_io.getvalue()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": list(entrypoint)},
            "rootfs": {"type": "layers", "diff_ids": [_sha(layer)]},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _sha(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": _sha(layer), "size": len(layer)}
            ],
        },
        sort_keys=True,
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _sha(manifest),
                    "size": len(manifest),
                    "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
                }
            ],
        }
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        blobs = {
            "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
            "index.json": index,
            **{f"blobs/sha256/{_sha(b)[7:]}": b for b in (layer, config, manifest)},
        }
        for path, content in blobs.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(content), 0o644
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def pause_image() -> Path:
    """The pod sandbox image, built once from PAUSE_C with `gcc -static` and cached."""
    digest = hashlib.sha256(PAUSE_C.encode()).hexdigest()[:12]
    archive = cache_dir() / "images" / f"pause-{digest}.tar"
    if archive.exists():
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "pause.c", Path(tmp) / "pause"
        source.write_text(PAUSE_C)
        run("gcc", "-static", "-Os", "-s", "-o", str(binary), str(source), timeout=120)
        data = oci_archive(PAUSE_IMAGE, {"pause": (binary.read_bytes(), 0o755)}, ["/pause"])
    partial = archive.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(archive)
    return archive


# --- the cluster -----------------------------------------------------------------------------------


@dataclass
class Node:
    """One kubelet node: a network namespace on the node network, its folder, its node.sh process."""

    role: str  # node-a, node-b, ...
    name: str  # the Node object's name (also its network namespace's)
    address: str  # InternalIP, on the node network
    address6: str  # on the node network too, in a dual-stack cluster ("" otherwise)
    dir: Path
    cgroup: str  # kubelet's cgroupRoot, in every hierarchy
    process: subprocess.Popen[bytes] | None = None
    pod_cidr: str = ""
    pod_cidr6: str = ""

    @property
    def netns(self) -> str:
        return self.name

    @property
    def pod_cidrs(self) -> list[str]:
        return [c for c in (self.pod_cidr, self.pod_cidr6) if c]

    @property
    def containerd_socket(self) -> Path:
        return self.dir / "run" / "containerd" / "containerd.sock"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logs(self, lines: int = 30) -> str:
        return "\n".join(
            f"--- {self.role} {name}\n{log_tail(self.dir / name, lines)}"
            for name in ("node.log", "containerd.log", "kubelet.log", "kube-proxy.log")
        )


class Cluster:
    """`with Cluster() as cluster: ...`, or start()/stop(); see the module docstring."""

    def __init__(
        self,
        nodes: int = 2,
        *,
        run_dir: Path | None = None,
        manifest: Path | None = None,
        suffix: str | None = None,
        images: Sequence[Path] = (),
        dual_stack: bool = False,
    ) -> None:
        """`dual_stack`: Services, pods and the node network get IPv6 addresses too (CLUSTER_CIDR6,
        SERVICE_CIDR6, NODE_NETWORK6); kube-proxy programs ip6tables as well."""
        if not 1 <= nodes <= 8:
            raise ValueError("1 to 8 nodes")
        self.suffix = suffix or secrets.token_hex(3)
        self.manifest = Manifest(path=manifest)
        self._given_run_dir = run_dir
        self._run_dir: Path | None = None
        self._images = list(images)
        self.plane: ControlPlane | None = None
        self.api: Any = None
        self.timings: dict[str, float] = {}
        self.dual_stack = dual_stack
        self.node_network = self._free_network()
        hosts = self.node_network.hosts()
        self.host_address = str(next(hosts))
        self.lan = f"{PREFIX}-{self.suffix}-lan"
        self.host_link = f"{PREFIX}{self.suffix}h"
        self._host_addresses: Iterator[ipaddress.IPv4Address] = iter(list(hosts)[99:])  # .101 on: add_host
        self.nodes = [
            Node(
                role=(role := f"node-{chr(ord('a') + i)}"),
                name=f"{PREFIX}-{self.suffix}-{role}",
                address=str(self.node_network.network_address + 11 + i),
                address6=str(NODE_NETWORK6.network_address + 11 + i) if dual_stack else "",
                dir=Path(),  # set at start, in the run folder
                cgroup=f"{PREFIX}-{self.suffix}-{role}",
            )
            for i in range(nodes)
        ]
        self._node_tokens = {node.name: secrets.token_urlsafe(24) for node in self.nodes}
        self._proxy_token = secrets.token_urlsafe(24)

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        if self._run_dir is None:
            raise ClusterError("cluster not started")
        return self._run_dir

    def node(self, role_or_name: str) -> Node:
        return next(n for n in self.nodes if role_or_name in (n.role, n.name))

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        began = time.monotonic()
        if self._given_run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix=f"kvpn-cluster-{self.suffix}-", dir="/var/tmp"))
            self.manifest.remove_run_dir = True
        else:
            self._run_dir = self._given_run_dir.resolve()
            hidden = next((p for p in NODE_PRIVATE if self._run_dir.is_relative_to(p)), None)
            if hidden is not None:
                raise ClusterError(f"run_dir {self._run_dir}: a node mounts a folder of its own over {hidden}")
            self._run_dir.mkdir(parents=True, exist_ok=True)
        self.manifest.run_dir = str(self._run_dir)
        self.manifest.info["suffix"] = self.suffix
        self.manifest.save()
        try:
            self._step("node network", self._build_network)
            self._step("control plane", self._start_control_plane)
            self._step("nodes", self._start_nodes)
            self._step("images", lambda: self.import_images([pause_image(), *self._images]))
            self._step("nodes ready", self._wait_nodes_ready)
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - began

    def _step(self, name: str, action: Callable[[], None]) -> None:
        began = time.monotonic()
        action()
        self.timings[name] = round(time.monotonic() - began, 2)

    def stop(self) -> None:
        """Removes everything; each part is tried whatever happened to the others."""
        errors: list[str] = []
        for node in self.nodes:
            if node.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGTERM)  # node.sh stops its three daemons
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(node.process.pid, signal.SIGKILL)
                node.process = None
        if self.api is not None:
            with contextlib.suppress(Exception):
                self.api.close()
            self.api = None
        if self.plane is not None:
            try:
                self.plane.stop()
            except Exception as error:
                errors.append(f"control plane: {error}")
            self.plane = None
        try:
            sweep(self.manifest)
        except Exception as error:
            errors.append(f"sweep: {error}")
        if errors:
            print("kvpn cluster: cleanup problems:\n  " + "\n  ".join(errors), file=sys.stderr)

    # -- building ----------------------------------------------------------------------------------

    @staticmethod
    def _free_network() -> ipaddress.IPv4Network:
        """A /24 of 172.31.0.0/16 that no route of the host's covers or overlaps."""
        routes = json.loads(run("ip", "-j", "route", "show", "table", "all").stdout or "[]")
        used = []
        for route in routes:
            dst = route.get("dst", "")
            if dst and dst != "default" and ":" not in dst:
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
        candidates = list(ipaddress.ip_network("172.31.0.0/16").subnets(new_prefix=24))
        secrets.SystemRandom().shuffle(candidates)
        for net in candidates:
            if not any(net.overlaps(u) for u in used):
                return net
        raise ClusterError("no free /24 in 172.31.0.0/16 for the node network")

    def _netns(self, name: str) -> str:
        self.manifest.add("netns", name)
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _veth(self, ns_a: str | None, dev_a: str, ns_b: str, dev_b: str) -> None:
        """A veth pair from ns_a (None: the host) to ns_b, created under random names, then moved and renamed."""
        tmp_a, tmp_b = f"{PREFIX}{secrets.token_hex(5)}", f"{PREFIX}{secrets.token_hex(5)}"
        if ns_a is None:
            self.manifest.add("links", dev_a)
            run("ip", "link", "add", dev_a, "type", "veth", "peer", "name", tmp_b)
            run("ip", "link", "set", dev_a, "up")
        else:
            run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
            run("ip", "link", "set", tmp_a, "netns", ns_a)
            run("ip", "-n", ns_a, "link", "set", tmp_a, "name", dev_a)
            run("ip", "-n", ns_a, "link", "set", dev_a, "up")
        run("ip", "link", "set", tmp_b, "netns", ns_b)
        run("ip", "-n", ns_b, "link", "set", tmp_b, "name", dev_b)
        run("ip", "-n", ns_b, "link", "set", dev_b, "up")

    def _build_network(self) -> None:
        lan = self._netns(self.lan)
        run("ip", "-n", lan, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", lan, "link", "set", "br0", "up")
        prefix = self.node_network.prefixlen
        self._veth(None, self.host_link, lan, "host")
        run("ip", "-n", lan, "link", "set", "host", "master", "br0")
        run("ip", "addr", "add", f"{self.host_address}/{prefix}", "dev", self.host_link)
        for node in self.nodes:
            ns = self._netns(node.netns)
            self._veth(ns, "eth0", lan, node.role)
            run("ip", "-n", lan, "link", "set", node.role, "master", "br0")
            run("ip", "-n", ns, "addr", "add", f"{node.address}/{prefix}", "dev", "eth0")
            if node.address6:
                prefix6 = NODE_NETWORK6.prefixlen
                run("ip", "-n", ns, "addr", "add", f"{node.address6}/{prefix6}", "dev", "eth0", "nodad")
            # A node's own traffic to a Service is routed before kube-proxy's OUTPUT rules translate it:
            # it needs a route, as every node's default route is. The host forwards nothing further.
            run("ip", "-n", ns, "route", "add", "default", "via", self.host_address)
            # Pods reach what lies outside the cluster (the API server on the host) from the node's
            # address, as CNIs do; between pods addresses are kept.
            ruleset = "\n".join(
                [
                    "table ip kvpn-test-node {",
                    '  comment "test cluster: pod traffic leaving the cluster is masqueraded to the node address"',
                    "  chain postrouting {",
                    "    type nat hook postrouting priority srcnat; policy accept;",
                    f'    ip saddr {CLUSTER_CIDR} ip daddr != {CLUSTER_CIDR} oifname "eth0" masquerade',
                    "  }",
                    "}",
                ]
            )
            in_ns(ns, "nft", "-f", "-", input=ruleset)

    def _start_control_plane(self) -> None:
        pki = self.run_dir / "pki"
        pki.mkdir(exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kvpn-test-kubelet-client-ca-{self.suffix}")])
        ca = _certificate(ca_name, ca_key, None)
        _write_pem(pki / "kubelet-client-ca", ca, ca_key)
        client_key = ec.generate_private_key(ec.SECP256R1())
        client_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver-kubelet-client"),
            ]
        )
        _write_pem(
            pki / "apiserver-kubelet-client", _certificate(client_name, client_key, (ca_name, ca_key)), client_key
        )
        tokens = [(t, f"system:node:{n}", ["system:nodes"]) for n, t in self._node_tokens.items()]
        tokens.append((self._proxy_token, "system:kube-proxy", []))
        self.plane = ControlPlane(
            run_dir=self.run_dir / "control-plane",
            address=self.host_address,
            tokens=tokens,
            apiserver_args=[
                "--authorization-mode=Node",  # appended to RBAC: kubelets are authorised as nodes
                "--enable-admission-plugins=NodeRestriction",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            ],
            kcm_args=[
                "--allocate-node-cidrs=true",
                *(
                    [
                        "--feature-gates=IPv6DualStack=true",
                        f"--cluster-cidr={CLUSTER_CIDR},{CLUSTER_CIDR6}",
                        f"--node-cidr-mask-size-ipv4={NODE_CIDR_MASK}",
                        f"--node-cidr-mask-size-ipv6={NODE_CIDR_MASK6}",
                        f"--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR6}",
                    ]
                    if self.dual_stack
                    else [
                        f"--cluster-cidr={CLUSTER_CIDR}",
                        f"--node-cidr-mask-size={NODE_CIDR_MASK}",
                        f"--service-cluster-ip-range={SERVICE_CIDR}",
                    ]
                ),
                # A node that stops reporting is NotReady after 20 s rather than 40 s.
                "--node-monitor-grace-period=20s",
                "--node-monitor-period=2s",
            ],
            scheduler=True,
            service_cidrs=[SERVICE_CIDR, SERVICE_CIDR6] if self.dual_stack else [SERVICE_CIDR],
        )
        try:
            self.plane.start()
        finally:
            for process in getattr(self.plane, "_processes", []):
                self.manifest.add_pid(process.popen.pid)
            if etcd_dir := getattr(self.plane, "_etcd_dir", None):
                self.manifest.add("paths", str(etcd_dir))
        self.api = self.plane.api_client()

    def _kubeconfig(self, path: Path, user: str, token: str) -> None:
        assert self.plane is not None
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kvpn-test",
                    "cluster": {"server": self.plane.server, "certificate-authority": str(self.plane.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "kvpn-test", "user": user}}],
            "current-context": user,
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)

    def _write_node_config(self, node: Node) -> None:
        d = node.dir
        (d / "cni").mkdir(parents=True, exist_ok=True)
        (d / "name").write_text(node.name)
        (d / "address").write_text(node.address)
        # The node's own resolver answers nothing (no upstream here); pods get the cluster DNS from kubelet.
        (d / "etc-resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        (d / "pod-resolv.conf").write_text("# kvpn test cluster: no upstream resolver\n")
        self._kubeconfig(d / "kubelet.kubeconfig", f"system:node:{node.name}", self._node_tokens[node.name])
        self._kubeconfig(d / "kube-proxy.kubeconfig", "system:kube-proxy", self._proxy_token)
        (d / "containerd.toml").write_text(
            f"""version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This machine withholds CAP_SYS_RESOURCE: runc may only raise a process's OOM score, never lower it.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d / "cni"}"
"""
        )
        kubelet = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": node.address,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True, "cacheTTL": "10s"},
                "x509": {"clientCAFile": str(self.run_dir / "pki" / "kubelet-client-ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{node.cgroup}",
            "cgroupsPerQOS": True,
            "clusterDomain": CLUSTER_DOMAIN,
            "clusterDNS": [DNS_SERVICE_IP],
            "resolvConf": str(d / "pod-resolv.conf"),
            "failSwapOn": False,
            # No registry to pull an evicted image back from.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "4s",
            "nodeStatusReportFrequency": "20s",
            "volumeStatsAggPeriod": "0s",
            "maxPods": 40,
            "containerLogMaxSize": "10Mi",
            "protectKernelDefaults": False,
            **({"featureGates": {"IPv6DualStack": True}} if self.dual_stack else {}),
        }
        (d / "kubelet.yaml").write_text(yaml.safe_dump(kubelet, sort_keys=False))
        proxy = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "bindAddress": "0.0.0.0",  # noqa: S104 - the node's own namespace
            "healthzBindAddress": "0.0.0.0:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            "clientConnection": {"kubeconfig": str(d / "kube-proxy.kubeconfig")},
            "clusterCIDR": f"{CLUSTER_CIDR},{CLUSTER_CIDR6}" if self.dual_stack else CLUSTER_CIDR,
            **({"featureGates": {"IPv6DualStack": True}} if self.dual_stack else {}),
            "hostnameOverride": node.name,
            "mode": "iptables",
            # nf_conntrack_max and the conntrack timeouts are the init namespace's only: left alone.
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"minSyncPeriod": "0s", "syncPeriod": "30s"},
        }
        (d / "kube-proxy.yaml").write_text(yaml.safe_dump(proxy, sort_keys=False))

    def _make_cgroup(self, name: str) -> None:
        """kubelet's cgroupRoot, made in every v1 hierarchy (kubelet expects it), cpuset copied from the parent."""
        self.manifest.add("cgroups", name)
        for folder in cgroup_dirs(name):
            folder.mkdir(exist_ok=True)
            if folder.parent.name == "cpuset":
                for key in ("cpuset.cpus", "cpuset.mems"):
                    (folder / key).write_text((folder.parent / key).read_text())

    def _start_nodes(self) -> None:
        bins = find_binaries(("kubelet", "kube-proxy"))
        bin_dir = bins["kubelet"].parent
        for node in self.nodes:
            node.dir = self.run_dir / "nodes" / node.role
            node.dir.mkdir(parents=True, exist_ok=True)
            self._write_node_config(node)
            self._make_cgroup(node.cgroup)
            with (node.dir / "node.log").open("ab") as log:
                enter = ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--mount", "--propagation", "slave"]
                node.process = subprocess.Popen(
                    [*enter, "bash", str(NODE_SCRIPT), str(node.dir), str(bin_dir)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=die_with_parent(),  # noqa: PLW1509 -- one prctl call
                )
            self.manifest.add_pid(node.process.pid)
        for node in self.nodes:
            self._wait(f"containerd on {node.role}", lambda n=node: (n.dir / "containerd.ready").exists(), 30)

    def _wait(self, what: str, ready: Callable[[], object], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            if dead := next((n for n in self.nodes if n.process is not None and not n.alive()), None):
                raise ClusterError(f"{dead.role} stopped (exit {dead.process.returncode}):\n{dead.logs()}")  # type: ignore[union-attr]
            if result := ready():
                return result
            if time.monotonic() > deadline:
                raise ClusterError(f"not within {timeout:.0f} s: {what}\n" + "\n".join(n.logs(15) for n in self.nodes))
            time.sleep(0.1)

    def _wait_nodes_ready(self) -> None:
        core = self.core
        for node in self.nodes:

            def pod_cidrs(n: Node = node) -> list[str] | None:
                try:
                    obj = core.read_node(n.name)
                except Exception:
                    return None
                spec = obj.spec
                if spec is None or not spec.pod_cidr:
                    return None
                cidrs = [str(c) for c in spec.pod_cidrs or [spec.pod_cidr]]
                return cidrs if len(cidrs) == (2 if self.dual_stack else 1) else None

            cidrs = self._wait(f"{node.role} registered with its pod CIDRs", pod_cidrs, NODE_READY_TIMEOUT)
            node.pod_cidr = next(c for c in cidrs if ":" not in c)
            node.pod_cidr6 = next((c for c in cidrs if ":" in c), "")
            self._write_cni_config(node)
        for node in self.nodes:
            for other in self.nodes:
                if other is not node:
                    run("ip", "-n", node.netns, "route", "replace", other.pod_cidr, "via", other.address)
                    if other.pod_cidr6:
                        run("ip", "-n", node.netns, "route", "replace", other.pod_cidr6, "via", other.address6)
        for node in self.nodes:
            self._wait(f"{node.role} Ready", lambda n=node: self.node_ready(n.name), NODE_READY_TIMEOUT)
        self.manifest.info["nodes"] = {
            n.role: {"name": n.name, "address": n.address, "podCIDRs": n.pod_cidrs} for n in self.nodes
        }
        self.manifest.save()

    def _write_cni_config(self, node: Node) -> None:
        ranges = [[{"subnet": c, "gateway": str(next(ipaddress.ip_network(c).hosts()))}] for c in node.pod_cidrs]
        config = {
            "cniVersion": "0.4.0",
            "name": "kvpn-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": False,  # the node's own masquerade rule (see _build_network) covers off-cluster traffic
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": ranges,
                        "routes": [{"dst": "0.0.0.0/0"}, *([{"dst": "::/0"}] if node.pod_cidr6 else [])],
                        "dataDir": str(node.dir / "var-lib" / "cni" / "networks"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        tmp = node.dir / "cni" / ".10-kvpn-test.conflist"
        tmp.write_text(json.dumps(config, indent=1))
        tmp.replace(node.dir / "cni" / "10-kvpn-test.conflist")

    # -- images ------------------------------------------------------------------------------------

    def import_images(self, archives: Iterable[Path]) -> None:
        """`ctr images import` of each OCI archive into every node's containerd, the nodes in parallel."""
        archives = list(archives)
        errors: list[str] = []

        def one(node: Node) -> None:
            for archive in archives:
                proc = run(
                    "ctr", "--address", str(node.containerd_socket), "-n", "k8s.io",
                    "images", "import", "--no-unpack=false", str(archive),
                    check=False, timeout=300,
                )  # fmt: skip
                if proc.returncode != 0:
                    errors.append(f"{node.role}: import {archive.name}: {proc.stderr.strip()}")

        threads = [threading.Thread(target=one, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise ClusterError("\n".join(errors))

    # -- using it ----------------------------------------------------------------------------------

    @property
    def core(self) -> Any:
        """CoreV1Api as the admin (Any: bodies go as plain dicts, which the client sends unchanged)."""
        from kubernetes import client  # noqa: PLC0415

        return client.CoreV1Api(self.api)

    @property
    def kubeconfig(self) -> Path:
        assert self.plane is not None
        return self.plane.kubeconfig

    def env(self) -> dict[str, str]:
        assert self.plane is not None
        return self.plane.env()

    def node_ready(self, name: str) -> bool:
        try:
            obj = self.core.read_node(name)
        except Exception:
            return False
        return any(c.type == "Ready" and c.status == "True" for c in (obj.status.conditions or []))

    def in_node(self, node: Node | str, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """A command in the node's network and mount namespaces (where its containerd and kubelet live)."""
        node = self.node(node) if isinstance(node, str) else node
        assert node.process is not None
        return run("nsenter", "-t", str(node.process.pid), "-n", "-m", *argv, **kwargs)

    def add_host(self, role: str) -> tuple[str, str]:
        """Another machine on the node network (a laptop): its namespace and address."""
        ns = self._netns(f"{PREFIX}-{self.suffix}-{role}")
        address = str(next(self._host_addresses))
        port = f"h{len(self.manifest.netns)}"
        self._veth(ns, "eth0", self.lan, port)
        run("ip", "-n", self.lan, "link", "set", port, "master", "br0")
        run("ip", "-n", ns, "addr", "add", f"{address}/{self.node_network.prefixlen}", "dev", "eth0")
        return ns, address

    def remove_host(self, ns: str) -> None:
        """Unplugs and removes a machine add_host made: deleting its namespace takes its veth, and so its
        port on br0, with it. Its name stays in the manifest, which sweep skips once it is gone; its port
        name and address are not given out again."""
        run("ip", "netns", "del", ns, check=False)

    def cut_network(self, node: Node | str) -> None:
        """A pulled cable: the node's port on br0 goes down, so nothing on the node network (the API
        server on the host, the other nodes, laptops) reaches the node or its pods, and they reach nothing.
        Noted in the manifest (info["cut"]) for whoever reads a killed run's; sweep has nothing to undo,
        as deleting the lan namespace removes the port, cut or not."""
        node = self.node(node) if isinstance(node, str) else node
        cut: list[str] = self.manifest.info.setdefault("cut", [])
        if node.role not in cut:
            cut.append(node.role)
            self.manifest.save()
        run("ip", "-n", self.lan, "link", "set", node.role, "down")

    def restore_network(self, node: Node | str) -> None:
        """The cable back in. The bridge forwards at once (no STP); a peer's first packets may wait for
        ARP, whose entries the carrier loss flushed (up to its 1 s retransmit)."""
        node = self.node(node) if isinstance(node, str) else node
        run("ip", "-n", self.lan, "link", "set", node.role, "up")
        cut: list[str] = self.manifest.info.get("cut", [])
        if node.role in cut:
            cut.remove(node.role)
            self.manifest.save()

    def describe(self) -> dict[str, Any]:
        return {
            "kubeconfig": str(self.kubeconfig),
            "run_dir": str(self.run_dir),
            "api_server": self.plane.server if self.plane else "",
            "node_network": str(self.node_network),
            "nodes": {n.role: {"name": n.name, "address": n.address, "podCIDRs": n.pod_cidrs} for n in self.nodes},
        }
