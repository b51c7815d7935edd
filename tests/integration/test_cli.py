"""kubectl-vpn against the real API server and operator, run as a subprocess as a developer would."""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from harness.controlplane import ControlPlane
from harness.kvpn import Kvpn, decode, wait_for
from harness.wgfiles import assert_only_app_keys
from kvpn_core import keys

pytestmark = pytest.mark.usefixtures("operator")

REPO = Path(__file__).resolve().parents[2]
PEERS = "vpnpeers"


@pytest.fixture
def kvpn(api: client.ApiClient) -> Kvpn:
    return Kvpn(api)


@pytest.fixture
def no_routes(tmp_path: Path) -> Path:
    """A route table with nothing that overlaps the test servers, whatever this machine routes."""
    path = tmp_path / "routes.json"
    path.write_text('[{"dst": "192.168.1.0/24", "dev": "eth0"}]')
    return path


def vpn(
    kubeconfig: Path, *args: str, timeout: float = 60, home: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "PYTHONPATH": os.pathsep.join([str(REPO / "cli"), str(REPO / "operator")]),
        **({"HOME": str(home)} if home else {}),  # where join writes by default and status looks
    }
    return subprocess.run(
        [sys.executable, "-m", "kvpn_cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1
    assert "Traceback" not in result.stderr
    message = lines[-1]
    assert message.startswith("error: ")
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_join_writes_a_private_config_with_the_local_key_only(
    control_plane: ControlPlane, kvpn: Kvpn, namespace: str, no_routes: Path, tmp_path: Path
) -> None:
    kvpn.server(namespace, "dev", dns={"nameserver": "10.96.0.10"})
    conf = tmp_path / "kvpn-dev.conf"
    result = vpn(
        control_plane.kubeconfig, "join", "dev", "-n", namespace, "--name", "laptop",
        "--dns", "full", "-o", str(conf), "--routes-from", str(no_routes),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert conf.stat().st_mode & 0o777 == 0o600
    text = conf.read_text()
    private_key = next(line.split(" = ", 1)[1] for line in text.splitlines() if line.startswith("PrivateKey = "))
    peer = kvpn.get(PEERS, namespace, "laptop") or {}
    assert keys.public_key_of(private_key) == peer["status"]["publicKey"] == peer["spec"]["publicKey"]
    assert "PresharedKey = " in text
    assert "DNS = 10.96.0.10" in text
    assert "AllowedIPs = 10.96.0.0/16" in text
    assert "0.0.0.0/0" not in text

    decoded = [
        base64.b64decode(value).decode(errors="replace")
        for secret in kvpn.core.list_secret_for_all_namespaces().items
        for value in (secret.data or {}).values()
    ]
    assert not any(private_key in value for value in decoded)
    assert private_key not in json.dumps(kvpn.list(PEERS, namespace))

    # wg-quick strip parses the file as `wg-quick up` would and needs no resolvconf to drop the DNS line.
    stripped = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True, check=False)
    assert stripped.returncode == 0, stripped.stderr
    assert f"PrivateKey = {private_key}" in stripped.stdout
    assert "DNS" not in stripped.stdout


def test_join_never_overwrites_a_config_unless_forced(
    control_plane: ControlPlane, kvpn: Kvpn, namespace: str, no_routes: Path, tmp_path: Path
) -> None:
    kvpn.server(namespace, "dev")
    conf = tmp_path / "kvpn-dev.conf"
    conf.write_text("the key of an earlier join")
    args = ["join", "dev", "-n", namespace, "--name", "again", "--dns", "none", "-o", str(conf)]
    assert_one_line_error(vpn(control_plane.kubeconfig, *args, "--routes-from", str(no_routes)), "exists")
    assert conf.read_text() == "the key of an earlier join"
    assert kvpn.get(PEERS, namespace, "again") is None


def test_join_with_dns_none_has_no_dns_line(
    control_plane: ControlPlane, kvpn: Kvpn, namespace: str, no_routes: Path, tmp_path: Path
) -> None:
    kvpn.server(namespace, "dev")
    conf = tmp_path / "kvpn-dev.conf"
    args = ["join", "dev", "-n", namespace, "--name", "nodns", "--dns", "none", "-o", str(conf)]
    result = vpn(control_plane.kubeconfig, *args, "--routes-from", str(no_routes))
    assert result.returncode == 0, result.stderr
    assert "DNS" not in conf.read_text()
    assert subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(Path("/run/systemd/resolve").is_dir(), reason="this host runs systemd-resolved")
def test_split_dns_without_resolved_says_what_to_do_instead(
    control_plane: ControlPlane, kvpn: Kvpn, namespace: str, no_routes: Path, tmp_path: Path
) -> None:
    kvpn.server(namespace, "dev", dns={"nameserver": "10.96.0.10"})
    kvpn.wait_ready("vpnservers", namespace, "dev")
    args = ["join", "dev", "-n", namespace, "--name", "split", "-o", str(tmp_path / "x.conf")]
    result = vpn(control_plane.kubeconfig, *args, "--routes-from", str(no_routes))
    assert_one_line_error(result, "split DNS needs systemd-resolved", "--dns full", "--dns none")
    assert kvpn.get(PEERS, namespace, "split") is None


def test_config_and_qr_of_a_generated_peer_equal_the_secret(
    control_plane: ControlPlane, kvpn: Kvpn, namespace: str, tmp_path: Path
) -> None:
    kvpn.server(namespace, "dev")
    kvpn.peer(namespace, "phone")
    peer = kvpn.wait_ready(PEERS, namespace, "phone")
    wg0 = decode(kvpn.secret(namespace, peer["status"]["configSecretName"]) or {}, "wg0.conf")

    shown = vpn(control_plane.kubeconfig, "config", "phone", "-n", namespace)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == wg0

    png = tmp_path / "phone.png"
    assert vpn(control_plane.kubeconfig, "qr", "phone", "-n", namespace, "--png", str(png)).returncode == 0
    scanned = subprocess.run(["zbarimg", "--raw", "-q", str(png)], capture_output=True, text=True, check=True)
    assert scanned.stdout == wg0 + "\n"  # zbarimg ends each decoded symbol with a newline of its own

    terminal = vpn(control_plane.kubeconfig, "qr", "phone", "-n", namespace)
    assert terminal.returncode == 0
    assert len(terminal.stdout.splitlines()) > 20


def test_config_of_a_byo_peer_says_where_the_key_lives(control_plane: ControlPlane, kvpn: Kvpn, namespace: str) -> None:
    kvpn.server(namespace, "dev")
    kvpn.peer(namespace, "own", publicKey=keys.public_key_of(keys.generate_private_key()))
    kvpn.wait_ready(PEERS, namespace, "own")
    assert_one_line_error(vpn(control_plane.kubeconfig, "config", "own", "-n", namespace), "only on the device")


def test_status_lists_the_peer(control_plane: ControlPlane, kvpn: Kvpn, namespace: str) -> None:
    kvpn.server(namespace, "dev")
    kvpn.peer(namespace, "alice")
    address = kvpn.wait_ready(PEERS, namespace, "alice")["status"]["address"]

    table = vpn(control_plane.kubeconfig, "status", "-n", namespace)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAME", "SERVER", "ADDRESS", "CONNECTED", "LAST-HANDSHAKE", "RX", "TX", "STATUS"]
    assert row.split() == ["alice", "dev", address, "no", "Ready"]  # no handshake, no traffic yet

    listed = json.loads(vpn(control_plane.kubeconfig, "status", "-n", namespace, "-o", "json").stdout)
    assert [(p["name"], p["address"], p["ready"], p["last_handshake"]) for p in listed] == [
        ("alice", address, True, None)
    ]
    everywhere = vpn(control_plane.kubeconfig, "status", "-A", "-o", "yaml")
    assert {"namespace": namespace, "name": "alice"}.items() <= next(
        p for p in yaml.safe_load(everywhere.stdout) if p["namespace"] == namespace
    ).items()


def test_unknown_server_names_the_servers_there(control_plane: ControlPlane, kvpn: Kvpn, namespace: str) -> None:
    kvpn.server(namespace, "dev")
    result = vpn(control_plane.kubeconfig, "join", "nope", "-n", namespace, "--dns", "none")
    assert_one_line_error(result, "no VpnServer 'nope'", f"namespace {namespace}", "dev")


def test_no_permission_names_the_rbac_verb_and_resource(
    control_plane: ControlPlane, api: client.ApiClient, kvpn: Kvpn, namespace: str, tmp_path: Path
) -> None:
    kvpn.server(namespace, "dev")
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata={"name": "dev-user"}))
    # The user may read servers (to find "dev") but not create peers.
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata={"name": "read-vpn"},
            rules=[
                client.V1PolicyRule(
                    api_groups=["kvpn.dev"], resources=["vpnservers", "vpnpeers"], verbs=["get", "list"]
                )
            ],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata={"name": "read-vpn"},
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="read-vpn"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="dev-user", namespace=namespace)],
        ),
    )
    request = client.AuthenticationV1TokenRequest(spec={"audiences": [], "expirationSeconds": 600})
    issued = core.create_namespaced_service_account_token("dev-user", namespace, request)
    assert issued.status is not None
    token = issued.status.token
    kubeconfig = yaml.safe_load(control_plane.kubeconfig.read_text())
    kubeconfig["users"] = [{"name": kubeconfig["contexts"][0]["context"]["user"], "user": {"token": token}}]
    user_config = tmp_path / "kubeconfig"
    user_config.write_text(yaml.safe_dump(kubeconfig))

    result = vpn(
        user_config, "join", "dev", "-n", namespace, "--name", "x", "--dns", "none", "-o", str(tmp_path / "x.conf")
    )
    assert_one_line_error(
        result, f"you may not create vpnpeers in namespace {namespace} (RBAC: create vpnpeers.kvpn.dev)"
    )
    assert not (tmp_path / "x.conf").exists()


def test_timeout_names_the_ready_reason_and_cleans_up(
    control_plane: ControlPlane, kvpn: Kvpn, namespace: str, no_routes: Path, tmp_path: Path
) -> None:
    kvpn.server(namespace, "pending", expose={"type": "LoadBalancer"})  # no load balancer controller here
    args = ["join", "pending", "-n", namespace, "--name", "late", "--dns", "none", "--timeout", "3"]
    result = vpn(control_plane.kubeconfig, *args, "-o", str(tmp_path / "x.conf"), "--routes-from", str(no_routes))
    assert_one_line_error(result, "timed out after 3s", "ServerNotReady", "deleted it")
    assert not (tmp_path / "x.conf").exists()
    wait_for("the abandoned peer to go", lambda: kvpn.get(PEERS, namespace, "late") is None)


def test_conflicting_route_refuses_unless_forced(
    control_plane: ControlPlane, kvpn: Kvpn, namespace: str, tmp_path: Path
) -> None:
    kvpn.server(namespace, "dev")
    routes = tmp_path / "routes.json"
    routes.write_text('[{"dst": "10.96.128.0/20", "dev": "tun0", "protocol": "static"}]')  # another VPN
    conf = tmp_path / "kvpn-dev.conf"
    args = ["join", "dev", "-n", namespace, "--name", "clash", "--dns", "none", "-o", str(conf), "--routes-from"]
    refused = vpn(control_plane.kubeconfig, *args, str(routes))
    assert_one_line_error(refused, "10.96.0.0/16", "10.96.128.0/20 dev tun0", "--force")
    assert not conf.exists()
    assert kvpn.get(PEERS, namespace, "clash") is None

    forced = vpn(control_plane.kubeconfig, *args, str(routes), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "warning:" in forced.stderr
    assert conf.exists()


def test_no_cluster_reachable(tmp_path: Path) -> None:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "gone", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}],
        "current-context": "gone",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    assert_one_line_error(vpn(path, "status"), "no cluster reachable at https://127.0.0.1:9")


def private_key_in(path: Path) -> str:
    return next(line.split(" = ", 1)[1] for line in path.read_text().splitlines() if line.startswith("PrivateKey = "))


def line_about(status: subprocess.CompletedProcess[str], path: Path) -> str:
    """The line `kubectl vpn status` prints about a config file on this machine."""
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "Config files on this machine:" in lines, status.stdout
    return next(line.strip() for line in lines if line.strip().startswith(f"{path} "))


def test_join_again_refreshes_a_stale_file_with_the_same_key(
    control_plane: ControlPlane, kvpn: Kvpn, namespace: str, no_routes: Path, tmp_path: Path
) -> None:
    kvpn.server(namespace, "dev", dns={"nameserver": "10.96.0.10"})
    home = tmp_path / "home"
    conf = home / ".config" / "kvpn" / "kvpn-dev.conf"  # join's default, where status looks
    args = ["join", "dev", "-n", namespace, "--name", "laptop", "--dns", "full", "--routes-from", str(no_routes)]
    joined = vpn(control_plane.kubeconfig, *args, home=home)
    assert joined.returncode == 0, joined.stderr
    key = private_key_in(conf)

    def revision() -> str:
        return str(((kvpn.get("vpnservers", namespace, "dev") or {}).get("status") or {}).get("revision") or "")

    first = revision()
    assert f"\n# kvpn: server {namespace}/dev revision {first} (--dns full --platform linux)\n" in conf.read_text()
    status = vpn(control_plane.kubeconfig, "status", "-n", namespace, home=home)
    head = f"{conf} (VpnPeer {namespace}/laptop):"
    assert line_about(status, conf) == f"{head} current, VpnServer {namespace}/dev revision {first}"

    kvpn.patch("vpnservers", namespace, "dev", {"routes": ["10.96.0.0/16", "10.100.0.0/16"]})
    second = wait_for("the server's next revision", lambda: (now := revision()) != first and now)
    command = f"kubectl vpn join dev -n {namespace} --name laptop -o {conf}"
    status = vpn(control_plane.kubeconfig, "status", "-n", namespace, home=home)
    assert line_about(status, conf) == (
        f"{head} stale, rendered from VpnServer {namespace}/dev revision {first}, which is now at {second}; "
        f"refresh it with: {command}"
    )

    # The command as printed (this test's route table added), with neither --dns nor -f: the file's are kept.
    again = vpn(control_plane.kubeconfig, *shlex.split(command)[2:], "--routes-from", str(no_routes), home=home)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == (
        f"refreshed {conf} for VpnPeer {namespace}/laptop to VpnServer {namespace}/dev revision {second}, "
        "with the same key"
    )
    text = conf.read_text()
    assert private_key_in(conf) == key
    peer = kvpn.get(PEERS, namespace, "laptop") or {}
    assert peer["spec"]["publicKey"] == keys.public_key_of(key)
    assert "10.100.0.0/16" in next(line for line in text.splitlines() if line.startswith("AllowedIPs = "))
    assert "DNS = 10.96.0.10" in text  # still --dns full
    assert conf.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in conf.parent.iterdir()) == ["kvpn-dev.conf"]  # no scratch file left
    status = vpn(control_plane.kubeconfig, "status", "-n", namespace, home=home)
    assert line_about(status, conf) == f"{head} current, VpnServer {namespace}/dev revision {second}"
    stripped = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True, check=False)
    assert stripped.returncode == 0, stripped.stderr

    unchanged = vpn(control_plane.kubeconfig, *shlex.split(command)[2:], "--routes-from", str(no_routes), home=home)
    assert unchanged.returncode == 0, unchanged.stderr
    assert unchanged.stdout == (
        f"{conf} is current for VpnPeer {namespace}/laptop (VpnServer {namespace}/dev revision {second}): "
        "nothing to change\n"
    )


def test_join_again_refuses_a_peer_that_is_not_this_machines(
    control_plane: ControlPlane, kvpn: Kvpn, namespace: str, no_routes: Path, tmp_path: Path
) -> None:
    kvpn.server(namespace, "dev")
    kvpn.peer(namespace, "phone")  # its key made by the cluster
    kvpn.peer(namespace, "desktop", publicKey=keys.public_key_of(keys.generate_private_key()))
    conf = tmp_path / "kvpn-dev.conf"

    def join(name: str) -> subprocess.CompletedProcess[str]:
        args = ["join", "dev", "-n", namespace, "--name", name, "--dns", "none", "-o", str(conf)]
        return vpn(control_plane.kubeconfig, *args, "--routes-from", str(no_routes))

    assert_one_line_error(join("phone"), f"`kubectl vpn config phone -n {namespace} -o FILE`", "another --name")
    assert_one_line_error(join("desktop"), "is not this machine's", f"no key of it in {conf}", "another --name")
    conf.write_text(f"[Interface]\nPrivateKey = {keys.generate_private_key()}\n")
    before = conf.read_text()
    assert_one_line_error(join("desktop"), "is not this machine's", f"the key in {conf} is another one")
    assert conf.read_text() == before
    assert kvpn.get(PEERS, namespace, "phone") is not None
    assert kvpn.get(PEERS, namespace, "desktop") is not None


def test_join_for_macos_and_phones_writes_only_what_the_apps_read(
    control_plane: ControlPlane, kvpn: Kvpn, namespace: str, no_routes: Path, tmp_path: Path
) -> None:
    kvpn.server(namespace, "dev", dns={"nameserver": "10.96.0.10"})
    mac, phone = tmp_path / "mac.conf", tmp_path / "phone.conf"
    common = ["join", "dev", "-n", namespace, "--routes-from", str(no_routes)]
    on_mac = vpn(control_plane.kubeconfig, *common, "--name", "mac", "--platform", "macos", "-o", str(mac))
    assert on_mac.returncode == 0, on_mac.stderr  # split DNS, the default: no systemd-resolved needed for a Mac
    assert "split DNS: sudo mkdir -p /etc/resolver && printf 'nameserver 10.96.0.10\\n' | sudo tee " in on_mac.stdout
    assert on_mac.stdout.splitlines()[-1].startswith(f"import {mac} into the WireGuard app")
    on_phone = vpn(control_plane.kubeconfig, *common, "--name", "phone", "--platform", "ios", "-o", str(phone))
    assert on_phone.returncode == 0, on_phone.stderr

    assert "DNS" not in assert_only_app_keys(mac.read_text())["Interface"]  # split DNS is /etc/resolver there
    assert "DNS" in assert_only_app_keys(phone.read_text())["Interface"]  # the one DNS the app has: --dns full

    split_phone = vpn(control_plane.kubeconfig, *common, "--name", "p2", "--platform", "ios", "--dns", "split")
    assert_one_line_error(split_phone, "the WireGuard app on iOS cannot send only the cluster's domains", "--dns full")
    assert kvpn.get(PEERS, namespace, "p2") is None
