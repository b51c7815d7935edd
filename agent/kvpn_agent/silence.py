"""Which sessions a gateway cut off ends: those with the laptops it stopped hearing from.

Once this node's gateway leases have run out (it cannot reach the API server: its network cut, say), the
other gateways take over its laptops. A session kept here would pull its laptop back on one stale packet
once the network is back (a pod's TCP retransmission reaching this node), to a session the laptop no
longer uses: 15 s of silence. A laptop still talking to this node (only the API server is away) is heard,
and keeps its session.

Hearing is judged from the bytes each peer sent, read every SILENCE_POLL_SECONDS from the moment a lease
renewal is late, not from the status report's reads (every 5 s): a read that late cannot tell a laptop
that went quiet with the cut from one heard a few seconds into it, and the sessions would be ended only
after the network is back, too late.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvpn_agent.observed import ObservedDevice, ObservedPeer

SILENCE_POLL_SECONDS = 0.5
"""How often the peers' received bytes are read while a lease renewal is late."""
RENEWAL_LATE_SECONDS = 3.0
"""Since the last renewal (every 2 s): from then on, the peers are listened to closely."""
QUIET_SECONDS = 5.0
"""A laptop that sent nothing for this long when the leases have run out is taken to be gone. The first
read is at most RENEWAL_LATE_SECONDS + SILENCE_POLL_SECONDS after the last renewal, so a laptop lost with
it is this quiet by the time the lease (10 s) runs out."""


class Silence:
    """Per outage of the leases: when each peer was last heard, and whose sessions were ended already."""

    def __init__(self) -> None:
        self._heard: dict[tuple[str, str], tuple[int, float]] = {}
        """(interface, peer key): bytes received as last read, and when they last grew (or were first read)."""
        self._ended: set[tuple[str, str]] = set()

    def reset(self) -> None:
        """The leases are renewed again: the next outage starts afresh."""
        self._heard.clear()
        self._ended.clear()

    def hear(self, interface: str, device: ObservedDevice | None, now: float) -> None:
        """One read of the device: a peer is heard when its received bytes grew, or read the first time
        (nothing known of its silence before the outage)."""
        for key, peer in (device.peers if device else {}).items():
            before = self._heard.get((interface, key))
            if before is None or before[0] != peer.rx_bytes:
                self._heard[(interface, key)] = (peer.rx_bytes, now)

    def quiet(self, interface: str, device: ObservedDevice | None, now: float) -> list[ObservedPeer]:
        """The peers with a session (a handshake) not heard for QUIET_SECONDS, not ended in this outage."""
        return [
            peer
            for key, peer in (device.peers if device else {}).items()
            if peer.last_handshake
            and (interface, key) not in self._ended
            and (interface, key) in self._heard
            and now - self._heard[(interface, key)][1] > QUIET_SECONDS
        ]

    def ended(self, interface: str, peers: Iterable[ObservedPeer]) -> None:
        """Sessions ended once per outage: a peer that handshakes again meanwhile keeps the new one."""
        self._ended |= {(interface, peer.public_key) for peer in peers}
