"""The operator's command line: its kopf identity and its probe ports."""

from __future__ import annotations

import getpass
import os
import socket

import pytest

from kvpn_operator.main import identity, main, parse_args


def no_login_name() -> str:
    raise KeyError("getpwuid(): uid not found: 65532")  # what the image's uid gets


def test_identity_is_the_pod_name_from_the_downward_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getuser", no_login_name)
    assert identity({"POD_NAME": "kvpn-operator-5d4f8-x2x7q"}) == "kvpn-operator-5d4f8-x2x7q"


def test_identity_outside_a_pod_is_host_and_pid_never_the_login_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getuser", no_login_name)
    assert identity({}) == f"{socket.gethostname()}/{os.getpid()}"
    assert identity({"POD_NAME": ""}) == f"{socket.gethostname()}/{os.getpid()}"


def test_probe_ports_default_to_8080_and_8081() -> None:
    args = parse_args([])
    assert (args.liveness_port, args.readiness_port) == (8080, 8081)
    assert parse_args(["--readiness-port", "0"]).readiness_port == 0


def test_one_port_for_both_probes_is_refused() -> None:
    with pytest.raises(SystemExit, match="--readiness-port and --liveness-port are both 9000"):
        main(["--liveness-port", "9000", "--readiness-port", "9000"])
