"""The wireguard-go supervisor's protocol (JSON lines on a unix socket) and the agent's client of it.

One request, one response, each a JSON object on one line:

    {"op": "start", "interface": "kvgw-0123456789"}  -> {"ok": true, "pid": 4242}
    {"op": "stop", "interface": "kvgw-0123456789"}   -> {"ok": true, "pid": 4242}  (null: none ran)
    {"op": "list"}                                   -> {"ok": true, "devices": {"kvgw-0123456789": 4242}}
    anything refused                                 -> {"ok": false, "error": "why, as text"}

A connection may carry several requests in turn. The two ends ship in separate DaemonSets and the
supervisor's is updated only by hand (OnDelete), so a newer agent meets an older supervisor as a
matter of course: change this protocol only by adding, and keep what is here answering as it does.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpn_agent.linux import IFNAMSIZ, SOCKET_DIR

SUPERVISOR_SOCKET = Path("/run/kvpn/wireguard-go.sock")
READY_FILE = "dataplane-ready"
"""Beside the socket: present while the agent's latest verdict on the node's dataplane is "as desired".

The wireguard-go pods are what each VpnServer's UDP Service selects, and their readiness probe is
this file. An agent that restarts, or is away, leaves it as it was (the dataplane does not change
without the agent), so a restart never takes a gateway out of the Services; a sync failure does.
"""
OPS = ("start", "stop", "list")
MAX_LINE = 1024
"""Longest request the supervisor reads: a request names one interface, so this is generous."""

MAX_REPLY = 1 << 20
"""Longest reply the client reads (a list of every device)."""

# What `ip link` accepts, narrowed: no leading "-" (wireguard-go would read an option), no "/" or
# ":" (paths, aliases), no space, nothing outside ASCII. The agent's names are kvgw-<hex>.
_INTERFACE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.=+-]{{0,{IFNAMSIZ - 1}}}")


class ProtocolError(ValueError):
    """A request or reply that does not follow the protocol; the text says what is wrong."""


class SupervisorError(Exception):
    """The supervisor refused a request (its text, verbatim) or its answer made no sense."""


class SupervisorUnreachableError(SupervisorError):
    """Nothing answers on the supervisor's socket: it is not running, or it hangs."""


def valid_interface(name: object) -> str:
    """``name`` if it is an interface name the supervisor may pass to wireguard-go, else ProtocolError."""
    if not isinstance(name, str) or not _INTERFACE.fullmatch(name) or name in (".", ".."):
        shown = repr(name)[:40]
        raise ProtocolError(f"invalid interface name {shown}: 1-{IFNAMSIZ} of A-Z a-z 0-9 _ . = + -, not first -")
    return name


@dataclass(frozen=True)
class Request:
    op: str
    interface: str | None = None

    def encode(self) -> bytes:
        body: dict[str, str] = {"op": self.op}
        if self.interface is not None:
            body["interface"] = self.interface
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def parse_request(line: bytes) -> Request:
    """One request line, checked strictly: unknown ops and keys, and bad names, are refused."""
    if len(line) > MAX_LINE:
        raise ProtocolError(f"request longer than {MAX_LINE} bytes")
    try:
        body = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("request is not JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError("request is not a JSON object")
    op = body.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {str(op)[:20]!r} (known: {', '.join(OPS)})")
    allowed = {"op"} if op == "list" else {"op", "interface"}
    if extra := sorted(set(body) - allowed):
        raise ProtocolError(f"unexpected keys for {op}: {', '.join(str(k)[:20] for k in extra)}")
    if op == "list":
        return Request(op)
    if "interface" not in body:
        raise ProtocolError(f"{op} needs an interface")
    return Request(op, valid_interface(body["interface"]))


def encode_reply(**fields: Any) -> bytes:
    return json.dumps({"ok": True, **fields}, separators=(",", ":")).encode() + b"\n"


def encode_error(error: str) -> bytes:
    return json.dumps({"ok": False, "error": error}, separators=(",", ":")).encode() + b"\n"


def parse_reply(line: bytes) -> dict[str, Any]:
    """A reply's fields when it says ok; SupervisorError with the supervisor's text when not."""
    try:
        body = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("reply is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
        raise ProtocolError("reply is not a JSON object with a boolean ok")
    if not body["ok"]:
        raise SupervisorError(str(body.get("error") or "refused, no reason given"))
    return body


def _pid(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProtocolError(f"not a pid: {str(value)[:20]!r}")
    return value


class SupervisorClient:
    """The agent's wireguard-go processes, run by the supervisor: the role of processes.WireGuardGo.

    One connection per request (a unix connect costs microseconds, and a supervisor that restarted
    is simply reached again); a dead or hung supervisor is SupervisorUnreachableError.
    """

    def __init__(self, path: Path = SUPERVISOR_SOCKET, socket_dir: Path = SOCKET_DIR, timeout: float = 15.0) -> None:
        self.path = path
        self.socket_dir = socket_dir
        self.timeout = timeout
        """Above the supervisor's own wait for a starting wireguard-go (5 s)."""

    def socket(self, interface: str) -> Path:
        return self.socket_dir / f"{interface}.sock"

    def start(self, interface: str) -> int:
        return _pid(self.call(Request("start", valid_interface(interface))).get("pid"))

    def stop(self, interface: str) -> int | None:
        pid = self.call(Request("stop", valid_interface(interface))).get("pid")
        return None if pid is None else _pid(pid)

    def devices(self) -> dict[str, int]:
        devices = self.call(Request("list")).get("devices")
        if not isinstance(devices, dict):
            raise SupervisorError("list reply without devices")
        try:
            return {valid_interface(name): _pid(pid) for name, pid in devices.items()}
        except ProtocolError as exc:
            raise SupervisorError(f"list reply: {exc}") from None

    def call(self, request: Request) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
                sock.sendall(request.encode())
                line = _read_line(sock)
            except OSError as exc:
                what = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
                raise SupervisorUnreachableError(f"wireguard-go supervisor at {self.path}: {what}") from None
        try:
            return parse_reply(line)
        except ProtocolError as exc:
            raise SupervisorError(f"wireguard-go supervisor at {self.path}: {exc}") from None


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError(0, "connection closed before the end of the reply")
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            return b"".join(chunks)
        if size > MAX_REPLY:
            raise ConnectionResetError(0, f"reply longer than {MAX_REPLY} bytes")
