"""What the node's kernel and WireGuard's tools fix for everyone: interface names, where UAPI sockets live."""

from __future__ import annotations

from pathlib import Path

IFNAMSIZ = 15
"""Longest Linux interface name: 16 bytes including the terminating NUL."""

SOCKET_DIR = Path("/var/run/wireguard")
"""Where wireguard-go opens each device's UAPI socket (``<interface>.sock``) and `wg` looks for it."""
