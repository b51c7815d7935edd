"""The Helm chart as the harness uses it: rendered with `helm template`, applied through the API, and
kubeconfigs that authenticate with TokenRequest tokens of the chart's ServiceAccounts."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tests.support.controlplane import ControlPlane, apply_crd

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kvpn"
HELM_TIMEOUT = 120

Doc = dict[str, Any]

# What `apply_rbac` creates: the chart's identities and permissions (no kubelet runs the workloads).
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def tool_dir() -> Path:
    """hack/helm.sh's folder with helm (v4) and kubectl; downloaded once, then cached."""
    result = subprocess.run([str(REPO / "hack" / "helm.sh")], capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"hack/helm.sh failed ({result.returncode}):\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


def helm_template(
    helm: Path, home: Path, *sets: str, namespace: str, release: str = "kvpn", chart: Path = CHART
) -> list[Doc]:
    """`helm template` with private Helm folders (nothing of the user's Helm setup takes part)."""
    args = [str(helm), "template", release, str(chart), "--namespace", namespace]
    for item in sets:
        args += ["--set", item]
    private = {f"HELM_{kind}_HOME": str(home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=HELM_TIMEOUT, env={**os.environ, **private}, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"helm template failed ({result.returncode}):\n{result.stderr}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def find(docs: Sequence[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(docs: Sequence[Doc], kind: str) -> Doc:
    """The pod spec of the one Deployment or DaemonSet in the rendered chart."""
    (workload,) = find(docs, kind)
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def container_args(docs: Sequence[Doc], kind: str) -> list[str]:
    (container,) = pod_spec(docs, kind)["containers"]
    return list(container.get("args") or [])


def apply_crds(api: ApiClient, docs: Sequence[Doc]) -> list[str]:
    return [apply_crd(api, doc) for doc in find(docs, "CustomResourceDefinition")]


def apply_rbac(api: ApiClient, docs: Sequence[Doc]) -> list[str]:
    """Create the chart's ServiceAccounts, (Cluster)Roles and (Cluster)RoleBindings as rendered."""
    from kubernetes import client  # noqa: PLC0415 -- keeps this module light for scripts

    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    creators: dict[str, Any] = {
        "ServiceAccount": lambda d: core.create_namespaced_service_account(d["metadata"]["namespace"], d),
        "ClusterRole": rbac.create_cluster_role,
        "ClusterRoleBinding": rbac.create_cluster_role_binding,
        "Role": lambda d: rbac.create_namespaced_role(d["metadata"]["namespace"], d),
        "RoleBinding": lambda d: rbac.create_namespaced_role_binding(d["metadata"]["namespace"], d),
    }
    created = []
    for kind in RBAC_KINDS:
        for doc in find(docs, kind):
            creators[kind](doc)
            created.append(f"{kind}/{doc['metadata']['name']}")
    return created


def token_kubeconfig(
    api: ApiClient, control_plane: ControlPlane, namespace: str, service_account: str, path: Path
) -> Path:
    """A kubeconfig that authenticates with a fresh TokenRequest token of the ServiceAccount."""
    from kubernetes import client  # noqa: PLC0415

    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=24 * 3600)
    )
    core: Any = client.CoreV1Api(api)
    token = core.create_namespaced_service_account_token(service_account, namespace, request).status.token
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kvpn",
                "cluster": {"server": control_plane.server, "certificate-authority": str(control_plane.ca_file)},
            }
        ],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [
            {"name": service_account, "context": {"cluster": "kvpn", "user": service_account, "namespace": namespace}}
        ],
        "current-context": service_account,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class AsServiceAccount:
    """What OperatorProcess needs of a control plane, with KUBECONFIG pointing at a ServiceAccount's."""

    def __init__(self, plane: ControlPlane, kubeconfig: Path) -> None:
        self.run_dir = plane.run_dir
        self.kubeconfig = kubeconfig

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
