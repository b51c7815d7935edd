"""The state file (the last good inputs, for a restart without the API server) and node selection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvpn_agent.state import ServerInputs, StateFile, selected
from tests.unit.fakes import labelled_secret


def test_the_state_file_is_private_and_survives_a_round_trip(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "kvpn")
    inputs = ServerInputs(
        {"metadata": {"namespace": "team", "name": "office"}}, labelled_secret("key"), (labelled_secret("b1"),)
    )
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
    base = ServerInputs(labelled_secret("s"), labelled_secret("k"), (labelled_secret("b1"), labelled_secret("b2")))
    assert (
        base.version()
        == ServerInputs(
            labelled_secret("s"), labelled_secret("k"), (labelled_secret("b2"), labelled_secret("b1"))
        ).version()
    )
    assert (
        base.version()
        != ServerInputs(
            labelled_secret("s"), labelled_secret("k"), (labelled_secret("b1"), labelled_secret("b2", "2"))
        ).version()
    )
    assert (
        base.version() != ServerInputs(labelled_secret("s"), labelled_secret("k"), (labelled_secret("b1"),)).version()
    )


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
