"""The wireguard-go supervisor's protocol: strict requests (no argument ever reaches wireguard-go unchecked)."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpn_agent.desired import interface_name
from kvpn_agent.supervisor_api import (
    MAX_LINE,
    ProtocolError,
    Request,
    SupervisorError,
    encode_error,
    encode_reply,
    parse_reply,
    parse_request,
    valid_interface,
)

SAFE = set(string.ascii_letters + string.digits + "_.=+-")


@pytest.mark.parametrize(
    "name", [interface_name("team", "office"), "wg0", "kvt1234abcdn", "a", "x" * 15, "a.b_c=d+e-f"]
)
def test_interface_names_kvpn_and_wg_quick_use_are_accepted(name: str) -> None:
    assert valid_interface(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 16,  # IFNAMSIZ
        "-f",  # would be read as an option by wireguard-go
        "--version",
        ".",
        "..",
        "a/b",
        "../../etc",
        "a b",
        "a:1",
        "a\nb",
        "wg\x00",
        "kvpné",
        5,
        None,
        ["wg0"],
    ],
)
def test_anything_else_is_refused(name: object) -> None:
    with pytest.raises(ProtocolError, match="invalid interface name"):
        valid_interface(name)


@given(st.text(max_size=40))
def test_an_accepted_name_is_one_argument_and_one_file_name(name: str) -> None:
    try:
        valid_interface(name)
    except ProtocolError:
        return
    assert 1 <= len(name) <= 15
    assert not name.startswith("-")
    assert set(name) <= SAFE
    assert name not in (".", "..")


def test_requests_round_trip() -> None:
    for request in (Request("start", "kvgw-0123456789"), Request("stop", "wg0"), Request("list")):
        line = request.encode()
        assert line.endswith(b"\n")
        assert b"\n" not in line[:-1]
        assert parse_request(line.rstrip(b"\n")) == request


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        (b"", "not JSON"),
        (b"start kvgw-1", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'"list"', "not a JSON object"),
        (b"{}", "unknown op"),
        (b'{"op": "exec", "interface": "wg0"}', "unknown op 'exec'"),
        (b'{"op": ["start"]}', "unknown op"),
        (b'{"op": "start"}', "start needs an interface"),
        (b'{"op": "stop", "interface": "-h"}', "invalid interface name"),
        (b'{"op": "start", "interface": "wg0", "argv": ["-h"]}', "unexpected keys for start: argv"),
        (b'{"op": "list", "interface": "wg0"}', "unexpected keys for list: interface"),
        (json.dumps({"op": "list", "pad": "x" * MAX_LINE}).encode(), f"longer than {MAX_LINE}"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(line: bytes, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        parse_request(line)


@given(st.binary(max_size=200))
def test_no_input_raises_anything_but_a_protocol_error(line: bytes) -> None:
    try:
        request = parse_request(line)
    except ProtocolError:
        return
    assert request.op in ("start", "stop", "list")


def test_replies() -> None:
    assert parse_reply(encode_reply(pid=42)) == {"ok": True, "pid": 42}
    assert parse_reply(encode_reply(devices={"wg0": 7}))["devices"] == {"wg0": 7}
    with pytest.raises(SupervisorError, match="wireguard-go for wg0 exited with 1"):
        parse_reply(encode_error("wireguard-go for wg0 exited with 1"))
    for bad in (b"nonsense\n", b"[]\n", b'{"pid": 1}\n', b'{"ok": "yes"}\n'):
        with pytest.raises(ProtocolError):
            parse_reply(bad)
