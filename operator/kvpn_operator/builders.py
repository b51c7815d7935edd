"""Pure builders of the child objects kvpn writes: key and config Secrets, peer bindings, the UDP Service."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kvpn_core.api import ExposeType, VpnServerSpec
from kvpn_core.contract import (
    ANNOTATION_PEER,
    LABEL_MANAGED_BY,
    LABEL_PEER_UID,
    LABEL_ROLE,
    LABEL_SERVER,
    MANAGED_BY,
    ROLE_PEER,
    ROLE_PEER_CONFIG,
    ROLE_SERVER_KEY,
    SECRET_TYPE_BINDING,
    SECRET_TYPE_PEER_CONFIG,
    SECRET_TYPE_SERVER_KEY,
    SERVER_KEY_DATA,
    PeerBinding,
    encode_data,
    peer_config_secret_name,
    server_key_secret_name,
)

Obj = dict[str, Any]


def owner_reference(owner: Obj) -> Obj:
    """An ownerReference to `owner`, so the garbage collector deletes the child with it."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: Obj, owner_uid: str) -> bool:
    return any(ref.get("uid") == owner_uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def labels(server: str, role: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_SERVER: server, LABEL_ROLE: role}


def server_key_secret(server: Obj, private_key: str) -> Obj:
    name = server["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE_SERVER_KEY,
        "metadata": {
            "name": server_key_secret_name(name),
            "namespace": server["metadata"]["namespace"],
            "labels": labels(name, ROLE_SERVER_KEY),
            "ownerReferences": [owner_reference(server)],
        },
        "data": encode_data({SERVER_KEY_DATA: private_key}),
    }


_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_SERVER_NAME = 63 - len("kvpn-")
MAX_PEER_NAME = 253 - len("kvpn-peer-")


def server_name_problem(name: str) -> str | None:
    """Why a VpnServer name cannot name its children, or None. Its Service is kvpn-<name>: a DNS-1035 label."""
    if len(name) > MAX_SERVER_NAME or not _DNS_1035_LABEL.match(name):
        return (
            f"VpnServer name {name!r} cannot name its Service kvpn-{name}: use at most {MAX_SERVER_NAME} "
            "lowercase letters, digits and '-', starting with a letter, and no dots"
        )
    return None


def peer_name_problem(name: str) -> str | None:
    """Why a VpnPeer name cannot name its config Secret kvpn-peer-<name>, or None."""
    if len(name) > MAX_PEER_NAME:
        return f"VpnPeer name is {len(name)} characters; its config Secret needs it at most {MAX_PEER_NAME}"
    return None


def service_name(server: str) -> str:
    return f"kvpn-{server}"


def service(server: Obj, spec: VpnServerSpec) -> Obj:
    """The UDP Service in front of the gateways' WireGuard port (LoadBalancer or NodePort).

    No selector: its Endpoints are the gateways that serve this server and are healthy for it, which
    the operator writes (gateways.endpoints_object). externalTrafficPolicy Local: a node sends what
    reaches its NodePort to its own gateway only, with the laptop's address kept, so the gateway a
    laptop dials is the one that holds its session, and sees where to reach the laptop from.
    """
    name = server["metadata"]["name"]
    port: Obj = {
        "name": "wireguard",
        "protocol": "UDP",
        "port": spec.listen_port,
        "targetPort": spec.listen_port,
    }
    if spec.expose.node_port:
        port["nodePort"] = spec.expose.node_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": server["metadata"]["namespace"],
            "labels": labels(name, "server"),
            "annotations": dict(spec.expose.annotations),
            "ownerReferences": [owner_reference(server)],
        },
        "spec": {
            "type": str(spec.expose.type),
            "externalTrafficPolicy": "Local",
            "ports": [port],
        },
    }


def service_patch(existing: Obj, desired: Obj) -> Obj | None:
    """The merge patch that brings an existing Service to `desired`, or None when nothing differs.

    Only what kvpn sets is compared: the API server fills in clusterIP, nodePort and the like.
    """
    patch: Obj = {}
    spec, want = existing.get("spec", {}), desired["spec"]
    policy = want["externalTrafficPolicy"]
    if spec.get("type") != want["type"] or spec.get("selector") or spec.get("externalTrafficPolicy") != policy:
        # selector None: a Service from an older kvpn selected every gateway pod, healthy or not.
        patch["spec"] = {"type": want["type"], "selector": None, "externalTrafficPolicy": policy}
    have_ports = [{k: p.get(k) for k in ("name", "protocol", "port", "targetPort")} for p in spec.get("ports", [])]
    want_ports = [{k: p.get(k) for k in ("name", "protocol", "port", "targetPort")} for p in want["ports"]]
    fixed_port = want["ports"][0].get("nodePort")
    if have_ports != want_ports or (fixed_port and spec.get("ports", [{}])[0].get("nodePort") != fixed_port):
        patch.setdefault("spec", {})["ports"] = want["ports"]
    annotations = existing["metadata"].get("annotations") or {}
    if any(annotations.get(k) != v for k, v in desired["metadata"]["annotations"].items()):
        patch["metadata"] = {"annotations": desired["metadata"]["annotations"]}
    return patch or None


def exposes_service(spec: VpnServerSpec) -> bool:
    """Whether the server has a UDP Service: not with HostPort (agents listen on the node itself), nor with
    ApiServer (laptops come through the API server and the relay, which sends to the gateways' own addresses)."""
    return spec.expose.type not in (ExposeType.HOST_PORT, ExposeType.API_SERVER)


def binding_secret(server: Obj, binding: PeerBinding) -> Obj:
    """A peer binding (see contract.py): owned by the server, so deleting the server frees its addresses."""
    name = server["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE_BINDING,
        "metadata": {
            "name": binding.secret_name(name),
            "namespace": server["metadata"]["namespace"],
            "labels": {**labels(name, ROLE_PEER), LABEL_PEER_UID: binding.peer_uid},
            "annotations": {ANNOTATION_PEER: f"{binding.peer_namespace}/{binding.peer_name}"},
            "ownerReferences": [owner_reference(server)],
        },
        "data": encode_data(binding.to_string_data()),
    }


def peer_config_secret(peer: Obj, server_name: str, string_data: Mapping[str, str]) -> Obj:
    """The Secret a developer fetches: wg0.conf (and the generated private key, if kvpn made one)."""
    meta = peer["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE_PEER_CONFIG,
        "metadata": {
            "name": peer_config_secret_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels(server_name, ROLE_PEER_CONFIG),
            "ownerReferences": [owner_reference(peer)],
        },
        "data": encode_data(dict(string_data)),
    }
