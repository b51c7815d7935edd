"""The Helm chart: lint, Kubernetes schemas, install into the real API server, and RBAC that is enough
(the real operator runs as the chart's ServiceAccount) and no more (`kubectl auth can-i`).

helm and kubectl come from hack/helm.sh (official static binaries out of a PyPI wheel, cached).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from harness import chart
from harness.controlplane import ControlPlane, free_port, log_tail
from harness.gateway_standin import ADDRESS as STAND_IN_ADDRESS
from harness.gateway_standin import GatewayStandIn
from harness.kvpn import Kvpn, wait_for
from harness.operator_process import OperatorProcess
from kvpn_core.contract import binding_selector, peer_config_secret_name
from kvpn_core.relaywire import RELAY_COMPONENT
from tests.conftest import TEST_NAMESPACE_LABEL

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kvpn"
CRDS = REPO / "crds"
HELM_TIMEOUT = 120
NODE_PORT = 31820

Doc = dict[str, Any]


# --- tools -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tool_dir() -> Path:
    """hack/helm.sh's folder with helm (v4) and kubectl; downloaded once, then cached."""
    try:
        return chart.tool_dir()
    except RuntimeError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def kubectl(tool_dir: Path) -> str:
    found = tool_dir / "kubectl"
    if found.is_file():
        return str(found)
    return shutil.which("kubectl") or pytest.fail("no kubectl (hack/helm.sh's or on PATH)", pytrace=False)


@dataclass
class Helm:
    binary: Path
    home: Path

    def run(
        self, *args: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        # Private cache, config and data folders: nothing of the user's Helm setup (repositories,
        # plugins, registry logins) takes part, and nothing is written to it.
        private = {f"HELM_{kind}_HOME": str(self.home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}
        result = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            timeout=HELM_TIMEOUT,
            env={**(env or os.environ), **private},
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
        return result

    def template(
        self, *sets: str, namespace: str = "kvpn", release: str = "kvpn", extra: Sequence[str] = ()
    ) -> list[Doc]:
        args = ["template", release, str(CHART), "--namespace", namespace, *extra]
        for item in sets:
            args += ["--set", item]
        return [d for d in yaml.safe_load_all(self.run(*args).stdout) if d]

    def notes(self, *sets: str, namespace: str = "kvpn", release: str = "kvpn") -> str:
        """NOTES.txt as `helm install` prints it, which `helm template` never renders: a client-side dry
        run, with a kubeconfig that does not exist so that no cluster takes part."""
        args = ["install", release, str(CHART), "--namespace", namespace, "--dry-run=client"]
        for item in sets:
            args += ["--set", item]
        env = {**os.environ, "KUBECONFIG": str(self.home / "no-kubeconfig")}
        output = self.run(*args, env=env).stdout
        assert "\nNOTES:\n" in output, output
        return output.split("\nNOTES:\n", 1)[1]


@pytest.fixture(scope="session")
def helm(tool_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(tool_dir / "helm", tmp_path_factory.mktemp("helm-home"))


def sets_args(sets: Sequence[str]) -> list[str]:
    return [a for item in sets for a in ("--set", item)]


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(workload: Doc) -> Doc:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Doc = containers[0]
    return result


# Value sets that exercise every branch of the templates.
VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "server": [
        "server.create=true",
        f"server.expose.nodePort={NODE_PORT}",
        "server.expose.endpoint=vpn.example.com:31820",
    ],
    "hostport-server": ["server.create=true", "server.expose.type=HostPort", "server.routes={10.96.0.0/12}"],
    "everything": [
        "namespace.create=true",
        "namespace.name=kvpn-system",
        "operator.watchNamespaces={team-*,kvpn-system}",
        "agent.serverNamespaces={kvpn-system,vpn-b}",
        "commonLabels.team=platform",
        "commonAnnotations.owner=platform",
        "image.digest=sha256:" + "a" * 64,
        "imagePullSecrets[0].name=registry",
        "agent.tolerations[0].operator=Exists",
        "agent.priorityClassName=system-node-critical",
        "operator.nodeSelector.role=infra",
        "operator.verbose=true",
        "agent.verbose=true",
        "agent.backend=userspace",
        "server.create=true",
        "server.peerNamespaces={*}",
        "operator.clusterWideSecrets=true",  # peers anywhere: Secrets everywhere
        "operator.secretNamespaces={team-a}",  # harmless beside it, and kept for when it is turned off
        "server.dns.search={svc.cluster.local}",
        "server.mtu=1380",
        "server.persistentKeepalive=0",
        "crds.keep=false",
    ],
    "relay": [
        "relay.enabled=true",
        "relay.users[0].kind=User",
        "relay.users[0].name=alice@example.com",
        "relay.users[1].kind=ServiceAccount",
        "relay.users[1].name=ci",
        "relay.users[1].namespace=ci",
        "relay.tolerations[0].operator=Exists",
        "server.create=true",
        "server.expose.type=ApiServer",
    ],
    "developers": [
        "agent.serverNamespaces={kvpn,vpn-b}",
        "developers.namespaces={team-a,team-b}",
        "developers.subjects[0].kind=Group",
        "developers.subjects[0].name=team-a-devs",
        "developers.subjects[1].kind=User",
        "developers.subjects[1].name=alice@example.com",
        "developers.subjects[2].kind=ServiceAccount",
        "developers.subjects[2].name=ci",
        "developers.subjects[2].namespace=ci",
        "server.create=true",
        "server.peerNamespaces={team-a,team-b,dev}",
        "operator.secretNamespaces={dev,team-b}",
    ],
}


# --- lint and schemas ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_lint_strict_passes(helm: Helm, values: str) -> None:
    args = ["lint", "--strict", str(CHART), "--namespace", "default"]
    for item in VALUE_SETS[values]:
        args += ["--set", item]
    helm.run(*args)


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("surprise=1", "additional properties 'surprise' not allowed"),
        ("agent.capabilities=SYS_ADMIN", "additional properties 'capabilities' not allowed"),
        ("server.expose.type=ClusterIP", "server/expose/type"),
        ("agent.backend=ebpf", "agent/backend"),
        ("operator.readinessPort=0", "operator/readinessPort"),
        ("agent.wireguardGo.capabilities=SYS_ADMIN", "additional properties 'capabilities' not allowed"),
        ("agent.wireguardGo.updateStrategy.type=Never", "agent/wireguardGo/updateStrategy/type"),
        ("relay.hostNetwork=true", "additional properties 'hostNetwork' not allowed"),
        ("relay.users[0].kind=Robot", "relay/users/0/kind"),
        ("relay.users[0].kind=ServiceAccount,relay.users[0].name=ci", "missing property 'namespace'"),
        ("developers.create=false", "additional properties 'create' not allowed"),
        ("developers.subjects[0].kind=Robot", "developers/subjects/0/kind"),
        ("developers.namespaces={Team_A}", "developers/namespaces/0"),
        ("operator.secretNamespaces={Team_A}", "operator/secretNamespaces/0"),
        ("operator.secretNamespaces={dev,dev}", "operator/secretNamespaces"),
        ("operator.clusterWideSecrets=maybe", "operator/clusterWideSecrets"),
    ],
)
def test_values_schema_refuses_what_it_does_not_know(helm: Helm, setting: str, complaint: str) -> None:
    result = helm.run("template", "kvpn", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_namespace_create_refuses_the_release_namespace(helm: Helm) -> None:
    result = helm.run("template", "kvpn", str(CHART), "-n", "kvpn", "--set", "namespace.create=true", check=False)
    assert result.returncode != 0
    assert "Helm cannot create the namespace it installs into" in result.stderr


def schema_versions() -> list[str]:
    """The newest Kubernetes kubernetes-validate knows, and 1.20 when it still has it, else its oldest."""
    known = sorted(set(kubernetes_validate.utils.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
    old = [v for v in known if v.startswith("1.20.")] or known[:1]
    return [kubernetes_validate.latest_version(), *old]


@pytest.mark.parametrize("version", schema_versions())
@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_rendered_objects_validate_against_kubernetes_schemas(helm: Helm, values: str, version: str) -> None:
    docs = helm.template(*VALUE_SETS[values])
    checked = set()
    for doc in docs:
        if doc["apiVersion"].startswith(f"{'kvpn.dev'}/"):
            continue  # custom resources: the API server checks them against the CRD (test_install)
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} against Kubernetes {version}: {error.message}")
        checked.add(doc["kind"])
    assert {"Deployment", "DaemonSet", "ServiceAccount", "ClusterRole", "Role"} <= checked


def test_crd_templates_render_to_crds_dir(helm: Helm) -> None:
    docs = helm.template()
    for path in sorted(CRDS.glob("*.yaml")):
        expected = yaml.safe_load(path.read_text("utf-8"))
        rendered = one(docs, "CustomResourceDefinition", expected["metadata"]["name"])
        assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert rendered["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert {**rendered, "metadata": {"name": rendered["metadata"]["name"]}} == expected, (
            f"the chart renders {path.name} differently from crds/: run `make crds`"
        )
    assert (
        "annotations"
        not in one(helm.template("crds.keep=false"), "CustomResourceDefinition", "vpnpeers.kvpn.dev")["metadata"]
    )
    assert find(helm.template("crds.install=false"), "CustomResourceDefinition") == []


def test_operator_pod_meets_restricted_pod_security(helm: Helm) -> None:
    deployment = one(helm.template(), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork")
    main = container(deployment)
    assert main["command"] == ["kvpn-operator"]
    assert {"--all-namespaces", "--log-format=json", "--liveness-port=8080"} <= set(main["args"])
    assert main["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {"name": "healthz", "containerPort": 8080, "protocol": "TCP"} in main["ports"]


def test_operator_is_ready_when_reconciling_and_named_after_its_pod(helm: Helm) -> None:
    """Ready from the operator's own /readyz (kopf watching, the API answering its reads), alive from
    kopf's /healthz; its kopf identity is the pod's name, so the image's uid needs no passwd entry."""
    main = container(one(helm.template(), "Deployment"))
    assert "--readiness-port=8081" in main["args"]
    assert {"name": "readyz", "containerPort": 8081, "protocol": "TCP"} in main["ports"]
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "readyz"}
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in main["env"]

    moved = container(one(helm.template("operator.readinessPort=9443"), "Deployment"))
    assert "--readiness-port=9443" in moved["args"]
    assert {"name": "readyz", "containerPort": 9443, "protocol": "TCP"} in moved["ports"]


AGENT, WIREGUARD_GO = "kvpn-agent", "kvpn-wireguard-go"
SUPERVISOR_FLAG = "--wireguard-go-supervisor=/run/kvpn/wireguard-go.sock"


def host_paths(workload: Doc) -> dict[str, Doc]:
    """mountPath -> hostPath of the workload's one container."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]].get("hostPath") for m in container(workload)["volumeMounts"]}


def test_agent_runs_with_net_admin_only_on_the_host_network(helm: Helm) -> None:
    docs = helm.template()
    daemonset = one(docs, "DaemonSet", AGENT)
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    agent = container(daemonset)
    assert agent["command"] == ["kvpn-agent"]
    assert agent["args"][:2] == ["run", "--namespace=kvpn"]
    assert SUPERVISOR_FLAG in agent["args"]  # the userspace backend's processes are the other pod's
    security = agent["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert security["privileged"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in agent["env"]
    # Its own pod, read when it stops (a pod being deleted hands over for its replacement): get, there only.
    for name, field in (("POD_NAMESPACE", "metadata.namespace"), ("POD_NAME", "metadata.name")):
        assert {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field}}} in agent["env"]
    own_pod = one(docs, "Role", f"{AGENT}-pod")
    assert own_pod["metadata"]["namespace"] == daemonset["metadata"]["namespace"]
    assert own_pod["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    assert one(docs, "RoleBinding", f"{AGENT}-pod")["subjects"][0]["name"] == pod["serviceAccountName"]
    paths = host_paths(daemonset)
    assert paths["/var/lib/kvpn"] == {"path": "/var/lib/kvpn", "type": "DirectoryOrCreate"}
    assert paths["/var/run/wireguard"] == {"path": "/var/run/wireguard", "type": "DirectoryOrCreate"}
    assert paths["/run/kvpn"] == {"path": "/run/kvpn", "type": "DirectoryOrCreate"}
    assert "/dev/net/tun" not in paths  # the agent starts no wireguard-go: no TUN
    probes = (agent["livenessProbe"]["httpGet"], agent["readinessProbe"]["httpGet"])
    assert probes == ({"path": "/healthz", "port": "metrics"}, {"path": "/readyz", "port": "metrics"})
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_agent_declares_a_host_port_only_for_the_host_port_expose_type(helm: Helm) -> None:
    def wireguard_port(*sets: str) -> Doc:
        ports = container(one(helm.template(*sets), "DaemonSet", AGENT))["ports"]
        port: Doc = next(p for p in ports if p["name"] == "wireguard")
        return port

    assert wireguard_port() == {"name": "wireguard", "containerPort": 51820, "protocol": "UDP"}
    assert wireguard_port("server.create=true") == {"name": "wireguard", "containerPort": 51820, "protocol": "UDP"}
    assert wireguard_port("server.create=true", "server.expose.type=HostPort")["hostPort"] == 51820
    # One value for the WireGuard port: the server's listenPort is what the agent declares.
    moved = wireguard_port("server.create=true", "server.expose.type=HostPort", "server.listenPort=443")
    assert (moved["containerPort"], moved["hostPort"]) == (443, 443)


def test_server_namespaces_get_one_role_each_and_the_agent_serves_them(helm: Helm) -> None:
    docs = helm.template("agent.serverNamespaces={vpn-a,vpn-b}")
    roles = {r["metadata"]["namespace"]: r for r in find(docs, "Role", AGENT)}
    assert set(roles) == {"vpn-a", "vpn-b"}
    assert {b["metadata"]["namespace"] for b in find(docs, "RoleBinding", AGENT)} == {"vpn-a", "vpn-b"}
    for role in roles.values():
        secrets_rule = next(r for r in role["rules"] if "secrets" in r["resources"])
        assert secrets_rule["verbs"] == ["get", "list", "watch"]
    args = container(one(docs, "DaemonSet", AGENT))["args"]
    assert [a for a in args if a.startswith("--namespace=")] == ["--namespace=vpn-a", "--namespace=vpn-b"]
    # No ClusterRole lets the agent read Secrets.
    agent_cluster_role = one(docs, "ClusterRole", "kvpn-agent")
    assert all("secrets" not in rule["resources"] for rule in agent_cluster_role["rules"])


OPERATOR = "kvpn-operator"
SECRETS_RULE = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "create", "patch", "delete"]}


def operator_secret_namespaces(docs: list[Doc]) -> list[str]:
    """The namespaces of the operator's Roles, checking that each grants Secrets and nothing else, and
    that a RoleBinding there binds it to the operator's ServiceAccount only."""
    roles = find(docs, "Role", OPERATOR)
    bindings = {b["metadata"]["namespace"]: b for b in find(docs, "RoleBinding", OPERATOR)}
    namespaces = [r["metadata"]["namespace"] for r in roles]
    assert sorted(bindings) == sorted(namespaces)
    sa_namespace = one(docs, "Deployment", OPERATOR)["metadata"]["namespace"]
    for role in roles:
        assert role["rules"] == [SECRETS_RULE]
        binding = bindings[role["metadata"]["namespace"]]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": OPERATOR}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": sa_namespace}]
    return namespaces


def cluster_wide_secret_rules(docs: list[Doc]) -> list[Doc]:
    return [r for r in one(docs, "ClusterRole", OPERATOR)["rules"] if "secrets" in r["resources"]]


def test_operator_may_write_secrets_only_in_the_namespaces_it_serves(helm: Helm) -> None:
    """No Secrets in the operator's ClusterRole: a Role in each server namespace (server keys, peer
    bindings) and each namespace whose VpnPeers it serves (their config Secrets), each once."""
    docs = helm.template()
    assert cluster_wide_secret_rules(docs) == []
    assert operator_secret_namespaces(docs) == ["kvpn"]  # the chart's: the servers' by default

    developers = ["developers.namespaces={team-a,team-b}", "developers.subjects[0].kind=Group"]
    developers.append("developers.subjects[0].name=devs")
    union = helm.template(
        "agent.serverNamespaces={vpn-a,vpn-b}", *developers, "operator.secretNamespaces={team-b,dev,vpn-a}"
    )
    assert cluster_wide_secret_rules(union) == []
    assert operator_secret_namespaces(union) == ["vpn-a", "vpn-b", "team-a", "team-b", "dev"]
    # Bound to the ServiceAccount where it lives, which is not one of these namespaces.
    moved = helm.template(
        "namespace.create=true", "namespace.name=kvpn-system", "operator.secretNamespaces={dev}", namespace="default"
    )
    assert operator_secret_namespaces(moved) == ["kvpn-system", "dev"]


def test_cluster_wide_secrets_is_the_cluster_role_rule_and_no_roles(helm: Helm) -> None:
    for sets in (
        ["operator.clusterWideSecrets=true"],
        ["operator.clusterWideSecrets=true", "operator.secretNamespaces={dev}"],
    ):
        docs = helm.template(*sets)
        assert cluster_wide_secret_rules(docs) == [SECRETS_RULE]
        assert find(docs, "Role", OPERATOR) == find(docs, "RoleBinding", OPERATOR) == []
        assert find(docs, "Role", AGENT)  # the agent's Roles stay as they are


@pytest.mark.parametrize(
    ("served", "complaint"),
    [
        ("*", 'server.peerNamespaces "*" serves VpnPeers of every namespace'),
        ("team-x", "server.peerNamespaces lists team-x, where the operator may not write the peers' config Secrets"),
    ],
)
def test_the_charts_server_serves_no_namespace_where_the_operator_may_not_write(
    helm: Helm, served: str, complaint: str
) -> None:
    """Its peers there would never get a config; the refusal names the ways out, which both work."""
    server = ["server.create=true", f"server.peerNamespaces={{{served}}}"]
    result = helm.run("template", "kvpn", str(CHART), "-n", "kvpn", *sets_args(server), check=False)
    assert result.returncode != 0
    assert complaint in result.stderr
    assert "operator.clusterWideSecrets=true" in result.stderr
    assert cluster_wide_secret_rules(helm.template(*server, "operator.clusterWideSecrets=true")) == [SECRETS_RULE]
    if served != "*":
        listed = helm.template(*server, f"operator.secretNamespaces={{{served}}}")
        assert operator_secret_namespaces(listed) == ["kvpn", served]


def test_the_charts_server_may_serve_team_namespaces_and_its_own(helm: Helm) -> None:
    developers = ["developers.namespaces={team-x}", "developers.subjects[0].kind=Group"]
    developers.append("developers.subjects[0].name=devs")
    docs = helm.template(*developers, "server.create=true", "server.peerNamespaces={team-x,kvpn}")
    assert one(docs, "VpnServer")["spec"]["peerNamespaces"] == ["team-x", "kvpn"]
    assert operator_secret_namespaces(docs) == ["kvpn", "team-x"]


def test_wireguard_go_runs_in_its_own_daemonset_that_an_upgrade_does_not_roll(helm: Helm) -> None:
    placement = [
        "agent.nodeSelector.gateway=yes",
        "agent.tolerations[0].operator=Exists",
        "agent.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
        ".matchExpressions[0].key=zone",
        "agent.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
        ".matchExpressions[0].operator=Exists",
        "agent.priorityClassName=system-node-critical",
        "imagePullSecrets[0].name=registry",
    ]
    docs = helm.template(*placement)
    agent, wggo = one(docs, "DaemonSet", AGENT), one(docs, "DaemonSet", WIREGUARD_GO)
    assert wggo["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert agent["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    pod, agent_pod = wggo["spec"]["template"]["spec"], agent["spec"]["template"]["spec"]
    # On exactly the agent's nodes.
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        assert pod[key] == agent_pod[key], key
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "gateway": "yes"}
    # Nothing that reaches the API server.
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
    assert pod["hostNetwork"] is True
    main = container(wggo)
    assert main["command"] == ["kvpn-agent"]
    assert main["args"][:2] == ["wireguard-go", "--socket=/run/kvpn/wireguard-go.sock"]
    assert main["image"] == container(agent)["image"]
    assert main["securityContext"] == {
        "runAsUser": 0,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
    }
    assert "livenessProbe" not in main  # a restart would cut every tunnel through the node
    # Ready on the agent's latest verdict, left beside the socket: an agent away changes nothing.
    assert main["readinessProbe"]["exec"] == {"command": ["test", "-e", "/run/kvpn/dataplane-ready"]}
    assert "limits" not in main["resources"]  # nor a CPU throttle or an OOM kill
    # The sockets both pods use are the node's, in the same places.
    paths = host_paths(wggo)
    assert paths["/dev/net/tun"] == {"path": "/dev/net/tun", "type": "CharDevice"}
    for shared in ("/run/kvpn", "/var/run/wireguard"):
        assert paths[shared] == host_paths(agent)[shared], shared
    # Its pods are not the agent's: the agent DaemonSet's selector does not take them.
    assert wggo["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "wireguard-go"
    assert (
        not agent["spec"]["selector"]["matchLabels"].items() <= wggo["spec"]["template"]["metadata"]["labels"].items()
    )

    moved = helm.template(
        "agent.wireguardGo.socketHostPath=/var/run/kvpn-sock", "agent.wireguardGo.updateStrategy.type=RollingUpdate"
    )
    assert one(moved, "DaemonSet", WIREGUARD_GO)["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    for name in (AGENT, WIREGUARD_GO):
        assert host_paths(one(moved, "DaemonSet", name))["/run/kvpn"]["path"] == "/var/run/kvpn-sock"


def test_the_kernel_backend_renders_no_wireguard_go(helm: Helm) -> None:
    docs = helm.template("agent.backend=kernel")
    assert [d["metadata"]["name"] for d in find(docs, "DaemonSet")] == [AGENT]
    agent = one(docs, "DaemonSet", AGENT)
    assert SUPERVISOR_FLAG not in container(agent)["args"]
    assert set(host_paths(agent)) == {"/var/lib/kvpn", "/tmp"}
    for backend in ("auto", "userspace"):
        assert find(helm.template(f"agent.backend={backend}"), "DaemonSet", WIREGUARD_GO)


def test_vpnserver_from_values(helm: Helm) -> None:
    assert find(helm.template(), "VpnServer") == []
    sets = ["server.create=true", "server.persistentKeepalive=0", "server.routes={10.96.0.0/12}"]
    server = one(helm.template(*sets), "VpnServer")
    assert server["metadata"]["namespace"] == "kvpn"
    assert server["spec"] == {
        "addressPool": ["10.8.0.0/24"],
        "listenPort": 51820,
        "expose": {"type": "NodePort"},
        "routes": ["10.96.0.0/12"],
        "masquerade": True,
        "persistentKeepalive": 0,  # zero is a value (keepalive off), not "unset"
        "presharedKeys": True,
    }
    # A cluster without the CRD yet (a first install): a post-install hook that an upgrade adopts.
    assert server["metadata"]["annotations"] == {
        "helm.sh/hook": "post-install,post-upgrade",
        "helm.sh/resource-policy": "keep",
        "meta.helm.sh/release-name": "kvpn",
        "meta.helm.sh/release-namespace": "kvpn",
    }
    # A cluster that knows VpnServer: an ordinary release object, still kept by `helm uninstall`.
    known = one(helm.template(*sets, extra=["--api-versions", "kvpn.dev/v1alpha1/VpnServer"]), "VpnServer")
    assert known["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


# --- the relay of `kubectl vpn up --via api` --------------------------------------------------------

RELAY, RELAY_NS = "kvpn-relay", "kvpn-relay"
RELAY_USER = "kvpn-relay-user"


def test_the_relay_is_not_rendered_unless_enabled(helm: Helm) -> None:
    docs = helm.template()
    assert [d for d in docs if "relay" in d["metadata"]["name"]] == []
    assert {d["metadata"].get("namespace") for d in docs} <= {None, "kvpn"}


def test_relay_pod_meets_restricted_pod_security_off_the_host_network(helm: Helm) -> None:
    docs = helm.template("relay.enabled=true")
    deployment = one(docs, "Deployment", RELAY)
    assert deployment["metadata"]["namespace"] == RELAY_NS
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host), host
    assert "volumes" not in pod or all("hostPath" not in v for v in pod["volumes"])
    assert pod["serviceAccountName"] == RELAY
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    main = container(deployment)
    assert main["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "hostPort" not in str(main["ports"])
    # The same image as the operator's and the agent's, another program.
    assert main["image"] == container(one(docs, "Deployment", "kvpn-operator"))["image"]
    assert main["command"] == ["kvpn-relay"]
    assert main["args"] == ["--port=51900", "--health-port=8080", "--log-format=json"]
    assert {"name": "relay", "containerPort": 51900, "protocol": "TCP"} in main["ports"]
    assert {"name": "healthz", "containerPort": 8080, "protocol": "TCP"} in main["ports"]
    assert main["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    # Alive while it accepts streams, whether or not the API server answers its reads.
    assert main["livenessProbe"]["tcpSocket"] == {"port": "relay"}
    # Where `kubectl vpn up --via api` looks for it (kvpn_core.relaywire.RELAY_COMPONENT).
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == RELAY_COMPONENT
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    namespace = one(docs, "Namespace", RELAY_NS)
    for mode in ("enforce", "audit", "warn"):
        assert namespace["metadata"]["labels"][f"pod-security.kubernetes.io/{mode}"] == "restricted"

    moved = container(
        one(helm.template("relay.enabled=true", "relay.port=443", "relay.healthPort=9000"), "Deployment", RELAY)
    )
    assert moved["args"] == ["--port=443", "--health-port=9000", "--log-format=json"]
    assert {"name": "relay", "containerPort": 443, "protocol": "TCP"} in moved["ports"]
    existing = helm.template("relay.enabled=true", "relay.createNamespace=false", "relay.namespace=vpn-relay")
    assert find(existing, "Namespace") == []
    assert one(existing, "Deployment", RELAY)["metadata"]["namespace"] == "vpn-relay"


def test_relay_pods_spread_over_nodes_and_a_drain_takes_one_at_a_time(helm: Helm) -> None:
    docs = helm.template("relay.enabled=true")
    pod = one(docs, "Deployment", RELAY)["spec"]["template"]["spec"]
    [preferred] = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    term = preferred["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == RELAY_COMPONENT
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["podAntiAffinity"]
    # And a spread constraint, which (unlike the anti-affinity) does not count a terminating pod: a
    # replacement made while its predecessor terminates goes to the node that lost it.
    assert pod["topologySpreadConstraints"] == [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": term["labelSelector"]["matchLabels"]},
        }
    ]
    budget = one(docs, "PodDisruptionBudget", RELAY)
    assert budget["metadata"]["namespace"] == RELAY_NS
    assert budget["spec"] == {"maxUnavailable": 1, "selector": one(docs, "Deployment", RELAY)["spec"]["selector"]}
    assert find(helm.template("relay.enabled=true", "relay.replicas=1"), "PodDisruptionBudget") == []
    # A user's nodeAffinity keeps the spread; a podAntiAffinity of their own replaces it.
    node_affinity = (
        "relay.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]"
        ".matchExpressions[0]"
    )
    both = helm.template("relay.enabled=true", f"{node_affinity}.key=zone", f"{node_affinity}.operator=Exists")
    affinity = one(both, "Deployment", RELAY)["spec"]["template"]["spec"]["affinity"]
    assert set(affinity) == {"nodeAffinity", "podAntiAffinity"}
    own = "relay.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0]"
    theirs = helm.template("relay.enabled=true", f"{own}.topologyKey=zone")
    anti = one(theirs, "Deployment", RELAY)["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti == {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "zone"}]}
    assert "topologySpreadConstraints" not in one(theirs, "Deployment", RELAY)["spec"]["template"]["spec"]


def test_the_relay_may_read_vpnservers_and_gateway_leases_and_nothing_else(helm: Helm) -> None:
    docs = helm.template("relay.enabled=true")
    role = one(docs, "ClusterRole", RELAY)
    assert role["rules"] == [
        {"apiGroups": ["kvpn.dev"], "resources": ["vpnservers"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list"]},
    ]
    binding = one(docs, "ClusterRoleBinding", RELAY)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": RELAY}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELAY, "namespace": RELAY_NS}]
    assert one(docs, "ServiceAccount", RELAY)["metadata"]["namespace"] == RELAY_NS


def test_relay_users_may_port_forward_to_pods_of_the_relay_namespace_only(helm: Helm) -> None:
    """The developers' role: find a ready relay pod and port-forward to it; bound only by a RoleBinding in
    the relay's namespace, so that it grants nothing anywhere else."""
    docs = helm.template(*VALUE_SETS["relay"])
    role = one(docs, "ClusterRole", RELAY_USER)
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        # create: SPDY's POST; get: the websocket upgrade's GET (`kubectl vpn`, kubectl 1.31+).
        {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]},
    ]
    assert [b for b in find(docs, "ClusterRoleBinding") if b["roleRef"]["name"] == RELAY_USER] == []
    bindings = [b for b in find(docs, "RoleBinding") if b["roleRef"]["name"] == RELAY_USER]
    assert [b["metadata"]["namespace"] for b in bindings] == [RELAY_NS]
    assert bindings[0]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": RELAY_USER,
    }
    assert bindings[0]["subjects"] == [
        {"kind": "User", "name": "alice@example.com", "apiGroup": "rbac.authorization.k8s.io"},
        {"kind": "ServiceAccount", "name": "ci", "namespace": "ci"},
    ]
    # Always defined with the relay, bound only when relay.users names someone.
    plain = helm.template("relay.enabled=true")
    assert one(plain, "ClusterRole", RELAY_USER)["rules"] == role["rules"]
    assert [b for b in find(plain, "RoleBinding") if b["roleRef"]["name"] == RELAY_USER] == []


def test_the_relay_namespace_is_not_the_charts(helm: Helm) -> None:
    result = helm.run(
        "template", "kvpn", str(CHART), "-n", "kvpn", "--set", "relay.enabled=true,relay.namespace=kvpn", check=False
    )
    assert result.returncode != 0
    assert "relay.namespace must not be the chart's namespace" in result.stderr
    sets = "namespace.create=true,namespace.name=kvpn-system,relay.enabled=true,relay.namespace=default"
    result = helm.run("template", "kvpn", str(CHART), "-n", "default", "--set", sets, check=False)
    assert result.returncode != 0
    assert "Helm cannot create the namespace it installs into" in result.stderr


# --- developers: `kubectl vpn` ---------------------------------------------------------------------

DEVELOPER, SERVER_READER = "kvpn-developer", "kvpn-server-reader"


def bindings_of(docs: list[Doc], role: str, kind: str = "RoleBinding") -> list[Doc]:
    return [b for b in find(docs, kind) if b["roleRef"]["name"] == role]


def test_developers_may_keep_peers_in_their_team_namespaces_and_read_servers_where_they_live(helm: Helm) -> None:
    """What `kubectl vpn` calls and nothing more: VpnPeers and their config Secrets in the team's
    namespaces, VpnServers in the servers' namespaces; RoleBindings only, in the listed namespaces."""
    docs = helm.template(*VALUE_SETS["developers"])
    assert one(docs, "ClusterRole", DEVELOPER)["rules"] == [
        # create/get/delete: join (and the peer it gives up on); list: status; watch: `kubectl wait`.
        {"apiGroups": ["kvpn.dev"], "resources": ["vpnpeers"], "verbs": ["get", "list", "watch", "create", "delete"]},
        # The peer's config Secret, by name: no list, no watch.
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    ]
    assert one(docs, "ClusterRole", SERVER_READER)["rules"] == [
        # get: join; list: join's "servers there" message; watch: up --follow.
        {"apiGroups": ["kvpn.dev"], "resources": ["vpnservers"], "verbs": ["get", "list", "watch"]},
    ]
    # Never a ClusterRoleBinding: the developer role would read every Secret of every namespace.
    for role in (DEVELOPER, SERVER_READER):
        assert bindings_of(docs, role, "ClusterRoleBinding") == []
    developer_bindings = bindings_of(docs, DEVELOPER)
    assert [b["metadata"]["namespace"] for b in developer_bindings] == ["team-a", "team-b"]
    reader_bindings = bindings_of(docs, SERVER_READER)
    assert [b["metadata"]["namespace"] for b in reader_bindings] == ["kvpn", "vpn-b"]
    subjects = [
        {"kind": "Group", "name": "team-a-devs", "apiGroup": "rbac.authorization.k8s.io"},
        {"kind": "User", "name": "alice@example.com", "apiGroup": "rbac.authorization.k8s.io"},
        {"kind": "ServiceAccount", "name": "ci", "namespace": "ci"},
    ]
    for binding in developer_bindings + reader_bindings:
        name = binding["roleRef"]["name"]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
        assert binding["subjects"] == subjects
    # Always defined, bound only when developers.subjects names someone.
    plain = helm.template()
    assert one(plain, "ClusterRole", DEVELOPER)["rules"] == one(docs, "ClusterRole", DEVELOPER)["rules"]
    assert one(plain, "ClusterRole", SERVER_READER)["rules"] == one(docs, "ClusterRole", SERVER_READER)["rules"]
    assert bindings_of(plain, DEVELOPER) == bindings_of(plain, SERVER_READER) == []
    # Subjects without team namespaces: they may read the servers, and are bound nowhere else.
    readers_only = helm.template("developers.subjects[0].kind=Group", "developers.subjects[0].name=devs")
    assert bindings_of(readers_only, DEVELOPER) == []
    assert [b["metadata"]["namespace"] for b in bindings_of(readers_only, SERVER_READER)] == ["kvpn"]


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        # The developer role reads every Secret of its namespace: never where server keys live.
        (
            "developers.namespaces={kvpn},developers.subjects[0].kind=Group,developers.subjects[0].name=devs",
            "developers.namespaces must not list kvpn",
        ),
        (
            "agent.serverNamespaces={vpn-b},developers.namespaces={team-a,vpn-b},"
            "developers.subjects[0].kind=Group,developers.subjects[0].name=devs",
            "developers.namespaces must not list vpn-b",
        ),
        ("developers.namespaces={team-a}", "developers.namespaces needs developers.subjects"),
    ],
)
def test_developer_namespaces_are_team_namespaces_with_someone_to_bind(helm: Helm, sets: str, complaint: str) -> None:
    result = helm.run("template", "kvpn", str(CHART), "-n", "kvpn", "--set", sets, check=False)
    assert result.returncode != 0
    assert complaint in result.stderr


JOIN = re.compile(r"kubectl vpn join (?P<server_ns>[^/\s]+)/(?P<server>\S+) -n (?P<peer_ns>\S+)")
SECRET_NAMESPACES_UPGRADE = re.compile(r"--set 'operator\.secretNamespaces=\{([^}]*)\}'")
APPLIED = re.compile(r"kubectl -n (?P<ns>\S+) (?:apply|create) -f - <<EOF\n\s*apiVersion: \S+\n\s*kind: (?P<kind>\w+)")


@pytest.mark.parametrize("values", list(VALUE_SETS), ids=list(VALUE_SETS))
def test_notes_put_peers_in_a_team_namespace_with_the_developer_roles(helm: Helm, values: str) -> None:
    """NOTES.txt never tells anyone to create VpnPeers where VpnServers live (the agents may read
    Secrets there), and names the RoleBindings that let a team join from its own namespace."""
    sets = VALUE_SETS[values]
    notes = helm.notes(*sets)
    docs = helm.template(*sets)
    server_namespaces = {r["metadata"]["namespace"] for r in find(docs, "Role", AGENT)}
    joins = list(JOIN.finditer(notes))
    assert joins, notes
    applied = [(m["ns"], m["kind"]) for m in APPLIED.finditer(notes)]
    peer_namespaces = {m["peer_ns"] for m in joins} | {ns for ns, kind in applied if kind == "VpnPeer"}
    assert "VpnPeer" in {kind for _, kind in applied}  # the by-hand path too
    assert peer_namespaces.isdisjoint(server_namespaces), notes
    assert {m["server_ns"] for m in joins} <= server_namespaces
    # The by-hand peer names its server's namespace, which is not its own.
    by_hand = re.search(r"serverRef:\n\s*namespace: (\S+)\n", notes)
    assert by_hand
    assert by_hand[1] in server_namespaces
    for ns in peer_namespaces:
        assert f"-n {ns} --clusterrole {DEVELOPER}" in notes or f"{DEVELOPER} in {ns}" in notes
    for ns in server_namespaces:
        assert f"-n {ns} --clusterrole {SERVER_READER}" in notes
    relay_user = f"--clusterrole {RELAY_USER}"
    assert (relay_user in notes) == any(item == "relay.enabled=true" for item in sets)
    # The operator may write those peers' config Secrets, or the notes say how to let it.
    if cluster_wide_secret_rules(docs):
        assert "The operator may write Secrets in every namespace (operator.clusterWideSecrets)" in notes
    else:
        upgrade = SECRET_NAMESPACES_UPGRADE.search(notes)
        granted = set(operator_secret_namespaces(docs)) | set(upgrade[1].split(",") if upgrade else [])
        assert peer_namespaces <= granted, notes


def test_notes_name_the_team_namespaces_where_the_operator_writes_config_secrets(helm: Helm) -> None:
    notes = helm.notes("operator.secretNamespaces={dev}")
    assert "server namespaces and these team namespaces only: dev." in notes
    # The example team, bound by hand: the notes add it to the list.
    assert "--set 'operator.secretNamespaces={dev,team-a}'" in notes
    assert "these team namespaces only: none yet." in helm.notes()
    developers = ["developers.namespaces={team-a}", "developers.subjects[0].kind=Group"]
    listed = helm.notes(*developers, "developers.subjects[0].name=devs")
    assert "these team namespaces only: team-a." in listed
    assert "--set 'operator.secretNamespaces={<team>}'" in listed  # another team, bound by hand
    wide = helm.notes("operator.clusterWideSecrets=true")
    assert "operator.secretNamespaces" not in wide


def test_notes_say_when_the_server_does_not_serve_the_team_namespace(helm: Helm) -> None:
    developers = [
        "developers.namespaces={team-a,team-b}",
        "developers.subjects[0].kind=Group",
        "developers.subjects[0].name=devs",
    ]
    notes = helm.notes("server.create=true", "server.peerNamespaces={team-b}", *developers)
    assert "It serves VpnPeers of team-b only (server.peerNamespaces), not of team-a" in notes
    assert "--set 'server.peerNamespaces={team-b,team-a}'" in notes
    assert "kubectl vpn join kvpn/default -n team-a" in notes
    everywhere = ["server.create=true", "server.peerNamespaces={*}", "operator.clusterWideSecrets=true"]
    assert "not of" not in helm.notes(*everywhere, *developers)
    # No server from values: the example VpnServer serves the team namespaces.
    assert "peerNamespaces: [team-a, team-b]" in helm.notes(*developers)


# --- install into the real API server --------------------------------------------------------------


@dataclass
class Release:
    name: str
    namespace: str  # the chart's namespace: operator, agent, and the VpnServer from values
    peers: str  # another namespace, for VpnPeers (allowed by the server's peerNamespaces, operator.secretNamespaces)
    elsewhere: str  # a namespace that holds neither
    ungranted: str  # for a VpnPeer that a hand-made server allows, in no namespace the chart grants the operator
    env: dict[str, str]
    docs: list[Doc]
    kubeconfigs: dict[str, Path]  # "operator", "agent": authenticated as the chart's ServiceAccounts
    first_install: bool  # the CRDs did not exist before: the VpnServer took the post-install hook path
    operator: OperatorProcess  # the real operator, as the chart's operator ServiceAccount


def operator_sa(release: str) -> str:
    return f"{release}-operator"


def agent_sa(release: str) -> str:
    return f"{release}-agent"


def create_namespace(core: client.CoreV1Api, stem: str) -> str:
    name = f"{stem}-{secrets.token_hex(3)}"
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={TEST_NAMESPACE_LABEL: "true"}))
    )
    return name


def adopt_existing_crds(api: client.ApiClient, release: str, namespace: str) -> bool:
    """CRDs another test already applied are handed to the release, as Helm's adoption documents
    (without ownership metadata Helm refuses to take over an object it did not create).

    True when there were none: a first install, as on a fresh cluster.
    """
    extensions = client.ApiextensionsV1Api(api)
    first = True
    for path in sorted(CRDS.glob("*.yaml")):
        name = yaml.safe_load(path.read_text("utf-8"))["metadata"]["name"]
        patch = {
            "metadata": {
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": namespace},
            }
        }
        try:
            extensions.patch_custom_resource_definition(name, patch)
            first = False
        except ApiException as error:
            if error.status != 404:
                raise
    return first


@pytest.fixture(scope="module")
def release(
    control_plane: ControlPlane,
    api: client.ApiClient,
    helm: Helm,
    tmp_path_factory: pytest.TempPathFactory,
    gateway_stand_in: GatewayStandIn,
) -> Iterator[Release]:
    """The chart installed (CRDs, operator, agent, RBAC, a VpnServer from values) into fresh namespaces,
    and the real operator running with the chart's Deployment arguments as the chart's ServiceAccount.

    Torn down as a user would: the VpnServer deleted while the operator still runs (removing its
    finalizer is part of what the operator's permissions must allow), then `helm uninstall`, which
    keeps VpnServers and CRDs.
    """
    core = client.CoreV1Api(api)
    namespace = create_namespace(core, "chart")
    peers = create_namespace(core, "chart-peers")
    elsewhere = create_namespace(core, "chart-elsewhere")
    ungranted = create_namespace(core, "chart-ungranted")
    name = f"kvpn-{secrets.token_hex(3)}"
    env = control_plane.env()
    first_install = adopt_existing_crds(api, name, namespace)
    sets = [
        "server.create=true",
        f"server.expose.nodePort={NODE_PORT}",
        f"server.expose.endpoint=vpn.example.com:{NODE_PORT}",
        f"server.peerNamespaces={{{namespace},{peers}}}",
        # Everything else default: Secrets in the chart's (the server's) namespace and the peers' only.
        f"operator.secretNamespaces={{{peers}}}",
    ]
    args = ["install", name, str(CHART), "--namespace", namespace, "--timeout", "60s"]
    for item in sets:
        args += ["--set", item]
    installed = helm.run(*args, env=env)
    assert f"kubectl vpn join {namespace}/default -n team-a" in installed.stdout  # NOTES.txt
    manifest = helm.run("get", "manifest", name, "--namespace", namespace, env=env).stdout
    docs = [d for d in yaml.safe_load_all(manifest) if d]

    folder = tmp_path_factory.mktemp("chart-release")
    kubeconfigs = {
        role: chart.token_kubeconfig(api, control_plane, namespace, sa, folder / f"{role}.kubeconfig")
        for role, sa in (("operator", operator_sa(name)), ("agent", agent_sa(name)))
    }
    # The Deployment's own arguments; OperatorProcess appends its liveness port and log format, which win.
    operator_args = container(one(docs, "Deployment"))["args"]
    # The readiness port too: a fixed host port would clash with other operators on this machine.
    operator_args = [a for a in operator_args if not a.startswith("--readiness-port=")]
    operator_args.append(f"--readiness-port={free_port()}")
    plane: Any = chart.AsServiceAccount(control_plane, kubeconfigs["operator"])  # duck-typed for OperatorProcess
    operator = OperatorProcess(plane, args=operator_args, log_path=folder / "operator.log")
    operator.start()
    try:
        yield Release(name, namespace, peers, elsewhere, ungranted, env, docs, kubeconfigs, first_install, operator)
        kvpn = Kvpn(api)
        kvpn.delete("vpnservers", namespace, "default")
        wait_for("the VpnServer to be gone", lambda: kvpn.get("vpnservers", namespace, "default") is None)
        helm.run("uninstall", name, "--namespace", namespace, "--wait", "--timeout", "60s", env=env)
    finally:
        operator.stop()
        for ns in (namespace, peers, elsewhere, ungranted):
            try:
                core.delete_namespace(ns)
            except ApiException as error:
                if error.status != 404:
                    raise


def test_install_creates_the_chart_objects(release: Release, api: client.ApiClient) -> None:
    apps = client.AppsV1Api(api)
    core = client.CoreV1Api(api)
    rbac = client.RbacAuthorizationV1Api(api)
    extensions = client.ApiextensionsV1Api(api)

    deployment = apps.read_namespaced_deployment(f"{release.name}-operator", release.namespace)
    assert deployment.spec.strategy.type == "Recreate"
    assert deployment.spec.template.spec.service_account_name == operator_sa(release.name)
    daemonset = apps.read_namespaced_daemon_set(f"{release.name}-agent", release.namespace)
    assert daemonset.spec.template.spec.host_network is True
    assert daemonset.spec.template.spec.service_account_name == agent_sa(release.name)
    wireguard_go = apps.read_namespaced_daemon_set(f"{release.name}-wireguard-go", release.namespace)
    assert wireguard_go.spec.update_strategy.type == "OnDelete"
    assert wireguard_go.spec.template.spec.automount_service_account_token is False
    for sa in (operator_sa(release.name), agent_sa(release.name)):
        core.read_namespaced_service_account(sa, release.namespace)
    for role in (operator_sa(release.name), agent_sa(release.name)):
        rbac.read_cluster_role(role)
        rbac.read_cluster_role_binding(role)
    rbac.read_namespaced_role(agent_sa(release.name), release.namespace)
    rbac.read_namespaced_role_binding(agent_sa(release.name), release.namespace)
    # The operator's Secrets: a Role where the server lives and one where its peers do, none elsewhere.
    operator_roles = rbac.list_role_for_all_namespaces(field_selector=f"metadata.name={operator_sa(release.name)}")
    assert sorted(r.metadata.namespace for r in operator_roles.items) == sorted([release.namespace, release.peers])
    for ns in (release.namespace, release.peers):
        rbac.read_namespaced_role_binding(operator_sa(release.name), ns)
    cluster_role = rbac.read_cluster_role(operator_sa(release.name))
    assert [r for r in cluster_role.rules if "secrets" in r.resources] == []
    for crd in ("vpnservers.kvpn.dev", "vpnpeers.kvpn.dev"):
        found = extensions.read_custom_resource_definition(crd)
        assert found.metadata.annotations["meta.helm.sh/release-name"] == release.name
        assert found.metadata.annotations["helm.sh/resource-policy"] == "keep"
    server = Kvpn(api).get("vpnservers", release.namespace, "default")
    assert server is not None
    assert server["spec"]["expose"] == {
        "type": "NodePort",
        "nodePort": NODE_PORT,
        "endpoint": f"vpn.example.com:{NODE_PORT}",
    }
    # The release's objects. On a first install the VpnServer is a hook, outside the manifest.
    kinds = {d["kind"] for d in release.docs}
    expected = {"ServiceAccount", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Role"}
    expected |= {"RoleBinding", "Deployment", "DaemonSet"} | (set() if release.first_install else {"VpnServer"})
    assert kinds == expected


# --- RBAC: enough, and no more ---------------------------------------------------------------------


def can_i(kubectl: str, kubeconfig: Path, check: str) -> bool:
    """`kubectl auth can-i <check>` as the kubeconfig's user: yes (exit 0) or no (exit 1)."""
    result = subprocess.run(
        [kubectl, "--kubeconfig", str(kubeconfig), "auth", "can-i", *check.split()],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode not in (0, 1) or result.stdout.strip() not in ("yes", "no"):
        raise AssertionError(f"kubectl auth can-i {check}: {result.returncode} {result.stdout} {result.stderr}")
    return result.returncode == 0


def expand(checks: Sequence[str], release: Release) -> list[str]:
    spaces = {"ns": release.namespace, "peers": release.peers, "elsewhere": release.elsewhere}
    return [c.format(**spaces, ungranted=release.ungranted) for c in checks]


OPERATOR_MAY = [
    # framework (kopf)
    "create events -n {peers}",
    "list customresourcedefinitions.apiextensions.k8s.io",
    "watch customresourcedefinitions.apiextensions.k8s.io",
    # application
    "watch vpnservers.kvpn.dev --all-namespaces",
    "patch vpnservers.kvpn.dev -n {ns}",
    "patch vpnservers.kvpn.dev -n {ns} --subresource=status",
    "watch vpnpeers.kvpn.dev --all-namespaces",
    "patch vpnpeers.kvpn.dev -n {peers} --subresource=status",
    "update vpnpeers.kvpn.dev -n {peers} --subresource=finalizers",
    # Secrets in the namespaces it serves, a Role each: the server's (key, bindings) and the peers'
    # (config Secrets; operator.secretNamespaces).
    *(f"{verb} secrets -n {{{ns}}}" for ns in ("ns", "peers") for verb in ("get", "list", "create", "patch", "delete")),
    "watch services --all-namespaces",
    "create services -n {ns}",
    "get services -n kube-system",
    "list nodes",
]
OPERATOR_MAY_NOT = [
    "create pods -n {ns}",
    "create vpnservers.kvpn.dev -n {ns}",
    "delete vpnpeers.kvpn.dev -n {peers}",
    "update vpnpeers.kvpn.dev -n {peers}",
    "watch secrets -n {ns}",
    "watch secrets -n {peers}",
    # No Secrets where it serves no one, and none cluster-wide (operator.clusterWideSecrets is off).
    *(
        f"{verb} secrets -n {{{ns}}}"
        for ns in ("elsewhere", "ungranted")
        for verb in ("get", "list", "create", "patch")
    ),
    "delete secrets -n {elsewhere}",
    "get secrets -n kube-system",
    "list secrets --all-namespaces",
    "get secrets --all-namespaces",
    "create secrets --all-namespaces",
    "patch customresourcedefinitions.apiextensions.k8s.io",
    "delete nodes",
    "patch nodes",
    "list namespaces",
    "create clusterroles.rbac.authorization.k8s.io",
    "create rolebindings.rbac.authorization.k8s.io -n {ns}",
    "create serviceaccounts --subresource=token -n {ns}",
    "impersonate serviceaccounts -n {ns}",
    "create deployments.apps -n {ns}",
    "create kopfpeerings.kopf.dev -n {ns}",
]
AGENT_MAY = [
    "get secrets -n {ns}",
    "list secrets -n {ns}",
    "watch secrets -n {ns}",
    "watch vpnservers.kvpn.dev -n {ns}",
    "get nodes",
    "get vpnpeers.kvpn.dev -n {peers}",
    "list vpnpeers.kvpn.dev -n {peers}",
    "patch vpnpeers.kvpn.dev -n {peers} --subresource=status",
    "patch vpnservers.kvpn.dev -n {ns} --subresource=status",  # its Dataplane condition
]
AGENT_MAY_NOT = [
    "get secrets -n {peers}",
    "get secrets -n {elsewhere}",
    "get secrets -n kube-system",
    "list secrets --all-namespaces",
    "create secrets -n {ns}",
    "patch secrets -n {ns}",
    "delete secrets -n {ns}",
    "watch vpnservers.kvpn.dev -n {elsewhere}",
    "patch vpnservers.kvpn.dev -n {ns}",
    "patch vpnservers.kvpn.dev -n {elsewhere} --subresource=status",
    "patch vpnpeers.kvpn.dev -n {peers}",
    "delete vpnpeers.kvpn.dev -n {peers}",
    "list nodes",
    "delete nodes",
    "patch nodes",
    "create pods -n {ns}",
    "create events -n {ns}",
    "create services -n {ns}",
]


@pytest.mark.parametrize(
    ("role", "allowed", "checks"),
    [
        ("operator", True, OPERATOR_MAY),
        ("operator", False, OPERATOR_MAY_NOT),
        ("agent", True, AGENT_MAY),
        ("agent", False, AGENT_MAY_NOT),
    ],
    ids=["operator-may", "operator-may-not", "agent-may", "agent-may-not"],
)
def test_rbac_allows_what_each_role_needs_and_nothing_else(
    release: Release, kubectl: str, role: str, allowed: bool, checks: list[str]
) -> None:
    wrong = [c for c in expand(checks, release) if can_i(kubectl, release.kubeconfigs[role], c) is not allowed]
    assert wrong == [], f"{role} {'may not' if allowed else 'may'}: {wrong}"


def test_operator_may_list_service_cidrs_where_the_cluster_has_them(release: Release, api: client.ApiClient) -> None:
    """ServiceCIDR objects exist from Kubernetes 1.31 on; kubectl cannot name a resource the 1.20 API
    server does not serve, so this asks the authorizer directly (SubjectAccessReview)."""
    user = f"system:serviceaccount:{release.namespace}:{operator_sa(release.name)}"

    def allowed(verb: str, sa_user: str) -> bool:
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=sa_user,
                groups=[
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{release.namespace}",
                    "system:authenticated",
                ],
                resource_attributes=client.V1ResourceAttributes(
                    group="networking.k8s.io", resource="servicecidrs", verb=verb
                ),
            )
        )
        return bool(client.AuthorizationV1Api(api).create_subject_access_review(review).status.allowed)

    assert allowed("list", user)
    assert not allowed("create", user)
    assert not allowed("list", f"system:serviceaccount:{release.namespace}:{agent_sa(release.name)}")


PERMISSION_PROBLEMS = re.compile(r"lacks a permission|Forbidden|forbidden|Not enough permissions|\b403\b")


def test_the_real_operator_works_with_the_charts_permissions(release: Release, api: client.ApiClient) -> None:
    """The operator, authenticated as the chart's ServiceAccount, makes the chart's VpnServer and a
    VpnPeer in another namespace Ready, then releases the peer: key Secret, UDP Service, Service
    network probe, peer binding, config Secret, status, Events and finalizers all go through the
    chart's RBAC, whose Secrets are the Roles of the server's namespace and of the peer's
    (operator.secretNamespaces)."""
    kvpn = Kvpn(api)
    server = kvpn.wait_ready("vpnservers", release.namespace, "default", timeout=30)
    kvpn.peer(release.peers, "laptop", serverRef={"name": "default", "namespace": release.namespace})
    peer = kvpn.wait_ready("vpnpeers", release.peers, "laptop", timeout=30)

    # The routes came from the probe Service (no routes in the spec): creating Services works.
    assert server["status"]["routes"] == ["10.96.0.0/16"]
    assert server["status"]["endpoint"] == f"vpn.example.com:{NODE_PORT}"
    service = client.CoreV1Api(api).read_namespaced_service("kvpn-default", release.namespace)
    assert service.spec.type == "NodePort"
    assert service.spec.ports[0].node_port == NODE_PORT
    # ... with no selector: its Endpoints are the server's healthy gateways (here the gateway stand-in's
    # node), which the operator writes with the chart's permissions.
    assert service.spec.selector is None
    assert service.spec.external_traffic_policy == "Local"
    endpoints = client.CoreV1Api(api).read_namespaced_endpoints("kvpn-default", release.namespace)
    assert [a.ip for s in endpoints.subsets or [] for a in s.addresses or []] == [STAND_IN_ADDRESS]
    secret = kvpn.secret(release.peers, peer["status"]["configSecretName"])
    assert secret is not None
    assert "wg0.conf" in (secret.data or {})
    wait_for("an Event about the peer", lambda: kvpn.events(release.peers, "laptop"))
    # The peer's binding sits in the server's namespace, the one whose Secrets the agent may read.
    bindings = kvpn.secrets(release.namespace, binding_selector("default"))
    assert [b.metadata.labels["kvpn.dev/server"] for b in bindings] == ["default"]

    # Deleting the peer: the operator frees its address (deletes the binding) and its finalizer.
    kvpn.delete("vpnpeers", release.peers, "laptop")
    wait_for("the peer to be gone", lambda: kvpn.get("vpnpeers", release.peers, "laptop") is None)
    assert kvpn.secrets(release.namespace, binding_selector("default")) == []

    # The readiness probe's reads (both kinds, every namespace, limit=1) are within the chart's RBAC too.
    readiness_port = next(a.split("=", 1)[1] for a in release.operator.args if a.startswith("--readiness-port="))

    def readyz() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{readiness_port}/readyz", timeout=10) as response:
                return str(response.read().decode())
        except OSError:  # 503 (HTTPError) included: not ready (yet)
            return None

    assert "readyz check passed" in wait_for("/readyz to answer 200", readyz, timeout=15)

    log = release.operator.log_text()
    assert release.operator.running, log_tail(release.operator.log_path, 60)
    # Where the chart grants nothing, a test below makes the operator lack permissions on purpose.
    log = "\n".join(line for line in log.splitlines() if release.ungranted not in line)
    assert not PERMISSION_PROBLEMS.search(log), (
        f"permission trouble in {release.operator.log_path}:\n{log_tail(release.operator.log_path, 60)}"
    )
    assert "Traceback" not in log, log_tail(release.operator.log_path, 60)


@pytest.fixture
def charts_operator_alone(request: pytest.FixtureRequest) -> Iterator[None]:
    """The chart's operator alone: the session's operator (tests/conftest.py), which watches every namespace
    with an administrator's rights, would serve this test's peer too; it is stopped while the test runs."""
    session_operator: OperatorProcess = request.getfixturevalue("operator")
    session_operator.stop()
    try:
        yield
    finally:
        session_operator.start()


@pytest.mark.usefixtures("charts_operator_alone")
def test_a_peer_where_the_operator_may_not_write_secrets_is_refused_and_says_why(
    release: Release, api: client.ApiClient
) -> None:
    """A VpnServer made by hand may serve a namespace where the chart grants the operator no Secrets
    (spec.peerNamespaces is the server's, the Roles are the chart's). Its peer there is refused with
    SecretsNotGranted, a Warning Event naming the chart value to set, no config Secret, and neither a
    binding nor an address in the server's namespace (with a generated key, no one would hold the private
    half of one); the operator keeps running."""
    kvpn = Kvpn(api)
    log_start = len(release.operator.log_text())
    kvpn.server(release.namespace, "wide", peerNamespaces=[release.ungranted], addressPool=["10.9.0.0/24"])
    try:
        kvpn.wait_ready("vpnservers", release.namespace, "wide", timeout=30)
        kvpn.peer(release.ungranted, "stray", serverRef={"name": "wide", "namespace": release.namespace})
        refused = kvpn.wait_ready("vpnpeers", release.ungranted, "stray", "False", "SecretsNotGranted", timeout=30)
        message = next(c["message"] for c in refused["status"]["conditions"] if c["type"] == "Ready")
        assert f"namespace {release.ungranted}" in message
        assert "operator.secretNamespaces" in message
        assert not refused["status"].get("address")
        assert kvpn.secret(release.ungranted, peer_config_secret_name("stray")) is None
        assert kvpn.secrets(release.namespace, binding_selector("wide")) == []
        events = client.CoreV1Api(api).list_namespaced_event(release.ungranted).items
        assert any(e.reason == "SecretsNotGranted" and e.type == "Warning" for e in events), events
        time.sleep(2)  # and it stays so: no binding comes back between the attempts
        assert kvpn.secrets(release.namespace, binding_selector("wide")) == []
        assert release.operator.running, log_tail(release.operator.log_path, 60)

        kvpn.delete("vpnpeers", release.ungranted, "stray")
        wait_for("the peer to be gone", lambda: kvpn.get("vpnpeers", release.ungranted, "stray") is None)
    finally:
        kvpn.delete("vpnservers", release.namespace, "wide")
        wait_for("the VpnServer to be gone", lambda: kvpn.get("vpnservers", release.namespace, "wide") is None)
    assert "Traceback" not in release.operator.log_text()[log_start:], log_tail(release.operator.log_path, 60)


def test_cluster_wide_secrets_grant_secrets_in_every_namespace(
    control_plane: ControlPlane, api: client.ApiClient, helm: Helm, kubectl: str, tmp_path: Path
) -> None:
    """operator.clusterWideSecrets=true, for peers anywhere: the Secrets rule back in the ClusterRole, no
    Roles. A second release beside the module's (crds.install=false: the CRDs are the other's), checked
    with `kubectl auth can-i` as its operator's ServiceAccount."""
    core = client.CoreV1Api(api)
    namespace = create_namespace(core, "chart-wide")
    name = f"kvpn-{secrets.token_hex(3)}"
    env = control_plane.env()
    sets = ["crds.install=false", "operator.clusterWideSecrets=true", "operator.secretNamespaces={dev}"]
    try:
        helm.run("install", name, str(CHART), "--namespace", namespace, "--timeout", "60s", *sets_args(sets), env=env)
        rules = client.RbacAuthorizationV1Api(api).read_cluster_role(operator_sa(name)).rules
        assert [r.verbs for r in rules if "secrets" in r.resources] == [SECRETS_RULE["verbs"]]
        manifest = helm.run("get", "manifest", name, "--namespace", namespace, env=env).stdout
        docs = [d for d in yaml.safe_load_all(manifest) if d]
        assert find(docs, "Role", operator_sa(name)) == find(docs, "RoleBinding", operator_sa(name)) == []
        agents = [agent_sa(name), f"{agent_sa(name)}-pod"]  # the agent's stay: its servers' and its own pod's
        assert sorted(r["metadata"]["name"] for r in find(docs, "Role")) == agents

        kubeconfig = chart.token_kubeconfig(api, control_plane, namespace, operator_sa(name), tmp_path / "kubeconfig")
        anywhere = (namespace, f"nowhere-{secrets.token_hex(3)}", "kube-system", "dev")
        checks = [f"{verb} secrets -n {ns}" for ns in anywhere for verb in SECRETS_RULE["verbs"]]
        checks.append("list secrets --all-namespaces")
        assert [c for c in checks if not can_i(kubectl, kubeconfig, c)] == []
        assert not can_i(kubectl, kubeconfig, "watch secrets --all-namespaces")
    finally:
        helm.run("uninstall", name, "--namespace", namespace, "--wait", "--timeout", "60s", env=env, check=False)
        core.delete_namespace(namespace)


def test_upgrade_adopts_the_vpnserver_and_patches_it_in_place(
    release: Release, api: client.ApiClient, helm: Helm
) -> None:
    """A first install creates the VpnServer as a hook (its CRD does not exist yet); an upgrade must
    take it over and change it in place: recreating it would replace the server's key and lose every
    peer's address. (Last in this module: it changes the release.)

    When another test created the CRDs first, the VpnServer was an ordinary release object from the
    start; the upgrade must change it in place all the same.
    """
    kvpn = Kvpn(api)
    before = kvpn.get("vpnservers", release.namespace, "default")
    assert before is not None
    hook = before["metadata"]["annotations"].get("helm.sh/hook")
    assert hook == ("post-install,post-upgrade" if release.first_install else None)
    args = ["upgrade", release.name, str(CHART), "--namespace", release.namespace, "--reuse-values"]
    helm.run(*args, "--set", "server.mtu=1380", env=release.env)
    after = kvpn.get("vpnservers", release.namespace, "default")
    assert after is not None
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["spec"]["mtu"] == 1380
    kvpn.wait_ready("vpnservers", release.namespace, "default")
    assert kvpn.get("vpnservers", release.namespace, "default")["status"]["publicKey"] == before["status"]["publicKey"]
    assert "helm.sh/hook" not in after["metadata"]["annotations"]
    manifest = helm.run("get", "manifest", release.name, "--namespace", release.namespace, env=release.env).stdout
    assert "kind: VpnServer" in manifest
