"""The status table: human units, "12s ago", connected or not, the Ready reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kvpn_cli.status import ago, human_bytes, row_of, table

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
