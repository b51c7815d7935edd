"""The agent's loop: desired state from watches (or the state file), applied per change, resynced, reported."""

from __future__ import annotations

import ipaddress
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kubernetes.client import ApiClient

from kvpn_agent.condition_report import ConditionReporter, dataplane_problems
from kvpn_agent.dataplane import Dataplane
from kvpn_agent.desired import GATEWAY_PREFIX, LEGACY_PREFIX, DesiredServer, legacy_interface_name
from kvpn_agent.gateway_lease import GatewayLeases, handover_seconds
from kvpn_agent.metrics import Metrics, PeerStats
from kvpn_agent.nft import NftError
from kvpn_agent.plan import AllowedIps
from kvpn_agent.served import ServedServers, role, secret_index
from kvpn_agent.silence import RENEWAL_LATE_SECONDS, SILENCE_POLL_SECONDS, Silence
from kvpn_agent.state import StateFile
from kvpn_agent.status_report import StatusReporter
from kvpn_agent.supervisor_api import SupervisorError, SupervisorUnreachableError
from kvpn_agent.sync import SERVER_ERRORS, NodeState, sync
from kvpn_agent.takeover import Takeover, lease_verdicts
from kvpn_agent.watch import Informer, Key, Obj, Store, key_of
from kvpn_core.api import API_VERSION
from kvpn_core.contract import (
    GATEWAY_LEASE_SECONDS,
    GATEWAY_RENEW_SECONDS,
    LABEL_ROLE,
    ROLE_GATEWAY,
    ROLE_PEER,
    ROLE_SERVER_KEY,
    GatewayReport,
)
from kvpn_core.kube import Kube, KubeError, core_path

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""How often the loop asks which wireguard-go devices live: a dead one is replaced within about this."""
RETRY_SECONDS = 8.0
"""The longest wait before a failed sync is tried again: a port freed on the node is used this soon."""
HANDOVER_TIMEOUT = 3.0
"""The longest a stopping agent waits for its handover leases to be written: well within a pod's grace period."""


@dataclass(frozen=True)
class Settings:
    node_name: str = ""
    pod_namespace: str = ""
    pod_name: str = ""
    """This agent's pod (the downward API): whether it is being deleted decides how long a handover lasts."""
    namespaces: tuple[str, ...] = ()
    """Namespaces holding the VpnServers to serve; empty: every namespace."""

    resync_seconds: float = 30.0
    report_seconds: float = 5.0
    start_timeout: float = 10.0
    """How long to wait for the API server at start before serving the state file."""

    ready_file: Path | None = None
    """Where to leave the dataplane's verdict for the gateway pods' readiness (supervisor_api.READY_FILE)."""


class Agent:
    """One node's agent. ``run`` is the sync loop (the caller's thread); watches and reports run in threads.

    What it serves, and the desired state of each, is ``served`` (ServedServers): a server whose
    objects turn bad keeps being served as it was.

    Ready (``readiness``) means the dataplane works as desired: the latest sync pass programmed
    every served server, and the wireguard-go supervisor (when there is one) answers. A server the
    node cannot program is also a Dataplane condition (SyncFailed) on its VpnServer.
    """

    def __init__(
        self,
        settings: Settings,
        dataplane: Dataplane,
        state_file: StateFile,
        api: ApiClient | None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.dp = dataplane
        self.state_file = state_file
        self.metrics = metrics or Metrics()
        self.metrics.backend.info({"backend": dataplane.backend})
        self.synced = threading.Event()
        """Set after the first sync pass that ran to its end (with or without failed servers)."""
        self.heartbeat = time.monotonic()
        self._cond = threading.Condition()
        self._dirty: set[Key] = set()
        self._dirty_bindings: dict[Key, set[str]] = {}
        """Binding Secrets changed per server since the last pass: patched in without a rebuild."""
        # What the reporter's thread reads: what ``served`` holds, _endpoints, _unsaved, _failures.
        self._lock = threading.Lock()
        self.served = ServedServers(self._lock, self.metrics)
        self._endpoints: dict[str, str] = {}
        self._unsaved = False
        self._save_lock = threading.Lock()
        self._known: NodeState | None = None
        self._allowed_ips = AllowedIps()
        """Kept from one sync to the next: a full resync at 10,000 peers costs several times more without."""
        self._node_labels: dict[str, str] | None = None
        self._have_desired = False
        self._from_api = False
        self._published: bool | None = None
        """The verdict last left in settings.ready_file; None: none yet by this process."""
        self._devices: dict[str, int] = {}
        """wireguard-go devices and their pids as last seen: a change between two looks is a death."""
        self._supervisor_down: str | None = None
        self._pass_error: str | None = None
        """Why the latest sync pass failed as a whole (the firewall, forwarding), or None."""
        self._failures: dict[Key, tuple[str, str]] = {}
        """Servers the latest sync pass could not program: (interface, error); replaced, never mutated
        (the metrics thread reads it)."""
        self.kube = Kube(api, timeout=10.0) if api is not None else None
        self.node = settings.node_name or socket.gethostname()
        """How this gateway names itself in Dataplane conditions, peer status and its gateway leases."""
        self.status = StatusReporter(self.kube, node=self.node) if self.kube is not None else None
        self.conditions = ConditionReporter(self.kube, node=self.node) if self.kube is not None else None
        self._init_leases()
        self.takeover = _takeover(self.kube, self.node, dataplane)
        """Handshakes started by this gateway when it takes over another one's laptops."""
        self.server_watches: dict[str, Informer] = {}
        self.secret_watches: dict[str, Informer] = {}
        self._objects = _Watched(self.server_watches, self.secret_watches)
        if api is not None:
            self._watch(api)

    def _init_leases(self) -> None:
        self.leases = GatewayLeases(self.kube, self.node) if self.kube is not None else None
        # Set when a server's verdict changed from what the lease thread last wrote (_leased): written
        # now, not at the thread's next round.
        self._lease_due = threading.Event()
        self._leased: dict[Key, GatewayReport] = {}
        self._programmed: frozenset[Key] = frozenset()
        """Servers a sync pass of this process has programmed (and still served): only they get a lease."""
        self._adopted: frozenset[Key] | None = None
        """Servers whose interface was up before this process's first full pass (a previous agent's)."""
        self._renewed_at: float | None = None
        """When the lease thread last renewed (monotonic)."""
        self.silence = Silence()
        """Whom this node still hears while its leases are late (end_quiet_sessions); the silence thread's."""

    def _watch(self, api: ApiClient) -> None:
        """One watch of VpnServers and one of their Secrets per namespace served (or one for all)."""
        for ns in self.settings.namespaces or ("",):
            self.server_watches[ns] = Informer(api, _servers_path(ns), self._server_changed)
            self.secret_watches[ns] = Informer(
                api,
                core_path("secrets", ns or None),
                self._secret_changed,
                label_selector=f"{LABEL_ROLE} in ({ROLE_PEER},{ROLE_SERVER_KEY})",
                index=secret_index,
            )

    # --- events --------------------------------------------------------------------------------

    def notify(self, key: Key) -> None:
        with self._cond:
            self._dirty.add(key)
            self._cond.notify()

    def _server_changed(self, obj: Obj) -> None:
        self.notify(key_of(obj))
        if self.takeover is not None:
            self.takeover.on_server(obj)  # returns at once: its work runs in a thread of its own

    def _secret_changed(self, obj: Obj) -> None:
        if (key := secret_index(obj)) is None:
            return
        if role(obj) == ROLE_PEER:
            with self._cond:
                self._dirty_bindings.setdefault(key, set()).add(key_of(obj)[1])
        self.notify(key)

    # --- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        saved = self.state_file.load()
        if saved is not None:
            self._endpoints = dict(saved.endpoints)
        for watch in self._watches():
            watch.start()
        threading.Thread(target=self._report_loop, args=(stop,), name="report", daemon=True).start()
        if self.leases is not None:
            threading.Thread(target=self._lease_loop, args=(stop,), name="leases", daemon=True).start()
        if self.leases is not None and self.takeover is not None:
            threading.Thread(target=self._silence_loop, args=(stop,), name="silence", daemon=True).start()
        deadline = time.monotonic() + self.settings.start_timeout
        while not stop.is_set() and not self._api_synced() and time.monotonic() < deadline:
            stop.wait(0.1)
        if self._api_synced():
            self._use_api()
        elif saved is not None:
            log.warning(
                "API server unreachable: serving the last good state",
                extra={"path": str(self.state_file.path), "servers": len(saved.servers)},
            )
            built = [self.served.build(inputs.key, inputs) for inputs in saved.servers]
            if any(built):
                self._mark_unsaved()
            self._have_desired = True
        else:
            log.warning("API server unreachable and no saved state: leaving the dataplane as it is until it answers")
        self._loop(stop)
        self._hand_over()

    def _loop(self, stop: threading.Event) -> None:
        next_full, delay = time.monotonic(), 1.0
        while not stop.is_set():
            self.heartbeat = now = time.monotonic()
            if not self._from_api and self._api_synced():
                log.info("API server reachable: desired state from the API from now on")
                self._use_api()
            if self._devices_changed():
                next_full = now
            with self._cond:
                if not self._have_desired:
                    self._cond.wait(POLL_SECONDS)  # nothing to serve yet: only the API server's answer can change that
                elif not self._dirty and now < next_full:
                    self._cond.wait(min(next_full - now, POLL_SECONDS))
                dirty, self._dirty = self._dirty, set()
                bindings, self._dirty_bindings = self._dirty_bindings, {}
            if not self._have_desired:
                continue
            full = time.monotonic() >= next_full
            if full:
                self._fetch_node_labels()
                dirty |= self.served.keys() | self._api_keys()
                bindings = {}  # the safety net: every server compared with its objects as a whole
            changed = self._recompute(dirty, bindings)
            if full or changed or self.served.gone:
                ok = self._sync(full)
                if ok:
                    self._save()
                if full or not ok:
                    next_full = time.monotonic() + (self.settings.resync_seconds if ok else delay)
                    delay = 1.0 if ok else min(delay * 2, self.settings.resync_seconds, RETRY_SECONDS)
            self._publish_readiness()
            self._check_verdicts()

    def _publish_readiness(self) -> None:
        """Leaves the verdict on the node's dataplane in settings.ready_file when it changes.

        Not before this process's first sync pass: until then the dataplane is as the previous agent
        left it, and so is its verdict.
        """
        path = self.settings.ready_file
        if path is None or not self.synced.is_set():
            return
        ready, why = self.readiness()
        if ready == self._published:
            return
        try:
            if ready:
                partial = path.with_name(f".{path.name}.partial")
                partial.write_text("ok\n")
                partial.replace(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("dataplane verdict not written", extra={"path": str(path), "error": str(exc)})  # noqa: TRY400 - a fact about the node
            return
        self._published = ready
        log.info("dataplane verdict for the gateway's readiness", extra={"ready": ready, "reason": why})

    def _watches(self) -> list[Informer]:
        return [*self.server_watches.values(), *self.secret_watches.values()]

    def _api_synced(self) -> bool:
        watches = self._watches()
        if not watches or not all(w.synced.is_set() for w in watches):
            return False
        if self._node_labels is None:
            self._fetch_node_labels()
        return self._node_labels is not None

    def _use_api(self) -> None:
        self._from_api = self._have_desired = True
        with self._cond:
            self._dirty |= self.served.keys() | self._api_keys()

    def _api_keys(self) -> set[Key]:
        """Every VpnServer the watches know (selected or not), once the API is the source."""
        if not self._from_api:
            return set()
        return {k for w in self.server_watches.values() for k in w.store.names()}

    def _fetch_node_labels(self) -> None:
        if self._node_labels is not None and not all(w.connected for w in self._watches()):
            return  # the API server is away: keep the labels known, and do not hold up the resync
        if self.kube is None:
            self._node_labels = {}
            return
        if not self.settings.node_name:
            if self._node_labels is None:
                log.warning("no node name (--node-name or NODE_NAME): serving only servers without a nodeSelector")
            self._node_labels = {}
            return
        try:
            node = self.kube.get(core_path("nodes", name=self.settings.node_name))
        except KubeError as exc:
            log.debug("node not read", extra={"error": str(exc)})  # keep the labels known so far
            return
        if node is None and self._node_labels != {}:
            log.warning(
                "node not found: serving only servers without a nodeSelector", extra={"node": self.settings.node_name}
            )
        self._node_labels = dict(((node or {}).get("metadata") or {}).get("labels") or {})

    def _devices_changed(self) -> bool:
        """Whether a full resync is due now: a wireguard-go died, or the supervisor left or came back."""
        if self.dp.wggo is None or not self.dp.uses_wireguard_go():
            return False
        try:
            devices = self.dp.wggo.devices()
        except SupervisorError as exc:
            return self._supervisor_lost(exc)
        back = self._supervisor_down is not None
        if back:
            log.info("wireguard-go supervisor answers again: resyncing now")
            self._supervisor_down = None
        gone = {i: pid for i, pid in self._devices.items() if devices.get(i) != pid}
        self._devices = devices
        if gone and not back:
            log.warning(
                "wireguard-go exited; resyncing now", extra={"interfaces": sorted(gone), "pids": sorted(gone.values())}
            )
        return back or bool(gone)

    def _supervisor_lost(self, exc: SupervisorError) -> bool:
        """Notes an unreachable supervisor; True (resync now) only when it was reachable until now."""
        if self._supervisor_down is not None:
            self._supervisor_down = str(exc)  # the latest reason, for /readyz; logged once per outage
            return False
        self._supervisor_down = str(exc)
        log.error(
            "wireguard-go supervisor unreachable: devices cannot be started or replaced until it answers",
            extra={"error": str(exc)},
        )
        return True

    def _watch_devices(self, servers: Sequence[DesiredServer], failed: set[str], full: bool) -> None:
        """The devices to watch from now on, as they are after a sync pass.

        After a full pass, a served device that runs without being known to the process starter
        (a previous agent's child, a supervisor's orphan outside a pod) is adopted: ``start`` keeps
        a device that answers, and from then on its death is seen too.
        """
        wggo = self.dp.wggo
        if wggo is None or not self.dp.uses_wireguard_go():
            return
        ours = {s.interface for s in servers if self.dp.userspace(s.interface)}
        try:
            devices = wggo.devices()
            for interface in sorted(ours - failed - set(devices)) if full else ():
                try:
                    devices[interface] = wggo.start(interface)
                except SupervisorUnreachableError:
                    raise
                except SERVER_ERRORS as exc:  # refused (its reason logged): the next full pass looks again
                    log.warning("wireguard-go not adopted", extra={"interface": interface, "error": str(exc)})
        except SupervisorError as exc:
            self._supervisor_lost(exc)
            return
        self._devices = devices

    def readiness(self) -> tuple[bool, str]:
        """Whether the node's dataplane is as desired, and if not, why (the body of /readyz)."""
        failures, supervisor, error = self._failures, self._supervisor_down, self._pass_error
        if not self.synced.is_set():
            return False, "no sync yet" if self._have_desired else "no desired state yet (API server, state file)"
        reasons = []
        if supervisor is not None:
            reasons.append(f"wireguard-go supervisor unreachable: {supervisor}")
        if error is not None:
            reasons.append(f"sync failed: {error}")  # and so did every server: said once
        else:
            reasons.extend(f"{ns}/{n} ({interface}): {why}" for (ns, n), (interface, why) in sorted(failures.items()))
        return (False, "; ".join(reasons)) if reasons else (True, "ok")

    # --- desired state -------------------------------------------------------------------------

    def _recompute(self, keys: set[Key], bindings: Mapping[Key, set[str]] | None = None) -> bool:
        """Brings ``served`` up to date with the watches for ``keys``; True when any of it changed."""
        if not self._from_api:
            return False  # serving the state file: nothing newer to build from
        changed = self.served.recompute(keys, self._objects, self._node_labels or {}, bindings)
        if changed:
            self._mark_unsaved()
        return changed

    def _mark_unsaved(self) -> None:
        with self._lock:
            self._unsaved = True

    # --- applying ------------------------------------------------------------------------------

    def _sync(self, full: bool) -> bool:
        mode = "full" if full else "incremental"
        servers = self.served.desired()
        gone = set(self.served.gone)
        with self._lock:
            endpoints = dict(self._endpoints)
        try:
            if full:
                # Interfaces of servers deleted while the agent was away are found by their prefix.
                ours = {s.interface for s in servers}
                present = set(self.dp.netlink.interfaces(GATEWAY_PREFIX))
                if self._adopted is None:
                    self._adopted = frozenset((s.namespace, s.name) for s in servers if s.interface in present)
                gone |= present - ours
                # An upgrade from the kvpn- names: the served servers' old interfaces go (they hold
                # the listen ports), picked by exact name so that a laptop's kvpn-<server> stays.
                legacy = {legacy_interface_name(s.namespace, s.name) for s in servers}
                gone |= {i for i in self.dp.netlink.interfaces(LEGACY_PREFIX) if i in legacy}
                families = {ipaddress.ip_interface(a).version for s in servers for a in s.addresses}
                for setting in self.dp.forwarding(tuple(sorted(families))):
                    log.info("IP forwarding turned on", extra={"setting": setting})
            result = sync(
                servers,
                self.dp.link,
                self.dp.wireguard,
                self.dp.firewall,
                endpoints=endpoints,
                gone=sorted(gone),
                known=None if full else self._known,
                memo=self._allowed_ips,
            )
        except (NftError, subprocess.SubprocessError, *SERVER_ERRORS) as exc:
            self._known = None  # read everything back next time
            self.metrics.sync_errors.labels(mode).inc()
            error = str(exc) or type(exc).__name__
            if error != self._pass_error:
                log.error("sync failed", extra={"mode": mode, "error": error})  # noqa: TRY400 - expected: no traceback
            self._pass_error = error
            self._set_failures({(s.namespace, s.name): (s.interface, f"sync failed: {error}") for s in servers})
            return False
        if self._pass_error is not None:
            log.info("sync works again")
            self._pass_error = None
        self._known = result.state
        self.served.gone -= gone
        self.metrics.sync_duration.labels(mode).observe(result.seconds)
        self.metrics.sync_errors.labels(mode).inc(len(result.errors))
        failed = result.errors
        self._set_failures(
            {(s.namespace, s.name): (s.interface, failed[s.interface]) for s in servers if s.interface in failed}
        )
        self._watch_devices(servers, set(result.errors), full)
        keys = {(s.namespace, s.name) for s in servers}
        with self._lock:  # the lease thread reads it
            self._programmed = (self._programmed & keys) | {
                (s.namespace, s.name) for s in servers if s.interface not in failed
            }
        level = logging.INFO if result.actions or not self.synced.is_set() else logging.DEBUG
        log.log(
            level,
            "synced",
            extra={
                "mode": mode,
                "actions": len(result.actions),
                "seconds": round(result.seconds, 4),
                "servers": len(servers),
                "peers": sum(len(s.peers) for s in servers),
            },
        )
        if not self.synced.is_set():
            self._mark_unsaved()  # a state file right after start, whatever else happens
        self.synced.set()
        return not result.errors

    def _set_failures(self, failures: dict[Key, tuple[str, str]]) -> None:
        """The servers the latest pass could not program; logged once per change, not per attempt."""
        old = self._failures
        for key, (interface, error) in sorted(failures.items()):
            if old.get(key) != (interface, error):
                log.error(
                    "server sync failed",
                    extra={"server_namespace": key[0], "server": key[1], "interface": interface, "error": error},
                )
        for key in sorted(old.keys() - failures.keys()):
            log.info("server sync works again", extra={"server_namespace": key[0], "server": key[1]})
        with self._lock:  # the reporter's thread turns them into Dataplane conditions
            self._failures = failures

    def _save(self) -> None:
        """The last good state, after each sync and when endpoints change."""
        with self._save_lock:
            if not self._unsaved or not self.synced.is_set():
                return
            with self._lock:
                self._unsaved = False
                inputs = self.served.inputs()
                keys = {p.public_key for d in self.served.desired() for p in d.peers}
                endpoints = {k: v for k, v in self._endpoints.items() if k in keys}
            try:
                self.state_file.save(inputs, endpoints)
            except OSError as exc:
                log.error("state file not written", extra={"path": str(self.state_file.path), "error": str(exc)})  # noqa: TRY400 - expected: no traceback

    # --- reporting -----------------------------------------------------------------------------

    def _report_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.report_seconds):
            try:
                self.report_once()
            except Exception:
                # Reporting is best effort; the dataplane does not depend on it, so it must not stop.
                log.exception("report failed")

    def report_once(self) -> list[PeerStats]:
        with self._lock:
            servers = self.served.desired()
        stats = []
        for server in servers:
            try:
                device = self.dp.reader.get(server.interface)
            except SERVER_ERRORS as exc:
                log.debug("device not read", extra={"interface": server.interface, "error": str(exc)})
                continue
            peers = {p.public_key: p for p in server.peers}
            for public_key, seen in (device.peers if device else {}).items():
                if (binding := peers.get(public_key)) is not None:
                    stats.append(
                        PeerStats(
                            server.namespace,
                            server.name,
                            binding.peer_namespace,
                            binding.peer_name,
                            public_key,
                            seen.last_handshake,
                            seen.rx_bytes,
                            seen.tx_bytes,
                            seen.endpoint,
                        )
                    )
        self.metrics.peers.update(stats)
        with self._lock:
            fresh = {
                s.public_key: s.endpoint
                for s in stats
                if s.endpoint and self._endpoints.get(s.public_key) != s.endpoint
            }
            self._endpoints.update(fresh)
            self._unsaved = self._unsaved or bool(fresh)
        if fresh:
            self._save()
        reachable = bool(self._watches()) and all(w.connected for w in self._watches())
        self.metrics.api_reachable.set(1 if reachable else 0)
        if self.status is not None and reachable:
            try:
                self.status.report(stats)
            except KubeError as exc:
                log.warning("peer status not written", extra={"error": str(exc)})
        if self.conditions is not None and reachable and self._from_api and self.synced.is_set():
            # Only once the desired state comes from the API: before that every problem looks solved.
            with self._lock:
                problems = self.served.problems()
                keys = self.served.keys()
                failures = {key: error for key, (_, error) in self._failures.items() if key in keys}
                served = [inputs.server for inputs in self.served.inputs()]
                refused = self.dp.fallback.failed if self.dp.fallback is not None else {}
                fallbacks = {
                    (d.namespace, d.name): refused[d.interface] for d in self.served.desired() if d.interface in refused
                }
            try:
                self.conditions.report(dataplane_problems(problems, self.node, failures, fallbacks), served)
            except KubeError as exc:
                log.warning("Dataplane conditions not written", extra={"error": str(exc)})
        return stats

    # --- gateway leases --------------------------------------------------------------------------

    def gateway_reports(self) -> dict[Key, tuple[str, GatewayReport]]:
        """Each server this node speaks for, with its uid and verdict: the servers a pass of this process
        programmed, those a previous agent left running once this process's first pass ran, and those
        it fails to program (not ready, and why: the server's status names this node and the reason).

        The verdict is readiness() narrowed to the server: its own failure, the pass's error, and the
        supervisor only for a server on wireguard-go.
        """
        if not self.synced.is_set():
            return {}
        failures, supervisor, error = self._failures, self._supervisor_down, self._pass_error
        with self._lock:
            claimed = self._programmed | (self._adopted or frozenset()) | failures.keys()
            served = {inputs.key: inputs.server for inputs in self.served.inputs()}
            desired = [d for d in self.served.desired() if (d.namespace, d.name) in claimed]
        reports = {}
        for d in desired:
            key = (d.namespace, d.name)
            uid = str(((served.get(key) or {}).get("metadata") or {}).get("uid") or "")
            if not uid:
                continue  # not read from the API server (the state file's, a test's): nothing to own the lease
            userspace = self.dp.userspace(d.interface)
            reasons = []
            if supervisor is not None and userspace:
                reasons.append(f"wireguard-go supervisor unreachable: {supervisor}")
            if key in failures:
                reasons.append(failures[key][1])
            elif error is not None:
                reasons.append(f"sync failed: {error}")
            reports[key] = (
                uid,
                GatewayReport(
                    ready=not reasons, message="; ".join(reasons), backend="userspace" if userspace else "kernel"
                ),
            )
        return reports

    def _leasing(self) -> bool:
        """Whether leases are written now: only while the desired state comes from a reachable API server."""
        watches = self._watches()
        return self.leases is not None and self._from_api and bool(watches) and all(w.connected for w in watches)

    def renew_leases(self) -> None:
        """One round of the lease thread; raises KubeError (status 0) when the API server cannot be reached."""
        if self.leases is None or not self._leasing():
            return
        reports = self.gateway_reports()
        with self._lock:
            self._leased = {key: report for key, (_, report) in reports.items()}
        self.leases.renew(reports)
        self._watch_gateways(reports.keys())
        now, last = time.monotonic(), self._renewed_at
        self._renewed_at = now
        if last is not None and now - last > GATEWAY_LEASE_SECONDS:
            log.warning("gateway leases renewed after they ran out", extra={"silent_s": round(now - last, 1)})

    def _watch_gateways(self, servers: Iterable[Key]) -> None:
        """Every gateway's lease of the servers this node speaks for, read each round: a gateway lost is
        taken over from here at once (takeover.on_leases), whether or not the operator is there to say so."""
        if self.takeover is None or self.kube is None:
            return
        keys = set(servers)
        leases = []
        for namespace in sorted({ns for ns, _ in keys}):
            path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
            try:
                leases.extend(self.kube.list(path, label_selector=f"{LABEL_ROLE}={ROLE_GATEWAY}", cached=True))
            except KubeError as exc:  # the operator's status still says it, a moment later
                log.debug("gateway leases not read", extra={"namespace": namespace, "error": str(exc)})
                return
        for key, verdicts in lease_verdicts(leases, time.time()).items():
            if key in keys:
                self.takeover.on_leases(key, verdicts)

    def _check_verdicts(self) -> None:
        """Wakes the lease thread when a verdict changed since it last wrote (the sync loop, each turn)."""
        if not self._leasing():
            return
        now = {key: report for key, (_, report) in self.gateway_reports().items()}
        with self._lock:
            changed = now != self._leased
        if changed:
            self._lease_due.set()

    def _lease_loop(self, stop: threading.Event) -> None:
        failing: str | None = None
        while not stop.is_set():
            self._lease_due.wait(GATEWAY_RENEW_SECONDS)
            self._lease_due.clear()
            if stop.is_set():
                return
            try:
                self.renew_leases()
            except KubeError as exc:  # unreachable: the leases run out, as they should for a node gone silent
                if failing is None:
                    log.warning("gateway leases not renewed", extra={"error": str(exc)})
                failing = str(exc)
            except Exception:
                # Like reporting, best effort: the dataplane does not depend on it, so it must not stop.
                log.exception("gateway leases not renewed")
            else:
                if failing is not None:
                    log.info("gateway leases renewed again; watches reconnected")
                    for watch in self._watches():  # what they missed meanwhile, now, not after TCP's backoff
                        watch.reconnect()
                    failing = None

    def _silence_loop(self, stop: threading.Event) -> None:
        while not stop.wait(SILENCE_POLL_SECONDS):
            try:
                self.end_quiet_sessions()
            except Exception:
                log.exception("quiet sessions not ended")

    def end_quiet_sessions(self, now: float | None = None) -> int:
        """One round of the silence thread (silence.py). While a lease renewal is late, reads whom each
        interface still hears from; once the leases have run out, ends the sessions with the laptops not
        heard for QUIET_SECONDS, each once per outage. Apart from the lease thread, which a renewal into a
        cut network holds for the client's timeout (10 s). Returns how many were ended in this round."""
        last = self._renewed_at
        if self.takeover is None or last is None:
            return 0
        now = time.monotonic() if now is None else now
        if now - last <= RENEWAL_LATE_SECONDS:
            self.silence.reset()
            return 0
        with self._lock:
            interfaces = [s.interface for s in self.served.desired()]
        ended = 0
        for interface in interfaces:
            try:
                device = self.takeover.read(interface)
            except SERVER_ERRORS as exc:
                log.warning("device not read", extra={"interface": interface, "error": str(exc)})
                continue
            self.silence.hear(interface, device, now)
            if now - last <= GATEWAY_LEASE_SECONDS:
                continue
            quiet = self.silence.quiet(interface, device, now)
            ended += self.takeover.drop_sessions(interface, quiet)
            self.silence.ended(interface, quiet)
        if ended:
            log.warning("gateway leases ran out: sessions with quiet peers ended", extra={"peers": ended})
        return ended

    def _hand_over(self) -> None:
        """On a graceful stop: the leases of the servers whose dataplane outlives this process are
        renewed once, for as long as this agent's successor may take to come (handover_seconds), so that
        a restart moves no laptop. Bounded by HANDOVER_TIMEOUT; the other leases run out."""
        leases = self.leases
        if leases is None:
            return
        with self._lock:
            staying = [(d.namespace, d.name) for d in self.served.desired() if self.dp.outlives_agent(d.interface)]
        self._lease_due.set()  # the lease thread sees the stop and ends

        settings = self.settings

        def hand_over() -> None:
            seconds, why = handover_seconds(leases.kube, settings.pod_namespace, settings.pod_name)
            try:
                leases.handover(staying, seconds)
            except KubeError as exc:
                log.warning("gateway leases not handed over", extra={"error": str(exc)})
                return
            log.info("gateway leases handed over", extra={"servers": len(staying), "seconds": seconds, "why": why})

        thread = threading.Thread(target=hand_over, name="handover", daemon=True)
        thread.start()
        thread.join(HANDOVER_TIMEOUT)
        if thread.is_alive():
            log.warning("gateway leases not handed over in time", extra={"seconds": HANDOVER_TIMEOUT})

    def healthy(self) -> bool:
        return time.monotonic() - self.heartbeat < max(120.0, 4 * self.settings.resync_seconds)


def _takeover(kube: Kube | None, node: str, dataplane: Dataplane) -> Takeover | None:
    wireguard = dataplane.takeover
    if kube is None or wireguard is None:
        return None
    return Takeover(kube, node, wireguard, wireguard.get)


def _servers_path(namespace: str) -> str:
    return f"/apis/{API_VERSION}" + (f"/namespaces/{namespace}" if namespace else "") + "/vpnservers"


class _Watched:
    """The objects the Agent's watches hold (served.Objects); the dicts are the Agent's, read as they are now."""

    def __init__(self, servers: Mapping[str, Informer], secrets: Mapping[str, Informer]) -> None:
        self._servers, self._secrets = servers, secrets

    def _stores(self, namespace: str) -> tuple[Store, Store] | None:
        servers = self._servers.get(namespace) or self._servers.get("")
        secrets = self._secrets.get(namespace) or self._secrets.get("")
        return (servers.store, secrets.store) if servers is not None and secrets is not None else None

    def server(self, key: Key) -> Obj | None:
        stores = self._stores(key[0])
        return stores[0].get(key) if stores is not None else None

    def secret(self, key: Key) -> Obj | None:
        stores = self._stores(key[0])
        return stores[1].get(key) if stores is not None else None

    def bindings(self, key: Key) -> Iterable[Obj]:
        stores = self._stores(key[0])
        return stores[1].indexed(key) if stores is not None else ()
