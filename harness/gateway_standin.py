"""A stand-in for the agents' gateway leases, in the tiers that run the operator without agents.

A VpnServer is Ready only while some gateway node reports it programmed (kvpn_core.contract). The
integration tier and the operator's benchmarks run the real operator against a control plane with no
nodes and no agents: this stand-in renews, for every VpnServer, a ready lease for a Node of its own
and for each Node a test labels ``kvpn.dev/gateway-stand-in=true`` that the server's nodeSelector
matches, with the agent's own lease writer (kvpn_agent.gateway_lease). It programs nothing: tiers that test the
dataplane run real agents.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kubernetes import client

from kvpn_agent.gateway_lease import GatewayLeases
from kvpn_core.api import API_VERSION
from kvpn_core.contract import GatewayReport
from kvpn_core.kube import Kube, KubeError, NotFoundError, core_path

NODE = "kvpn-gateway-stand-in"
LABEL = "kvpn.dev/gateway-stand-in"
"""A test's Node labelled so (value "true") is spoken for too; no other: a real agent's lease is its own."""
ADDRESS = "192.0.2.1"  # TEST-NET-1: nothing is ever sent there
REPORT = GatewayReport(ready=True, message="gateway stand-in: nothing programmed", backend="stand-in")

log = logging.getLogger(__name__)


def _matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class GatewayStandIn:
    """`with GatewayStandIn(api): ...`: leases renewed every `period` seconds until the block ends."""

    def __init__(self, api: client.ApiClient, period: float = 1.0) -> None:
        self.kube = Kube(api, timeout=10.0)
        self.api = api
        self.period = period
        self._leases: dict[str, GatewayLeases] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gateway stand-in", daemon=True)

    def __enter__(self) -> GatewayStandIn:
        if self.kube.get(core_path("nodes", name=NODE)) is None:
            self.kube.create(core_path("nodes"), {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
        status = {"status": {"addresses": [{"type": "InternalIP", "address": ADDRESS}]}}
        self.kube.merge_patch(core_path("nodes", name=NODE, sub="status"), status)
        self.renew()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.kube.delete(core_path("nodes", name=NODE))

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.renew()
            except KubeError as exc:  # the next round tries again
                log.warning("gateway stand-in: leases not renewed: %s", exc)

    def renew(self) -> None:
        try:
            servers: list[dict[str, Any]] = self.kube.list(f"/apis/{API_VERSION}/vpnservers")
        except NotFoundError:
            return  # no CRD yet

        nodes: list[dict[str, Any]] = self.kube.list(core_path("nodes"))
        for node in nodes:
            name = node["metadata"]["name"]
            labels = node["metadata"].get("labels") or {}
            if name != NODE and labels.get(LABEL) != "true":
                continue
            reports = {
                (s["metadata"]["namespace"], s["metadata"]["name"]): (s["metadata"]["uid"], REPORT)
                for s in servers
                if _matches(labels, (s.get("spec") or {}).get("nodeSelector") or {})
                and not s["metadata"].get("deletionTimestamp")
            }
            leases = self._leases.setdefault(name, GatewayLeases(self.kube, name))
            leases.renew(reports)
