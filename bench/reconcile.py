"""Time from `kubectl create` of a VpnPeer to Ready=True, for N peers created at once.

    .venv/bin/python -m bench.reconcile [--peers 100 1000] [--json FILE] [--py-spy DIR]

Starts its own control plane and operator in a temporary folder (removed at the end unless --keep
or the run failed). Each N gets a fresh namespace with a fresh VpnServer, so runs do not share
peers, bindings or address books; the namespace is deleted, and waited for, before the next N.

Per peer: t_created is when its create call returned, t_ready when the watch on the namespace's
VpnPeers first showed Ready=True. Both are this process's monotonic clock; the watch is opened
(from the resourceVersion of an empty list) before the first create, so no event is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from harness.controlplane import ControlPlane, apply_crd_files
from harness.gateway_standin import GatewayStandIn
from harness.operator_process import OperatorProcess
from kvpn_core.api import GROUP, VERSION
from kvpn_core.contract import binding_selector

REPO = Path(__file__).resolve().parent.parent
CRD_DIR = REPO / "crds"
SERVERS, PEERS = "vpnservers", "vpnpeers"
SERVER = "bench"
POOL = "10.64.0.0/16"
ROUTES = ["10.96.0.0/16"]
ENDPOINT = "vpn.example.com:51820"
# The issue's targets, for N=1000 on a 2-core machine.
TARGET_N = 1000
TARGET_P50, TARGET_P99, TARGET_RSS_MIB = 0.5, 2.0, 250.0
WATCH_SECONDS = 5  # server-side timeout of one watch request; the watch resumes from the last resourceVersion

Obj = dict[str, Any]


@dataclass
class Run:
    """The figures of one N."""

    n: int
    namespace: str
    concurrency: int
    created: int = 0
    ready: int = 0
    create_seconds: float = 0.0
    create_rate: float = 0.0
    p50: float = math.nan
    p90: float = math.nan
    p99: float = math.nan
    max: float = math.nan
    mean: float = math.nan
    wall: float = math.nan
    rss_before_mib: float = math.nan
    rss_peak_mib: float = math.nan
    rss_after_mib: float = math.nan
    operator_cpu_seconds: float = math.nan
    control_plane_cpu_seconds: dict[str, float] = field(default_factory=dict)
    bench_cpu_seconds: float = math.nan
    api_requests_per_peer: dict[str, float] = field(default_factory=dict)
    machine_busy: float = math.nan
    operator_retries: int = 0
    watch_events: int = 0
    distinct_addresses: int = 0
    bindings: int = 0
    problems: list[str] = field(default_factory=list)
    cleanup_seconds: float = math.nan

    @property
    def ok(self) -> bool:
        return not self.problems


# -- the API -------------------------------------------------------------------------------------


def ready(obj: Obj | None) -> tuple[str, str] | None:
    """(status, reason) of the Ready condition, or None (as harness.kvpn.ready)."""
    for condition in ((obj or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return str(condition["status"]), str(condition.get("reason", ""))
    return None


class Objects:
    """VpnServers, VpnPeers and Secrets of one namespace through the API, as plain dicts."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace

    def create(self, plural: str, name: str, spec: Obj) -> Obj:
        kind = {SERVERS: "VpnServer", PEERS: "VpnPeer"}[plural]
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
        return cast(Obj, self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body))

    def get(self, plural: str, name: str) -> Obj | None:
        try:
            return cast(Obj, self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, plural: str) -> Obj:
        """The whole list response (items and metadata.resourceVersion)."""
        return cast(Obj, self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, plural))

    def count_secrets(self, selector: str) -> int:
        return len(self.core.list_namespaced_secret(self.namespace, label_selector=selector).items)


# -- the operator's process, from /proc ----------------------------------------------------------


def proc_status_kib(pid: int, key: str) -> float:
    """A `VmXxx:  123 kB` figure of /proc/<pid>/status, in KiB (NaN when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return float(line.split()[1])
    except OSError:
        pass
    return math.nan


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so each N gets its own peak."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    # After the command: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs together, from /proc/stat."""
    values = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def operator_pid(operator: OperatorProcess) -> int:
    popen: subprocess.Popen[bytes] | None = operator._popen
    if popen is None or popen.poll() is not None:
        raise RuntimeError(f"the operator is not running; see {operator.log_path}")
    return popen.pid


def control_plane_pids(plane: ControlPlane) -> dict[str, int]:
    processes: list[Any] = plane._processes
    return {p.name: p.popen.pid for p in processes}


_REQUEST_TOTAL = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def api_requests(plane: ControlPlane) -> dict[str, float]:
    """The API server's request counters so far, by "VERB resource[/subresource]" (all clients)."""
    url = f"{plane.server}/metrics"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {plane.token}"})  # noqa: S310 - https
    context = ssl.create_default_context(cafile=str(plane.ca_file))
    with urllib.request.urlopen(request, timeout=10, context=context) as response:  # noqa: S310 - loopback URL
        text = response.read().decode()
    counts: dict[str, float] = {}
    for match in _REQUEST_TOTAL.finditer(text):
        labels = dict(_LABEL.findall(match["labels"]))
        key = f"{labels.get('verb', '?')} {labels.get('resource', '?')}"
        key += f"/{labels['subresource']}" if labels.get("subresource") else ""
        counts[key] = counts.get(key, 0.0) + float(match["value"])
    return counts


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was actually measured."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# -- the watch -----------------------------------------------------------------------------------


class ReadyWatch:
    """Watches a namespace's VpnPeers in a thread; records when each first shows Ready=True."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self._objects = Objects(api, namespace)
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"watch-{namespace}", daemon=True)
        self._watch: watch.Watch | None = None
        self._resource_version = ""
        self.ready_at: dict[str, float] = {}
        self.events = 0
        self.error: BaseException | None = None

    def start(self) -> None:
        # The watch starts at the resourceVersion of this list: whatever happens after it is delivered,
        # however late the watch request itself reaches the API server.
        self._resource_version = self._objects.list(PEERS)["metadata"]["resourceVersion"]
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]
        self._thread.join(timeout=WATCH_SECONDS + 5)

    def wait(self, names: set[str], deadline: float) -> bool:
        """Blocks until every name was seen Ready (True) or the deadline passed (False); raises if the watch failed."""
        with self._changed:
            while not names <= self.ready_at.keys():
                if self.error is not None:
                    raise RuntimeError(f"the watch failed: {self.error!r}") from self.error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(1.0, remaining))
        return True

    def ready_count(self) -> int:
        with self._changed:
            return len(self.ready_at)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._stream_once()
        except BaseException as exc:
            with self._changed:
                self.error = exc
                self._changed.notify_all()

    def _record(self, obj: Obj, seen: float) -> None:
        condition = ready(obj)
        if condition is not None and condition[0] == "True":
            with self._changed:
                if self.ready_at.setdefault(obj["metadata"]["name"], seen) == seen:
                    self._changed.notify_all()

    def _stream_once(self) -> None:
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        stream = self._watch.stream(  # type: ignore[no-untyped-call]
            self._objects.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self._objects.namespace,
            PEERS,
            resource_version=self._resource_version,
            timeout_seconds=WATCH_SECONDS,
            allow_watch_bookmarks=True,
            deserialize=False,  # plain json.loads: the objects stay dicts
        )
        try:
            for event in stream:
                seen = time.monotonic()
                obj: Obj = event["object"]
                self._resource_version = obj["metadata"]["resourceVersion"]
                if event["type"] in {"ADDED", "MODIFIED"}:
                    self.events += 1
                    self._record(obj, seen)
                if self._stop.is_set():
                    break
        except ApiException as exc:
            if exc.status != 410:
                raise
            # Too old (compacted): go on from a fresh list; peers already Ready are recorded late.
            listing = self._objects.list(PEERS)
            for obj in listing["items"]:
                self._record(obj, time.monotonic())
            self._resource_version = listing["metadata"]["resourceVersion"]


# -- one N ---------------------------------------------------------------------------------------


def create_namespace(api: client.ApiClient, n: int) -> str:
    name = f"bench-n{n}-{secrets.token_hex(3)}"
    client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    return name


def delete_namespace(api: client.ApiClient, namespace: str, timeout: float) -> float:
    """Deletes the namespace and waits until it is gone (its peers' finalizers run in the operator)."""
    core = client.CoreV1Api(api)
    began = time.monotonic()
    with contextlib.suppress(ApiException):
        core.delete_namespace(namespace)
    while time.monotonic() - began < timeout:
        try:
            core.read_namespace(namespace)
        except ApiException as exc:
            if exc.status == 404:
                return time.monotonic() - began
            raise
        time.sleep(0.5)
    return math.nan


def create_server(objects: Objects, timeout: float = 60.0) -> None:
    objects.create(SERVERS, SERVER, {"addressPool": [POOL], "routes": ROUTES, "expose": {"endpoint": ENDPOINT}})
    deadline = time.monotonic() + timeout
    condition = None
    while time.monotonic() < deadline:
        condition = ready(objects.get(SERVERS, SERVER))
        if condition is not None and condition[0] == "True":
            return
        time.sleep(0.1)
    raise RuntimeError(f"VpnServer {objects.namespace}/{SERVER} not Ready after {timeout:.0f}s: {condition}")


def count_retries(log_path: Path) -> int:
    try:
        return log_path.read_text(errors="replace").count("failed temporarily")
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def py_spy(pid: int, output: Path | None) -> Iterator[None]:
    """`py-spy record` on the operator while the block runs (raw collapsed stacks, all threads, idle too)."""
    if output is None:
        yield
        return
    exe = Path(sys.executable).parent / "py-spy"
    spy = subprocess.Popen(
        [
            str(exe if exe.exists() else "py-spy"),
            *("record", "--pid", str(pid), "--format", "raw", "--rate", "100"),
            *("--threads", "--idle", "--nonblocking", "--output", str(output)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes the profile on SIGINT
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


@dataclass
class Sample:
    """Counters of the operator and the control plane at one moment."""

    operator_cpu: float
    control_plane_cpu: dict[str, float]
    bench_cpu: float
    machine: tuple[float, float]
    retries: int
    requests: dict[str, float]
    rss_mib: float

    @classmethod
    def take(cls, pid: int, plane: ControlPlane, log_path: Path) -> Sample:
        mine = os.times()
        return cls(
            cpu_seconds(pid),
            {k: cpu_seconds(p) for k, p in control_plane_pids(plane).items()},
            mine.user + mine.system,
            machine_cpu(),
            count_retries(log_path),
            api_requests(plane),
            proc_status_kib(pid, "VmRSS") / 1024,
        )


def create_all(objects: Objects, names: Sequence[str], concurrency: int, rate: float | None) -> dict[str, float]:
    """Creates the peers from `concurrency` threads, all at once or `rate` per second; when each was sent.

    Time-to-Ready counts from the moment the create request is sent: the user's clock starts there.
    """
    created_at: dict[str, float] = {}
    lock = threading.Lock()
    start = time.monotonic()

    def create(index: int, name: str) -> None:
        if rate:
            time.sleep(max(0.0, start + index / rate - time.monotonic()))
        sent = time.monotonic()
        objects.create(PEERS, name, {"serverRef": {"name": SERVER}})
        with lock:
            created_at[name] = sent

    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="create")
    try:
        for future in [pool.submit(create, i, name) for i, name in enumerate(names)]:
            future.result()
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C or a failed create: no more creates
    return created_at


def run_one(
    api: client.ApiClient,
    watch_api: client.ApiClient,
    plane: ControlPlane,
    operator: OperatorProcess,
    n: int,
    *,
    concurrency: int,
    rate: float | None,
    timeout: float,
    profile: Path | None,
) -> Run:
    objects = Objects(api, create_namespace(api, n))
    run = Run(n=n, namespace=objects.namespace, concurrency=concurrency)
    create_server(objects)
    time.sleep(1.0)  # let the operator settle after the server's own reconciles

    pid = operator_pid(operator)
    reset_peak_rss(pid)
    before = Sample.take(pid, plane, operator.log_path)

    names = [f"p{i:05d}" for i in range(n)]
    peers_watch = ReadyWatch(watch_api, objects.namespace)
    peers_watch.start()
    try:
        with py_spy(pid, profile):
            first = time.monotonic()
            created_at = create_all(objects, names, concurrency, rate)
            deadline = time.monotonic() + timeout
            while not peers_watch.wait(set(names), min(deadline, time.monotonic() + 10)):
                if time.monotonic() >= deadline:
                    run.problems.append(f"only {peers_watch.ready_count()}/{n} peers Ready after {timeout:.0f}s")
                    break
                operator_pid(operator)  # raises when the operator died
                print(f"  N={n}: {peers_watch.ready_count()}/{n} Ready", file=sys.stderr, flush=True)
    finally:
        peers_watch.stop()

    run.rss_peak_mib = proc_status_kib(pid, "VmHWM") / 1024
    usage(run, before, Sample.take(pid, plane, operator.log_path))
    run.watch_events = peers_watch.events
    ready_at = {name: peers_watch.ready_at[name] for name in names if name in peers_watch.ready_at}
    latency(run, first, created_at, ready_at)
    check(objects, run)
    return run


def usage(run: Run, before: Sample, after: Sample) -> None:
    """What the operator, the control plane and this client used during the run."""
    run.rss_before_mib, run.rss_after_mib = before.rss_mib, after.rss_mib
    run.operator_cpu_seconds = after.operator_cpu - before.operator_cpu
    run.control_plane_cpu_seconds = {k: v - before.control_plane_cpu[k] for k, v in after.control_plane_cpu.items()}
    run.bench_cpu_seconds = after.bench_cpu - before.bench_cpu
    busy, total = (a - b for a, b in zip(after.machine, before.machine, strict=True))
    run.machine_busy = busy / total if total else math.nan
    run.operator_retries = after.retries - before.retries
    per_peer = {k: (v - before.requests.get(k, 0.0)) / run.n for k, v in after.requests.items()}
    run.api_requests_per_peer = dict(sorted(((k, v) for k, v in per_peer.items() if v >= 0.005), key=lambda kv: -kv[1]))


def latency(run: Run, first: float, created_at: dict[str, float], ready_at: dict[str, float]) -> None:
    """Create rate and time-to-Ready figures from the per-peer times (this process's monotonic clock)."""
    run.created = len(created_at)
    run.create_seconds = max(created_at.values()) - first
    run.create_rate = run.n / run.create_seconds
    latencies = [ready_at[name] - created_at[name] for name in ready_at]
    run.ready = len(latencies)
    if latencies:
        run.p50, run.p90, run.p99 = (percentile(latencies, q) for q in (50, 90, 99))
        run.max = max(latencies)
        run.mean = sum(latencies) / len(latencies)
        run.wall = max(ready_at.values()) - first
    if early := sum(x < 0 for x in latencies):
        run.problems.append(f"{early} peers seen Ready before their create request was sent")


def check(objects: Objects, run: Run) -> None:
    """What was measured is right: N Ready peers at N distinct addresses of the pool, N bindings."""
    peers: list[Obj] = objects.list(PEERS)["items"]
    pool = ipaddress.ip_network(POOL)
    ready_peers = [p for p in peers if (ready(p) or ("", ""))[0] == "True"]
    addresses = [str((p.get("status") or {}).get("address") or "") for p in ready_peers]
    run.distinct_addresses = len(set(addresses))
    run.bindings = objects.count_secrets(binding_selector(SERVER))
    if len(peers) != run.n:
        run.problems.append(f"{len(peers)} VpnPeers listed, expected {run.n}")
    if len(ready_peers) != run.n:
        run.problems.append(f"{len(ready_peers)} Ready VpnPeers listed, expected {run.n}")
    if run.distinct_addresses != len(ready_peers):
        run.problems.append(f"{len(ready_peers)} Ready peers share {run.distinct_addresses} addresses")
    if outside := [a for a in addresses if not a or ipaddress.ip_address(a) not in pool]:
        run.problems.append(f"{len(outside)} addresses outside {POOL}: {outside[:3]}")
    if run.bindings != run.n:
        run.problems.append(f"{run.bindings} peer bindings, expected {run.n}")


# -- report --------------------------------------------------------------------------------------


def seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def table(runs: Sequence[Run]) -> str:
    lines = [
        "| N | create rate/s | p50 s | p90 s | p99 s | max s | wall s | operator peak RSS MiB |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {r.n} | {r.create_rate:.0f} | {seconds(r.p50)} | {seconds(r.p90)} | {seconds(r.p99)} | "
        f"{seconds(r.max)} | {seconds(r.wall)} | {r.rss_peak_mib:.0f} |"
        for r in runs
    ]
    return "\n".join(lines)


def details(runs: Sequence[Run]) -> str:
    lines = []
    for r in runs:
        cp = ", ".join(f"{k} {v:.1f}" for k, v in r.control_plane_cpu_seconds.items())
        busy = r.operator_cpu_seconds / r.wall if r.wall and not math.isnan(r.wall) else math.nan
        lines.append(
            f"N={r.n}: {r.ready}/{r.n} Ready, {r.distinct_addresses} distinct addresses, {r.bindings} bindings; "
            f"mean {seconds(r.mean)} s; operator CPU {r.operator_cpu_seconds:.1f} s ({busy:.0%} of one core "
            f"over the wall time), control plane CPU s: {cp}, this client {r.bench_cpu_seconds:.1f} s; "
            f"all CPUs {r.machine_busy:.0%} busy; {r.operator_retries} handler retries; "
            f"RSS {r.rss_before_mib:.0f} -> {r.rss_after_mib:.0f} MiB; namespace cleanup {seconds(r.cleanup_seconds)} s"
        )
        total = sum(r.api_requests_per_peer.values())
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(r.api_requests_per_peer.items())[:8])
        lines.append(f"  API requests per peer (all clients, incl. watch events above): {total:.1f}: {top}")
        lines.append(f"  watch events per peer: {r.watch_events / r.n:.1f}")
        lines.extend(f"  PROBLEM: {p}" for p in r.problems)
    return "\n".join(lines)


def targets(runs: Sequence[Run]) -> str:
    run = next((r for r in runs if r.n == TARGET_N), None)
    if run is None:
        return f"targets: defined for N={TARGET_N}, which was not run"

    def verdict(value: float, limit: float, unit: str) -> str:
        met = not math.isnan(value) and value <= limit and run.ok
        return f"{value:.3f}{unit} <= {limit}{unit}: {'met' if met else 'NOT met'}"

    return (
        f"targets for N={TARGET_N}: p50 {verdict(run.p50, TARGET_P50, ' s')}; "
        f"p99 {verdict(run.p99, TARGET_P99, ' s')}; peak RSS {verdict(run.rss_peak_mib, TARGET_RSS_MIB, ' MiB')}"
    )


def as_json(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else round(value, 4)


def write_json(path: Path, runs: Sequence[Run]) -> None:
    records = []
    for r in runs:
        record = {k: as_json(v) if isinstance(v, float) else v for k, v in asdict(r).items()}
        record["control_plane_cpu_seconds"] = {k: as_json(v) for k, v in r.control_plane_cpu_seconds.items()}
        record["api_requests_per_peer"] = {k: as_json(v) for k, v in r.api_requests_per_peer.items()}
        records.append(record)
    document = {
        "benchmark": "reconcile",
        "cpus": os.cpu_count(),
        "targets": {"n": TARGET_N, "p50": TARGET_P50, "p99": TARGET_P99, "rss_mib": TARGET_RSS_MIB},
        "runs": records,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.reconcile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[100, 1000], metavar="N", help="peer counts")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--concurrency", type=int, default=8, help="threads creating peers (default 8)")
    parser.add_argument(
        "--rate", type=float, metavar="R", help="create R peers per second instead of all at once (a steady load)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for all N Ready (per N)")
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="record the operator with py-spy, per N")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.peers):
        parser.error("--peers wants positive counts")
    return args


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)  # stop everything as Ctrl-C does
    signal.signal(signal.SIGINT, interrupt)  # also when started in the background with SIGINT ignored
    work = Path(tempfile.mkdtemp(prefix="kvpn-bench-"))
    keep = args.keep
    runs: list[Run] = []
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    print(f"bench: working folder {work}", file=sys.stderr, flush=True)
    try:
        with contextlib.ExitStack() as stack:
            plane = stack.enter_context(ControlPlane(run_dir=work / "control-plane"))
            print(f"bench: control plane up in {plane.startup_seconds:.1f}s", file=sys.stderr, flush=True)
            api = stack.enter_context(plane.api_client())
            watch_api = stack.enter_context(plane.api_client())
            apply_crd_files(api, sorted(CRD_DIR.glob("*.yaml")))
            # No agents: the VpnServer is Ready once a gateway reports it; a stand-in does, as the tests' tiers.
            stack.enter_context(GatewayStandIn(stack.enter_context(plane.api_client())))
            operator = stack.enter_context(OperatorProcess(plane, log_path=work / "operator.log"))
            for n in args.peers:
                print(f"bench: N={n}", file=sys.stderr, flush=True)
                profile = args.py_spy / f"operator-n{n}.txt" if args.py_spy else None
                run = run_one(
                    api,
                    watch_api,
                    plane,
                    operator,
                    n,
                    concurrency=args.concurrency,
                    rate=args.rate,
                    timeout=args.timeout,
                    profile=profile,
                )
                runs.append(run)
                run.cleanup_seconds = delete_namespace(api, run.namespace, timeout=max(120.0, n * 0.5))
                if math.isnan(run.cleanup_seconds):
                    run.problems.append("namespace still there after the cleanup timeout")
        if "Traceback" in (work / "operator.log").read_text(errors="replace"):
            print(f"bench: the operator logged a traceback, see {work / 'operator.log'}", file=sys.stderr)
            keep = True
    except BaseException:
        keep = True
        raise
    finally:
        if runs:
            print(table(runs))
            print()
            print(details(runs))
            print(targets(runs))
            if args.json:
                write_json(args.json, runs)
        if keep or any(not r.ok for r in runs):
            print(f"bench: logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
