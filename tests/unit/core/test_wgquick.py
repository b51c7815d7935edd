"""The client's wg0.conf: golden files, and the real wg-quick and wg reading what we render."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.wgfiles import assert_only_app_keys
from kvpn_core.wgquick import ClientConfig, for_apps, render_client_config

GOLDEN = Path(__file__).parent / "golden"

# RFC 7748 section 6.1 key pairs: Alice is the device, Bob the server.
DEVICE_PRIVATE = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo="
DEVICE_PUBLIC = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="
SERVER_PUBLIC = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08="
PRESHARED = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def config(**changes: Any) -> ClientConfig:
    base = ClientConfig(
        private_key=DEVICE_PRIVATE,
        public_key=DEVICE_PUBLIC,
        addresses=["10.8.0.2"],
        dns_servers=["10.96.0.10"],
        dns_search=["dev.svc.cluster.local", "svc.cluster.local", "cluster.local"],
        mtu=1420,
        server_public_key=SERVER_PUBLIC,
        preshared_key=PRESHARED,
        endpoint="203.0.113.10:51820",
        allowed_ips=["10.96.0.0/12", "10.244.0.0/16"],
        persistent_keepalive=25,
        name="dev/alice",
    )
    return base.model_copy(update=changes)


CASES = {
    "generated_key_ipv4": config(),
    "bring_your_own_key": config(private_key=None, preshared_key=None),
    "dual_stack": config(
        addresses=["10.8.0.2", "fd00:8::2"],
        dns_servers=["fd00:96::a"],
        allowed_ips=["10.96.0.0/12", "fd00:96::/112", "10.244.0.0/16"],
        endpoint="[2001:db8::1]:51820",
    ),
    "no_dns": config(dns_servers=[], dns_search=[], mtu=None),
    "keepalive_0": config(persistent_keepalive=0),
    # A server of expose type ApiServer: `kubectl vpn up --via api` sets a local Endpoint.
    "no_endpoint": config(endpoint=""),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_golden_file(case: str) -> None:
    assert render_client_config(CASES[case]) == (GOLDEN / f"{case}.conf").read_text()


def test_without_an_endpoint_there_is_no_endpoint_line_and_the_header_says_how_to_connect() -> None:
    rendered = render_client_config(CASES["no_endpoint"])
    assert "Endpoint" not in rendered
    first = rendered.splitlines()[0]
    assert first == "# kvpn: WireGuard tunnel of VpnPeer dev/alice through the API server (`kubectl vpn up --via api`)"
    # `kubectl vpn` finds the VpnPeer in the header by its name and the space after it.
    header = re.match(r"^# kvpn: WireGuard tunnel of VpnPeer (?P<namespace>[^/\s]+)/(?P<name>\S+) ", first)
    assert header is not None
    assert (header["namespace"], header["name"]) == ("dev", "alice")


def test_bring_your_own_key_tells_the_user_which_private_key_to_add() -> None:
    rendered = render_client_config(CASES["bring_your_own_key"])
    assert "\nPrivateKey" not in rendered
    assert f"# PrivateKey = <add the private key that matches public key {DEVICE_PUBLIC}>" in rendered


@pytest.mark.parametrize(
    ("dns_servers", "allowed_ips", "expected"),
    [
        (["10.96.0.10"], ["10.96.0.0/12"], "10.96.0.0/12"),
        (["10.96.0.10"], ["10.244.0.0/16"], "10.244.0.0/16, 10.96.0.10/32"),
        (["fd00::a", "10.96.0.10"], [], "fd00::a/128, 10.96.0.10/32"),
        (["10.96.0.10", "10.96.0.10"], ["10.0.0.0/8", "10.0.0.0/8", "fd00::/8"], "10.0.0.0/8, fd00::/8"),
        (["10.96.0.10"], ["10.96.0.10/32", "0.0.0.0/0"], "10.96.0.10/32, 0.0.0.0/0"),
    ],
)
def test_allowed_ips_add_uncovered_dns_servers(dns_servers: list[str], allowed_ips: list[str], expected: str) -> None:
    rendered = render_client_config(config(dns_servers=dns_servers, allowed_ips=allowed_ips))
    assert f"\nAllowedIPs = {expected}\n" in rendered


def sections(text: str) -> dict[str, dict[str, str]]:
    """wg's config grammar, enough for these files: [Section] headers, Key = value lines, # comments."""
    parsed: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            current = parsed.setdefault(line, {})
        elif line:
            key, value = (part.strip() for part in line.split("=", 1))
            current[key] = value
    return parsed


@pytest.mark.parametrize("case", CASES)
def test_wg_quick_strip_leaves_what_wg_reads(case: str, tmp_path: Path) -> None:
    cfg = CASES[case]
    path = tmp_path / "wg0.conf"
    path.write_text(render_client_config(cfg))
    path.chmod(0o600)  # else wg-quick warns that the file is world accessible
    stripped = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, text=True, check=True).stdout

    expected_interface = {"PrivateKey": cfg.private_key} if cfg.private_key else {}
    expected_peer = {"PublicKey": SERVER_PUBLIC}
    if cfg.endpoint:
        expected_peer["Endpoint"] = cfg.endpoint
    if cfg.preshared_key:
        expected_peer["PresharedKey"] = cfg.preshared_key
    if cfg.persistent_keepalive:
        expected_peer["PersistentKeepalive"] = str(cfg.persistent_keepalive)
    parsed = sections(stripped)
    assert parsed["[Interface]"] == expected_interface
    assert parsed["[Peer]"].pop("AllowedIPs")
    assert parsed["[Peer]"] == expected_peer

    # wg parses the whole file before it looks for the interface, so on an interface that does not exist
    # the only error left is about the interface, whether or not we may create one.
    path.write_text(stripped)
    result = subprocess.run(["wg", "setconf", "kvpn-no-such0", str(path)], capture_output=True, text=True, check=False)
    assert "Configuration parsing error" not in result.stderr
    assert "Unable to modify interface" in result.stderr


@pytest.mark.parametrize("case", CASES)
def test_the_operators_file_is_one_the_apps_import(case: str) -> None:
    """What `kubectl vpn config` and `qr` hand to a phone is the Secret's wg0.conf as rendered."""
    assert_only_app_keys(render_client_config(CASES[case]))


def test_for_apps_drops_what_the_apps_refuse_and_keeps_comments() -> None:
    rendered = render_client_config(CASES["generated_key_ipv4"])
    hooks = "PostUp = resolvectl dns %i 10.96.0.10  # split DNS\npreDown = resolvectl revert %i\nTable = off\n"
    linux = rendered.replace("MTU = 1420\n", f"MTU = 1420\n{hooks}").replace("[Peer]\n", "[Peer]\nFwMark = 1\n")
    assert for_apps(linux) == rendered  # keys matched without regard to case, the header comments kept


def test_for_apps_leaves_an_app_file_as_it_is() -> None:
    for case in CASES.values():
        assert for_apps(render_client_config(case)) == render_client_config(case)
