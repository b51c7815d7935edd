"""One TCP connection kept open while something happens: run in a laptop's namespace, it says whether the
connection survived and how long the longest silence was.

    ip netns exec LAPTOP python3 tcp_probe.py HOST PORT [--interval 0.05] [--drain 0.5]

Sends a numbered line every interval to an echo server and reads the echoes; on SIGTERM/SIGINT (or
--duration) it prints one JSON object: sent, received, broken (the error that ended the connection, or
null), max_gap_s (the longest time between two echoes, including until the end) and the silences over
5 intervals as [start offset, length] pairs. It prints {"connected": true} first, once connected; with
--drain it keeps reading that long after the last send, so that the echoes in flight count as received.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import socket
import threading
import time


def silence(opened: float, echoes: list[float], ended: float, interval: float) -> dict[str, object]:
    """max_gap_s and the silences over 5 intervals, between the connection's opening, its echoes and its end."""
    # Echoes read while draining come after `ended`: in time order, the gaps are the silences either way.
    marks = sorted([opened, *echoes, ended])
    gaps = [(a - opened, b - a) for a, b in itertools.pairwise(marks)]
    return {
        "max_gap_s": round(max((g for _, g in gaps), default=0.0), 3),
        "silences": [[round(start, 3), round(length, 3)] for start, length in gaps if length > 5 * interval],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--drain", type=float, default=0.0)
    args = parser.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    began = time.monotonic()
    result: dict[str, object] = {"sent": 0, "received": 0, "broken": None}
    echoes: list[float] = []
    try:
        conn = socket.create_connection((args.host, args.port), timeout=args.connect_timeout)
    except OSError as error:
        print(json.dumps({**result, "broken": f"connect: {error}", "max_gap_s": None, "silences": []}), flush=True)
        return
    conn.settimeout(None)
    print(json.dumps({"connected": True}), flush=True)
    opened = time.monotonic()

    def reader() -> None:
        buffer = b""
        try:
            while chunk := conn.recv(4096):
                buffer += chunk
                while b"\n" in buffer:
                    _, buffer = buffer.split(b"\n", 1)
                    echoes.append(time.monotonic())
            if not stop.is_set():
                result["broken"] = "closed by the other end"
        except OSError as error:
            if not stop.is_set():
                result["broken"] = f"recv: {error}"
        stop.set()

    threading.Thread(target=reader, daemon=True).start()
    n = 0
    while not stop.is_set() and time.monotonic() - began < args.duration:
        try:
            conn.sendall(f"{n}\n".encode())
            n += 1
        except OSError as error:
            result["broken"] = f"send: {error}"
            break
        stop.wait(args.interval)
    ended = time.monotonic()
    time.sleep(args.drain)
    result.update(sent=n, received=len(echoes), **silence(opened, list(echoes), ended, args.interval))
    print(json.dumps(result), flush=True)
    conn.close()


if __name__ == "__main__":
    main()
