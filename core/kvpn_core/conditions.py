"""Kubernetes-convention status conditions: set one, keep lastTransitionTime unless the status flips."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from kvpn_core.api import Condition

READY = "Ready"

# A VpnServer's discovery conditions: whether peers get the pod networks and cluster DNS. True when
# nothing is missing (found, or taken from the spec, or DNS switched off); False names what to set.
POD_NETWORK = "PodNetwork"
POD_NETWORK_FOUND = "PodNetworkFound"
POD_NETWORK_NOT_FOUND = "PodNetworkNotFound"
ROUTES_FROM_SPEC = "RoutesFromSpec"

CLUSTER_DNS = "ClusterDNS"
DNS_SERVICE_FOUND = "DNSServiceFound"
DNS_SERVICE_NOT_FOUND = "DNSServiceNotFound"
DNS_SERVICE_HAS_NO_CLUSTER_IP = "DNSServiceHasNoClusterIP"
NAMESERVER_FROM_SPEC = "NameserverFromSpec"
DNS_DISABLED = "Disabled"

# The condition types the operator writes on a VpnServer; others (the agents' Dataplane) are kept as found.
SERVER_CONDITIONS = (READY, POD_NETWORK, CLUSTER_DNS)


@dataclass(frozen=True)
class Outcome:
    """The verdict of one reconcile on one condition (Ready, unless said otherwise): status, reason, message.

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

    @classmethod
    def missing(cls, reason: str, message: str) -> Outcome:
        """Something the cluster should provide is absent, and only a user can supply it."""
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
