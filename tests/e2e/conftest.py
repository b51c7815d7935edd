"""What a failed end-to-end test shows: the world's pods, WireGuard state and log tails, before teardown."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Generator, Iterator, Sequence

import pytest

from harness.world import World

REQUIRED = (
    "ip", "nft", "iptables", "wireguard-go", "wg", "wg-quick", "curl", "nsenter", "unshare",
    "containerd", "containerd-shim-runc-v2", "runc", "ctr", "buildah", "gcc",
)  # fmt: skip
PERMISSION_PROBLEMS = re.compile(r"forbidden|\(403\)", re.IGNORECASE)


@contextlib.contextmanager
def started_world(
    helm_values: Sequence[str] = (), namespaces: Sequence[str] = (), dual_stack: bool = False
) -> Iterator[World]:
    """A world for one test module (each module its own cluster); on a clean end, its pods' logs must show
    no traceback and no permission trouble."""
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, cgroups, TUN, nftables)", pytrace=False)
    if missing := [b for b in REQUIRED if shutil.which(b) is None]:
        pytest.fail(f"missing {', '.join(missing)}: run `make setup`", pytrace=False)
    made = World(helm_values=helm_values, namespaces=namespaces, dual_stack=dual_stack)
    made.start()
    print(f"world up in {made.timings['total']:.1f} s: {made.timings} {made.cluster.timings}")
    try:
        yield made
        folder = made.save_pod_logs()
        for log in sorted(folder.glob("*.log")):
            text = log.read_text(errors="replace")
            assert "Traceback" not in text, f"{log.name}:\n{text[-4000:]}"
            assert not PERMISSION_PROBLEMS.search(text), f"permission trouble in {log.name}:\n{text[-4000:]}"
    finally:
        made.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[FAILED] = report.failed


FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _diagnose_failures(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not request.node.stash.get(FAILED, False) or "world" not in request.fixturenames:
        return
    world = request.getfixturevalue("world")
    print(f"\n=== the world when {request.node.name} failed ===\n{world.diagnose()}")
