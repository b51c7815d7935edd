"""The agent's command line and log lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kvpn_agent.main import parse_args
from kvpn_core.logs import JsonFormatter, PlainFormatter


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
