"""Address allocation over a server's pool: index layout, static requests, exhaustion, random histories."""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvpn_operator.ipam import AllocationError, Pool, choose_index


def allocate_all(pool: Pool) -> list[list[str]]:
    """Every peer's addresses, allocating until the pool is full, which must be after exactly capacity."""
    taken: set[int] = set()
    for _ in range(pool.capacity):
        taken.add(choose_index(pool, taken))
    with pytest.raises(AllocationError, match="is full") as error:
        choose_index(pool, taken)
    assert error.value.finding.reason == "PoolExhausted"
    return [pool.addresses(i) for i in sorted(taken)]


def test_slash_29_holds_exactly_five_peers() -> None:
    pool = Pool(["10.8.0.0/29"])
    assert pool.server_addresses() == ["10.8.0.1"]
    assert (pool.first_index, pool.last_index, pool.capacity) == (2, 6, 5)
    assert allocate_all(pool) == [["10.8.0.2"], ["10.8.0.3"], ["10.8.0.4"], ["10.8.0.5"], ["10.8.0.6"]]


def test_slash_30_holds_one_peer() -> None:
    assert allocate_all(Pool(["10.8.0.0/30"])) == [["10.8.0.2"]]


def test_dual_stack_peers_share_the_index_in_pool_order() -> None:
    pool = Pool(["fd00:8::/64", "10.8.0.0/24"])
    assert pool.server_addresses() == ["fd00:8::1", "10.8.0.1"]
    assert pool.addresses(2) == ["fd00:8::2", "10.8.0.2"]
    assert pool.addresses(254) == ["fd00:8::fe", "10.8.0.254"]
    assert pool.capacity == 253, "the IPv4 network is the smaller one"


def test_dual_stack_capacity_is_the_smaller_family() -> None:
    pool = Pool(["10.8.0.0/24", "fd00:8::/125"])
    assert (pool.last_index, pool.capacity) == (7, 6), "IPv6 has no broadcast: ::7 is a peer"
    assert allocate_all(pool)[-1] == ["10.8.0.7", "fd00:8::7"]


def test_ipv6_only_has_no_broadcast() -> None:
    pool = Pool(["fd00:8::/125"])
    assert pool.server_addresses() == ["fd00:8::1"]
    assert allocate_all(pool) == [[f"fd00:8::{i}"] for i in range(2, 8)]


def test_huge_ipv6_pool_is_capped() -> None:
    pool = Pool(["fd00:8::/64"])
    assert (pool.last_index, pool.capacity) == (2**20, 2**20 - 1)
    assert pool.addresses(pool.last_index) == ["fd00:8::10:0"]


@pytest.mark.parametrize("index", [0, 1, 7, -1])
def test_addresses_refuses_indexes_outside_the_peer_range(index: int) -> None:
    with pytest.raises(ValueError, match="outside the peer range"):
        Pool(["10.8.0.0/29"]).addresses(index)


POOL = Pool(["10.8.0.0/24", "fd00:8::/64"])


@pytest.mark.parametrize(
    ("address", "index"),
    [("10.8.0.2", 2), ("10.8.0.254", 254), ("fd00:8::2", 2), ("fd00:8::fe", 254), ("FD00:8::0:A", 10)],
)
def test_static_address_in_pool(address: str, index: int) -> None:
    assert choose_index(POOL, {3, 4}, address) == index


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("10.9.0.5", "address 10.9.0.5 is outside the pool 10.8.0.0/24, fd00:8::/64"),
        ("fd01::5", "address fd01::5 is outside the pool 10.8.0.0/24, fd00:8::/64"),
        ("10.8.0.0", "address 10.8.0.0 is the network address of 10.8.0.0/24, reserved"),
        ("fd00:8::", "address fd00:8:: is the network address of fd00:8::/64, reserved"),
        ("10.8.0.1", "address 10.8.0.1 is the server's own address"),
        ("fd00:8::1", "address fd00:8::1 is the server's own address"),
        ("10.8.0.255", "address 10.8.0.255 is the broadcast address of 10.8.0.0/24, reserved"),
        (
            "fd00:8::ff",
            "address fd00:8::ff is outside the peer addresses of fd00:8::/64, fd00:8::2 to fd00:8::fe",
        ),
        ("10.8.0.300", "'10.8.0.300' is not an IP address"),
        ("10.8.0.5/32", "'10.8.0.5/32' is not an IP address"),
    ],
)
def test_static_address_not_a_peer_address(address: str, message: str) -> None:
    with pytest.raises(AllocationError, match=f"^{message}") as error:
        choose_index(POOL, set(), address)
    assert error.value.finding.reason == "AddressOutOfPool"


def test_static_address_taken() -> None:
    with pytest.raises(AllocationError, match=r"^address fd00:8::5 is already taken") as error:
        choose_index(POOL, [2, 5], "fd00:8::5")
    assert error.value.finding.reason == "AddressConflict"


def test_static_address_may_take_an_index_above_the_lowest_free() -> None:
    assert choose_index(POOL, set(), "10.8.0.200") == 200
    assert choose_index(POOL, {200}) == 2


def test_lowest_free_index_fills_holes() -> None:
    assert choose_index(POOL, {2, 3, 5}) == 4


def test_exhaustion_names_the_pool_and_its_capacity() -> None:
    pool = Pool(["10.8.0.0/29"])
    with pytest.raises(AllocationError, match=r"^pool 10.8.0.0/29 is full: all 5 peer addresses are taken") as e:
        choose_index(pool, range(2, 7))
    assert e.value.finding.reason == "PoolExhausted"


def test_ten_thousand_taken_is_fast() -> None:
    pool = Pool(["10.8.0.0/16"])
    taken = list(range(2, 10_002))
    start = time.perf_counter()
    for _ in range(10):
        assert choose_index(pool, taken) == 10_002
    assert time.perf_counter() - start < 0.5


POOLS = st.one_of(
    st.builds(lambda p: [f"10.8.0.0/{p}"], st.integers(26, 30)),
    st.builds(lambda p: [f"fd00:8::/{p}"], st.integers(122, 126)),
    st.builds(lambda p, q: [f"10.8.0.0/{p}", f"fd00:8::/{q}"], st.integers(26, 30), st.integers(122, 126)),
)


class AllocateAndRelease(RuleBasedStateMachine):
    """Random histories of allocations (lowest free or static) and releases over a small pool."""

    pool: Pool

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[int, list[str]] = {}

    @initialize(cidrs=POOLS)
    def create_pool(self, cidrs: list[str]) -> None:
        self.pool = Pool(cidrs)

    @rule()
    def allocate(self) -> None:
        if len(self.held) == self.pool.capacity:
            with pytest.raises(AllocationError, match="is full"):
                choose_index(self.pool, self.held.keys())
            return
        index = choose_index(self.pool, self.held.keys())
        assert index not in self.held
        self.held[index] = self.pool.addresses(index)

    @rule(data=st.data())
    def request_static(self, data: st.DataObject) -> None:
        net = data.draw(st.sampled_from(self.pool.networks))
        offset = data.draw(st.integers(0, net.num_addresses - 1))
        address = str(net.network_address + offset)
        if not self.pool.first_index <= offset <= self.pool.last_index:
            expected: str | None = "AddressOutOfPool"
        elif offset in self.held:
            expected = "AddressConflict"
        else:
            expected = None
        try:
            index = choose_index(self.pool, self.held.keys(), address)
        except AllocationError as error:
            reason: str | None = error.finding.reason
        else:
            reason = None
            assert index == offset
            self.held[index] = self.pool.addresses(index)
        assert reason == expected

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        del self.held[data.draw(st.sampled_from(sorted(self.held)))]

    @invariant()
    def addresses_are_unique_peer_addresses_of_the_pool(self) -> None:
        addresses = [ipaddress.ip_address(a) for held in self.held.values() for a in held]
        assert len(addresses) == len(set(addresses)), "duplicate address"
        reserved = {ipaddress.ip_address(a) for a in self.pool.server_addresses()}
        for net in self.pool.networks:
            reserved |= {net.network_address, net.broadcast_address} if net.version == 4 else {net.network_address}
        for address in addresses:
            assert any(address in net for net in self.pool.networks), f"{address} outside the pool"
            assert address not in reserved, f"{address} is reserved"
        assert len(self.held) <= self.pool.capacity


TestAllocateAndRelease = AllocateAndRelease.TestCase
TestAllocateAndRelease.settings = settings(max_examples=200, stateful_step_count=60)


@given(POOLS, st.data())
def test_exhaustion_exactly_when_every_index_is_taken(cidrs: list[str], data: st.DataObject) -> None:
    pool = Pool(cidrs)
    indexes = range(pool.first_index, pool.last_index + 1)
    free = data.draw(st.sets(st.sampled_from(indexes), max_size=3))
    taken = set(indexes) - free
    if free:
        assert choose_index(pool, taken) == min(free)
    else:
        with pytest.raises(AllocationError, match="is full"):
            choose_index(pool, taken)
