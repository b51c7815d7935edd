"""`kvpn-agent wireguard-go` as a process, driven by the agent's client, with a stand-in wireguard-go binary.

The stand-in (harness/agent_process.py) opens <dir>/<interface>.sock and removes it on
SIGTERM, as wireguard-go does; the real one needs root and a TUN device, and is what
tests/dataplane runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.agent_process import SupervisorProcess, fake_wireguard_go
from kvpn_agent.processes import process_start_time
from kvpn_agent.supervisor_api import SupervisorClient, SupervisorError, SupervisorUnreachableError


class Supervisor(SupervisorProcess):
    """A supervisor running the stand-in wireguard-go; ``close`` also ends the orphans it left."""

    def __init__(self, tmp: Path, log: Path) -> None:
        self.tmp, self.uapi = tmp, tmp / "uapi"
        self.uapi.mkdir(exist_ok=True)
        args, env = fake_wireguard_go(tmp, self.uapi)
        super().__init__(tmp / "run" / "wireguard-go.sock", log, extra=args, env=env)
        self.orphans: list[int] = []

    @property
    def socket(self) -> Path:
        return self.socket_path

    def client(self) -> SupervisorClient:
        return SupervisorClient(self.socket_path, self.uapi, timeout=5)

    def kill(self) -> None:
        """SIGKILL to the supervisor alone: its children live on, as orphans."""
        assert self.popen is not None
        self.orphans += self.children()
        self.popen.kill()
        self.popen.wait(timeout=5)
        self.popen = None

    def close(self) -> None:
        if self.popen is not None:
            self.orphans += self.children()
        self.stop(signal.SIGKILL)
        for pid in self.orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait(condition: Callable[[], object], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def raw(path: Path, payload: bytes) -> bytes:
    """What the supervisor answers to bytes no client of ours would send."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionResetError):  # hung up on with our bytes unread: the reply may be lost
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[[], Supervisor]]:
    made: list[Supervisor] = []

    def factory() -> Supervisor:
        made.append(Supervisor(tmp_path, tmp_path / f"supervisor{len(made)}.log"))
        return made[-1]

    try:
        yield factory
    finally:
        for supervisor in made:
            supervisor.close()


@pytest.fixture
def supervisor(make: Callable[[], Supervisor]) -> Supervisor:
    made = make()
    made.start()
    return made


def test_start_is_idempotent_list_shows_pids_stop_ends_the_process(supervisor: Supervisor) -> None:
    client = supervisor.client()
    assert client.devices() == {}
    pid = client.start("kvt-a")
    assert (supervisor.uapi / "kvt-a.sock").is_socket()
    assert client.start("kvt-a") == pid  # running and answering: kept, not restarted
    other = client.start("kvt-b")
    assert client.devices() == {"kvt-a": pid, "kvt-b": other}
    assert client.stop("kvt-a") == pid
    assert process_start_time(pid) is None
    assert not (supervisor.uapi / "kvt-a.sock").exists()  # removed by the process on SIGTERM
    assert client.devices() == {"kvt-b": other}
    assert client.stop("kvt-a") is None  # nothing to stop: fine


def test_a_device_that_dies_leaves_the_list_and_a_start_replaces_it(supervisor: Supervisor) -> None:
    client = supervisor.client()
    pid = client.start("kvt-a")
    os.kill(pid, signal.SIGKILL)  # leaves its socket behind, as a killed wireguard-go does
    wait(lambda: "kvt-a" not in client.devices(), "the dead device to leave the list")
    replaced = client.start("kvt-a")  # over the stale socket
    assert replaced != pid
    assert client.devices() == {"kvt-a": replaced}
    wait(lambda: any(r.get("message") == "wireguard-go exited" for r in supervisor.records()), "the exit in the log")


def test_failures_come_back_as_text(supervisor: Supervisor) -> None:
    client = supervisor.client()
    with pytest.raises(SupervisorError, match="wireguard-go for kvt-fail exited with 3"):
        client.start("kvt-fail")
    with pytest.raises(SupervisorError, match=r"did not open its socket in 1\.0 s"):
        client.start("kvt-slow")
    assert client.devices() == {}  # the one that hung was ended


@pytest.mark.parametrize(
    "payload",
    [
        b'{"op": "start", "interface": "-h"}\n',
        b'{"op": "start", "interface": "a/../../b"}\n',
        b'{"op": "start", "interface": "kvt-a", "binary": "/bin/sh"}\n',
        b"rm -rf /\n",
        b"\x00\xff" * 10 + b"\n",
        b"x" * 100_000,  # no newline at all
        b'{"op": "list"',  # cut short
    ],
)
def test_bad_requests_are_refused_and_the_supervisor_carries_on(supervisor: Supervisor, payload: bytes) -> None:
    reply = raw(supervisor.socket, payload)
    if reply:  # no answer to a cut-short request (the client went away first), maybe none to a flood
        body = json.loads(reply.splitlines()[0])
        assert body["ok"] is False
        assert body["error"]
    assert list(supervisor.uapi.iterdir()) == []  # nothing was started
    assert supervisor.client().start("kvt-a") > 0
    assert supervisor.popen is not None
    assert supervisor.popen.poll() is None


def test_one_connection_may_carry_several_requests(supervisor: Supervisor) -> None:
    replies = raw(supervisor.socket, b'{"op":"start","interface":"kvt-a"}\n{"op":"bogus"}\n{"op":"list"}\n')
    started, refused, listed = (json.loads(line) for line in replies.splitlines())
    assert started["ok"]
    assert not refused["ok"]
    assert listed["devices"] == {"kvt-a": started["pid"]}


def test_a_stalled_client_does_not_hold_up_the_others(supervisor: Supervisor) -> None:
    with socket.socket(socket.AF_UNIX) as idle:
        idle.connect(str(supervisor.socket))
        idle.sendall(b'{"op": "li')  # and then nothing
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda i=i: results.append(supervisor.client().start(f"kvt-{i}")))  # type: ignore[misc]
            for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert len(set(results)) == 8
        assert len(supervisor.client().devices()) == 8


def test_nobody_listening_is_unreachable_and_the_socket_is_root_only(supervisor: Supervisor) -> None:
    with pytest.raises(SupervisorUnreachableError, match="No such file or directory"):
        SupervisorClient(supervisor.tmp / "nothing.sock").devices()
    assert supervisor.socket.stat().st_mode & 0o777 == 0o600
    assert supervisor.socket.parent.stat().st_mode & 0o777 == 0o700


def test_sigterm_ends_the_devices_and_the_socket(supervisor: Supervisor) -> None:
    client = supervisor.client()
    pid = client.start("kvt-a")
    assert supervisor.popen is not None
    supervisor.popen.send_signal(signal.SIGTERM)
    assert supervisor.popen.wait(timeout=10) == 0
    assert process_start_time(pid) is None
    assert not supervisor.socket.exists()
    assert list(supervisor.uapi.iterdir()) == []
    with pytest.raises(SupervisorUnreachableError):
        client.devices()


def test_a_second_supervisor_waits_for_the_first_then_adopts_its_orphans(
    make: Callable[[], Supervisor], supervisor: Supervisor
) -> None:
    pid = supervisor.client().start("kvt-a")
    second = make()
    second.start(wait=False)
    wait(
        lambda: any("waiting for it to go" in str(r.get("message")) for r in second.records()),
        "the second supervisor to wait",
    )
    assert supervisor.client().devices() == {"kvt-a": pid}  # still the first one's

    supervisor.kill()  # its socket stays behind, its device lives on
    wait(lambda: second.records()[-1].get("message") == "listening", "the second one to take over")
    client = second.client()
    assert client.devices() == {}  # it holds no state of its own ...
    assert client.start("kvt-a") == pid  # ... and adopts the running device instead of replacing it
    assert client.devices() == {"kvt-a": pid}
    os.kill(pid, signal.SIGKILL)
    wait(lambda: client.devices() == {}, "an adopted device's death to show")
