"""A served server's inputs (object, key Secret, bindings), node selection, and the state file that outlives the API."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpn_agent.desired import DesiredServer, build_desired
from kvpn_agent.watch import Key, Obj, key_of

log = logging.getLogger(__name__)

FORMAT = 1
STATE_FILE = "state.json"


@dataclass(frozen=True)
class ServerInputs:
    """The contract objects of one server, as the API server (or the state file) last gave them."""

    server: Obj
    key_secret: Obj | None
    bindings: tuple[Obj, ...] = field(repr=False)

    @property
    def key(self) -> Key:
        return key_of(self.server)

    def version(self) -> tuple[object, ...]:
        """Equal exactly when no input changed: resourceVersions change with every write."""

        def rv(obj: Obj | None) -> str:
            return str(((obj or {}).get("metadata") or {}).get("resourceVersion") or "")

        return (rv(self.server), rv(self.key_secret), frozenset((key_of(b)[1], rv(b)) for b in self.bindings))

    def build(self) -> DesiredServer:
        return build_desired(self.server, self.key_secret, self.bindings)

    def to_json(self) -> Obj:
        return {"server": self.server, "keySecret": self.key_secret, "bindings": list(self.bindings)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServerInputs:
        return cls(data["server"], data.get("keySecret"), tuple(data.get("bindings") or ()))


def selected(server: Obj, node_labels: Mapping[str, str]) -> bool:
    """Whether this node is a gateway of ``server``: its nodeSelector matches, or it has none."""
    selector = (server.get("spec") or {}).get("nodeSelector") or {}
    return isinstance(selector, dict) and all(node_labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class Saved:
    servers: tuple[ServerInputs, ...]
    endpoints: Mapping[str, str]
    """Last known endpoint per peer public key."""


class StateFile:
    """``<dir>/state.json``: private keys inside, so 0600 in a 0700 folder, replaced atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE

    def save(self, servers: Iterable[ServerInputs], endpoints: Mapping[str, str]) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        body = json.dumps(
            {"format": FORMAT, "servers": [s.to_json() for s in servers], "endpoints": dict(endpoints)},
            separators=(",", ":"),
        ).encode()
        tmp = self.directory / f".{STATE_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask or a leftover file said
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        # A crash leaves either the old file or the new one, never half of one.
        tmp.replace(self.path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self) -> Saved | None:
        try:
            data = json.loads(self.path.read_bytes())
            if data.get("format") != FORMAT:
                log.warning("state file of another format, ignored", extra={"path": str(self.path)})
                return None
            servers = tuple(ServerInputs.from_json(s) for s in data.get("servers") or ())
            endpoints = {str(k): str(v) for k, v in (data.get("endpoints") or {}).items()}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Never the content in the message: it holds keys.
            log.warning("state file unusable, ignored", extra={"path": str(self.path), "error": type(exc).__name__})
            return None
        return Saved(servers, endpoints)

    def remove(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
            return True
        return False
