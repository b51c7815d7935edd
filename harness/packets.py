"""What an attacker on a laptop sends, as a script run inside the laptop's (or a node's) network namespace.

    python3 packets.py udp --src ADDR --dst ADDR --port N [--count N]       datagrams from a chosen source
    python3 packets.py connect --dst ADDR --port N [--timeout S]           prints connected/refused/timeout
    python3 packets.py listen --host ADDR --port N --seconds S             prints the connections accepted
    python3 packets.py garbage --dst ADDR --port N --count N [--seed N]    random datagrams, some WireGuard-shaped
    python3 packets.py capture --dst ADDR --port N --seconds S [--iface I] outbound UDP payloads, as JSON base64
    python3 packets.py replay --dst ADDR --port N --wait S < PAYLOADS     sends them again; prints answers heard

Standard library only: it runs with the machine's python3 in any namespace. Every send is to the address
given, bounded in count and time.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import random
import select
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003  # outgoing frames reach only taps on every protocol
ETH_P_IP = 0x0800
ETH_HEADER = 14
# WireGuard's message types and their sizes (data: at least header + tag).
WIREGUARD_SHAPES = ((1, 148), (2, 92), (3, 64), (4, 32), (4, 96), (4, 1452))


def udp(args: argparse.Namespace) -> None:
    """Datagrams whose source is `--src`: an address the interface holds (the attacker added it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: the source need not be up yet
        sock.bind((args.src, 0))
        for i in range(args.count):
            sock.sendto(f"kvpn-test {i}".encode(), (args.dst, args.port))
            time.sleep(0.02)


def connect(args: argparse.Namespace) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(args.timeout)
        try:
            sock.connect((args.dst, args.port))
        except TimeoutError:
            print("timeout")
        except OSError as exc:
            print("refused" if exc.errno == errno.ECONNREFUSED else f"error {exc.errno}")
        else:
            print("connected")


def listen(args: argparse.Namespace) -> None:
    accepted = 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, 15, 1)
        sock.bind((args.host, args.port))
        sock.listen(16)
        print("listening", flush=True)
        deadline = time.monotonic() + args.seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                sock.accept()[0].close()
                accepted += 1
    print(accepted)


def garbage(args: argparse.Namespace) -> None:
    """Random bytes, and random bytes behind each WireGuard message header: what a scanner or a fuzzer sends."""
    rng = random.Random(args.seed)  # noqa: S311 - reproducible noise, not a secret
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(args.count):
            if i % 2:
                kind, size = rng.choice(WIREGUARD_SHAPES)
                payload = struct.pack("<I", kind) + rng.randbytes(size - 4)
            else:
                payload = rng.randbytes(rng.randint(1, 1500))
            sock.sendto(payload, (args.dst, args.port))
            if i % 50 == 0:
                time.sleep(0.005)


def capture(args: argparse.Namespace) -> None:
    """Outbound UDP payloads to dst:port on `--iface` (an Ethernet one), for `--seconds`."""
    target = socket.inet_aton(args.dst)
    found: list[str] = []
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sock:
        sock.bind((args.iface, ETH_P_ALL))
        print("capturing", flush=True)
        deadline = time.monotonic() + args.seconds
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                continue
            frame, meta = sock.recvfrom(65535)
            if meta[2] != socket.PACKET_OUTGOING or frame[12:14] != struct.pack("!H", ETH_P_IP):
                continue
            ip = frame[ETH_HEADER:]
            header = (ip[0] & 0x0F) * 4
            if ip[9] != socket.IPPROTO_UDP or ip[16:20] != target:
                continue
            if struct.unpack("!H", ip[header + 2 : header + 4])[0] == args.port:
                found.append(base64.b64encode(ip[header + 8 :]).decode())
    print(json.dumps(found))


def replay(args: argparse.Namespace) -> None:
    """The captured payloads again, from a socket of their own; any answer (a handshake response to a
    replayed initiation) is counted."""
    payloads = [base64.b64decode(p) for p in json.load(sys.stdin)]
    answers = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for payload in payloads:
            sock.sendto(payload, (args.dst, args.port))
        deadline = time.monotonic() + args.wait
        while (left := deadline - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                sock.recv(65535)
                answers += 1
    print(json.dumps({"sent": len(payloads), "answers": answers}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func in (("udp", udp), ("connect", connect), ("garbage", garbage), ("capture", capture)):
        sub = commands.add_parser(name)
        sub.set_defaults(func=func)
        sub.add_argument("--dst", required=True)
        sub.add_argument("--port", type=int, required=True)
        if name == "udp":
            sub.add_argument("--src", required=True)
        if name in ("udp", "garbage"):
            sub.add_argument("--count", type=int, default=3)
        if name == "garbage":
            sub.add_argument("--seed", type=int, default=0)
        if name == "connect":
            sub.add_argument("--timeout", type=float, default=2.0)
        if name == "capture":
            sub.add_argument("--seconds", type=float, required=True)
            sub.add_argument("--iface", default="eth0")
    sub = commands.add_parser("replay")
    sub.set_defaults(func=replay)
    sub.add_argument("--dst", required=True)
    sub.add_argument("--port", type=int, required=True)
    sub.add_argument("--wait", type=float, default=2.0)
    sub = commands.add_parser("listen")
    sub.set_defaults(func=listen)
    sub.add_argument("--host", required=True)
    sub.add_argument("--port", type=int, required=True)
    sub.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
