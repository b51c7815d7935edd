"""Shared fixtures: a real control plane per session, the CRDs, fresh namespaces, the operator."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness.controlplane import ControlPlane, ControlPlaneError, apply_crd_files, log_tail
from harness.gateway_standin import GatewayStandIn
from harness.operator_process import OperatorProcess

REPO = Path(__file__).resolve().parent.parent
CRD_DIR = REPO / "crds"
TEST_NAMESPACE_LABEL = "kvpn.dev/test"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Whatever uses the control plane is an `apiserver` test, marked or not (for `-m`). `vm` tests need
    the guest's kernel: on the host they are deselected (tests/vm/test_kernel_tier.py runs them in the
    guest, where KVPN_IN_VM=1 and the guest's command line picks what runs)."""
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.apiserver)
    if os.environ.get("KVPN_IN_VM") != "1":
        guest_only = [item for item in items if item.get_closest_marker("vm")]
        if guest_only:
            config.hook.pytest_deselected(items=guest_only)
            items[:] = [item for item in items if not item.get_closest_marker("vm")]


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + kube-controller-manager; logs stay in pytest's temp folder."""
    plane = ControlPlane(run_dir=tmp_path_factory.mktemp("control-plane"))
    try:
        plane.start()
    except ControlPlaneError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """A kubernetes.client.ApiClient authenticated as the admin (group system:masters)."""
    with control_plane.api_client() as api_client:
        yield api_client


@pytest.fixture(scope="session")
def crds(api: client.ApiClient) -> list[str]:
    """Every CRD in crds/*.yaml, created or replaced, Established; their names."""
    return apply_crd_files(api, sorted(CRD_DIR.glob("*.yaml")))


@pytest.fixture
def namespace(api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test, deleted afterwards (without waiting for it to go)."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].rstrip("-")
    name = f"{stem}-{secrets.token_hex(3)}"
    core = client.CoreV1Api(api)
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={TEST_NAMESPACE_LABEL: "true"}))
    )
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as error:
        if error.status != 404:
            raise


@pytest.fixture(scope="session")
def gateway_stand_in(control_plane: ControlPlane, crds: list[str]) -> Iterator[GatewayStandIn]:
    """No agents run beside the operator in these tiers: a stand-in renews the gateway leases they would."""
    with control_plane.api_client() as api_client, GatewayStandIn(api_client) as stand_in:
        yield stand_in


@pytest.fixture(scope="session")
def operator(
    control_plane: ControlPlane,
    crds: list[str],
    gateway_stand_in: GatewayStandIn,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """The real operator, watching all namespaces; its log must hold no traceback at the end."""
    process = OperatorProcess(control_plane, log_path=tmp_path_factory.mktemp("operator") / "operator.log")
    process.start()
    try:
        yield process
    finally:
        process.stop()
    tail = log_tail(process.log_path, 80)
    assert "Traceback" not in process.log_text(), (
        f"the operator logged a traceback; last lines of {process.log_path}:\n{tail}"
    )
