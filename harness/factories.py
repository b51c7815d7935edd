"""Keys, peer binding Secrets and wg-quick configs, made up for dataplane tests and benchmarks."""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from kvpn_core.contract import LABEL_ROLE, LABEL_SERVER, ROLE_PEER, PeerBinding, encode_data


def keypair() -> tuple[str, str]:
    """(private, public), base64 as WireGuard writes them."""
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    pub = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode(), base64.b64encode(pub).decode()


def key() -> str:
    """32 random bytes in base64: a usable public or preshared key, without the cost of a real keypair."""
    return base64.b64encode(os.urandom(32)).decode()


def binding_secret(
    server: str,
    pb: PeerBinding,
    created: str = "2024-01-01T00:00:00Z",
    *,
    namespace: str | None = None,
    resource_version: str | None = None,
) -> dict[str, Any]:
    """A peer binding Secret of ``server`` as the API returns it, labelled as the operator labels it."""
    labels = {LABEL_SERVER: server, LABEL_ROLE: ROLE_PEER}
    metadata: dict[str, Any] = {"name": pb.secret_name(server), "creationTimestamp": created, "labels": labels}
    if namespace is not None:
        metadata["namespace"] = namespace
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    return {"metadata": metadata, "type": "kvpn.dev/peer-binding", "data": encode_data(pb.to_string_data())}


def wg_quick_config(
    private_key: str,
    address: str,
    server_public_key: str,
    preshared_key: str | None,
    endpoint: str,
    allowed: Sequence[str],
) -> str:
    lines = [
        "[Interface]",
        f"PrivateKey = {private_key}",
        f"Address = {address}",
        "MTU = 1420",
        "",
        "[Peer]",
        f"PublicKey = {server_public_key}",
        *([f"PresharedKey = {preshared_key}"] if preshared_key else []),
        f"Endpoint = {endpoint}",
        f"AllowedIPs = {', '.join(allowed)}",
        "PersistentKeepalive = 25",
    ]
    return "\n".join(lines) + "\n"
