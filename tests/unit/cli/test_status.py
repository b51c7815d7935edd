"""The status table: human units, "12s ago", connected or not, the Ready reason; stale local files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from kvpn_cli import peers
from kvpn_cli.cluster import CliError, Cluster
from kvpn_cli.status import LocalFile, ago, freshness, human_bytes, refresh_command, row_of, table
from kvpn_cli.wgquick import DnsMode, Platform, Stamp
from kvpn_core.api import Kind

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, ""), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**2, "5.0 MiB"), (3 * 1024**4, "3.0 TiB")],
)
def test_human_bytes(value: int | None, text: str) -> None:
    assert human_bytes(value) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s ago"), (12, "12s ago"), (59, "59s ago"), (61, "1m ago"), (7200, "2h ago")]
)
def test_ago(seconds: int, text: str) -> None:
    assert ago(NOW - timedelta(seconds=seconds), NOW) == text


def test_ago_never_is_empty() -> None:
    assert ago(None, NOW) == ""


def peer(name: str, handshake: datetime | None = None, ready: str = "True", reason: str = "Ready") -> dict[str, object]:
    status: dict[str, object] = {
        "address": "10.8.0.2",
        "conditions": [{"type": "Ready", "status": ready, "reason": reason, "message": ""}],
    }
    if handshake:
        status |= {"lastHandshake": handshake.isoformat().replace("+00:00", "Z"), "rxBytes": 2048, "txBytes": 10}
    return {"metadata": {"name": name, "namespace": "dev"}, "spec": {"serverRef": {"name": "vpn"}}, "status": status}


def test_table_shows_handshake_traffic_and_reason() -> None:
    rows = [
        row_of(peer("alice", NOW - timedelta(seconds=12)), NOW),
        row_of(peer("bob", NOW - timedelta(minutes=10)), NOW),
        row_of(peer("carol", ready="False", reason="ServerNotReady"), NOW),
    ]
    assert table(rows, NOW).splitlines() == [
        "NAME    SERVER   ADDRESS    CONNECTED   LAST-HANDSHAKE   RX        TX     STATUS",
        "alice   vpn      10.8.0.2   yes         12s ago          2.0 KiB   10 B   Ready",
        "bob     vpn      10.8.0.2   no          10m ago          2.0 KiB   10 B   Ready",
        "carol   vpn      10.8.0.2   no                                            ServerNotReady",
    ]


def test_all_namespaces_adds_the_namespace_column() -> None:
    lines = table([row_of(peer("alice"), NOW)], NOW, all_namespaces=True).splitlines()
    assert lines[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert lines[1].split()[:2] == ["dev", "alice"]


def test_a_peer_without_status_reads_unknown() -> None:
    row = row_of({"metadata": {"name": "new", "namespace": "dev"}, "spec": {"serverRef": {"name": "vpn"}}}, NOW)
    assert (row.address, row.ready, row.reason, row.connected) == ("", False, "Unknown", False)


# --- the config files on this machine --------------------------------------------------------

CONF = Path("/home/dev/.config/kvpn/kvpn-dev.conf")


def local(revision: str | None = "1111111111111111", **changes: Any) -> LocalFile:
    base: dict[str, Any] = {
        "path": CONF,
        "peer_namespace": "team-a",
        "peer_name": "laptop",
        "server_namespace": "kvpn",
        "server_name": "dev",
        "revision": revision,
    }
    return LocalFile(**(base | changes))


def test_a_file_from_the_current_revision_is_current() -> None:
    assert freshness(local(), "1111111111111111") == (
        f"{CONF} (VpnPeer team-a/laptop): current, VpnServer kvpn/dev revision 1111111111111111"
    )


def test_a_file_from_another_revision_is_stale_with_the_command_that_refreshes_it() -> None:
    assert freshness(local(), "2222222222222222") == (
        f"{CONF} (VpnPeer team-a/laptop): stale, rendered from VpnServer kvpn/dev revision 1111111111111111, "
        "which is now at 2222222222222222; refresh it with: "
        f"kubectl vpn join kvpn/dev -n team-a --name laptop -o {CONF}"
    )


def test_a_file_that_does_not_say_its_revision_may_be_stale() -> None:
    line = freshness(local(None), "2222222222222222")
    assert "maybe stale, it does not record which revision of VpnServer kvpn/dev it is from" in line
    assert line.endswith(f"refresh it with: kubectl vpn join kvpn/dev -n team-a --name laptop -o {CONF}")


def test_a_server_without_a_revision_is_not_compared() -> None:
    assert freshness(local(), None).endswith(
        "not checked: VpnServer kvpn/dev has no revision yet (the operator has not seen it)"
    )


def test_the_refresh_command() -> None:
    assert (
        refresh_command(local(server_namespace="team-a")) == f"kubectl vpn join dev -n team-a --name laptop -o {CONF}"
    )
    assert refresh_command(local(path=Path("my vpn.conf")), "prod") == (
        "kubectl vpn join kvpn/dev -n team-a --name laptop -o 'my vpn.conf' --context prod"
    )
    assert refresh_command(local(own_key=False)) == f"kubectl vpn config laptop -n team-a -o {CONF}"


class FakeCluster:
    def __init__(self, objects: dict[tuple[Kind, str, str], dict[str, Any]]) -> None:
        self.objects = objects

    def get_kvpn(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        if (kind, namespace, name) == (Kind.VPN_SERVER, "kvpn", "secret"):
            raise CliError("you may not get vpnservers in namespace kvpn (RBAC: get vpnservers.kvpn.dev)")
        return self.objects.get((kind, namespace, name))


HEADER = "# kvpn: WireGuard tunnel of VpnPeer team-a/laptop to vpn.example.com:51820\n"


def stamped_file(path: Path, server: str = "dev", revision: str = "1111111111111111") -> Path:
    stamp = Stamp("kvpn", server, revision, DnsMode.SPLIT, Platform.LINUX)
    path.write_text(f"{HEADER}{stamp.line()}\n\n[Interface]\n")
    return path


def test_status_reads_every_kvpn_file_in_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kvpn_cli.join.config_dir", lambda: tmp_path)
    server = {"status": {"revision": "2222222222222222"}}
    generated = {"spec": {"serverRef": {"name": "dev", "namespace": "kvpn"}}}
    cluster = FakeCluster({(Kind.VPN_SERVER, "kvpn", "dev"): server, (Kind.VPN_PEER, "team-a", "laptop"): generated})
    stale = stamped_file(tmp_path / "kvpn-dev.conf")
    (tmp_path / "notes.conf").write_text("[Interface]\n")  # not ours: left out
    (tmp_path / "kvpn-phone.conf").write_text(HEADER)  # `kubectl vpn config -o`: no stamp, a generated key
    gone = stamped_file(tmp_path / "kvpn-old.conf", server="old")
    denied = stamped_file(tmp_path / "kvpn-secret.conf", server="secret")

    lines = peers.local_file_lines(cast(Cluster, cluster), None, None)
    head = "(VpnPeer team-a/laptop):"
    assert lines == [
        f"{tmp_path / 'kvpn-dev.conf'} {head} stale, rendered from VpnServer kvpn/dev revision 1111111111111111, "
        f"which is now at 2222222222222222; refresh it with: kubectl vpn join kvpn/dev -n team-a --name laptop "
        f"-o {stale}",
        f"{gone} {head} VpnServer kvpn/old not found (deleted, or the file is from another cluster)",
        f"{tmp_path / 'kvpn-phone.conf'} {head} maybe stale, it does not record which revision of VpnServer kvpn/dev "
        f"it is from; refresh it with: kubectl vpn config laptop -n team-a -o {tmp_path / 'kvpn-phone.conf'}",
        f"{denied} {head} not checked: you may not get vpnservers in namespace kvpn (RBAC: get vpnservers.kvpn.dev)",
    ]


def test_a_file_given_by_name_is_always_reported(tmp_path: Path) -> None:
    cluster = cast(Cluster, FakeCluster({}))
    other = tmp_path / "wg0.conf"
    other.write_text("[Interface]\n")
    missing = tmp_path / "missing.conf"
    assert peers.local_file_lines(cluster, [other, missing], None) == [
        f"{other}: not a kvpn file (it has no `# kvpn: WireGuard tunnel of VpnPeer` line)",
        f"{missing}: cannot read it (No such file or directory)",
    ]
