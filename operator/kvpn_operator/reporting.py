"""What a reconcile reports, shared by both kinds: which of its verdicts are news, and refusals in the user's words."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from kvpn_core.api import Condition
from kvpn_core.conditions import READY, Outcome, find


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
