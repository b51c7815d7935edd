"""The operator→agent contract: the objects an agent watches to learn the desired state of a server.

An agent serving VpnServer ``S`` in namespace ``N`` watches, in ``N`` only:

1. the VpnServer ``S`` itself: listen port, MTU, masquerade, and from its status the server's tunnel
   addresses and the routes in effect;
2. the Secret ``kvpn-server-<S>`` (``SERVER_KEY_ROLE``): the server's private key;
3. the Secrets labelled ``kvpn.dev/server=<S>, kvpn.dev/role=peer``: one **peer binding** per peer
   (``PeerBinding``), named after the peer's address.

and reports back, per server it serves, a **gateway lease** (``GatewayReport``): a
coordination.k8s.io Lease in ``N`` named ``gateway_lease_name(S, node)``, renewed every
``GATEWAY_RENEW_SECONDS`` while the agent runs. The operator sends laptops only to gateways whose lease
is current and says the server is programmed: the server's Service endpoints, its status.endpoints, the
endpoint in peers' configs. A node that stops renewing (its network cut, the node down) is out once the
lease runs out; an agent that stops on purpose while its dataplane stays (a restart, an upgrade)
renews once for ``GATEWAY_HANDOVER_SECONDS`` (``GATEWAY_REPLACEMENT_SECONDS`` when its pod is being
deleted, and so replaced), so that its restart moves no laptop.

Why this shape:

- *Within a second.* Agents hold a watch on these objects (no mounted files, which kubelet refreshes
  only about once a minute); a peer change is one small object, so one watch event.
- *Ten thousand peers.* One Secret per peer (a few hundred bytes each) instead of one Secret for all
  peers, which the 1 MiB object limit would cap at a few thousand peers, and whose every change
  would rewrite and resend the whole list.
- *Least privilege.* Bindings live in the server's namespace, whatever namespace the VpnPeer is in,
  so an agent needs read access to Secrets of that namespace only. A binding carries the peer's public
  key and preshared key, never its private key (which lives only in the config Secret in the peer's
  namespace, or nowhere when the user brought their own key).
- *No duplicate addresses.* The binding's name is derived from the peer's address, so it is also the
  address claim: the API server refuses a second object of the same name with 409 Conflict, whatever
  the number of operators, threads or restarts racing for that address (invariant 1).
- *One key per server.* WireGuard tells peers of an interface apart by public key, so of a server's
  enabled bindings with one key the older (``binding_age``) holds it; the agents leave the others out,
  and the operator refuses their VpnPeers (``DuplicatePublicKey``) and removes their bindings, so that
  Ready says what the gateways do. Servers have an interface each: two servers' peers may share a key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field, TypeAdapter, ValidationError

from kvpn_core.api import AllowedDestination, Model

LABEL_SERVER = "kvpn.dev/server"
LABEL_ROLE = "kvpn.dev/role"
LABEL_PEER_UID = "kvpn.dev/peer-uid"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kvpn"
ANNOTATION_PEER = "kvpn.dev/peer"

# The data key of the server key Secret that holds the server's private key (base64, as `wg genkey`).
SERVER_KEY_DATA = "privateKey"

ROLE_PEER = "peer"
ROLE_SERVER_KEY = "server-key"
ROLE_PEER_CONFIG = "peer-config"
ROLE_GATEWAY = "gateway"

ANNOTATION_GATEWAY = "kvpn.dev/gateway"
"""On a gateway lease: the agent's GatewayReport, as JSON."""

GATEWAY_LEASE_SECONDS = 10
"""How long a gateway lease holds after its renewal: a node that went silent is out within this."""
GATEWAY_RENEW_SECONDS = 2.0
"""How often an agent renews its leases (and how soon a change of its verdict shows)."""
GATEWAY_HANDOVER_SECONDS = 60
"""The lease an agent leaves when it stops while the dataplane stays, for a cause it cannot tell apart (its
container restarted in place, or the node shutting down): a successor in place renews well within it."""
GATEWAY_REPLACEMENT_SECONDS = 180
"""The same when the agent's pod is being deleted (a rolling update, `kubectl delete pod`, an eviction):
the DaemonSet creates the successor on this node only once the kubelet has confirmed the deletion (up to
its one-minute container garbage collection, after the grace period), then pulls its image and starts
it. 60 s was measured to run out before the successor renewed; a node lost meanwhile keeps its laptops
this long."""

# Secret types (names of kinds of Secret, not secrets themselves).
SECRET_TYPE_BINDING = "kvpn.dev/peer-binding"  # noqa: S105
SECRET_TYPE_SERVER_KEY = "kvpn.dev/server-key"  # noqa: S105
SECRET_TYPE_PEER_CONFIG = "kvpn.dev/peer-config"  # noqa: S105

_destinations = TypeAdapter(list[AllowedDestination])


def server_key_secret_name(server: str) -> str:
    """Name of the Secret holding the server's private key, in the server's namespace."""
    return f"kvpn-server-{server}"


def binding_secret_name(server: str, address: str) -> str:
    """Name of a peer binding: the server and the peer's first address, written as a DNS label.

    IPv6 addresses are written out in full (eight groups) so that no two addresses of a server map
    to one name.
    """
    ip = ipaddress.ip_address(address)
    host = ip.exploded.replace(":", "-") if ip.version == 6 else str(ip).replace(".", "-")
    return f"kvpn-{server}-{host}"


def peer_config_secret_name(peer: str) -> str:
    """Name of the Secret holding a peer's wg0.conf, in the peer's namespace."""
    return f"kvpn-peer-{peer}"


def gateway_lease_name(server: str, node: str) -> str:
    """Name of the lease a gateway node holds for a server: kvpn-<server>.<node>, a DNS subdomain;
    hashed when a long node name would make it too long."""
    name = f"kvpn-{server}.{node}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:16]
    return f"kvpn-{server}.{node[: 253 - len(server) - 23]}-{digest}"


def gateway_selector(server: str) -> str:
    """Label selector of a server's gateway leases."""
    return f"{LABEL_SERVER}={server},{LABEL_ROLE}={ROLE_GATEWAY}"


class GatewayReport(Model):
    """What an agent says of one server on its node, in the gateway lease."""

    ready: bool
    """The server's interface is programmed as desired on this node."""

    message: str = ""
    """Why not, when not ready; what the agent does, when it hands over."""

    backend: str = ""
    """The WireGuard backend serving it (kernel, userspace)."""


@dataclass(frozen=True)
class GatewayLease:
    """A gateway lease as read back: who holds it, until when, and what it says."""

    server: str
    node: str
    renewed: dt.datetime | None
    expires: dt.datetime | None
    report: GatewayReport | None
    """None when the annotation is missing or unreadable."""

    def current(self, now: dt.datetime) -> bool:
        return self.expires is not None and now < self.expires


def read_gateway_lease(lease: Mapping[str, Any]) -> GatewayLease | None:
    """The lease's content, or None when it names no server or node: what the operator and the agents
    (who takes over a lost gateway) both judge a gateway by."""
    meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
    server, node = (meta.get("labels") or {}).get(LABEL_SERVER), spec.get("holderIdentity")
    if not server or not node:
        return None
    renewed = _micro_time(spec.get("renewTime"))
    duration = spec.get("leaseDurationSeconds")
    expires = renewed + dt.timedelta(seconds=duration) if renewed and isinstance(duration, int) else None
    try:
        report: GatewayReport | None = GatewayReport.model_validate_json(
            (meta.get("annotations") or {}).get(ANNOTATION_GATEWAY) or ""
        )
    except ValidationError:
        report = None
    return GatewayLease(str(server), str(node), renewed, expires, report)


def _micro_time(value: Any) -> dt.datetime | None:
    """A Kubernetes Time or MicroTime ("2026-12-01T16:40:00.123456Z"), None when absent or unreadable."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def binding_selector(server: str) -> str:
    """Label selector an agent (and the operator) use to list a server's peer bindings."""
    return f"{LABEL_SERVER}={server},{LABEL_ROLE}={ROLE_PEER}"


def binding_age(secret: Mapping[str, Any]) -> tuple[str, str]:
    """What orders bindings (creation time, then name): older ones win a conflict, so a newcomer
    cannot push out a working peer.

    The agents judge a server's bindings in this order, and the operator judges a peer's claim on a
    public key by it too, so the peer it calls Ready is the one the gateways serve.
    """
    meta = secret.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))


class PeerBinding(Model):
    """A peer as an agent sees it: everything needed to program the dataplane, nothing more."""

    peer_namespace: str = Field(alias="peerNamespace")
    """Namespace of the VpnPeer (for status reports and metric labels)."""

    peer_name: str = Field(alias="peerName")
    """Name of the VpnPeer."""

    peer_uid: str = Field(alias="peerUID")
    """UID of the VpnPeer that holds this binding; the address claim belongs to it."""

    public_key: str | None = Field(default=None, alias="publicKey")
    """The peer's public key; empty while the key is still being set up (the agent skips such peers)."""

    preshared_key: str | None = Field(default=None, alias="presharedKey", repr=False)
    """The peer's preshared key, if the server uses them."""

    addresses: list[str] = Field(min_length=1)
    """The peer's tunnel addresses, plain IPs without a prefix; the agent allows exactly these as the peer's source."""

    enabled: bool = True
    """False while the peer is disabled or expired: the agent removes it from the interface."""

    allowed_destinations: list[AllowedDestination] = Field(default_factory=list, alias="allowedDestinations")
    """The only destinations the peer may reach; the server's routes when empty."""

    def secret_name(self, server: str) -> str:
        return binding_secret_name(server, self.addresses[0])

    def to_string_data(self) -> dict[str, str]:
        """The binding as Secret data (decoded): one key per field, destinations as JSON."""
        data = {
            "peerNamespace": self.peer_namespace,
            "peerName": self.peer_name,
            "peerUID": self.peer_uid,
            "addresses": ",".join(self.addresses),
            "enabled": "true" if self.enabled else "false",
            "allowedDestinations": json.dumps(
                [d.to_api() for d in self.allowed_destinations], separators=(",", ":"), sort_keys=True
            ),
        }
        if self.public_key:
            data["publicKey"] = self.public_key
        if self.preshared_key:
            data["presharedKey"] = self.preshared_key
        return data

    @classmethod
    def from_secret(cls, secret: dict[str, Any]) -> PeerBinding:
        """Reads a binding back from a Secret as the API returns it (base64 data)."""
        raw = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        return cls.model_validate(
            {
                "peerNamespace": raw.get("peerNamespace", ""),
                "peerName": raw.get("peerName", ""),
                "peerUID": raw.get("peerUID", ""),
                "publicKey": raw.get("publicKey") or None,
                "presharedKey": raw.get("presharedKey") or None,
                "addresses": [a for a in raw.get("addresses", "").split(",") if a],
                "enabled": raw.get("enabled", "true") == "true",
                "allowedDestinations": _destinations.validate_json(raw.get("allowedDestinations") or "[]"),
            }
        )


def encode_data(string_data: dict[str, str]) -> dict[str, str]:
    """Secret ``data`` (base64) from decoded strings, so objects compare equal to what the API returns."""
    return {k: base64.b64encode(v.encode()).decode() for k, v in string_data.items()}
