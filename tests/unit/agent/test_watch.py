"""The watch store: what a relist changed, and its index."""

from __future__ import annotations

from kvpn_agent.watch import Store, trim
from tests.unit.fakes import labelled_secret


def test_the_store_reports_what_a_relist_changed_and_keeps_its_index() -> None:
    store = Store(index=lambda o: ("team", o["metadata"]["labels"]["kvpn.dev/server"]))  # type: ignore[index]
    store.replace([trim(labelled_secret("a")), trim(labelled_secret("b"))])
    assert "managedFields" not in store.get(("team", "a"))["metadata"]  # type: ignore[index]
    changed = store.replace(
        [trim(labelled_secret("a")), trim(labelled_secret("b", "2", server="other")), trim(labelled_secret("c"))]
    )
    assert sorted(o["metadata"]["name"] for o in changed) == ["b", "c"]  # type: ignore[index]
    assert sorted(o["metadata"]["name"] for o in store.indexed(("team", "office"))) == ["a", "c"]  # type: ignore[index]
    gone = store.replace([])
    assert len(gone) == 3
    assert store.indexed(("team", "office")) == []
