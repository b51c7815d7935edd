"""Kubernetes-convention status conditions: set one, keep lastTransitionTime unless the status flips."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, NamedTuple

from kvpn_core.api import Condition

READY = "Ready"
"""The condition type both kinds carry: whether the object does what its spec asks."""

# A VpnServer's discovery conditions: whether peers get the pod networks and cluster DNS. True when
# nothing is missing (found, or taken from the spec, or DNS switched off); False names what to set.
POD_NETWORK = "PodNetwork"
CLUSTER_DNS = "ClusterDNS"
GATEWAYS = "Gateways"
"""Whether some gateway node serves the server, naming the ones that do not and why."""

# The condition types the operator writes on a VpnServer; others (the agents' Dataplane) are kept as found.
SERVER_CONDITIONS = (READY, POD_NETWORK, CLUSTER_DNS, GATEWAYS)

CEILING = "Ceiling"
"""A VpnPeer's: whether its server's ceiling (spec.peerCeilings) cut its allowedDestinations, and what.

Absent while no ceiling holds the peer's namespace, so a server without ceilings changes nothing a user sees.
"""

# The condition types the operator writes on a VpnPeer; others (the agents' Dataplane) are kept as found.
PEER_CONDITIONS = (READY, CEILING)


class Reason(StrEnum):
    """Every condition and Event reason kvpn writes, operator's and agent's alike.

    The values are API: users and alerts match on them, so a value never changes once released.
    """

    # Ready, both kinds
    READY = "Ready"
    INVALID_NAME = "InvalidName"
    INVALID_SPEC = "InvalidSpec"
    # Ready, VpnServer
    POOL_OVERLAPS_ROUTES = "PoolOverlapsRoutes"
    ENDPOINT_PENDING = "EndpointPending"
    NO_ROUTES = "NoRoutes"
    NO_HEALTHY_GATEWAY = "NoHealthyGateway"
    """Also the Gateways condition's, when no gateway serves the server."""
    # Gateways, VpnServer; and each entry of status.gateways
    GATEWAYS_SERVING = "GatewaysServing"
    SERVING = "Serving"
    NOT_PROGRAMMED = "NotProgrammed"
    LEASE_EXPIRED = "LeaseExpired"
    NODE_NOT_FOUND = "NodeNotFound"
    # Ready, VpnPeer
    SERVER_NOT_FOUND = "ServerNotFound"
    SERVER_NOT_READY = "ServerNotReady"
    NAMESPACE_NOT_ALLOWED = "NamespaceNotAllowed"
    INVALID_PUBLIC_KEY = "InvalidPublicKey"
    DESTINATION_NOT_ROUTED = "DestinationNotRouted"
    SECRET_CONFLICT = "SecretConflict"  # noqa: S105 - a reason, not a password
    DISABLED = "Disabled"
    """Also ClusterDNS's reason when spec.dns.enabled is false."""
    EXPIRED = "Expired"
    POOL_EXHAUSTED = "PoolExhausted"
    ADDRESS_CONFLICT = "AddressConflict"
    """Also the agent's, for a binding whose address the server or an older binding holds."""
    ADDRESS_OUT_OF_POOL = "AddressOutOfPool"
    DUPLICATE_PUBLIC_KEY = "DuplicatePublicKey"
    """Also the agent's, for a binding whose key the server or an older binding holds."""
    SECRETS_NOT_GRANTED = "SecretsNotGranted"
    """The operator may not write Secrets in the peer's namespace (the chart's operator.secretNamespaces)."""
    OUTSIDE_CEILING = "OutsideCeiling"
    """Also the Ceiling condition's: the server's ceiling leaves nothing of what the peer asks for."""
    # Ceiling, VpnPeer
    WITHIN_CEILING = "WithinCeiling"
    CUT_BY_CEILING = "CutByCeiling"
    # PodNetwork, VpnServer
    POD_NETWORK_FOUND = "PodNetworkFound"
    """From the Nodes' pod CIDRs (spec.podNetwork.strategy NodePodCIDRs, or Auto when they hold the pods)."""
    POD_NETWORK_FROM_POD_IPS = "PodNetworkFromPodIPs"
    """Networks covering the pod IPs in use (strategy PodIPs, or Auto when the Nodes' pod CIDRs do not hold them)."""
    POD_NETWORK_FROM_SPEC = "PodNetworkFromSpec"
    """spec.podNetwork.cidrs (strategy Explicit)."""
    POD_LIST_FORBIDDEN = "PodListForbidden"
    """Pod IPs were needed but the operator may not list pods; and the Nodes' pod CIDRs do not stand in."""
    POD_NETWORK_NOT_FOUND = "PodNetworkNotFound"
    ROUTES_FROM_SPEC = "RoutesFromSpec"
    # ClusterDNS, VpnServer
    DNS_SERVICE_FOUND = "DNSServiceFound"
    DNS_SERVICE_NOT_FOUND = "DNSServiceNotFound"
    DNS_SERVICE_HAS_NO_CLUSTER_IP = "DNSServiceHasNoClusterIP"
    NAMESERVER_FROM_SPEC = "NameserverFromSpec"
    # Dataplane, written by the agents (kvpn_agent.condition_report, kvpn_agent.desired)
    SYNC_FAILED = "SyncFailed"
    KERNEL_WIREGUARD_FAILED = "KernelWireGuardFailed"
    SERVER_KEY_MISSING = "ServerKeyMissing"
    INVALID_SERVER_KEY = "InvalidServerKey"
    ADDRESS_OUTSIDE_POOL = "AddressOutsidePool"
    INVALID_BINDING = "InvalidBinding"
    DESTINATION_OUTSIDE_ROUTES = "DestinationOutsideRoutes"
    DESTINATION_OUTSIDE_CEILING = "DestinationOutsideCeiling"
    INVALID_PRESHARED_KEY = "InvalidPresharedKey"
    INVALID_ADDRESS = "InvalidAddress"


class Finding(NamedTuple):
    """A reason and the message that explains it: what a condition, an Event or a log line says, and why.

    Whatever carries one adds what it knows besides: an Outcome the condition's status, a PeerProblem the
    binding, an exception the fact that work stopped. A named tuple, so ``reason, message = finding`` reads
    as it always did.
    """

    reason: Reason
    message: str


@dataclass(frozen=True)
class Outcome:
    """The verdict of one reconcile on one condition (Ready, unless said otherwise): a status and its finding.

    `warning` marks outcomes a user must act on (a rejected input); they become Warning Events.
    """

    status: Literal["True", "False", "Unknown"]
    finding: Finding
    warning: bool = False

    @classmethod
    def ready(cls, reason: Reason, message: str) -> Outcome:
        return cls("True", Finding(reason, message))

    @classmethod
    def waiting(cls, reason: Reason, message: str) -> Outcome:
        return cls("False", Finding(reason, message))

    @classmethod
    def rejected(cls, reason: Reason, message: str) -> Outcome:
        return cls("False", Finding(reason, message), warning=True)

    @classmethod
    def missing(cls, reason: Reason, message: str) -> Outcome:
        """Something the cluster should provide is absent, and only a user can supply it."""
        return cls("False", Finding(reason, message), warning=True)


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
        reason=outcome.finding.reason,
        message=outcome.finding.message,
        last_transition_time=since.replace(microsecond=0),
        observed_generation=generation,
    )
    return [updated if c.type == type_ else c for c in conditions] if previous else [*conditions, updated]


def remove_condition(conditions: list[Condition], type_: str) -> list[Condition]:
    """The conditions without `type_`: for a condition that only means something while its cause is there."""
    return [c for c in conditions if c.type != type_]


def find(conditions: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def find_current(conditions: list[Condition], type_: str, generation: int | None) -> Condition | None:
    """The condition of type `type_`, if it was written for `generation`; None when absent or stale.

    A condition written for an older generation says nothing about the spec the object has now (tailscale's
    k8s-operator asks the same of its Ready conditions). One that records no generation, or an object that
    has none, cannot be judged stale, and counts as current.
    """
    found = find(conditions, type_)
    if found is None:
        return None
    if generation is not None and found.observed_generation is not None and found.observed_generation != generation:
        return None
    return found


def condition_of(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    """The current condition of type `type_` of a Kubernetes object as the API returns it (plain dicts).

    Checked against the object's metadata.generation, as `find_current` does; the condition stays a plain
    dict, so an entry another writer left incomplete does not fail the caller.
    """
    conditions = (obj.get("status") or {}).get("conditions") or []
    found: Mapping[str, Any] | None = next((c for c in conditions if c.get("type") == type_), None)
    if found is None:
        return None
    generation, observed = (obj.get("metadata") or {}).get("generation"), found.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return None
    return found


def is_ready(obj: Mapping[str, Any]) -> bool:
    """Whether the object's Ready condition is True and was written for its current generation."""
    ready = condition_of(obj, READY)
    return ready is not None and ready.get("status") == "True"
