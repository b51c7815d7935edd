"""The node agent as a process, as its DaemonSet runs it: started, probed on /readyz, signalled, restarted."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from tests.support.controlplane import die_with_parent, free_port
from tests.support.kvpn import wait_for

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
            wait_for(f"{self.name} /readyz", self.ready, timeout=30)

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
            return error.code, ""
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
