"""The VM tier's runner (harness/vm.py): a guest command's status and output come back, a hang is
killed at the timeout, a crash fails with the console, a signal to the runner leaves nothing behind, the
guest has the kernel WireGuard this host lacks, and pytest runs inside it (tests/vm/test_guest.py: the
tools the kernel tier needs)."""

from __future__ import annotations

import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness.vm import FAILED_STATUS, REPO, STOP_GRACE_SECONDS, Kernel, Vm, VmTimeoutError, run_in_vm
from tests.vm import test_guest

BOOT_TIMEOUT = 180.0  # boots take 4-6 s here; a loaded CI machine gets slack


def qemu_processes(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (a run folder: qemu's 9p share names it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and b"qemu" in cmdline:
                found.append(int(proc.name))
    return found


def assert_nothing_left(vm: Vm) -> None:
    assert vm.run_dir is not None
    assert vm.pid is not None
    assert not vm.run_dir.exists(), f"{vm.run_dir} outlived the run"
    assert not Path(f"/proc/{vm.pid}").exists(), f"qemu ({vm.pid}) outlived the run"


def test_status_and_output_come_back(kernel: Kernel) -> None:
    vm = Vm(
        ["sh", "-c", 'echo "out KVPN_IN_VM=$KVPN_IN_VM uid=$(id -u) $(pwd) $(uname -r)"; echo err >&2'],
        timeout=BOOT_TIMEOUT,
        kernel=kernel,
    )
    run = vm.run()
    assert run.status == 0, run.output
    assert run.output == f"out KVPN_IN_VM=1 uid=0 {REPO} {kernel.release}\nerr\n"
    assert_nothing_left(vm)
    print(f"boot {run.boot_seconds:.1f} s, qemu peak {run.qemu_peak_bytes / 2**20:.0f} MiB")


def test_a_folder_under_var_tmp_is_the_hosts_in_the_guest(kernel: Kernel) -> None:
    """The guest's /tmp and /var/tmp are its own, but for the command's folder: a checkout there (a CI's
    clone) is the host's, read and written through the overlay."""
    with tempfile.TemporaryDirectory(prefix="kvpn-vm-cwd-", dir="/var/tmp") as folder:
        Path(folder, "marker").write_text("from the host\n")
        vm = Vm(
            ["sh", "-c", "cat marker && echo guest >written && ls /var/tmp"],
            timeout=BOOT_TIMEOUT,
            cwd=Path(folder),
            kernel=kernel,
        )
        run = vm.run()
        assert run.status == 0, run.output
        assert run.output == f"from the host\n{Path(folder).name}\n"  # and nothing else of the host's /var/tmp
        assert not Path(folder, "written").exists()  # nothing written back


def test_a_failing_status_comes_back() -> None:
    assert run_in_vm(["sh", "-c", "echo failing; exit 7"], timeout=BOOT_TIMEOUT) == (7, "failing\n")


def test_a_hang_is_killed_at_the_timeout(kernel: Kernel) -> None:
    timeout = 20.0
    vm = Vm(["sh", "-c", "echo sleeping; exec sleep 600"], timeout=timeout, kernel=kernel)
    began = time.monotonic()
    with pytest.raises(VmTimeoutError, match=r"still running after 20 s and was killed") as caught:
        vm.run()
    assert time.monotonic() - began < timeout + STOP_GRACE_SECONDS + 5
    message = str(caught.value)
    assert "last console lines:" in message
    assert "kvpn-vm: root ready" in message  # the guest's init reached its command
    assert message.endswith("last output lines:\nsleeping")
    assert_nothing_left(vm)


def test_a_crashed_guest_fails_with_its_console(kernel: Kernel) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "harness.vm", "--", "sh", "-c", "echo crashing; echo c >/proc/sysrq-trigger"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT,
        check=False,
    )
    assert proc.returncode == FAILED_STATUS, proc.stderr
    assert proc.stdout == "crashing\n"
    assert "stopped before the command finished" in proc.stderr
    assert "Kernel panic - not syncing: sysrq triggered crash" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_runner_leaves_nothing(kernel: Kernel, tmp_path: Path, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.vm", "--", "sh", "-c", "echo started; exec sleep 600"],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # the run folder goes there
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=BOOT_TIMEOUT), "the guest's command never started"
        assert proc.stdout.readline() == "started\n"
        assert qemu_processes(str(tmp_path)), "no qemu while the command runs"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=STOP_GRACE_SECONDS + 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {sig.name}" in err
    assert list(tmp_path.iterdir()) == []
    assert qemu_processes(str(tmp_path)) == []


def test_kernel_wireguard_is_in_the_guest_not_on_the_host(kernel: Kernel) -> None:
    # The host's side in a namespace of its own, so that nothing is added to the host's links.
    ns = f"kvt-vm-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        host = subprocess.run(
            ["ip", "-n", ns, "link", "add", "wg0", "type", "wireguard"], capture_output=True, text=True, check=False
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    # A host that has the module (a production node) loses only the contrast: the tier still runs.
    if host.returncode != 0:
        assert "Unknown device type" in host.stderr, host.stderr

    status, output = run_in_vm(
        ["sh", "-c", "ip link add wg0 type wireguard && ip -d link show wg0 && cat /sys/module/wireguard/version"],
        timeout=BOOT_TIMEOUT,
    )
    assert status == 0, output
    assert re.search(r"^\s+wireguard ", output, re.MULTILINE), output


def test_pytest_runs_in_the_guest_and_finds_its_tools(kernel: Kernel) -> None:
    """test_guest.py inside the guest: module loading, namespaces, veths, nft, wireguard-go, wg, the venv."""
    expected = len([name for name in dir(test_guest) if name.startswith("test_")])
    command = ["pytest", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-m", "vm", test_guest.__file__]
    status, output = run_in_vm(command, timeout=600, echo=sys.stdout)
    assert status == 0
    assert re.fullmatch(rf"{expected} passed in [\d.]+s( \(.+\))?", output.strip().splitlines()[-1])
