"""`kubectl vpn join` run again: the file follows its server with the same key; a peer that is not this
machine's is refused with the way out. Against a fake of the API and of the operator's rendering."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any, cast

import pytest

from kvpn_cli import join
from kvpn_cli.cluster import CliError, Cluster
from kvpn_cli.wgquick import DnsMode, Platform, stamp_of
from kvpn_core import keys
from kvpn_core.api import Kind
from kvpn_core.wgquick import ClientConfig, field, render_client_config

Obj = dict[str, Any]
SERVER_KEY = keys.public_key_of(keys.generate_private_key())


class FakeCluster:
    """What join reads and writes, and an operator that renders a peer at the server's revision once it has
    been read `lag` times since the server changed."""

    def __init__(self, lag: int = 0) -> None:
        self.lag = lag
        self.reads_since_change = 0
        self.server: Obj = {"status": {}}
        self.peers: dict[tuple[str, str], Obj] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.change_server(revision="r1", endpoint="203.0.113.10:51820", routes=["10.96.0.0/16"])

    def change_server(self, **status: Any) -> None:
        self.server["status"].update(status)
        self.reads_since_change = 0

    def get_kvpn(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        if kind is Kind.VPN_SERVER:
            return copy.deepcopy(self.server) if (namespace, name) == ("kvpn", "dev") else None
        peer = self.peers.get((namespace, name))
        if peer is not None:
            self.operate(peer)
        return copy.deepcopy(peer)

    def operate(self, peer: Obj) -> None:
        self.reads_since_change += 1
        if self.reads_since_change <= self.lag or not peer["spec"].get("publicKey"):
            return
        peer["status"] = {
            "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": ""}],
            "publicKey": peer["spec"]["publicKey"],
            "configSecretName": f"kvpn-peer-{peer['metadata']['name']}",
            "serverRevision": self.server["status"]["revision"],
            "address": "10.8.0.2",
        }
        peer["wg0.conf"] = render_client_config(
            ClientConfig(
                private_key=None,
                public_key=peer["spec"]["publicKey"],
                addresses=["10.8.0.2"],
                dns_servers=[self.server["status"]["dnsNameserver"]]
                if "dnsNameserver" in self.server["status"]
                else [],
                dns_search=["svc.cluster.local", "cluster.local"],
                mtu=None,
                server_public_key=SERVER_KEY,
                preshared_key=None,
                endpoint=self.server["status"]["endpoint"],
                allowed_ips=self.server["status"]["routes"],
                persistent_keepalive=25,
                name=f"{peer['metadata']['namespace']}/{peer['metadata']['name']}",
            )
        )

    def create_kvpn(self, kind: Kind, namespace: str, name: str, spec: Obj) -> Obj:
        assert kind is Kind.VPN_PEER
        self.peers[(namespace, name)] = {"metadata": {"namespace": namespace, "name": name}, "spec": spec, "status": {}}
        self.created.append(name)
        return {}

    def delete_kvpn(self, kind: Kind, namespace: str, name: str) -> None:
        del self.peers[(namespace, name)]
        self.deleted.append(name)

    def secret(self, namespace: str, name: str) -> Obj | None:
        peer = next(p for p in self.peers.values() if p["status"].get("configSecretName") == name)
        return {"data": {"wg0.conf": base64.b64encode(peer["wg0.conf"].encode()).decode()}}


def run(cluster: FakeCluster, req: join.JoinRequest) -> None:
    join.join(cast(Cluster, cluster), req)


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(join.time, "sleep", lambda _: None)


@pytest.fixture
def request_for(tmp_path: Path) -> Any:
    routes = tmp_path / "routes.json"
    routes.write_text("[]")

    def make(**changes: Any) -> join.JoinRequest:
        base: dict[str, Any] = {
            "server": "kvpn/dev",
            "name": "laptop",
            "namespace": "team-a",
            "dns_mode": None,
            "output": tmp_path / "kvpn-dev.conf",
            "timeout": 5,
            "force": False,
            "routes_file": routes,
            "platform": Platform.LINUX,
        }
        return join.JoinRequest(**(base | changes))

    return make


def private_key_in(path: Path) -> str:
    key = field(path.read_text(), "PrivateKey")
    assert key is not None
    return key


def test_a_new_join_writes_a_file_stamped_with_the_servers_revision(request_for: Any) -> None:
    cluster, req = FakeCluster(), request_for()
    run(cluster, req)
    stamp = stamp_of(req.output.read_text())
    assert stamp is not None
    assert (stamp.server, stamp.revision, stamp.dns_mode, stamp.platform) == ("kvpn/dev", "r1", "split", "linux")
    assert req.output.stat().st_mode & 0o777 == 0o600
    assert cluster.created == ["laptop"]


def test_a_second_join_refreshes_the_file_with_the_same_key(
    request_for: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster, req = FakeCluster(lag=3), request_for(dns_mode=DnsMode.NONE)
    run(cluster, req)
    key = private_key_in(req.output)
    cluster.change_server(revision="r2", endpoint="198.51.100.7:51820", routes=["10.96.0.0/16", "10.100.0.0/16"])
    capsys.readouterr()

    run(cluster, request_for())
    text = req.output.read_text()
    assert private_key_in(req.output) == key
    assert field(text, "Endpoint") == "198.51.100.7:51820"
    assert field(text, "AllowedIPs") == "10.96.0.0/16, 10.100.0.0/16"
    stamp = stamp_of(text)
    assert stamp is not None
    assert (stamp.revision, stamp.dns_mode) == ("r2", DnsMode.NONE)  # the DNS mode the file had
    assert cluster.created == ["laptop"]
    assert cluster.deleted == []
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"refreshed {req.output} for VpnPeer team-a/laptop to VpnServer kvpn/dev revision r2, with the same key",
        "a tunnel that is up keeps the old settings until: "
        f"kubectl vpn down {req.output} && kubectl vpn up {req.output}",
    ]


def test_a_join_with_nothing_new_leaves_the_file_alone(request_for: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cluster, req = FakeCluster(), request_for()
    run(cluster, req)
    inode = req.output.stat().st_ino
    capsys.readouterr()
    run(cluster, req)
    assert req.output.stat().st_ino == inode
    assert capsys.readouterr().out == (
        f"{req.output} is current for VpnPeer team-a/laptop (VpnServer kvpn/dev revision r1): nothing to change\n"
    )


def test_given_options_win_over_the_files(request_for: Any) -> None:
    cluster, req = FakeCluster(), request_for(dns_mode=DnsMode.NONE)
    run(cluster, req)
    cluster.change_server(revision="r2", dnsNameserver="10.96.0.10")
    run(cluster, request_for(dns_mode=DnsMode.FULL, platform=Platform.IOS))
    text = req.output.read_text()
    stamp = stamp_of(text)
    assert stamp is not None
    assert (stamp.dns_mode, stamp.platform) == (DnsMode.FULL, Platform.IOS)
    assert field(text, "DNS") == "10.96.0.10, svc.cluster.local, cluster.local"
    # and the next run without them keeps those
    cluster.change_server(revision="r3")
    run(cluster, request_for(platform=None))
    stamp = stamp_of(req.output.read_text())
    assert stamp is not None
    assert (stamp.revision, stamp.dns_mode, stamp.platform) == ("r3", DnsMode.FULL, Platform.IOS)


def test_a_refresh_that_times_out_keeps_the_peer_and_the_file(request_for: Any) -> None:
    cluster, req = FakeCluster(), request_for(timeout=0)
    run(cluster, req)
    before = req.output.read_text()
    cluster.server["status"]["revision"] = "r2"  # the operator never gets to it
    cluster.lag = 10**6
    with pytest.raises(CliError) as failed:
        run(cluster, req)
    assert str(failed.value) == (
        "timed out after 0s waiting for VpnPeer team-a/laptop to be Ready "
        "(its config is from revision r1, VpnServer kvpn/dev is at r2)"
    )
    assert req.output.read_text() == before
    assert cluster.deleted == []


def test_a_generated_key_peer_is_refused_with_the_config_command(request_for: Any) -> None:
    cluster = FakeCluster()
    cluster.peers[("team-a", "laptop")] = {"spec": {"serverRef": {"name": "dev", "namespace": "kvpn"}}, "status": {}}
    with pytest.raises(CliError) as refused:
        run(cluster, request_for())
    assert str(refused.value) == (
        "VpnPeer team-a/laptop already exists and its key was made by the cluster, not here: write its config with "
        "`kubectl vpn config laptop -n team-a -o FILE`, or choose another --name"
    )


def test_a_peer_of_another_machine_is_refused(request_for: Any, tmp_path: Path) -> None:
    cluster, req = FakeCluster(), request_for()
    other = keys.public_key_of(keys.generate_private_key())
    spec = {"serverRef": {"name": "dev", "namespace": "kvpn"}, "publicKey": other}
    cluster.peers[("team-a", "laptop")] = {"metadata": {"namespace": "team-a", "name": "laptop"}, "spec": spec}

    with pytest.raises(CliError) as no_file:
        run(cluster, req)
    assert str(no_file.value) == (
        f"VpnPeer team-a/laptop already exists and is not this machine's (no key of it in {req.output}): "
        "choose another --name, or -o the file that joined it"
    )
    assert not req.output.exists()

    req.output.write_text(f"[Interface]\nPrivateKey = {keys.generate_private_key()}\n")
    with pytest.raises(CliError, match=r"the key in .* is another one\): choose another --name and -o$"):
        run(cluster, req)
    req.output.write_text("[Interface]\nPrivateKey = not a key\n")
    with pytest.raises(CliError, match="no key of it in"):
        run(cluster, req)
    assert cluster.deleted == []


def test_a_peer_of_another_server_is_refused(request_for: Any) -> None:
    cluster, req = FakeCluster(), request_for()
    run(cluster, req)
    cluster.peers[("team-a", "laptop")]["spec"]["serverRef"] = {"name": "prod", "namespace": "kvpn"}
    with pytest.raises(CliError) as refused:
        run(cluster, req)
    assert str(refused.value) == (
        "VpnPeer team-a/laptop already exists and joined VpnServer kvpn/prod, not kvpn/dev: "
        "run `kubectl vpn join kvpn/prod -n team-a --name laptop` for it, or choose another --name"
    )


def test_a_new_peer_still_never_overwrites_a_file(request_for: Any) -> None:
    cluster, req = FakeCluster(), request_for()
    req.output.write_text("the key of an earlier join")
    with pytest.raises(CliError, match=r"exists \(from an earlier join\?\)"):
        run(cluster, req)
    assert cluster.created == []
