"""The operator's readiness verdict: what makes it Ready, what the body says when it is not, what it costs."""

from __future__ import annotations

import http.client
from collections.abc import Callable, Collection
from typing import cast

import pytest

from kvpn_core.kube import ForbiddenError, Kube, KubeError, NotFoundError
from kvpn_operator.readiness import CACHE_SECONDS, MAX_NAMESPACES, Readiness, serve
from kvpn_operator.storage import KubeStorage
from tests.unit.fakes import Clock, FakeKube

WATCHED = {"vpnservers.kvpn.dev", "vpnpeers.kvpn.dev"}


def readiness(
    kube: FakeKube,
    *,
    started: bool = True,
    watching: Collection[str] = WATCHED,
    namespaces: Collection[str] | None = None,
    clock: Clock | None = None,
) -> Readiness:
    return Readiness(
        KubeStorage(cast(Kube, kube)),
        started=lambda: started,
        watching=lambda: watching,
        namespaces=lambda: namespaces,
        clock=clock or Clock(),
    )


def test_ready_when_started_watching_and_both_kinds_are_readable() -> None:
    kube = FakeKube()
    verdict = readiness(kube).verdict()
    assert verdict.ready
    assert verdict.body().splitlines() == [
        "[+]kopf ok: started, watching vpnservers.kvpn.dev, vpnpeers.kvpn.dev",
        "[+]vpnservers.kvpn.dev ok: listed in all namespaces",
        "[+]vpnpeers.kvpn.dev ok: listed in all namespaces",
        "readyz check passed",
    ]
    # Cheap: one object each, straight from etcd (a cached list would ignore the limit and return them all).
    assert kube.lists == [
        ("/apis/kvpn.dev/v1alpha1/vpnservers", {"label_selector": None, "cached": False, "limit": 1}),
        ("/apis/kvpn.dev/v1alpha1/vpnpeers", {"label_selector": None, "cached": False, "limit": 1}),
    ]


def test_not_ready_before_kopf_has_run_its_startup_handlers() -> None:
    verdict = readiness(FakeKube(), started=False).verdict()
    assert not verdict.ready
    assert "[-]kopf failed: kopf's startup handlers have not finished" in verdict.body()
    assert verdict.body().endswith("readyz check failed\n")


def test_not_ready_while_kopf_does_not_watch_a_kind() -> None:
    verdict = readiness(FakeKube(), watching={"vpnservers.kvpn.dev"}).verdict()
    assert not verdict.ready
    assert "[-]kopf failed: kopf does not watch vpnpeers.kvpn.dev" in verdict.body()


def test_missing_crd_names_the_kind_and_what_to_install() -> None:
    def answer(path: str) -> Exception | None:
        return NotFoundError(404, "the server could not find the requested resource") if "vpnpeers" in path else None

    body = readiness(FakeKube(errors=answer)).verdict().body()
    assert "[+]vpnservers.kvpn.dev ok" in body
    line = next(line for line in body.splitlines() if line.startswith("[-]vpnpeers.kvpn.dev"))
    assert "404" in line
    assert "CRD" in line
    assert "crds/" in line


def test_forbidden_names_the_namespace_and_rbac() -> None:
    def answer(path: str) -> Exception | None:
        if "/namespaces/team-b/" in path:
            return ForbiddenError(403, 'vpnservers.kvpn.dev is forbidden: User "op" cannot list resource "vpnservers"')
        return None

    verdict = readiness(FakeKube(errors=answer), namespaces={"team-a", "team-b"}).verdict()
    assert not verdict.ready
    line = next(line for line in verdict.body().splitlines() if line.startswith("[-]vpnservers.kvpn.dev"))
    assert "namespace team-b" in line
    assert "403" in line
    assert "RBAC" in line
    assert 'User "op"' in line  # the API server's own words name the identity to grant


def test_unreachable_api_server_stops_after_the_first_read() -> None:
    """Every further read would wait out its own timeout: one is enough to know."""
    kube = FakeKube()
    kube.down = True
    verdict = readiness(kube, namespaces={"a", "b", "c"}).verdict()
    assert not verdict.ready
    assert len(kube.lists) == 1
    assert "API server unreachable" in verdict.body()
    assert "[+]kopf ok" in verdict.body()  # it is not the operator's own machinery that fails


def test_an_unexpected_error_is_a_reason_not_a_crash() -> None:
    verdict = readiness(FakeKube(errors=lambda path: ValueError("bad certificate file"))).verdict()
    assert not verdict.ready
    assert "ValueError: bad certificate file" in verdict.body()


def test_namespaced_scope_reads_in_each_namespace_up_to_a_bound() -> None:
    kube = FakeKube()
    many = {f"team-{i:02d}" for i in range(MAX_NAMESPACES + 5)}
    verdict = readiness(kube, namespaces=many).verdict()
    assert verdict.ready
    paths = [p for p, _ in kube.lists]
    assert len(paths) == 2 * MAX_NAMESPACES
    assert paths[0] == "/apis/kvpn.dev/v1alpha1/namespaces/team-00/vpnservers"
    assert f"listed in {MAX_NAMESPACES} of {len(many)} namespaces" in verdict.body()


def test_namespaced_scope_with_no_namespace_yet_is_ready() -> None:
    """A glob that matches nothing yet: nothing to reconcile, nothing wrong."""
    kube = FakeKube()
    verdict = readiness(kube, namespaces=set()).verdict()
    assert verdict.ready
    assert (kube.gets, kube.lists) == ([], [])
    assert "no namespace in scope yet" in verdict.body()


def test_reads_are_cached_for_a_few_seconds() -> None:
    clock = Clock()
    kube = FakeKube()
    probe = readiness(kube, clock=clock)
    probe.verdict()
    clock.now += CACHE_SECONDS - 0.1
    probe.verdict()
    assert len(kube.lists) == 2
    clock.now += 0.2
    probe.verdict()
    assert len(kube.lists) == 4


def test_kopf_state_is_not_cached() -> None:
    """Reads are what cost; whether kopf runs is a lookup, and is answered fresh."""
    state = {"started": False}
    probe = Readiness(
        KubeStorage(cast(Kube, FakeKube())),
        started=lambda: state["started"],
        watching=lambda: WATCHED,
        namespaces=lambda: None,
        clock=Clock(),
    )
    assert not probe.verdict().ready
    state["started"] = True
    assert probe.verdict().ready


@pytest.mark.parametrize(("started", "status"), [(True, 200), (False, 503)])
def test_endpoint_answers_the_verdict(started: bool, status: int) -> None:
    server = serve(readiness(FakeKube(), started=started), host="127.0.0.1", port=0)
    try:
        port = server.server_address[1]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/readyz")
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == status
        assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
        assert body.endswith("readyz check passed\n" if started else "readyz check failed\n")
        connection.request("GET", "/elsewhere")
        other = connection.getresponse()
        other.read()
        assert other.status == 404
        connection.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_kind_served_but_not_watched_is_stalled_after_the_grace() -> None:
    clock = Clock()
    watched = {"vpnpeers.kvpn.dev"}
    probe = Readiness(
        KubeStorage(cast(Kube, FakeKube())),
        started=lambda: True,
        watching=lambda: watched,
        namespaces=lambda: None,
        clock=clock,
    )
    assert probe.stalled(grace=20) == []
    clock.now += 19
    assert probe.stalled(grace=20) == []
    clock.now += 1
    assert probe.stalled(grace=20) == ["vpnservers.kvpn.dev"]
    watched.add("vpnservers.kvpn.dev")  # kopf caught up: the clock starts again next time
    assert probe.stalled(grace=20) == []
    watched.discard("vpnservers.kvpn.dev")
    clock.now += 10
    assert probe.stalled(grace=20) == []


@pytest.mark.parametrize(
    ("answer", "started", "namespaces"),
    [
        (lambda path: NotFoundError(404, "not found"), True, None),  # no CRD: kopf is right not to watch
        (lambda path: KubeError(0, "API server unreachable"), True, None),  # a restart would not help
        (lambda path: None, False, None),  # kopf is still starting
        (lambda path: None, True, set()),  # nothing was read: unknown whether it is served
    ],
    ids=["no-crd", "unreachable", "starting", "nothing-read"],
)
def test_not_stalled_when_a_restart_would_not_help(
    answer: Callable[[str], Exception | None], started: bool, namespaces: set[str] | None
) -> None:
    clock = Clock()
    probe = readiness(FakeKube(errors=answer), started=started, watching=set(), namespaces=namespaces, clock=clock)
    probe.stalled(grace=20)
    clock.now += 60
    assert probe.stalled(grace=20) == []


def test_no_reads_for_the_stall_check_while_kopf_watches_both_kinds() -> None:
    kube = FakeKube()
    readiness(kube).stalled()
    assert (kube.gets, kube.lists) == ([], [])
