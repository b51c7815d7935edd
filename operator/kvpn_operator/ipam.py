"""Address allocation: map a server's pool to host indexes and choose a free one for a peer."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Sequence
from ipaddress import IPv4Network, IPv6Network

from kvpn_core.conditions import Finding, Reason

SERVER_INDEX = 1
FIRST_PEER_INDEX = 2
# A /64 holds 2**64 indexes. Capping the range keeps the lowest-free scan and the capacity reported to
# users at sizes that mean something, while staying far above the peers one WireGuard interface can
# carry.
MAX_INDEX = 2**20


class AllocationError(Exception):
    """An address cannot be allocated, and why: ``finding`` (PoolExhausted, AddressConflict, AddressOutOfPool).

    str(error) is the finding's message, for the user.
    """

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.message)
        self.finding = finding


class Pool:
    """A server's address pool: one network per IP family, addressed by a host index shared by all of them.

    Index i is network address + i in every family, so a dual-stack peer's addresses share one index.
    Index 0 (the network address) is reserved, index 1 is the server's, and in IPv4 the last address is
    the broadcast address.
    """

    def __init__(self, cidrs: Sequence[str]) -> None:
        self.networks: tuple[IPv4Network | IPv6Network, ...] = tuple(ipaddress.ip_network(c) for c in cidrs)
        self._last = min(*(_last_host_index(net) for net in self.networks), MAX_INDEX)

    def __str__(self) -> str:
        return ", ".join(str(net) for net in self.networks)

    @property
    def first_index(self) -> int:
        return FIRST_PEER_INDEX

    @property
    def last_index(self) -> int:
        return self._last

    @property
    def capacity(self) -> int:
        """Number of peer indexes."""
        return max(0, self.last_index - self.first_index + 1)

    def server_addresses(self) -> list[str]:
        return self._addresses(SERVER_INDEX)

    def addresses(self, index: int) -> list[str]:
        """A peer's addresses at index, one per family, in pool order."""
        if not self.first_index <= index <= self.last_index:
            raise ValueError(f"index {index} is outside the peer range [{self.first_index}, {self.last_index}]")
        return self._addresses(index)

    def index_of(self, address: str) -> int:
        """The peer index of address, or AllocationError(AddressOutOfPool) saying why it is not one."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise AllocationError(
                Finding(Reason.ADDRESS_OUT_OF_POOL, f"{address!r} is not an IP address (for example 10.8.0.10)")
            ) from None
        net = next((n for n in self.networks if ip in n), None)
        if net is None:
            raise AllocationError(Finding(Reason.ADDRESS_OUT_OF_POOL, f"address {ip} is outside the pool {self}"))
        index = int(ip) - int(net.network_address)
        if index == 0:
            raise AllocationError(
                Finding(Reason.ADDRESS_OUT_OF_POOL, f"address {ip} is the network address of {net}, reserved")
            )
        if index == SERVER_INDEX:
            raise AllocationError(Finding(Reason.ADDRESS_OUT_OF_POOL, f"address {ip} is the server's own address"))
        if net.version == 4 and ip == net.broadcast_address:
            raise AllocationError(
                Finding(Reason.ADDRESS_OUT_OF_POOL, f"address {ip} is the broadcast address of {net}, reserved")
            )
        if index > self.last_index:
            first = net.network_address + self.first_index
            last = net.network_address + self.last_index
            raise AllocationError(
                Finding(
                    Reason.ADDRESS_OUT_OF_POOL,
                    f"address {ip} is outside the peer addresses of {net}, {first} to {last}",
                )
            )
        return index

    def _addresses(self, index: int) -> list[str]:
        return [str(net.network_address + index) for net in self.networks]


def choose_index(pool: Pool, taken: Collection[int], requested: str | None = None) -> int:
    """The index of the requested address if it is free, else the lowest free index."""
    if requested is not None:
        index = pool.index_of(requested)
        if index in taken:
            raise AllocationError(
                Finding(Reason.ADDRESS_CONFLICT, f"address {requested} is already taken by another peer")
            )
        return index
    taken = set(taken)  # O(1) membership: the scan may test every index of a pool of 10,000 peers
    free = next((i for i in range(pool.first_index, pool.last_index + 1) if i not in taken), None)
    if free is None:
        raise AllocationError(
            Finding(Reason.POOL_EXHAUSTED, f"pool {pool} is full: all {pool.capacity} peer addresses are taken")
        )
    return free


def _last_host_index(net: IPv4Network | IPv6Network) -> int:
    # IPv6 has no broadcast address, so its last address is a host.
    return net.num_addresses - (2 if net.version == 4 else 1)
