"""The kernel backend: WireGuard links and pyroute2's generic netlink API (a sketch; never run here, no module)."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pyroute2 import WireGuard

from kvpn_agent.model import (
    DeviceConfig,
    ObservedDevice,
    ObservedPeer,
    PeerConfig,
    sort_networks,
)
from kvpn_agent.netlink import Netlink, NetlinkConfigured
from kvpn_operator.keys import KEY_BYTES

# UNTESTED ON THESE MACHINES: the kernel here has no WireGuard module. The request building and the
# read-back parsing are unit-tested; the socket calls are not. Before trusting get() on a real
# node, check it against `wg show <if> peers` with thousands of peers: pyroute2 issue #1212
# reports info() returning only the first ~20 peers, and this parser can only merge what it is given.

_ZERO_KEY = base64.b64encode(bytes(KEY_BYTES)).decode()


def kernel_available(sys_module: Path = Path("/sys/module/wireguard")) -> bool:
    """Whether the WireGuard module is loaded (or built in); the agent picks the userspace backend otherwise."""
    return sys_module.is_dir()


def device_request(device: DeviceConfig) -> dict[str, Any]:
    """Keyword arguments of pyroute2's ``WireGuard.set`` for interface-level settings."""
    if device.replace_peers:
        raise NotImplementedError("pyroute2's WireGuard.set cannot send WGDEVICE_F_REPLACE_PEERS")
    request: dict[str, Any] = {}
    if device.private_key is not None:
        request["private_key"] = device.private_key or _ZERO_KEY
    if device.listen_port is not None:
        request["listen_port"] = device.listen_port
    if device.fwmark is not None:
        request["fwmark"] = device.fwmark
    return request


def peer_request(peer: PeerConfig) -> dict[str, Any]:
    """pyroute2's peer structure for one PeerConfig (same meaning as the UAPI lines)."""
    request: dict[str, Any] = {"public_key": peer.public_key}
    if peer.remove:
        request["remove"] = True
        return request
    if peer.update_only:
        request["update_only"] = True
    if peer.preshared_key is not None:
        request["preshared_key"] = peer.preshared_key or _ZERO_KEY
    if peer.endpoint is not None:
        host, _, port = peer.endpoint.rpartition(":")
        request["endpoint_addr"] = host.strip("[]")
        request["endpoint_port"] = int(port)
    if peer.persistent_keepalive is not None:
        request["persistent_keepalive"] = peer.persistent_keepalive
    if peer.replace_allowed_ips:
        request["replace_allowed_ips"] = True
    if peer.allowed_ips:
        request["allowed_ips"] = list(peer.allowed_ips)
    return request


def _key(value: Any) -> str | None:
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    return None if text == _ZERO_KEY else text


def _attr(nla: Any, name: str) -> Any:
    """The decoded value of an attribute: pyroute2 keeps keys under 'value', plain types as is."""
    value = nla.get_attr(name)
    if isinstance(value, dict) and "value" in value:
        return value["value"]
    return value


def parse_info(messages: Iterable[Any]) -> ObservedDevice:
    """Merges a GET_DEVICE dump: the kernel splits peers, and one peer's allowed IPs, across messages."""
    private_key: str | None = None
    listen_port = fwmark = 0
    fields: dict[str, dict[str, Any]] = {}
    allowed: dict[str, list[str]] = {}
    for msg in messages:
        private_key = _key(_attr(msg, "WGDEVICE_A_PRIVATE_KEY")) or private_key
        listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port
        fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or fwmark
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
            key = _key(_attr(peer, "WGPEER_A_PUBLIC_KEY"))
            if key is None:
                continue
            f = fields.setdefault(key, {})
            for name, attr in (
                ("preshared_key", "WGPEER_A_PRESHARED_KEY"),
                ("endpoint", "WGPEER_A_ENDPOINT"),
                ("persistent_keepalive", "WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"),
                ("handshake", "WGPEER_A_LAST_HANDSHAKE_TIME"),
                ("rx_bytes", "WGPEER_A_RX_BYTES"),
                ("tx_bytes", "WGPEER_A_TX_BYTES"),
            ):
                value = peer.get_attr(attr)
                if value is not None:
                    f[name] = value
            allowed.setdefault(key, []).extend(ip["addr"] for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or [])
    peers = {key: _peer(key, f, allowed.get(key, [])) for key, f in fields.items()}
    return ObservedDevice(private_key=private_key, listen_port=int(listen_port), fwmark=int(fwmark), peers=peers)


def _peer(key: str, f: dict[str, Any], allowed: Sequence[str]) -> ObservedPeer:
    endpoint = f.get("endpoint")
    text = None
    if endpoint and endpoint.get("port"):
        addr = endpoint["addr"]
        text = f"[{addr}]:{endpoint['port']}" if ":" in addr else f"{addr}:{endpoint['port']}"
    handshake = f.get("handshake") or {}
    seconds = int(handshake.get("tv_sec", 0))
    psk = f.get("preshared_key")
    return ObservedPeer(
        public_key=key,
        preshared_key=_key(psk["value"] if isinstance(psk, dict) else psk),
        endpoint=text,
        allowed_ips=sort_networks(allowed),
        persistent_keepalive=int(f.get("persistent_keepalive", 0)),
        last_handshake=seconds + int(handshake.get("tv_nsec", 0)) / 1e9 if seconds else None,
        rx_bytes=int(f.get("rx_bytes", 0)),
        tx_bytes=int(f.get("tx_bytes", 0)),
    )


class KernelWireGuard:
    """WireGuardBackend over generic netlink. One message per peer: pyroute2's set() takes one peer."""

    def __init__(self) -> None:
        self._wg: Any = WireGuard()

    def get(self, interface: str) -> ObservedDevice | None:
        try:
            return parse_info(self._wg.info(interface))
        except OSError:
            return None

    def set(self, interface: str, device: DeviceConfig | None, peers: Sequence[PeerConfig]) -> None:
        if device is not None:
            request = device_request(device)
            if request:
                self._wg.set(interface, **request)
        for peer in peers:
            self._wg.set(interface, peer=peer_request(peer))


class KernelLink(NetlinkConfigured):
    """LinkBackend for kernel WireGuard: the link is created by netlink, nothing to supervise."""

    def __init__(self, netlink: Netlink) -> None:
        self.netlink = netlink

    def create(self, interface: str) -> None:
        self.netlink.delete(interface)
        self.netlink.add_wireguard(interface)

    def delete(self, interface: str) -> None:
        self.netlink.delete(interface)
