"""The relay's framing: frames survive any split of the byte stream, and every way of breaking it is refused."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpn_core.relaywire import (
    MAX_PAYLOAD,
    FrameError,
    FrameReader,
    Hello,
    Welcome,
    frame,
    frames,
    is_wireguard,
    ping,
    ping_number,
    pong,
    read_control,
)

INITIATION = b"\x01\0\0\0" + bytes(144)
RESPONSE = b"\x02\0\0\0" + bytes(88)
COOKIE = b"\x03\0\0\0" + bytes(60)


def data_message(length: int) -> bytes:
    """A data message carrying `length` bytes of (padded, encrypted) packet: 16 bytes of header before
    them, 16 of authentication tag after."""
    return b"\x04\0\0\0" + bytes(28 + length)


KEEPALIVE = data_message(0)

wireguard = st.one_of(
    st.sampled_from([INITIATION, RESPONSE, COOKIE, KEEPALIVE]),
    st.integers(0, (MAX_PAYLOAD - 32) // 16).map(lambda n: data_message(16 * n)),
)
payloads = st.one_of(wireguard, st.binary(max_size=200).map(lambda b: b"\0" + b))
"""What a reader passes on: WireGuard messages, and control messages (read only later, by their reader)."""


@given(st.lists(payloads, min_size=1, max_size=20), st.lists(st.integers(0, 10_000), max_size=10))
def test_frames_come_out_whole_and_in_order_however_the_stream_is_split(sent: list[bytes], cuts: list[int]) -> None:
    stream = frames(sent)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    reader = FrameReader()
    got: list[bytes] = []
    for start, end in itertools.pairwise(points):
        got += reader.feed(stream[start:end])
    assert got == sent
    assert reader.pending == 0


def test_a_frame_split_after_its_length_waits_for_the_rest() -> None:
    reader = FrameReader()
    assert reader.feed(frame(INITIATION)[:1]) == []
    assert reader.feed(frame(INITIATION)[1:100]) == []
    assert reader.pending == 100
    assert reader.feed(frame(INITIATION)[100:]) == [INITIATION]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\0\0", "a frame of 0 bytes"),
        (struct.pack(">H", MAX_PAYLOAD + 1), f"a frame of {MAX_PAYLOAD + 1} bytes"),
        (b"\xff\xff", "a frame of 65535 bytes"),
        (frame(b"\x05\0\0\0" + bytes(28)), "not a WireGuard message"),
        (frame(INITIATION[:-1]), "not a WireGuard message"),
        (frame(b"\x01\x01\0\0" + bytes(144)), "not a WireGuard message"),
        (frame(data_message(0)[:-1]), "not a WireGuard message"),
    ],
)
def test_a_broken_stream_is_a_frame_error_that_shows_none_of_its_bytes(data: bytes, says: str) -> None:
    with pytest.raises(FrameError, match=says) as raised:
        FrameReader().feed(frame(KEEPALIVE) + data)
    assert "\\x" not in str(raised.value)


def test_a_frame_out_of_bounds_cannot_be_made() -> None:
    with pytest.raises(FrameError):
        frame(b"")
    with pytest.raises(FrameError):
        frame(data_message(MAX_PAYLOAD))
    assert len(frame(bytes(MAX_PAYLOAD))) == MAX_PAYLOAD + 2


@pytest.mark.parametrize(
    ("payload", "shaped"),
    [
        (INITIATION, True),
        (RESPONSE, True),
        (COOKIE, True),
        (KEEPALIVE, True),
        (data_message(1408), True),
        (data_message(1420), True),  # a full-sized packet through an MTU of 1420: padded to the MTU only
        (INITIATION + b"\0", False),
        (RESPONSE[:-1], False),
        (COOKIE + bytes(16), False),
        (data_message(0)[:-16], False),
        (b"\x00\0\0\0" + bytes(28), False),
        (b"\x04\0\0\x01" + bytes(28), False),
        (b"\x04\0\0", False),
        (b"", False),
    ],
)
def test_is_wireguard_knows_each_messages_size(payload: bytes, shaped: bool) -> None:
    assert is_wireguard(payload) is shaped


def test_hello_and_welcome_round_trip() -> None:
    hello = Hello("team/office", "key=", "node-b")
    (payload,) = FrameReader().feed(hello.encode())
    assert Hello.decode(payload) == hello
    for welcome in (Welcome(gateway="node-b"), Welcome(error="no VpnServer team/office")):
        (payload,) = FrameReader().feed(welcome.encode())
        assert Welcome.decode(payload) == welcome
    assert Welcome(gateway="node-b").ok
    assert not Welcome(error="no").ok


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (KEEPALIVE, "the first frame must be a Hello"),
        (b"\0{", "not JSON"),
        (b"\0\xff", "not JSON"),
        (b"\0[1]", "not a JSON object"),
        (b'\0{"v": 2, "hello": "team/office"}', "protocol version 2"),
        (b'\0{"hello": "team/office"}', "protocol version None"),
        (b'\0{"v": 1, "hello": "office"}', "NAMESPACE/NAME"),
        (b'\0{"v": 1, "hello": "team/"}', "NAMESPACE/NAME"),
        (b'\0{"v": 1, "hello": "a/b/c"}', "NAMESPACE/NAME"),
        (b'\0{"v": 1, "hello": 7}', "NAMESPACE/NAME"),
        (b'\0{"v": 1, "hello": "team/office", "key": 1}', "strings"),
        (b'\0{"v": 1, "hello": "team/office", "gateway": null}', "strings"),
    ],
)
def test_a_hello_that_is_not_one_is_refused(payload: bytes, says: str) -> None:
    with pytest.raises(FrameError, match=says):
        Hello.decode(payload)


@pytest.mark.parametrize("payload", [b'\0{"v": 1}', b'\0{"v": 1, "gateway": 3}', b'\0{"v": 1, "error": ["x"]}'])
def test_a_welcome_names_a_gateway_or_an_error(payload: bytes) -> None:
    with pytest.raises(FrameError, match="a Welcome names a gateway or an error"):
        Welcome.decode(payload)


def test_pings_and_pongs_carry_their_number_and_nothing_else_passes_for_one() -> None:
    (payload,) = FrameReader().feed(ping(41) + pong(42))[:1]
    assert ping_number(read_control(payload), "ping") == 41
    assert ping_number(read_control(FrameReader().feed(pong(42))[0]), "pong") == 42
    assert ping_number({"ping": True}, "ping") is None
    assert ping_number({"ping": "1"}, "ping") is None
    assert ping_number({"gateway": "node-a"}, "pong") is None
