"""Key generation and validation, checked against RFC 7748 and the real `wg`."""

from __future__ import annotations

import base64
import re
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpn_core.api import PUBLIC_KEY_PATTERN
from kvpn_core.keys import (
    InvalidKeyError,
    generate_preshared_key,
    generate_private_key,
    public_key_of,
    validate_public_key,
)

# RFC 7748 section 6.1: Alice's and Bob's X25519 key pairs, in WireGuard's base64.
ALICE_PRIVATE = base64.b64encode(
    bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
).decode()
ALICE_PUBLIC = base64.b64encode(
    bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
).decode()
BOB_PRIVATE = base64.b64encode(
    bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
).decode()
BOB_PUBLIC = base64.b64encode(
    bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
).decode()


def wg(*args: str, stdin: str = "") -> str:
    return subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize(("private", "public"), [(ALICE_PRIVATE, ALICE_PUBLIC), (BOB_PRIVATE, BOB_PUBLIC)])
def test_public_key_of_matches_rfc7748(private: str, public: str) -> None:
    assert public_key_of(private) == public


def test_public_key_of_matches_wg_pubkey() -> None:
    private = generate_private_key()
    assert public_key_of(private) == wg("pubkey", stdin=private)


def test_public_key_of_accepts_wg_genkey() -> None:
    private = wg("genkey")
    assert public_key_of(private) == wg("pubkey", stdin=private)


def test_generated_keys_have_wireguard_format() -> None:
    private, psk = generate_private_key(), generate_preshared_key()
    for key in (private, public_key_of(private), psk):
        assert re.fullmatch(PUBLIC_KEY_PATTERN, key)
        assert validate_public_key(key) == key


def test_generated_private_key_is_clamped_like_wg_genkey() -> None:
    raw = base64.b64decode(generate_private_key())
    assert raw[0] & 7 == 0
    assert raw[31] & 0xC0 == 0x40


def test_generated_keys_differ() -> None:
    assert len({generate_private_key() for _ in range(20)}) == 20
    assert len({generate_preshared_key() for _ in range(20)}) == 20


@given(st.binary(min_size=32, max_size=32).filter(any))
def test_every_nonzero_32_byte_key_is_valid(raw: bytes) -> None:
    key = base64.b64encode(raw).decode()
    assert validate_public_key(key) == key
    assert re.fullmatch(PUBLIC_KEY_PATTERN, key), "the CRD pattern must accept every valid key"


NONCANONICAL = ALICE_PUBLIC[:42] + chr(ord(ALICE_PUBLIC[42]) + 1) + "="


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "must be 44 characters of base64 (a WireGuard key), got 0"),
        ("hSDwCYkwp1R0", "must be 44 characters of base64 (a WireGuard key), got 12"),
        (ALICE_PUBLIC[:-1], "got 43"),
        (ALICE_PUBLIC + "=", "got 45"),
        (ALICE_PUBLIC + "\n", "got 45"),
        (" " + ALICE_PUBLIC[1:], "must be base64"),
        (ALICE_PUBLIC[:10] + "-_" + ALICE_PUBLIC[12:], "must be base64"),  # the URL-safe alphabet
        (ALICE_PUBLIC[:10] + "é" + ALICE_PUBLIC[11:], "must be base64"),
        ("=" + ALICE_PUBLIC[1:], "must be base64"),
        (ALICE_PUBLIC[:43] + "A", "decodes to 33 bytes; a WireGuard key is 32 bytes"),
        (ALICE_PUBLIC[:42] + "==", "decodes to 31 bytes"),
        (NONCANONICAL, "is not a key as wg prints it"),
        ("A" * 43 + "=", "all zeros"),
        ("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a", "got 64"),  # hex, not base64
    ],
)
def test_validate_public_key_rejects(value: str, message: str) -> None:
    with pytest.raises(InvalidKeyError, match=re.escape(message)) as error:
        validate_public_key(value)
    assert str(error.value).startswith("publicKey ")


def test_noncanonical_key_decodes_to_a_valid_key() -> None:
    # The case the canonical check exists for: the decoder alone would take it for Alice's key.
    assert base64.b64decode(NONCANONICAL) == base64.b64decode(ALICE_PUBLIC)


@pytest.mark.parametrize("value", [ALICE_PRIVATE[:-1], ALICE_PRIVATE[:43] + "!", ALICE_PRIVATE[:42] + "=="])
def test_messages_never_quote_the_key(value: str) -> None:
    for check in (validate_public_key, public_key_of):
        with pytest.raises(InvalidKeyError) as error:
            check(value)
        assert value[:20] not in str(error.value)


def test_public_key_of_rejects_a_malformed_private_key() -> None:
    with pytest.raises(InvalidKeyError, match=r"^private key must be 44 characters"):
        public_key_of("not a key")
