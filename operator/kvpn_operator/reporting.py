"""Status and Event reporting shared by both kinds: write status only on change, say what changed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kvpn_operator.api import Condition
from kvpn_operator.conditions import READY, Outcome, find
from kvpn_operator.kube import ConflictError, Kube

Obj = dict[str, Any]


@dataclass(frozen=True)
class Report:
    """The verdict of a reconcile and whether it is news: an Event goes out only when Ready changes."""

    outcome: Outcome
    transition: bool

    @classmethod
    def of(cls, before: list[Condition], after: list[Condition], outcome: Outcome) -> Report:
        old, new = find(before, READY), find(after, READY)
        changed = (
            old is None or new is None or (old.status, old.reason, old.message) != (new.status, new.reason, new.message)
        )
        return cls(outcome, changed)


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


def _with_their_conditions(desired: Obj, current: Obj) -> Obj:
    """`desired` with the conditions of types the operator does not own taken from `current`.

    Others write conditions too (the agents' Dataplane): a list built from a stale copy must not
    undo what they wrote since.
    """
    if "conditions" not in desired:
        return desired
    ours = [c for c in desired["conditions"] or [] if c.get("type") == READY]
    theirs = [c for c in current.get("conditions") or [] if c.get("type") != READY]
    return {**desired, "conditions": ours + theirs}


def write_status(kube: Kube, status_path: str, obj: Obj, desired: Obj) -> bool:
    """Merge-patches the status fields in `desired` (None deletes one), unless they already hold.

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
            desired = _with_their_conditions(desired, obj.get("status") or {})
            continue
        return True
    raise ConflictError(409, f"status of {obj['metadata'].get('name')} kept changing under three attempts")
