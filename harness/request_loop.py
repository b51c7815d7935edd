"""New requests from a laptop in a loop while something happens: run in the laptop's namespace, it says how
many were answered and how long the longest time without an answer was.

    ip netns exec LAPTOP python3 request_loop.py URL [--max-time 1] [--pause 0.05] [--expect hello]

Each request is a fresh `curl` (name lookup, a new TCP connection, an HTTP GET). It prints {"started": true}
once running; on SIGTERM/SIGINT (or --duration) it prints one JSON object: attempts, failures,
longest_gap_s (the longest time between two answered requests, or from the start or to the end) and the
gaps over 5 pauses as [start offset, length] pairs. Out of the test process on purpose: a pause of
the test's own Python (a fork, a long GIL hold) is no outage of the laptop's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import subprocess
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--max-time", type=float, default=1.0)
    parser.add_argument("--pause", type=float, default=0.05)
    parser.add_argument("--expect", default="hello", help="what an answer's body starts with")
    parser.add_argument("--duration", type=float, default=600.0)
    args = parser.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"started": True}), flush=True)
    began = time.monotonic()
    answers: list[float] = []
    attempts = failures = 0
    while not stop.is_set() and time.monotonic() - began < args.duration:
        attempts += 1
        try:
            proc = subprocess.run(
                ["curl", "-s", "-f", "--max-time", str(args.max_time), args.url],
                capture_output=True,
                text=True,
                timeout=args.max_time + 5,
                check=False,
            )
            answered = proc.returncode == 0 and proc.stdout.startswith(args.expect)
        except subprocess.TimeoutExpired:
            answered = False
        if answered:
            answers.append(time.monotonic())
        else:
            failures += 1
        stop.wait(args.pause)
    ended = time.monotonic()
    marks = [began, *answers, ended]
    gaps = [(a - began, b - a) for a, b in itertools.pairwise(marks)]
    print(
        json.dumps(
            {
                "attempts": attempts,
                "failures": failures,
                "longest_gap_s": round(max((g for _, g in gaps), default=0.0), 3),
                "gaps": [[round(at, 3), round(g, 3)] for at, g in gaps if g > 5 * args.pause + args.max_time / 2],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
