"""Runs one command inside a qemu guest with Debian 12's kernel and the host's root: the VM tier's runner.

The kernel has WireGuard, which this host's kernel lacks. hack/vm-kernel.sh prepares it once (the unpacked
package, a PVH vmlinux, an initramfs); each run boots it under software emulation (no KVM here) with the
host's `/` shared read-only over 9p under a tmpfs overlay, so the guest sees this checkout and its venv
and writes nothing back, and a second 9p share, a temporary folder, that carries the command in and its
output and exit status out. The guest has no network device: it only talks to itself.

    sudo .venv/bin/python -m harness.vm [--timeout S] [--memory M] [--console] -- COMMAND...

runs COMMAND as root in the repository folder with the venv first on PATH and KVPN_IN_VM=1, streams its
output (stdout and stderr, interleaved) as it comes, and exits with its status; 124 when the guest ran
past the timeout, 125 when it crashed or never reported (with the console's last lines). From Python:
`run_in_vm([...], timeout=...)` returns (status, output). Nothing outlives a run: qemu is killed and the
temporary folder removed on every path (a SIGKILLed runner takes qemu with it; its folder is swept by
the next run).
"""

from __future__ import annotations

import argparse
import codecs
import collections
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, TextIO

from harness.controlplane import cache_bin_dir, die_with_parent

REPO = Path(__file__).resolve().parents[1]
QEMU = "qemu-system-x86_64"
DEFAULT_TIMEOUT = 600.0
DEFAULT_MEMORY = "1G"
TIMEOUT_STATUS = 124  # as timeout(1)
FAILED_STATUS = 125  # the guest crashed or never reported
CONSOLE_LINES = 60  # a kernel panic with its stack trace
POLL_SECONDS = 0.1
STOP_GRACE_SECONDS = 3.0
RUN_PREFIX = "kvpn-vm-"
# Standard places for what tests drive (ip, nft, modprobe): sudo's PATH has them, a user's may not.
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


class VmError(RuntimeError):
    """The guest crashed, hung or never reported; the message names what happened and ends with the
    console's last lines."""


class VmTimeoutError(VmError):
    """The guest was still running at the timeout and was killed."""


@dataclass(frozen=True)
class Kernel:
    """What hack/vm-kernel.sh left in its folder."""

    release: str
    image: Path  # the PVH vmlinux when it booted there, else the compressed vmlinuz
    initramfs: Path
    modules: Path  # the unpacked lib/modules, bound on the guest's /lib/modules


@dataclass(frozen=True)
class GuestRun:
    status: int
    output: str
    boot_seconds: float  # qemu started → the command started
    command_seconds: float  # the command started → qemu exited
    qemu_peak_bytes: int  # qemu's peak resident memory


def vm_dir() -> Path:
    """${KVPN_CACHE:-~/.cache/kvpn}/vm, as hack/vm-kernel.sh uses it."""
    return cache_bin_dir().parent.parent / "vm"


def script_stamp(script: Path = REPO / "hack" / "vm-kernel.sh") -> str:
    """The digest hack/vm-kernel.sh writes to `ready`: its initramfs (the guest's init) is made from it."""
    return hashlib.sha256(script.read_bytes()).hexdigest()[:16]


def find_kernel(folder: Path | None = None) -> Kernel:
    """The prepared kernel, or a VmError that says to run `make setup`."""
    folder = folder or vm_dir()
    ready, initramfs = folder / "ready", folder / "initramfs.cpio"
    if not ready.is_file() or not initramfs.is_file():
        raise VmError(f"no guest kernel in {folder}: run `make setup` (hack/vm-kernel.sh)")
    if ready.read_text().strip() != script_stamp():
        raise VmError(f"{folder} was prepared by another version of hack/vm-kernel.sh: run `make setup`")
    if shutil.which(QEMU) is None:
        raise VmError(f"{QEMU} is missing: run `make setup` (Debian package qemu-system-x86)")
    vmlinux = folder / "vmlinux"
    image = vmlinux if vmlinux.is_file() else folder / "vmlinuz"
    return Kernel((folder / "release").read_text().strip(), image, initramfs, folder / "kernel" / "lib" / "modules")


def guest_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's whole environment in the guest: this venv first on PATH, root's HOME, KVPN_IN_VM=1,
    unbuffered Python (its output is a file there), and the host's KVPN_* settings."""
    path = [str(Path(sys.prefix) / "bin")] if sys.prefix != sys.base_prefix else []
    for entry in [*os.environ.get("PATH", "").split(os.pathsep), *SYSTEM_PATH]:
        if entry and entry not in path:
            path.append(entry)
    env = {k: v for k, v in os.environ.items() if k.startswith("KVPN_")}
    env |= {
        "PATH": os.pathsep.join(path),
        "HOME": "/root",
        "USER": "root",
        "LOGNAME": "root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONUNBUFFERED": "1",
        "KVPN_IN_VM": "1",
    }
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    return env | dict(extra or {})


def command_script(command: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """What the guest's init runs with `env -i /bin/sh`: the environment, the folder, then COMMAND."""
    exports = "".join(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(env.items()))
    return f"{exports}cd {shlex.quote(str(cwd))} || exit {FAILED_STATUS}\nexec {shlex.join(command)}\n"


def sweep_stale_runs(parent: Path) -> None:
    """Remove run folders whose runner is gone (SIGKILL leaves no chance to clean up)."""
    for folder in parent.glob(f"{RUN_PREFIX}*-*"):
        pid = folder.name.removeprefix(RUN_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            continue  # alive, someone else's


def _qemu_option(value: str) -> str:
    """A value inside qemu's comma-separated options: commas are doubled."""
    return value.replace(",", ",,")


class Vm:
    """One guest run: `Vm([...]).run()` boots, runs, reaps and cleans up; `run_dir` and `pid` stay set
    afterwards so a caller (a test) can check that both are gone."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        memory: str = DEFAULT_MEMORY,
        cwd: Path = REPO,
        env: Mapping[str, str] | None = None,
        echo: TextIO | None = None,
        console: TextIO | None = None,
        kernel: Kernel | None = None,
    ) -> None:
        if not command:
            raise ValueError("no command to run in the guest")
        self.command = list(command)
        self.timeout = timeout
        self.memory = memory
        self.cwd = cwd
        self.env = guest_env(env)
        self.echo = echo  # the command's output, live
        self.console = console  # the guest's console (kernel, init), live
        self.kernel = kernel
        self.run_dir: Path | None = None
        self.pid: int | None = None
        self._console_tail: collections.deque[str] = collections.deque(maxlen=CONSOLE_LINES)

    def argv(self, kernel: Kernel, run_dir: Path) -> list[str]:
        if any(c.isspace() for c in str(kernel.modules)):
            raise VmError(f"the kernel's folder {kernel.modules} has white space; set KVPN_CACHE elsewhere")
        if any(c.isspace() for c in str(self.cwd)):
            raise VmError(f"the guest cannot run in {self.cwd}: its path has white space")
        # kvpn.keep: the guest's /tmp and /var/tmp are fresh, but for this folder (a checkout may be there).
        cmdline = f"console=ttyS0 quiet panic=-1 mitigations=off kvpn.modules={kernel.modules} kvpn.keep={self.cwd}"
        return [
            QEMU,
            *("-accel", "tcg,tb-size=256", "-cpu", "max", "-m", self.memory, "-smp", "2"),
            *("-nographic", "-no-reboot", "-nodefaults", "-no-user-config", "-nic", "none", "-serial", "stdio"),
            *("-kernel", str(kernel.image), "-initrd", str(kernel.initramfs), "-append", cmdline),
            *("-fsdev", "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap"),
            *("-device", "virtio-9p-pci,fsdev=root,mount_tag=kvpnroot"),
            *("-fsdev", f"local,id=results,path={_qemu_option(str(run_dir))},security_model=none,multidevs=remap"),
            *("-device", "virtio-9p-pci,fsdev=results,mount_tag=kvpnresults"),
        ]

    def run(self) -> GuestRun:
        """Boot, run the command, return its status and output; VmError when the guest does not report."""
        kernel = self.kernel or find_kernel()
        parent = Path(tempfile.gettempdir())
        sweep_stale_runs(parent)
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=parent))
        proc: subprocess.Popen[bytes] | None = None
        try:
            (self.run_dir / "command").write_text(command_script(self.command, self.cwd, self.env))
            proc = subprocess.Popen(
                self.argv(kernel, self.run_dir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the runner, which stops qemu itself
                preexec_fn=die_with_parent(),  # noqa: PLW1509 -- async-signal-safe: one prctl call
            )
            self.pid = proc.pid
            assert proc.stdout is not None
            reader = threading.Thread(target=self._read_console, args=(proc.stdout,), daemon=True)
            reader.start()
            return self._supervise(proc, reader)
        finally:
            if proc is not None:
                _stop(proc)
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _read_console(self, stream: IO[bytes]) -> None:
        with contextlib.suppress(OSError, ValueError):  # closed under it by _stop
            for raw in stream:
                line = raw.decode(errors="replace").replace("\r", "").rstrip("\n")
                self._console_tail.append(line)
                if self.console is not None:
                    self.console.write(line + "\n")
                    self.console.flush()

    def _supervise(self, proc: subprocess.Popen[bytes], reader: threading.Thread) -> GuestRun:
        assert self.run_dir is not None
        output_path, started_path = self.run_dir / "output", self.run_dir / "started"
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        chunks: list[str] = []
        offset = 0
        began = time.monotonic()
        started: float | None = None
        peak = 0

        def drain() -> None:
            nonlocal offset
            with contextlib.suppress(FileNotFoundError), output_path.open("rb") as file:
                file.seek(offset)
                data = file.read()
                offset += len(data)
                if text := decoder.decode(data):
                    chunks.append(text)
                    if self.echo is not None:
                        self.echo.write(text)
                        self.echo.flush()

        while True:
            drain()
            if started is None and started_path.exists():
                started = time.monotonic()
            pid, wait_status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(wait_status)
                peak = usage.ru_maxrss * 1024
                break
            elapsed = time.monotonic() - began
            if elapsed > self.timeout:
                _stop(proc)
                reader.join(timeout=2)
                drain()
                what = f"was still running after {self.timeout:.0f} s and was killed"
                raise VmTimeoutError(self._failure(what, chunks))
            time.sleep(POLL_SECONDS)

        ended = time.monotonic()
        reader.join(timeout=2)
        drain()
        if (tail := decoder.decode(b"", final=True)) and self.echo is not None:
            self.echo.write(tail)
        output = "".join(chunks) + tail
        status_path = self.run_dir / "status"
        if not status_path.exists():
            what = "never started the command" if started is None else "stopped before the command finished"
            raise VmError(self._failure(f"{what} (qemu exited with {proc.returncode})", chunks))
        return GuestRun(
            status=int(status_path.read_text().strip()),
            output=output,
            boot_seconds=(started or ended) - began,
            command_seconds=ended - (started or ended),
            qemu_peak_bytes=peak,
        )

    def _failure(self, what: str, chunks: Sequence[str]) -> str:
        message = f"the guest ({shlex.join(self.command)}) {what}; last console lines:\n"
        message += "\n".join(self._console_tail) or "(none)"
        if output := "".join(chunks):
            message += "\nlast output lines:\n" + "\n".join(output.splitlines()[-CONSOLE_LINES:])
        return message


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to qemu's process group, SIGKILL after a grace period, reap, close its console; safe to
    call twice."""
    if proc.returncode is None:
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    if proc.stdout is not None:
        proc.stdout.close()


def run_in_vm(
    command: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    memory: str = DEFAULT_MEMORY,
    env: Mapping[str, str] | None = None,
    echo: TextIO | None = None,
) -> tuple[int, str]:
    """COMMAND's exit status and output (stdout and stderr interleaved) from a guest run in the
    repository folder; VmTimeoutError / VmError when the guest hangs past `timeout` or crashes. `echo`
    receives the output as it comes (pass sys.stdout for pytest's -s)."""
    run = Vm(command, timeout=timeout, memory=memory, env=env, echo=echo).run()
    return run.status, run.output


class _Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_signalled(signum: int, frame: FrameType | None) -> None:
    # The first one stops the run; a second must not interrupt the cleanup (at most a few seconds).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise _Signalled(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.vm",
        description="Run COMMAND as root in a qemu guest with Debian 12's kernel (real WireGuard), in "
        "the repository folder with this venv first on PATH and KVPN_IN_VM=1; exit with its status.",
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds, boot included (%(default)s)")
    parser.add_argument("--memory", default=DEFAULT_MEMORY, help="guest memory, as qemu's -m (%(default)s)")
    parser.add_argument("--console", action="store_true", help="also stream the guest's console to stderr")
    parser.add_argument("command", nargs="+", help="the command, after --")
    args = parser.parse_args(argv)
    # A background job inherits SIGINT ignored; SIGTERM and SIGHUP would skip the cleanup by default.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_signalled)
    vm = Vm(
        args.command,
        timeout=args.timeout,
        memory=args.memory,
        echo=sys.stdout,
        console=sys.stderr if args.console else None,
    )
    try:
        run = vm.run()
    except VmTimeoutError as error:
        print(f"kvpn-vm: {error}", file=sys.stderr)
        return TIMEOUT_STATUS
    except VmError as error:
        print(f"kvpn-vm: {error}", file=sys.stderr)
        return FAILED_STATUS
    except _Signalled as stop:
        print(f"kvpn-vm: stopped by {signal.Signals(stop.signum).name}; the guest is gone", file=sys.stderr)
        return 128 + stop.signum
    print(
        f"kvpn-vm: exit {run.status} (boot {run.boot_seconds:.1f} s, command {run.command_seconds:.1f} s, "
        f"qemu peak {run.qemu_peak_bytes / 2**20:.0f} MiB)",
        file=sys.stderr,
    )
    return run.status


if __name__ == "__main__":
    sys.exit(main())
