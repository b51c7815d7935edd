"""The VpnServer's Ready verdict: still Ready when discovery left gaps, with the gaps in its message."""

from __future__ import annotations

from kvpn_core.api import VpnServerSpec
from kvpn_core.conditions import (
    CLUSTER_DNS,
    DNS_SERVICE_FOUND,
    DNS_SERVICE_NOT_FOUND,
    POD_NETWORK,
    POD_NETWORK_FOUND,
    POD_NETWORK_NOT_FOUND,
    Outcome,
)
from kvpn_operator.server import serving_outcome

SPEC = VpnServerSpec.model_validate({"addressPool": ["10.8.0.0/24"]})
FOUND = {POD_NETWORK: Outcome.ready(POD_NETWORK_FOUND, "p"), CLUSTER_DNS: Outcome.ready(DNS_SERVICE_FOUND, "d")}


def test_ready_with_everything_found() -> None:
    outcome = serving_outcome(SPEC, "vpn.example.com:51820", ["10.96.0.0/16", "10.244.0.0/16"], FOUND)
    assert (outcome.status, outcome.reason) == ("True", "Ready")
    assert outcome.message == "serving at vpn.example.com:51820, routes 10.96.0.0/16, 10.244.0.0/16"


def test_still_ready_without_pod_network_and_dns_but_says_what_peers_lack() -> None:
    gaps = {
        POD_NETWORK: Outcome.missing(POD_NETWORK_NOT_FOUND, "p"),
        CLUSTER_DNS: Outcome.missing(DNS_SERVICE_NOT_FOUND, "d"),
    }
    outcome = serving_outcome(SPEC, "vpn.example.com:51820", ["10.96.0.0/16"], gaps)
    assert (outcome.status, outcome.reason, outcome.warning) == ("True", "Ready", False)
    assert outcome.message == (
        "serving at vpn.example.com:51820, routes 10.96.0.0/16; peers reach no pod IPs (see condition PodNetwork); "
        "peers get no cluster DNS (see condition ClusterDNS)"
    )


def test_only_the_missing_one_is_named() -> None:
    gaps = {**FOUND, CLUSTER_DNS: Outcome.missing(DNS_SERVICE_NOT_FOUND, "d")}
    message = serving_outcome(SPEC, "vpn.example.com:51820", ["10.96.0.0/16", "10.244.0.0/16"], gaps).message
    assert "ClusterDNS" in message
    assert "PodNetwork" not in message


def test_no_routes_at_all_is_not_ready() -> None:
    outcome = serving_outcome(
        SPEC, "vpn.example.com:51820", [], {POD_NETWORK: Outcome.missing(POD_NETWORK_NOT_FOUND, "p")}
    )
    assert (outcome.status, outcome.reason, outcome.warning) == ("False", "NoRoutes", True)


def test_no_endpoint_yet_comes_first() -> None:
    outcome = serving_outcome(SPEC, None, [], {})
    assert (outcome.status, outcome.reason) == ("False", "EndpointPending")
