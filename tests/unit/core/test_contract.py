"""The operator→agent contract: a peer binding survives the trip through a Secret; its name is the address claim."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from kvpn_core.api import AllowedDestination
from kvpn_core.contract import PeerBinding, binding_secret_name, encode_data
from kvpn_operator import builders

SERVER: dict[str, Any] = {
    "apiVersion": "kvpn.dev/v1alpha1",
    "kind": "VpnServer",
    "metadata": {"name": "office", "namespace": "vpn", "uid": "0b6f6c1e-3c7d-4a59-9d3e-2f1f7c8a9b01"},
}
PEER_PUBLIC = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
PRESHARED = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
# RFC 1123 subdomain, what Kubernetes requires of a Secret's name.
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
V4_POOL = ipaddress.ip_network("10.8.0.0/16")
V6_POOL = ipaddress.ip_network("fd00:8::/112")


def binding(**changes: Any) -> PeerBinding:
    base = PeerBinding(
        peer_namespace="dev",
        peer_name="alice",
        peer_uid="7d1c2a44-5e0f-4b8e-a0c2-6a9f4e3b2d10",
        public_key=PEER_PUBLIC,
        preshared_key=PRESHARED,
        addresses=["10.8.0.2"],
    )
    return base.model_copy(update=changes)


DESTINATIONS = [
    AllowedDestination.model_validate({"cidr": "10.96.0.10/32", "protocol": "UDP", "ports": [{"port": 53}]}),
    AllowedDestination.model_validate(
        {"cidr": "10.244.0.0/16", "protocol": "TCP", "ports": [{"port": 443}, {"port": 8000, "endPort": 8080}]}
    ),
    AllowedDestination.model_validate({"cidr": "fd00:10:96::/112"}),
]


@pytest.mark.parametrize(
    "original",
    [
        binding(),
        binding(preshared_key=None),
        binding(public_key=None, preshared_key=None),
        binding(enabled=False),
        binding(addresses=["10.8.0.2", "fd00:8::2"], allowed_destinations=DESTINATIONS),
        binding(preshared_key=None, allowed_destinations=DESTINATIONS[1:2]),
    ],
    ids=["psk", "no-psk", "no-keys", "disabled", "dual-stack-destinations", "ports-no-psk"],
)
def test_binding_round_trips_through_its_secret(original: PeerBinding) -> None:
    secret = builders.binding_secret(SERVER, original)
    assert PeerBinding.from_secret(secret) == original
    assert ("presharedKey" in secret["data"]) is (original.preshared_key is not None)


def test_binding_without_optional_keys_reads_with_defaults() -> None:
    """An older or hand-written binding: no enabled, no destinations, no keys."""
    secret = {"data": encode_data({"peerNamespace": "dev", "peerName": "bob", "peerUID": "u", "addresses": "10.8.0.3"})}
    read = PeerBinding.from_secret(secret)
    assert read.enabled
    assert read.allowed_destinations == []
    assert (read.public_key, read.preshared_key) == (None, None)


def test_binding_without_addresses_is_refused() -> None:
    with pytest.raises(ValidationError):
        PeerBinding.from_secret({"metadata": {"name": "x"}})


def test_binding_secret_is_named_after_the_first_address() -> None:
    secret = builders.binding_secret(SERVER, binding(addresses=["10.8.0.2", "fd00:8::2"]))
    assert secret["metadata"]["name"] == "kvpn-office-10-8-0-2"
    v6_first = builders.binding_secret(SERVER, binding(addresses=["fd00:8::2"]))
    assert v6_first["metadata"]["name"] == "kvpn-office-fd00-0008-0000-0000-0000-0000-0000-0002"


def is_dns_subdomain(name: str) -> bool:
    return len(name) <= 253 and DNS_SUBDOMAIN.match(name) is not None


addresses_v4 = st.integers(0, V4_POOL.num_addresses - 1).map(lambda i: str(V4_POOL.network_address + i))
addresses_v6 = st.integers(0, V6_POOL.num_addresses - 1).map(lambda i: str(V6_POOL.network_address + i))
addresses = addresses_v4 | addresses_v6


@given(address=addresses)
def test_binding_secret_name_is_a_dns_subdomain(address: str) -> None:
    assert is_dns_subdomain(binding_secret_name("office", address))


@given(st.lists(addresses, min_size=2, max_size=100, unique_by=ipaddress.ip_address))
def test_binding_secret_names_are_unique(distinct: list[str]) -> None:
    names = {binding_secret_name("office", a) for a in distinct}
    assert len(names) == len(distinct)


@given(address=addresses)
def test_binding_secret_name_gives_the_address_back(address: str) -> None:
    """The name decodes to its address, so no two addresses can share one (the claim is exact)."""
    host = binding_secret_name("office", address).removeprefix("kvpn-office-")
    parts = host.split("-")
    decoded = ":".join(parts) if len(parts) == 8 else ".".join(parts)
    assert ipaddress.ip_address(decoded) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("fd00:8::1:0", "fd00:8::1"),  # compressed forms that differ only in where '::' falls
        ("fd00:8::10", "fd00:8::1:0"),
        ("10.8.1.23", "10.8.12.3"),  # same digits, different octets
    ],
)
def test_binding_secret_names_do_not_collide_on_look_alikes(a: str, b: str) -> None:
    assert binding_secret_name("office", a) != binding_secret_name("office", b)


def test_binding_secret_name_spells_an_address_one_way() -> None:
    """Two spellings of one IPv6 address are one claim, or two peers could hold it."""
    assert binding_secret_name("office", "FD00:8:0::2") == binding_secret_name("office", "fd00:8::2")
