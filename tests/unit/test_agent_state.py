"""The state file, node selection, the watch store and the command line of the agent."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from kvpn_agent.main import JsonFormatter, PlainFormatter, parse_args
from kvpn_agent.state import ServerInputs, StateFile, selected
from kvpn_agent.watch import Store, trim


def obj(name: str, version: str = "1", server: str = "office") -> dict[str, object]:
    return {
        "metadata": {
            "namespace": "team",
            "name": name,
            "resourceVersion": version,
            "labels": {"kvpn.dev/server": server},
            "managedFields": [{"manager": "kvpn"}],
        },
        "data": {"privateKey": "c2VjcmV0"},
    }


def test_the_state_file_is_private_and_survives_a_round_trip(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "kvpn")
    inputs = ServerInputs({"metadata": {"namespace": "team", "name": "office"}}, obj("key"), (obj("b1"),))
    old_umask = os.umask(0)
    try:
        state.save([inputs], {"pub": "192.0.2.1:1"})
    finally:
        os.umask(old_umask)
    assert state.path.stat().st_mode & 0o777 == 0o600
    assert state.directory.stat().st_mode & 0o777 == 0o700
    assert list(state.directory.iterdir()) == [state.path]  # no temporary file left behind
    loaded = state.load()
    assert loaded is not None
    assert loaded.servers == (inputs,)
    assert loaded.endpoints == {"pub": "192.0.2.1:1"}


def test_an_unreadable_state_file_is_ignored_without_showing_its_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = StateFile(tmp_path)
    assert state.load() is None
    state.path.write_text('{"format": 1, "servers": [{"bindings": "c2VjcmV0"}]}')
    assert state.load() is None
    assert "c2VjcmV0" not in caplog.text
    state.path.write_text("not json")
    assert state.load() is None
    assert state.remove()
    assert not state.remove()


def test_inputs_version_changes_with_any_object() -> None:
    base = ServerInputs(obj("s"), obj("k"), (obj("b1"), obj("b2")))
    assert base.version() == ServerInputs(obj("s"), obj("k"), (obj("b2"), obj("b1"))).version()
    assert base.version() != ServerInputs(obj("s"), obj("k"), (obj("b1"), obj("b2", "2"))).version()
    assert base.version() != ServerInputs(obj("s"), obj("k"), (obj("b1"),)).version()


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, {}, True),
        ({"gateway": "yes"}, {"gateway": "yes", "zone": "a"}, True),
        ({"gateway": "yes"}, {"gateway": "no"}, False),
        ({"gateway": "yes"}, {}, False),
    ],
)
def test_node_selection(selector: dict[str, str], labels: dict[str, str], expected: bool) -> None:
    assert selected({"spec": {"nodeSelector": selector}}, labels) is expected


def test_the_store_reports_what_a_relist_changed_and_keeps_its_index() -> None:
    store = Store(index=lambda o: ("team", o["metadata"]["labels"]["kvpn.dev/server"]))  # type: ignore[index]
    store.replace([trim(obj("a")), trim(obj("b"))])
    assert "managedFields" not in store.get(("team", "a"))["metadata"]  # type: ignore[index]
    changed = store.replace([trim(obj("a")), trim(obj("b", "2", server="other")), trim(obj("c"))])
    assert sorted(o["metadata"]["name"] for o in changed) == ["b", "c"]  # type: ignore[index]
    assert sorted(o["metadata"]["name"] for o in store.indexed(("team", "office"))) == ["a", "c"]  # type: ignore[index]
    gone = store.replace([])
    assert len(gone) == 3
    assert store.indexed(("team", "office")) == []


def test_run_is_the_default_command_and_namespaces_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "node-1")
    args = parse_args(["--namespace", "a", "--namespace", "b"])
    assert (args.command, args.node_name, args.namespace) == ("run", "node-1", ["a", "b"])
    assert (args.metrics_port, args.resync_seconds, args.state_dir) == (9586, 30.0, Path("/var/lib/kvpn"))
    assert parse_args(["cleanup", "--netns", "n"]).netns == "n"


def test_log_lines_carry_their_fields() -> None:
    record = logging.LogRecord("kvpn_agent.sync", logging.INFO, "", 0, "AddPeer", None, None)
    record.interface = "kvgw-0123456789"
    assert json.loads(JsonFormatter().format(record))["interface"] == "kvgw-0123456789"
    assert PlainFormatter().format(record).endswith("AddPeer interface=kvgw-0123456789")
