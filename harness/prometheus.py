"""A real Prometheus (Debian's, from hack/prometheus.sh) scraping a world's agents as the chart's PodMonitor
says, for the end-to-end test of the dashboard's queries.

The stand-in is for the Prometheus Operator and for Prometheus' own Kubernetes discovery, which Debian's
build leaves out: `scrape_job` turns the chart's PodMonitor into the scrape job the operator would
generate, with the targets discovery would find (pods kept by the PodMonitor's namespaces, label
selector and port name, labelled by its relabelings), thin and named as such. Prometheus itself
runs on the host, listening on loopback, and scrapes the nodes' addresses (the agents run on the nodes'
network): nothing outside the world is touched.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from harness.cluster import run
from harness.controlplane import free_port
from harness.kvpn import wait_for

SCRIPT = Path(__file__).resolve().parents[1] / "hack" / "prometheus.sh"


def binary() -> Path:
    """The cached prometheus binary (`make setup` fetches it)."""
    folder = run(str(SCRIPT), timeout=600).stdout.strip().splitlines()[-1]
    return Path(folder) / "prometheus"


def scrape_job(pod_monitor: dict[str, Any], pods: list[dict[str, Any]], interval: str) -> dict[str, Any]:
    """The scrape job the Prometheus Operator would make of a PodMonitor, with its targets resolved here.

    A stand-in for the operator and for Prometheus' Kubernetes discovery (Debian builds Prometheus
    without it): of `pods`, those in the PodMonitor's namespaces with its selector's labels, on the
    container port it names; each target labelled namespace, pod and container, then by the PodMonitor's
    relabelings, read from the discovery labels Prometheus would give them. Only the `replace` relabeling
    is understood: another fails here, rather than be ignored.
    """
    spec = pod_monitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    namespaces = set(spec["namespaceSelector"]["matchNames"])
    wanted = spec["selector"]["matchLabels"]
    groups = []
    for pod in pods:
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        if meta["namespace"] not in namespaces or any(labels.get(k) != v for k, v in wanted.items()):
            continue
        for container in pod["spec"]["containers"]:
            for port in container.get("ports") or []:
                if port.get("name") != endpoint["port"]:
                    continue
                discovered = {
                    "__meta_kubernetes_namespace": meta["namespace"],
                    "__meta_kubernetes_pod_name": meta["name"],
                    "__meta_kubernetes_pod_container_name": container["name"],
                    "__meta_kubernetes_pod_node_name": pod["spec"].get("nodeName", ""),
                }
                target = {"namespace": meta["namespace"], "pod": meta["name"], "container": container["name"]}
                for relabeling in endpoint.get("relabelings", []):
                    if relabeling.get("action", "replace").lower() != "replace" or "regex" in relabeling:
                        raise ValueError(f"the stand-in understands only plain replace relabelings: {relabeling}")
                    value = ";".join(discovered[label] for label in relabeling["sourceLabels"])
                    target[relabeling["targetLabel"]] = value
                address = f"{pod['status']['podIP']}:{port['containerPort']}"
                groups.append({"targets": [address], "labels": target})
    meta = pod_monitor["metadata"]
    return {
        "job_name": f"podMonitor/{meta['namespace']}/{meta['name']}/0",
        "scrape_interval": interval,
        "metrics_path": endpoint.get("path", "/metrics"),
        "static_configs": groups,
    }


class Prometheus:
    """`with Prometheus(folder, jobs) as prom: prom.query(...)`: one server on loopback, stopped on exit."""

    def __init__(self, folder: Path, jobs: list[dict[str, Any]], interval: str = "2s") -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "prometheus.yml"
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval}, "scrape_configs": jobs}
        self.config.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        log = (self.folder / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(binary()),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            wait_for("prometheus to be ready", self._ready, timeout=60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:  # noqa: S310 -- loopback URL
                return bool(response.status == 200)
        except OSError:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited: {(self.folder / 'prometheus.log').read_text()[-2000:]}"
                ) from None
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (a scalar comes back as one series without labels)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 -- loopback URL
            body = json.loads(response.read())
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> int:
        return sum(float(s["value"][1]) == 1 for s in self.query("up"))
