"""wireguard-go processes against a stand-in process (start, adopt, notice deaths), and IP forwarding against a
fake /proc/sys."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvpn_agent.netlink import enable_forwarding
from kvpn_agent.processes import WireGuardGo, WireGuardGoError, process_start_time

# Opens <dir>/<interface>.sock like wireguard-go and serves until terminated.
FAKE = """
import socket, sys, pathlib
path = pathlib.Path(sys.argv[1]) / (sys.argv[-1] + ".sock")
srv = socket.socket(socket.AF_UNIX); srv.bind(str(path)); srv.listen(4)
while True:
    srv.accept()[0].close()
"""


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[WireGuardGo]:
    script = tmp_path / "fake_wggo.py"
    script.write_text(FAKE)
    wggo = WireGuardGo(prefix=(sys.executable, str(script), str(tmp_path)), socket_dir=tmp_path, start_timeout=5)
    yield wggo
    wggo.stop_all()


def test_start_waits_for_the_socket_and_stop_ends_the_process(fake: WireGuardGo, tmp_path: Path) -> None:
    pid = fake.start("kvt0")
    assert fake.answers("kvt0")
    proc = fake.procs["kvt0"]
    assert proc.pid == pid
    assert fake.start("kvt0") == pid  # already serving: nothing happens
    assert fake.procs["kvt0"] is proc
    assert fake.devices() == {"kvt0": pid}
    assert fake.stop("kvt0") == pid
    assert proc.poll() is not None
    assert not fake.answers("kvt0")
    assert fake.devices() == {}


def test_a_death_shows_in_devices_once(fake: WireGuardGo) -> None:
    pid = fake.start("kvt0")
    os.kill(pid, signal.SIGKILL)
    fake.procs["kvt0"].wait(timeout=5)
    assert fake.reap() == {"kvt0": pid}
    assert fake.reap() == {}
    assert fake.devices() == {}


def test_a_running_device_is_adopted_not_replaced(fake: WireGuardGo, tmp_path: Path) -> None:
    """What a restarted agent (or supervisor, outside a pod) finds: a device someone else started."""
    pid = fake.start("kvt0")
    successor = WireGuardGo(prefix=fake.argv[:-2], socket_dir=tmp_path)
    assert successor.devices() == {}
    assert successor.start("kvt0") == pid
    assert successor.procs == {}
    assert successor.devices() == {"kvt0": pid}
    assert successor.stop("kvt0") == pid  # an adopted one is ended by its pid
    deadline = time.monotonic() + 5
    while process_start_time(pid) is not None and time.monotonic() < deadline:
        fake.reap()  # our child: reaped here, else it stays a zombie
        time.sleep(0.02)
    assert process_start_time(pid) is None
    assert successor.devices() == {}


def test_stop_ends_whatever_serves_the_interface(fake: WireGuardGo, tmp_path: Path) -> None:
    pid = fake.start("kvt0")
    stranger = WireGuardGo(socket_dir=tmp_path)
    assert stranger.stop("kvt0") == pid
    fake.procs["kvt0"].wait(timeout=5)
    assert stranger.stop("kvt0") is None


def test_a_stale_socket_is_replaced(fake: WireGuardGo, tmp_path: Path) -> None:
    (tmp_path / "kvt1.sock").write_text("")
    fake.start("kvt1")
    assert fake.answers("kvt1")


def test_a_process_that_dies_at_once_is_an_error(tmp_path: Path) -> None:
    wggo = WireGuardGo(prefix=(sys.executable, "-c", "raise SystemExit(3)"), socket_dir=tmp_path)
    with pytest.raises(WireGuardGoError, match="exited with 3"):
        wggo.start("kvt2")


def test_forwarding_is_written_only_when_off(tmp_path: Path) -> None:
    v4 = tmp_path / "net/ipv4/ip_forward"
    v6 = tmp_path / "net/ipv6/conf/all/forwarding"
    for path, value in ((v4, "0\n"), (v6, "1\n")):
        path.parent.mkdir(parents=True)
        path.write_text(value)
    assert enable_forwarding((4, 6), proc_sys=tmp_path) == [str(v4)]
    assert v4.read_text() == "1\n"
    assert enable_forwarding((4, 6), proc_sys=tmp_path) == []


def test_forwarding_that_cannot_be_written_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    v4 = tmp_path / "net/ipv4/ip_forward"
    v4.parent.mkdir(parents=True)
    v4.write_text("0\n")

    def read_only(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))  # what an unprivileged container sees

    monkeypatch.setattr(Path, "write_text", read_only)
    with caplog.at_level("ERROR"):
        assert enable_forwarding((4,), proc_sys=tmp_path) == []
    assert "set net.ipv4.ip_forward=1 on the node" in caplog.text
