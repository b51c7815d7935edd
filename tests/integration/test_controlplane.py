"""The test control plane is a real one, and the API server facts the operator relies on hold."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness.controlplane import (
    SERVICE_CIDR,
    ControlPlane,
    ControlPlaneError,
    apply_crd,
    find_binaries,
)

pytestmark = pytest.mark.apiserver


def eventually(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:.0f}s"
        time.sleep(0.1)


def api_error(call: Callable[[], object]) -> ApiException:
    with pytest.raises(ApiException) as raised:
        call()
    return raised.value


def test_namespace_and_configmap_round_trip(api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    assert core.read_namespace(namespace).status.phase == "Active"
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"mtu": "1420", "dns": "10.96.0.10"}}
    )
    assert core.read_namespaced_config_map("settings", namespace).data == {"mtu": "1420", "dns": "10.96.0.10"}


def test_kubeconfig_works_for_kubectl(control_plane: ControlPlane) -> None:
    """The admin kubeconfig verifies the apiserver's own certificate (no insecure-skip-tls-verify)."""
    kubectl = subprocess.run(
        ["kubectl", "get", "namespace", "kube-system", "-o", "json"],
        env=control_plane.env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert kubectl.returncode == 0, kubectl.stderr
    assert json.loads(kubectl.stdout)["metadata"]["name"] == "kube-system"


def test_crds_fixture_establishes_every_crd_file(api: Any, crds: list[str]) -> None:
    """crds/*.yaml may still be empty; whatever is there is served."""
    extensions = client.ApiextensionsV1Api(api)
    for name in crds:
        conditions = extensions.read_custom_resource_definition(name).status.conditions
        assert any(c.type == "Established" and c.status == "True" for c in conditions)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_stop_kills_every_process_and_removes_the_run_folder() -> None:
    with ControlPlane() as plane:
        pids = [process.popen.pid for process in plane._processes]
        run_dir = plane.run_dir
        assert len(pids) == 3
        assert all(_alive(pid) for pid in pids)
    assert not any(_alive(pid) for pid in pids)
    assert not run_dir.exists()


def test_failed_start_raises_with_the_log_tail_and_cleans_up(tmp_path: Path) -> None:
    binaries = {**find_binaries(), "kube-apiserver": tmp_path / "kube-apiserver"}
    binaries["kube-apiserver"].write_text("#!/bin/sh\necho 'simulated: bad flag' >&2\nexit 3\n")
    binaries["kube-apiserver"].chmod(0o755)
    plane = ControlPlane(run_dir=tmp_path / "run", binaries=binaries)
    with pytest.raises(ControlPlaneError, match=r"(?s)kube-apiserver exited with 3.*simulated: bad flag"):
        plane.start()
    assert plane._processes == []
    assert (tmp_path / "run" / "kube-apiserver.log").exists()  # a given run folder keeps its logs
    assert not (tmp_path / "run" / "sa.key").exists()


def test_rbac_denies_service_account_until_a_role_grants_it(
    api: Any, namespace: str, control_plane: ControlPlane
) -> None:
    core = client.CoreV1Api(api)
    rbac = client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    token_request = core.create_namespaced_service_account_token(
        "reader", namespace, {"spec": {"audiences": [], "expirationSeconds": 600}}
    )
    token = token_request.status.token

    config = client.Configuration()
    config.host = control_plane.server
    config.ssl_ca_cert = str(control_plane.ca_file)
    config.api_key = {"authorization": token}
    config.api_key_prefix = {"authorization": "Bearer"}
    with client.ApiClient(config) as as_reader:
        reader = client.CoreV1Api(as_reader)
        denied = api_error(lambda: reader.list_namespaced_secret(namespace))
        assert denied.status == 403
        assert f"system:serviceaccount:{namespace}:reader" in json.loads(denied.body)["message"]

        rbac.create_namespaced_role(
            namespace,
            {
                "metadata": {"name": "secret-reader"},
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}],
            },
        )
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "reader-reads-secrets"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secret-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
            },
        )

        def allowed() -> bool:
            try:
                reader.list_namespaced_secret(namespace)
            except ApiException as error:
                if error.status != 403:
                    raise
                return False
            return True

        # The authorizer reads roles through an informer: the grant shows up within moments.
        eventually(allowed, timeout=10, what="list secrets allowed after the RoleBinding")
        # Only what was granted: other namespaces stay closed.
        assert api_error(lambda: reader.list_namespaced_secret("default")).status == 403


def test_garbage_collector_deletes_dependents(api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {
                "name": "dependent",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
                ],
            },
            "stringData": {"key": "value"},
        },
    )
    core.delete_namespaced_config_map("owner", namespace)

    def dependent_gone() -> bool:
        try:
            core.read_namespaced_secret("dependent", namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            return True
        return False

    eventually(dependent_gone, timeout=30, what="owned Secret garbage-collected")


# The operator learns the Service CIDR from this refusal (there is no API that states it in 1.20).
SERVICE_CIDR_MESSAGE = (
    'Service "cidr-probe" is invalid: spec.clusterIPs: Invalid value: []string{"0.0.0.0"}: '
    "failed to allocated ip:0.0.0.0 with error:provided IP is not in the valid range. "
    "The range of valid IPs is 10.96.0.0/16"
)
OUTSIDE_EVERY_RANGE = "0.0.0.0"  # noqa: S104 -- a clusterIP no service CIDR holds, not a bind address
CIDR_PROBE = {
    "metadata": {"name": "cidr-probe"},
    "spec": {"clusterIP": OUTSIDE_EVERY_RANGE, "ports": [{"port": 443}]},
}


def test_out_of_range_cluster_ip_error_names_the_service_cidr(api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    refused = api_error(lambda: core.create_namespaced_service(namespace, CIDR_PROBE))
    assert refused.status == 422
    status = json.loads(refused.body)
    assert status["message"] == SERVICE_CIDR_MESSAGE
    assert status["details"]["causes"][0]["field"] == "spec.clusterIPs"
    match = re.search(r"The range of valid IPs is (\S+)", status["message"])
    assert match is not None
    assert match.group(1) == SERVICE_CIDR
    assert core.list_namespaced_service(namespace).items == []


def test_dry_run_does_not_allocate_so_it_cannot_reveal_the_service_cidr(api: Any, namespace: str) -> None:
    """dryRun=All skips IP allocation in 1.20: the impossible clusterIP is echoed back, no 422."""
    core = client.CoreV1Api(api)
    echoed = core.create_namespaced_service(namespace, CIDR_PROBE, dry_run="All")
    assert echoed.spec.cluster_ip == OUTSIDE_EVERY_RANGE
    assert core.list_namespaced_service(namespace).items == []


@pytest.fixture(scope="module")
def widgets(api: Any) -> Iterator[Any]:
    """A throwaway CRD using the validation features the kvpn CRDs use."""
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.harness.kvpn.dev"},
        "spec": {
            "group": "harness.kvpn.dev",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "cidr": {"type": "string", "format": "cidr", "maxLength": 43},
                                        "since": {"type": "string", "format": "date-time"},
                                        "name": {"type": "string", "pattern": "^[a-z][a-z0-9-]*$"},
                                    },
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    apply_crd(api, crd)
    # Established is not quite "served": give discovery a moment by listing until it answers.
    objects = client.CustomObjectsApi(api)
    eventually(lambda: _lists(objects), timeout=10, what="widgets served")
    yield objects
    client.ApiextensionsV1Api(api).delete_custom_resource_definition(crd["metadata"]["name"])


def _lists(objects: Any) -> bool:
    try:
        objects.list_cluster_custom_object("harness.kvpn.dev", "v1", "widgets")
    except ApiException:
        return False
    return True


def _create_widget(objects: Any, namespace: str, spec: dict[str, str]) -> object:
    body = {
        "apiVersion": "harness.kvpn.dev/v1",
        "kind": "Widget",
        "metadata": {"generateName": "w-"},
        "spec": spec,
    }
    return objects.create_namespaced_custom_object("harness.kvpn.dev", "v1", namespace, "widgets", body)


@pytest.mark.parametrize(
    "spec",
    [
        {"cidr": "10.8.0.0/24", "since": "2024-05-01T12:00:00Z", "name": "office"},
        {"cidr": "fd00:8::/64", "since": "2024-05-01T12:00:00+02:00"},
        # Go's net.ParseCIDR allows host bits: the server does not insist on a network address.
        {"cidr": "10.8.0.1/24"},
    ],
)
def test_crd_schema_accepts_valid_values(widgets: Any, namespace: str, spec: dict[str, str]) -> None:
    assert _create_widget(widgets, namespace, spec)


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"cidr": "not-a-cidr"}, 'spec.cidr in body must be of type cidr: "not-a-cidr"'),
        ({"cidr": "10.8.0.1"}, 'spec.cidr in body must be of type cidr: "10.8.0.1"'),
        ({"cidr": "10.8.0.0/33"}, 'spec.cidr in body must be of type cidr: "10.8.0.0/33"'),
        ({"since": "yesterday"}, 'spec.since in body must be of type date-time: "yesterday"'),
        ({"since": "2024-05-01"}, 'spec.since in body must be of type date-time: "2024-05-01"'),
        ({"name": "Office"}, "spec.name in body should match '^[a-z][a-z0-9-]*$'"),
    ],
)
def test_crd_schema_formats_and_patterns_are_enforced(
    widgets: Any, namespace: str, spec: dict[str, str], complaint: str
) -> None:
    refused = api_error(lambda: _create_widget(widgets, namespace, spec))
    assert refused.status == 422
    assert complaint in json.loads(refused.body)["message"]
