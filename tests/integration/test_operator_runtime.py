"""The operator process as its pod runs it: an image uid with no passwd entry, and probes that mean something.

Each test gets a control plane of its own: these tests need a cluster without the CRDs, or one whose
API server they freeze, and no other operator reconciling behind their back.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from harness import chart
from harness.controlplane import ControlPlane, ControlPlaneError, apply_crd_files, free_port
from harness.gateway_standin import GatewayStandIn
from harness.kvpn import Kvpn, wait_for
from harness.operator_process import OperatorProcess
from kvpn_operator.readiness import STALL_SECONDS
from tests.conftest import CRD_DIR

pytestmark = pytest.mark.apiserver

# The chart's runAsUser; the image has no passwd entry for it (nor has this machine).
IMAGE_UID = 65532
# The operator caches its readiness verdict for 5 s and gives an API read 3 s; a few probes' worth.
READY_WITHIN = 20.0


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(run_dir=tmp_path / "control-plane")
    try:
        cp.start()
    except ControlPlaneError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        # No agents here: a stand-in renews the gateway leases they would, once the CRDs exist.
        with cp.api_client() as api_client, GatewayStandIn(api_client):
            yield cp
    finally:
        cp.stop()


@pytest.fixture
def api(plane: ControlPlane) -> Iterator[client.ApiClient]:
    with plane.api_client() as api_client:
        yield api_client


class ImageUserOperator(OperatorProcess):
    """The operator as uid/gid 65532 with the environment a container gets: no USER, LOGNAME or passwd entry."""

    def command(self) -> list[str]:
        return [
            "setpriv",
            f"--reuid={IMAGE_UID}",
            f"--regid={IMAGE_UID}",
            "--clear-groups",
            # This checkout's interpreter lives under /root (mode 0700): the right to read files, no other
            # privilege. It does not give the uid a name, which is what this test is about.
            "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "--pdeathsig=KILL",  # the uid change clears the harness's own parent-death signal
            "env",
            "-i",
            f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME=/",  # what containerd sets for a uid without a passwd entry
            f"KUBECONFIG={self.control_plane.kubeconfig}",
            "PYTHONUNBUFFERED=1",
            *super().command(),
        ]


def probe(url: str) -> tuple[int, str]:
    """(HTTP status, body) of a GET, as a kubelet's httpGet probe sees it; (0, why) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 -- loopback URL
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


def wait_for_probe(url: str, status: int, text: str = "", timeout: float = READY_WITHIN) -> str:
    """Polls until the probe answers `status` with `text` in its body; the body."""
    answers: list[tuple[int, str]] = []

    def answered() -> str | None:
        answers.append(probe(url))
        code, body = answers[-1]
        return body if code == status and text in body else None

    try:
        return wait_for(f"{url} to answer {status} with {text!r}", answered, timeout=timeout, interval=0.5)
    except AssertionError as error:
        raise AssertionError(f"{error}; last answer: {answers[-1] if answers else None}") from None


def apiserver_pid(plane: ControlPlane) -> int:
    """The pid of this control plane's kube-apiserver, told apart from others' by its certificate folder."""
    marker = f"--cert-dir={plane.run_dir / 'apiserver-certs'}".encode()
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().split(b"\0"):
                return int(proc.name)
    raise AssertionError(f"no kube-apiserver with {marker!r} running")


def test_operator_runs_as_a_uid_without_a_passwd_entry(
    plane: ControlPlane, api: client.ApiClient, tmp_path: Path
) -> None:
    with pytest.raises(KeyError):  # else this test could not fail
        pwd.getpwuid(IMAGE_UID)
    apply_crd_files(api, sorted(CRD_DIR.glob("*.yaml")))
    port = free_port()
    operator = ImageUserOperator(
        plane, args=("--all-namespaces", f"--readiness-port={port}"), log_path=tmp_path / "operator.log"
    )
    operator.start()  # raises with the log tail unless /healthz answers
    try:
        wait_for_probe(f"http://127.0.0.1:{port}/readyz", 200)
        kvpn = Kvpn(api)
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="team")))
        kvpn.server("team", "dev")
        server = kvpn.wait_ready("vpnservers", "team", "dev", timeout=30)
        assert server["status"]["publicKey"]
    finally:
        operator.stop()
    log = operator.log_text()
    assert "Traceback" not in log, log
    assert "getpwuid" not in log, log


def test_ready_only_while_it_can_reconcile_alive_regardless(
    plane: ControlPlane, api: client.ApiClient, tmp_path: Path
) -> None:
    """Not Ready without the CRDs, Ready once they exist, not Ready while the API server does not answer,
    Ready again when it does; alive (/healthz) throughout, because a restart would fix none of it."""
    port = free_port()
    readyz = f"http://127.0.0.1:{port}/readyz"
    operator = OperatorProcess(
        plane, args=("--all-namespaces", f"--readiness-port={port}"), log_path=tmp_path / "op.log"
    )
    operator.start()
    try:
        body = wait_for_probe(readyz, 503, "vpnservers.kvpn.dev")
        assert "CRD" in body, body
        assert "vpnpeers.kvpn.dev" in body, body
        assert probe(operator.healthz_url)[0] == 200

        apply_crd_files(api, sorted(CRD_DIR.glob("*.yaml")))
        # kopf may miss a CRD created while it runs (its discovery scan races the CRD's last event; here it
        # missed the second one every time). Then the operator is not Ready, and exits after a while so that
        # the kubelet restarts it; this harness restarts it the same way.
        outcome = wait_for(
            "Ready, or an exit to scan again",
            lambda: "ready" if probe(readyz)[0] == 200 else "exited" if not operator.running else None,
            timeout=STALL_SECONDS + 3 * READY_WITHIN,
            interval=0.5,
        )
        if outcome == "exited":
            assert "exiting to scan again" in operator.log_text(), operator.log_text()
            operator.restart()
        body = wait_for_probe(readyz, 200)
        assert "[+]kopf ok: started, watching vpnservers.kvpn.dev, vpnpeers.kvpn.dev" in body, body
        # Ready means reconciling: a VpnServer created now becomes Ready.
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="team")))
        Kvpn(api).server("team", "dev")
        Kvpn(api).wait_ready("vpnservers", "team", "dev", timeout=30)

        pid = apiserver_pid(plane)
        os.kill(pid, signal.SIGSTOP)  # the API server still holds its port, but answers nothing
        try:
            body = wait_for_probe(readyz, 503, "API server")
            assert probe(operator.healthz_url)[0] == 200, "liveness must not depend on the API server"
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for_probe(readyz, 200)
        assert operator.running
    finally:
        operator.stop()
    assert "Traceback" not in operator.log_text(), operator.log_text()


def operator_as_service_account(
    plane: ControlPlane, api: client.ApiClient, tmp_path: Path, rules: list[dict[str, Any]], port: int
) -> OperatorProcess:
    """An operator whose only permissions are `rules` (a ClusterRole for ServiceAccount kvpn/operator)."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="kvpn")))
    core.create_namespaced_service_account("kvpn", {"metadata": {"name": "operator"}})
    rbac.create_cluster_role({"metadata": {"name": "kvpn-operator"}, "rules": rules})
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": "kvpn-operator"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kvpn-operator"},
            "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": "kvpn"}],
        }
    )
    kubeconfig = chart.token_kubeconfig(api, plane, "kvpn", "operator", tmp_path / "operator.kubeconfig")
    as_sa: Any = chart.AsServiceAccount(plane, kubeconfig)  # duck-typed for OperatorProcess
    return OperatorProcess(as_sa, args=("--all-namespaces", f"--readiness-port={port}"), log_path=tmp_path / "op.log")


EVENTS = {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}
CRDS = {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]}


def kvpn_rule(*resources: str) -> dict[str, Any]:
    return {"apiGroups": ["kvpn.dev"], "resources": list(resources), "verbs": ["get", "list", "watch", "patch"]}


def test_not_ready_without_permission_to_read_what_it_reconciles(
    plane: ControlPlane, api: client.ApiClient, tmp_path: Path
) -> None:
    """An operator whose RBAC lets it read VpnServers but not VpnPeers says so, and is not Ready."""
    apply_crd_files(api, sorted(CRD_DIR.glob("*.yaml")))
    port = free_port()
    operator = operator_as_service_account(plane, api, tmp_path, [EVENTS, CRDS, kvpn_rule("vpnservers")], port)
    operator.start()
    try:
        body = wait_for_probe(f"http://127.0.0.1:{port}/readyz", 503, "vpnpeers.kvpn.dev")
        assert "403" in body, body
        assert "RBAC" in body, body
        assert "[+]vpnservers.kvpn.dev" in body, body  # what it may read is not reported as a problem
        assert probe(operator.healthz_url)[0] == 200
    finally:
        operator.stop()


def test_a_kind_kopf_does_not_watch_makes_it_exit_and_a_restart_serves_it(
    plane: ControlPlane, api: client.ApiClient, tmp_path: Path
) -> None:
    """kopf that may not watch CRDs scans for its kinds only at start: CRDs created later are served by
    the API server but never watched. The operator is not Ready, then exits, and a restart (the kubelet's
    job) picks them up. The same happens when kopf's discovery scan loses a race with a new CRD."""
    port = free_port()
    readyz = f"http://127.0.0.1:{port}/readyz"
    operator = operator_as_service_account(plane, api, tmp_path, [EVENTS, kvpn_rule("vpnservers", "vpnpeers")], port)
    operator.start()
    try:
        wait_for_probe(readyz, 503, "CRD is not installed")
        apply_crd_files(api, sorted(CRD_DIR.glob("*.yaml")))
        body = wait_for_probe(readyz, 503, "[+]vpnpeers.kvpn.dev ok")
        assert "[-]kopf failed: kopf does not watch vpnservers.kvpn.dev, vpnpeers.kvpn.dev" in body, body
        wait_for("the operator to exit", lambda: not operator.running, timeout=STALL_SECONDS + 2 * READY_WITHIN)
        assert "exiting to scan again" in operator.log_text(), operator.log_text()
        operator.restart()
        wait_for_probe(readyz, 200)
    finally:
        operator.stop()
    assert "Traceback" not in operator.log_text(), operator.log_text()
