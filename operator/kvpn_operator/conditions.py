"""Kubernetes-convention status conditions: set one, keep lastTransitionTime unless the status flips."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from kvpn_operator.api import Condition

READY = "Ready"


@dataclass(frozen=True)
class Outcome:
    """The verdict of one reconcile: the Ready condition's status, reason and message.

    `warning` marks outcomes a user must act on (a rejected input); they become Warning Events.
    """

    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    warning: bool = False

    @classmethod
    def ready(cls, reason: str, message: str) -> Outcome:
        return cls("True", reason, message)

    @classmethod
    def waiting(cls, reason: str, message: str) -> Outcome:
        return cls("False", reason, message)

    @classmethod
    def rejected(cls, reason: str, message: str) -> Outcome:
        return cls("False", reason, message, warning=True)


def set_condition(
    conditions: list[Condition],
    *,
    type_: str,
    outcome: Outcome,
    generation: int | None,
    now: dt.datetime,
) -> list[Condition]:
    """The conditions with `type_` set from `outcome`.

    lastTransitionTime moves only when the status changes, so a reason or message update does not
    look like a flap (the convention cert-manager and the Kubernetes API follow).
    """
    previous = next((c for c in conditions if c.type == type_), None)
    since = previous.last_transition_time if previous and previous.status == outcome.status else now
    updated = Condition(
        type=type_,
        status=outcome.status,
        reason=outcome.reason,
        message=outcome.message,
        last_transition_time=since.replace(microsecond=0),
        observed_generation=generation,
    )
    return [updated if c.type == type_ else c for c in conditions] if previous else [*conditions, updated]


def find(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
