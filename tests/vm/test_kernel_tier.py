"""The kernel tier: every `vm`-marked dataplane test, run inside the guest with Debian 12's kernel.

On the host those tests are deselected (tests/conftest.py); this one test boots the guest and runs them
all there with real kernel WireGuard. Its output is pytest's own, from the guest (`make test-vm` shows it).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

from harness.vm import Kernel, Vm

# One boot (~5 s) plus the guest's pytest: its start alone is ~30 s (Python runs 10-20x slower there).
TIER_TIMEOUT = 1500.0
# hypothesis' pytest plugin costs ~17 s to import in the guest, and no dataplane test uses it.
# -rfEp: one line per test in the summary, which tests/vm/conftest.py copies into the host's (CI's log).
COMMAND = [
    "pytest", "-q", "-rfEp", "--durations=10", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
    "-m", "vm", "tests/dataplane",
]  # fmt: skip


def test_the_kernel_tier_passes_in_the_guest(kernel: Kernel, record_property: Callable[[str, object], None]) -> None:
    # Vm rather than run_in_vm (the same run) for the figures CI's log should carry.
    run = Vm(COMMAND, timeout=TIER_TIMEOUT, echo=sys.stdout, kernel=kernel).run()
    print(
        f"guest: boot {run.boot_seconds:.1f} s, pytest {run.command_seconds:.1f} s, "
        f"qemu peak {run.qemu_peak_bytes / 2**20:.0f} MiB"
    )
    record_property("guest_summary", guest_summary(run.output))  # tests/vm/conftest.py prints it
    summary = run.output.strip().splitlines()[-1] if run.output.strip() else ""
    assert run.status == 0, f"the guest's pytest exited {run.status}: {summary}"
    # An empty selection (no vm tests found) exits 5 and says "no tests ran": never a pass.
    assert re.search(r"\b[1-9]\d* passed\b", summary), summary


def guest_summary(output: str) -> str:
    """The guest pytest's durations and short summary (from its first `====` section on), or its last lines."""
    lines = output.rstrip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("====")), max(len(lines) - 40, 0))
    return "\n".join(lines[start:])
