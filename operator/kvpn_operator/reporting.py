"""Status and Event reporting shared by both kinds: write status only on change, say what changed."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kvpn_core.api import Condition
from kvpn_core.conditions import READY, Outcome, find
from kvpn_core.kube import ConflictError, Kube

Obj = dict[str, Any]


@dataclass(frozen=True)
class Report:
    """The verdict of a reconcile and what of it is news, each an Event.

    Ready is news whenever it changes; another condition (`news`) only when its status does, or when it
    first appears as a problem: a gap is reported once, not at every resync, and so is its end.
    """

    outcome: Outcome
    transition: bool
    news: tuple[Outcome, ...] = ()

    @classmethod
    def of(
        cls,
        before: list[Condition],
        after: list[Condition],
        outcome: Outcome,
        others: Mapping[str, Outcome] | None = None,
    ) -> Report:
        old, new = find(before, READY), find(after, READY)
        changed = (
            old is None or new is None or (old.status, old.reason, old.message) != (new.status, new.reason, new.message)
        )
        news = tuple(o for type_, o in (others or {}).items() if _flipped(find(before, type_), o))
        return cls(outcome, changed, news)


def _flipped(old: Condition | None, new: Outcome) -> bool:
    return new.status != "True" if old is None else old.status != new.status


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad field the way the user wrote it (spec.addressPool[0]), and why."""
    parts = []
    for error in exc.errors()[:3]:
        loc = "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        parts.append(f"{loc}: {error['msg'].removeprefix('Value error, ')}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _same(current: Obj, desired: Obj) -> bool:
    return all(current.get(k) == v for k, v in desired.items())


def _with_their_conditions(desired: Obj, current: Obj, owned: Collection[str]) -> Obj:
    """`desired` with the conditions of types the operator does not own taken from `current`.

    Others write conditions too (the agents' Dataplane): a list built from a stale copy must not
    undo what they wrote since.
    """
    if "conditions" not in desired:
        return desired
    ours = [c for c in desired["conditions"] or [] if c.get("type") in owned]
    theirs = [c for c in current.get("conditions") or [] if c.get("type") not in owned]
    return {**desired, "conditions": ours + theirs}


def write_status(kube: Kube, status_path: str, obj: Obj, desired: Obj, *, owned: Collection[str] = (READY,)) -> bool:
    """Merge-patches the status fields in `desired` (None deletes one), unless they already hold.

    `owned` are the condition types the operator writes on this kind; the others are someone else's.

    The patch carries the resourceVersion it was computed from, so a reconcile working from a stale
    copy cannot overwrite a newer status: on conflict it reads the object again, keeps the conditions
    others wrote meanwhile, and compares again.
    """
    for _ in range(3):
        if _same(obj.get("status") or {}, desired):
            return False
        try:
            kube.merge_patch(
                status_path,
                {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "status": desired},
            )
        except ConflictError:
            fresh = kube.get(status_path.removesuffix("/status"))
            if fresh is None:
                return False
            obj = fresh
            desired = _with_their_conditions(desired, obj.get("status") or {}, owned)
            continue
        return True
    raise ConflictError(409, f"status of {obj['metadata'].get('name')} kept changing under three attempts")
