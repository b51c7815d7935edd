"""The VM tier's host side: root and slow, and a failure (never a skip) when qemu or the kernel is missing."""

from __future__ import annotations

import os

import pytest

from harness.vm import Kernel, VmError, find_kernel


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The guest's per-test summary (test_kernel_tier.py records it) in the host's, passed or not: CI's
    log shows what ran on the kernel."""
    for reports in list(terminalreporter.stats.values()):
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if name == "guest_summary":
                    terminalreporter.section("kernel WireGuard tier, in the guest")
                    terminalreporter.write_line(str(value))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.root)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def kernel() -> Kernel:
    """The guest kernel hack/vm-kernel.sh prepared; this tier never skips, CI must run it."""
    if os.environ.get("KVPN_IN_VM") == "1":
        pytest.fail("this test boots a guest: run it on the host", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the VM tier needs root (the guest reads the host's whole root)", pytrace=False)
    try:
        return find_kernel()
    except VmError as error:
        pytest.fail(str(error), pytrace=False)
