"""The kvpn.dev/v1alpha1 API: VpnServer and VpnPeer as pydantic models, the one source of the CRDs."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

GROUP = "kvpn.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# A WireGuard key: 32 bytes in base64, 44 characters; the last character before '=' carries only
# 4 significant bits, so only 16 letters are possible there.
PUBLIC_KEY_PATTERN = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$"
# host:port where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
ENDPOINT_PATTERN = r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):[0-9]{1,5}$"
DNS_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a network in CIDR notation (for example 10.8.0.0/24): {exc}") from exc
    return value


# Checked per item, so an error names the item: spec.routes[1].
Cidr = Annotated[str, AfterValidator(_check_cidr), Field(json_schema_extra={"format": "cidr"}, max_length=43)]
IPAddress = Annotated[str, Field(max_length=39)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Model(BaseModel):
    """Base of every API model: Kubernetes-style camelCase aliases, field docstrings as descriptions."""

    model_config = ConfigDict(
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="ignore",
        frozen=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The JSON form the API server stores: aliases, no unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ExposeType(StrEnum):
    LOAD_BALANCER = "LoadBalancer"
    NODE_PORT = "NodePort"
    HOST_PORT = "HostPort"
    API_SERVER = "ApiServer"


class Expose(Model):
    type: ExposeType = ExposeType.NODE_PORT
    """How laptops reach the gateways: a LoadBalancer or NodePort UDP Service, the node's port directly (HostPort), or only through the API server (ApiServer: `kubectl vpn up --via api` carries WireGuard over a port-forward to the chart's relay, for laptops that cannot send UDP). ApiServer has no Service and no endpoint: peers' configs carry no Endpoint line, and `kubectl vpn up` sets a local one."""

    node_port: Annotated[int, Field(ge=1, le=65535)] | None = Field(default=None, alias="nodePort")
    """Fixed node port for type NodePort (and LoadBalancer); chosen by Kubernetes when empty. Ignored with HostPort and ApiServer, which have no Service (with ApiServer, Ready's message says so)."""

    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations for the UDP Service, for example a cloud load balancer's settings. Ignored with HostPort and ApiServer, which have no Service (with ApiServer, Ready's message says so)."""

    endpoint: Annotated[str, Field(pattern=ENDPOINT_PATTERN, max_length=261)] | None = None
    """host:port that laptops dial, overriding discovery (for a DNS name or a port forward in front of the cluster). Ignored with ApiServer, where laptops dial no endpoint (Ready's message says so)."""


class Dns(Model):
    enabled: bool = True
    """Push cluster DNS to peers."""

    nameserver: IPAddress | None = None
    """DNS server for peers; default: the ClusterIP of the kube-dns Service in kube-system."""

    search: list[Annotated[str, Field(pattern=DNS_NAME_PATTERN, max_length=253)]] = Field(
        default_factory=list, max_length=6
    )
    """Search domains for peers; default: svc.<clusterDomain> and <clusterDomain>, so `curl http://api.payments` reaches Service api in namespace payments."""


class PortRange(Model):
    port: Port
    """A destination port, or the first of a range."""

    end_port: Port | None = Field(default=None, alias="endPort")
    """Last port of the range (inclusive)."""


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    ICMP = "ICMP"


class AllowedDestination(Model):
    cidr: Cidr
    """Network the peer may reach; must lie inside the server's routes."""

    protocol: Protocol | None = None
    """Only this protocol; any when empty (TCP and UDP when ports are given)."""

    ports: list[PortRange] = Field(default_factory=list, max_length=32)
    """Only these destination ports; all when empty."""


NamespaceOrAll = Annotated[str, Field(pattern=r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$", max_length=63)]
"""A namespace's name, or "*" for every namespace."""


class PeerCeiling(Model):
    namespaces: list[NamespaceOrAll] = Field(min_length=1)
    """The namespaces whose VpnPeers this ceiling holds ("*": every namespace that no ceiling names). A peer gets the first ceiling that names its namespace, else the first that names "*"."""

    destinations: list[AllowedDestination] = Field(min_length=1, max_length=64)
    """The most those peers may reach (networks, protocols, ports); the networks need not lie inside the routes. A peer reaches what lies both here and in its allowedDestinations (all of the routes when those are empty)."""


class PodNetworkStrategy(StrEnum):
    AUTO = "Auto"
    NODE_POD_CIDRS = "NodePodCIDRs"
    POD_IPS = "PodIPs"
    EXPLICIT = "Explicit"


class PodNetwork(Model):
    strategy: PodNetworkStrategy = PodNetworkStrategy.AUTO
    """How the pod networks pushed to peers are found. NodePodCIDRs: the Nodes' spec.podCIDRs, for CNIs that take pod addresses from them (kubenet, flannel, Cilium's kubernetes IPAM). PodIPs: the /16 around each IPv4 and the /64 around each IPv6 address of the pods in use (not on hostNetwork), merged, for CNIs that allocate elsewhere (Cilium cluster-pool, Calico IPAM, the AWS VPC CNI, Azure CNI); those networks may hold other hosts too (use Explicit to narrow them). Auto: the Nodes' pod CIDRs when every Node has one and they hold every pod IP in use, else PodIPs. Explicit: exactly cidrs. Auto and PodIPs list pods cluster-wide (the chart's ClusterRole allows it). Ignored when spec.routes is set. The PodNetwork condition says which strategy found what."""

    cidrs: list[Cidr] = Field(default_factory=list, max_length=32)
    """The pod networks, with strategy Explicit (and only then)."""

    @model_validator(mode="after")
    def _cidrs_only_when_explicit(self) -> PodNetwork:
        if self.strategy is PodNetworkStrategy.EXPLICIT and not self.cidrs:
            raise ValueError("strategy Explicit needs cidrs: the pod networks to push to peers")
        if self.strategy is not PodNetworkStrategy.EXPLICIT and self.cidrs:
            raise ValueError(
                f"cidrs are taken only with strategy Explicit (it is {self.strategy.value}): set strategy Explicit, "
                "or remove cidrs"
            )
        return self


class VpnServerSpec(Model):
    address_pool: list[Cidr] = Field(alias="addressPool", min_length=1, max_length=2)
    """Networks peers get their tunnel addresses from: one IPv4 network, optionally one IPv6 network. The server takes the first usable address of each."""

    listen_port: Port = Field(default=51820, alias="listenPort")
    """UDP port of the WireGuard interface on the gateway nodes."""

    expose: Expose = Field(default_factory=Expose)
    """How the server is reached from outside the cluster."""

    routes: list[Cidr] = Field(default_factory=list, max_length=64)
    """Networks pushed to peers as AllowedIPs (split tunnel); default: the cluster's Service and pod networks."""

    pod_network: PodNetwork = Field(default_factory=PodNetwork, alias="podNetwork")
    """How the pod networks among the default routes are found (spec.routes, when set, replaces them all)."""

    dns: Dns = Field(default_factory=Dns)
    """Cluster DNS pushed to peers."""

    masquerade: bool = True
    """Translate peer traffic to the gateway node's address, so cluster services need no route back to the pool."""

    mtu: Annotated[int, Field(ge=1280, le=9000)] = 1420
    """MTU of the tunnel interface, on the gateways and in peer configs."""

    persistent_keepalive: Annotated[int, Field(ge=0, le=65535)] = Field(default=25, alias="persistentKeepalive")
    """Seconds between keepalives sent by peers (0 turns them off); keeps NAT mappings open."""

    preshared_keys: bool = Field(default=True, alias="presharedKeys")
    """Give every peer a preshared key as well (an extra symmetric layer of WireGuard's handshake)."""

    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    """Labels of the nodes that act as gateways for this server; every agent node when empty."""

    peer_namespaces: list[NamespaceOrAll] = Field(default_factory=list, alias="peerNamespaces")
    """Namespaces whose VpnPeers may use this server ("*" for all); by default only the server's own."""

    peer_ceilings: list[PeerCeiling] = Field(default_factory=list, alias="peerCeilings", max_length=32)
    """The most the peers of a namespace may reach through this server, whatever their allowedDestinations ask: set by the server's owner, so a VpnPeer can only narrow it. A peer gets the first ceiling naming its namespace, else the first naming "*"; a peer whose namespace no ceiling names is limited only by the routes. The gateways let a peer reach what lies both in its ceiling and in its allowedDestinations (all of the routes when those are empty); DNS to the nameserver pushed to peers stays open. A peer left nothing is refused (Ready False, reason OutsideCeiling); one narrowed says what was cut in its Ceiling condition."""

    @field_validator("address_pool")
    @classmethod
    def _pool_networks(cls, value: list[str]) -> list[str]:
        nets = [ipaddress.ip_network(v) for v in value]
        if len({n.version for n in nets}) != len(nets):
            raise ValueError("addressPool takes at most one network per IP family")
        for net in nets:
            if net.num_addresses < 4:
                raise ValueError(f"addressPool {net} is too small: it needs room for the server and a peer")
        return value


class Condition(Model):
    type: str
    """Type of the condition, for example Ready."""

    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""

    reason: str
    """One CamelCase word a program can act on."""

    message: str = ""
    """What happened and what to do about it, for a person."""

    last_transition_time: AwareDatetime = Field(alias="lastTransitionTime")
    """When the status last changed."""

    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    """The metadata.generation this condition was computed from."""


class PeerCounts(Model):
    total: int = 0
    """VpnPeers that hold an address of this server."""

    ready: int = 0
    """Of those, the ones that are Ready."""


class GatewayStatus(Model):
    node: str
    """The gateway node."""

    ready: bool
    """Whether laptops are sent to it: its agent reports the server programmed, and keeps saying so."""

    reason: str
    """Why it is or is not ready, in one word (Serving, NotProgrammed, LeaseExpired, NodeNotFound)."""

    message: str = ""
    """The details."""

    endpoint: str | None = None
    """host:port on this node (NodePort, HostPort); none behind a load balancer, nor with ApiServer."""

    address: str | None = None
    """The node's own address on the cluster network (its InternalIP; its ExternalIP when it has none), where its WireGuard listens on spec.listenPort: where the in-cluster relay of `kubectl vpn up --via api` sends to."""


class VpnServerStatus(Model):
    public_key: str | None = Field(default=None, alias="publicKey")
    """The server's WireGuard public key."""

    endpoint: str | None = None
    """host:port laptops dial: the one in peers' configs. With NodePort or HostPort a healthy gateway's, kept
    while that gateway stays healthy. Unset with ApiServer: laptops reach the gateways through the API server."""

    endpoints: list[str] = Field(default_factory=list)
    """Every endpoint laptops may dial now: one per healthy gateway (NodePort, HostPort), else the one above; none with ApiServer."""

    gateways: list[GatewayStatus] = Field(default_factory=list)
    """Every gateway node that reported for this server, healthy or not, by name."""

    addresses: list[str] = Field(default_factory=list)
    """The server's own tunnel addresses, one per family of the pool, plain IPs without a prefix."""

    routes: list[str] = Field(default_factory=list)
    """The routes in effect (spec.routes or the discovered cluster networks)."""

    dns_nameserver: str | None = Field(default=None, alias="dnsNameserver")
    """The DNS server in effect for peers."""

    dns_search: list[str] = Field(default_factory=list, alias="dnsSearch")
    """The search domains in effect for peers."""

    peers: PeerCounts = Field(default_factory=PeerCounts)
    """Peer counts."""

    peer_count: int = Field(default=0, alias="peerCount")
    """Number of peers (same as peers.total; a flat field for the printer column)."""

    revision: str | None = None
    """Digest of everything a peer's config takes from this server; peers re-render when it changes."""

    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    """The metadata.generation this status was computed from."""

    conditions: list[Condition] = Field(default_factory=list)
    """Ready, with a reason."""


class ServerRef(Model):
    name: Annotated[str, Field(pattern=DNS_NAME_PATTERN, min_length=1, max_length=253)]
    """Name of the VpnServer."""

    namespace: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)] | None = None
    """Namespace of the VpnServer; the peer's own when empty."""


class VpnPeerSpec(Model):
    server_ref: ServerRef = Field(alias="serverRef")
    """The VpnServer this peer connects to."""

    public_key: Annotated[str, Field(pattern=PUBLIC_KEY_PATTERN)] | None = Field(default=None, alias="publicKey")
    """Bring your own key: the device's WireGuard public key. The private key then never exists in the cluster. When empty, kvpn generates a key pair and writes the private key only to the peer's config Secret."""

    address: IPAddress | None = None
    """A static tunnel address; must lie in the server's pool and be free. Allocated when empty."""

    allowed_destinations: list[AllowedDestination] = Field(
        default_factory=list, alias="allowedDestinations", max_length=64
    )
    """The only networks (and ports) this peer may reach, enforced by the gateways' firewall; all of the server's routes when empty."""

    disabled: bool = False
    """Switch the peer off without deleting it: its tunnel stops carrying traffic."""

    expires_at: AwareDatetime | None = Field(default=None, alias="expiresAt")
    """The peer is switched off at this time (RFC 3339)."""


class VpnPeerStatus(Model):
    address: str | None = None
    """The tunnel address (the first, when the server is dual-stack)."""

    addresses: list[str] = Field(default_factory=list)
    """Every tunnel address, one per family of the server's pool."""

    public_key: str | None = Field(default=None, alias="publicKey")
    """The peer's WireGuard public key."""

    config_secret_name: str | None = Field(default=None, alias="configSecretName")
    """Secret in the peer's namespace that holds wg0.conf."""

    server_revision: str | None = Field(default=None, alias="serverRevision")
    """The server revision the config was rendered from."""

    last_handshake: AwareDatetime | None = Field(default=None, alias="lastHandshake")
    """Latest handshake seen by any gateway."""

    endpoint: str | None = None
    """Where the peer's packets last came from, as seen by a gateway."""

    gateway: str | None = None
    """The gateway node of the latest handshake: the one the peer talks to now."""

    rx_bytes: int | None = Field(default=None, alias="rxBytes")
    """Bytes received from the peer."""

    tx_bytes: int | None = Field(default=None, alias="txBytes")
    """Bytes sent to the peer."""

    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    """The metadata.generation this status was computed from."""

    conditions: list[Condition] = Field(default_factory=list)
    """Ready, with a reason."""


class Kind(StrEnum):
    VPN_SERVER = "VpnServer"
    VPN_PEER = "VpnPeer"


PLURALS = {Kind.VPN_SERVER: "vpnservers", Kind.VPN_PEER: "vpnpeers"}
