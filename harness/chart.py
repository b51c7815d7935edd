"""The Helm chart as the harness uses it: where it is, the helm and kubectl that install it, and
kubeconfigs that authenticate with TokenRequest tokens of the chart's ServiceAccounts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from harness.controlplane import ControlPlane

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "kvpn"


def tool_dir() -> Path:
    """hack/helm.sh's folder with helm (v4) and kubectl; downloaded once, then cached."""
    result = subprocess.run([str(REPO / "hack" / "helm.sh")], capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"hack/helm.sh failed ({result.returncode}):\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


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
