"""Runs the real kvpn operator as a subprocess against a test control plane."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Self

from harness.controlplane import ControlPlane, die_with_parent, free_port, log_tail

HEALTHY_TIMEOUT = 30.0
STOP_GRACE_SECONDS = 10.0


class OperatorError(RuntimeError):
    """The operator did not become healthy; the message carries the log tail."""


class OperatorProcess:
    """`python -m kvpn_operator.main` with the control plane's KUBECONFIG.

    The log accumulates over restarts, so a check for tracebacks at the end covers every run.
    """

    def __init__(
        self,
        control_plane: ControlPlane,
        args: Sequence[str] = ("--all-namespaces",),
        log_path: Path | None = None,
    ) -> None:
        self.control_plane = control_plane
        self.args = tuple(args)
        self.log_path = log_path if log_path is not None else control_plane.run_dir / "operator.log"
        self.port = 0
        self.readiness_port = 0
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def healthz_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "kvpn_operator.main",
            *self.args,
            "--liveness-port",
            str(self.port),
            *([] if self._readiness_in_args() else ["--readiness-port", str(self.readiness_port)]),
            "--log-format",
            "plain",
        ]

    def _readiness_in_args(self) -> str | None:
        return next((a.split("=", 1)[1] for a in self.args if a.startswith("--readiness-port=")), None)

    def start(self) -> None:
        """Start the operator and return once /healthz answers 200."""
        if self.running:
            raise OperatorError("operator already running")
        # A fresh port each start: the previous one may still be in TIME_WAIT or taken meanwhile.
        self.port = free_port()
        # A readiness port of the test's choosing (in args) is kept; else a free one, not the default
        # 8081, which a second operator on this machine would find taken.
        given = self._readiness_in_args()
        self.readiness_port = int(given) if given else free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"--- kvpn test harness: starting {' '.join(self.command())}\n".encode())
        self._log.flush()
        self._popen = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**self.control_plane.env(), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=die_with_parent(),  # noqa: PLW1509 -- async-signal-safe: one prctl call
        )
        try:
            self._wait_healthy()
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if the operator has not exited after 10 s."""
        self._signal_and_reap(signal.SIGTERM, STOP_GRACE_SECONDS)

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to clean up (finalizers, peering stay behind)."""
        self._signal_and_reap(signal.SIGKILL, None)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        assert self._popen is not None
        deadline = time.monotonic() + HEALTHY_TIMEOUT
        while True:
            if self._popen.poll() is not None:
                raise OperatorError(
                    f"operator exited with {self._popen.returncode} before /healthz answered; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if _healthy(self.healthz_url):
                return
            if time.monotonic() > deadline:
                raise OperatorError(
                    f"operator /healthz not 200 after {HEALTHY_TIMEOUT:.0f}s; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def _signal_and_reap(self, sig: signal.Signals, grace: float | None) -> None:
        popen, self._popen = self._popen, None
        if popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, sig)
            try:
                popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 -- loopback URL
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False
