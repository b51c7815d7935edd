"""What a failed end-to-end test shows: the world's pods, WireGuard state and log tails, before teardown."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest


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
