"""The node agent as a process, as its DaemonSet runs it (started, probed on /readyz, signalled,
restarted), and its wireguard-go supervisor (`kvpn-agent wireguard-go`) as the other DaemonSet runs it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from harness.controlplane import die_with_parent, free_port
from harness.kvpn import wait_for

START_MARK = "--- start "


class AgentProcess:
    """`kvpn-agent run ...` (argv) with its metrics on a free loopback port; its log kept across restarts."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, *, name: str = "agent") -> None:
        self.argv, self.env, self.log_path, self.name = argv, env, log_path, name
        self.port = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        return [*self.argv, "--metrics-address", "127.0.0.1", "--metrics-port", str(self.port)]

    def start(self, wait_ready: bool = True) -> None:
        self.port = free_port()
        self._log = self.log_path.open("ab")
        # A JSON line, so `records` can tell the starts apart whatever the log format.
        self._log.write((json.dumps({"message": f"{START_MARK}{self.starts}"}) + "\n").encode())
        self._log.flush()
        self.starts += 1
        self.popen = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**self.env, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=die_with_parent(),  # noqa: PLW1509 -- one prctl call
        )
        if wait_ready:
            # A bound, not the measure: in the VM tier's emulated guest on a busy host a start with its
            # first full sync has taken over 30 s; what a test measures is the traffic meanwhile.
            wait_for(f"{self.name} /readyz", self.ready, timeout=60)

    def ready(self) -> bool:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
        return self.get("/readyz")[0] == 200

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read().decode(errors="replace")
        except OSError:
            return 0, ""

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signals the agent's process group (wireguard-go runs in sessions of its own and stays)."""
        popen, self.popen = self.popen, None
        if popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, sig)
            try:
                popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def records(self, start: int | None = None) -> list[dict[str, Any]]:
        """JSON log records, of the given start only (0 is the first)."""
        out: list[dict[str, Any]] = []
        current = -1
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"message": line}
            if str(record.get("message", "")).startswith(START_MARK):
                current = int(record["message"].split()[-1])
            elif start is None or current == start:
                out.append(record)
        return out

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:]) if self.log_path.exists() else ""


class SupervisorProcess:
    """`kvpn-agent wireguard-go --socket PATH` (after ``prefix``, e.g. ``ip netns exec NODE``).

    Its wireguard-go processes share its process group, as they share its container in a pod:
    ``kill`` ends them together, as a deleted pod does.
    """

    def __init__(
        self,
        socket_path: Path,
        log_path: Path,
        *,
        prefix: Sequence[str] = (),
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.socket_path, self.log_path = socket_path, log_path
        self.prefix, self.extra = list(prefix), list(extra)
        self.env = env if env is not None else dict(os.environ)
        self.popen: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [
            *self.prefix, sys.executable, "-m", "kvpn_agent.main", "wireguard-go",
            "--socket", str(self.socket_path), "--log-format", "json", *self.extra,
        ]  # fmt: skip

    def start(self, wait: bool = True) -> None:
        with self.log_path.open("ab") as out:
            self.popen = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=die_with_parent(),  # noqa: PLW1509 -- one prctl call
            )
        if wait:
            wait_for("the wireguard-go supervisor's socket", self.listening, timeout=15)

    def listening(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            raise AssertionError(f"the supervisor exited with {self.popen.returncode}:\n{self.log_tail()}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.socket_path))
            except OSError:
                return False
        return True

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def children(self) -> list[int]:
        """Its wireguard-go processes (and any other child)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM: it ends its wireguard-go itself. SIGKILL: to the whole group, like a deleted pod."""
        popen, self.popen = self.popen, None
        if popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                os.killpg(popen.pid, sig)
            else:
                popen.send_signal(sig)
        try:
            popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=10)
        if sig != signal.SIGKILL:  # whatever it left in its group goes too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines() if self.log_path.exists() else []:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:]) if self.log_path.exists() else ""


FAKE_WIREGUARD_GO = """#!{python}
# A stand-in for wireguard-go where the real one would need root and a TUN device: it opens
# $FAKE_WG_DIR/<interface>.sock and removes it on SIGTERM, as wireguard-go does.
import os, pathlib, signal, socket, sys
interface = sys.argv[-1]
assert sys.argv[1:] == ["-f", interface], sys.argv
if interface == "kvt-fail":
    sys.exit(3)
if interface == "kvt-slow":
    signal.pause()  # never opens its socket
path = pathlib.Path(os.environ["FAKE_WG_DIR"]) / (interface + ".sock")
srv = socket.socket(socket.AF_UNIX)
srv.bind(str(path))
srv.listen(8)
def stop(*_):
    path.unlink()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    srv.accept()[0].close()
"""


def fake_wireguard_go(folder: Path, uapi_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The supervisor arguments and environment that make it run the stand-in, with sockets in ``uapi_dir``."""
    binary = folder / "fake-wireguard-go"
    binary.write_text(FAKE_WIREGUARD_GO.format(python=sys.executable))
    binary.chmod(0o755)
    args = ["--binary", str(binary), "--uapi-dir", str(uapi_dir), "--start-timeout", "1"]
    return args, {**os.environ, "FAKE_WG_DIR": str(uapi_dir)}
