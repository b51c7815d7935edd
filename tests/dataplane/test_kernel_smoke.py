"""Kernel WireGuard through pyroute2 in a fresh network namespace: a link created, configured, read back.

A `vm` test: it needs the WireGuard module, which only the VM tier's guest has (tests/vm/test_kernel_tier.py
runs it there). It drives pyroute2 directly, not the agent's backend, so it checks the ground the kernel
backend stands on: what netlink sets is what netlink and `wg` read back.
"""

from __future__ import annotations

from typing import Any

import pytest
from pyroute2 import IPRoute, WireGuard

from harness.commands import run
from harness.factories import keypair
from harness.netlab import Lab

pytestmark = pytest.mark.vm

LISTEN_PORT, FWMARK, KEEPALIVE = 51820, 0x237, 25
ENDPOINT = ("192.168.237.2", 51821)  # inside the test's own namespace: nothing is ever sent there
ALLOWED = ["10.237.0.2/32", "fd00:237::2/128"]


def _key(value: Any) -> str:
    """pyroute2 decodes a key attribute to {'value': base64 bytes}."""
    raw = value["value"] if isinstance(value, dict) else value
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def test_a_kernel_wireguard_link_is_configured_and_read_back(lab: Lab) -> None:
    ns, ifname = lab.netns("kwg"), lab.ifname("k")
    private, public = keypair()
    _, peer_public = keypair()
    psk, _ = keypair()
    with IPRoute(netns=ns) as ipr:
        ipr.link("add", ifname=ifname, kind="wireguard")
        (link,) = ipr.link("get", ifname=ifname)
        assert link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "wireguard"

    with WireGuard(netns=ns) as wg:
        wg.set(ifname, private_key=private, listen_port=LISTEN_PORT, fwmark=FWMARK)
        peer = {
            "public_key": peer_public,
            "preshared_key": psk,
            "endpoint_addr": ENDPOINT[0],
            "endpoint_port": ENDPOINT[1],
            "persistent_keepalive": KEEPALIVE,
            "allowed_ips": ALLOWED,
        }
        wg.set(ifname, peer=peer)
        messages = list(wg.info(ifname))

    device = messages[0]
    assert _key(device.get_attr("WGDEVICE_A_PRIVATE_KEY")) == private
    assert _key(device.get_attr("WGDEVICE_A_PUBLIC_KEY")) == public
    assert device.get_attr("WGDEVICE_A_LISTEN_PORT") == LISTEN_PORT
    assert device.get_attr("WGDEVICE_A_FWMARK") == FWMARK
    peers = [p for m in messages for p in m.get_attr("WGDEVICE_A_PEERS") or []]
    assert [_key(p.get_attr("WGPEER_A_PUBLIC_KEY")) for p in peers] == [peer_public]
    (read,) = peers
    assert _key(read.get_attr("WGPEER_A_PRESHARED_KEY")) == psk
    endpoint = read.get_attr("WGPEER_A_ENDPOINT")
    assert (endpoint["addr"], endpoint["port"]) == ENDPOINT
    assert read.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == KEEPALIVE
    assert sorted(ip["addr"] for ip in read.get_attr("WGPEER_A_ALLOWEDIPS")) == sorted(ALLOWED)

    # wg(8) reads the same device over the same netlink family: both views must agree.
    interface_line, peer_line = run("ip", "netns", "exec", ns, "wg", "show", ifname, "dump").stdout.splitlines()
    assert interface_line.split("\t") == [private, public, str(LISTEN_PORT), hex(FWMARK)]
    fields = peer_line.split("\t")
    assert fields[:3] == [peer_public, psk, f"{ENDPOINT[0]}:{ENDPOINT[1]}"]
    assert sorted(fields[3].split(",")) == sorted(ALLOWED)
    assert fields[7] == str(KEEPALIVE)
