"""WireGuard keys: generate key pairs and preshared keys, derive public keys, validate user-supplied keys."""

from __future__ import annotations

import base64
import secrets

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_BYTES = 32
KEY_CHARS = 44


class InvalidKeyError(ValueError):
    """A string that is not a usable WireGuard key; the message tells the user what is wrong with it."""


def generate_private_key() -> str:
    """A new X25519 private key, in the format of `wg genkey`."""
    return _clamp(X25519PrivateKey.generate().private_bytes_raw())


def clamped(private_key: str) -> str:
    """The private key as WireGuard stores and reports it (clamped); the same public key.

    A key written by hand may be unclamped: compared with what a device reports, it would always
    look changed.
    """
    return _clamp(decode_key(private_key, "private key"))


def _clamp(key: bytes) -> str:
    # Clamp as `wg genkey` does (RFC 7748 section 5). X25519 clamps on use anyway, so this changes no
    # public key; it makes our keys byte-for-byte the kind wg produces.
    raw = bytearray(key)
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return _encode(bytes(raw))


def public_key_of(private_key: str) -> str:
    """The public key of a private key, as `wg pubkey` prints it."""
    raw = decode_key(private_key, "private key")
    public = X25519PrivateKey.from_private_bytes(raw).public_key()
    return _encode(public.public_bytes_raw())


def generate_preshared_key() -> str:
    """A new preshared key, in the format of `wg genpsk`."""
    return _encode(secrets.token_bytes(KEY_BYTES))


def validate_public_key(value: str) -> str:
    """Return value if it is a WireGuard public key, else raise InvalidKeyError."""
    if not any(decode_key(value, "publicKey")):
        raise InvalidKeyError("publicKey is all zeros, which is not a usable key: paste the output of `wg pubkey`")
    return value


def _encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_key(value: str, what: str = "key") -> bytes:
    """The 32 bytes of a key in WireGuard's base64 form; InvalidKeyError (a ValueError) naming `what` if not."""
    # Messages never quote the value: a user who pastes their private key into publicKey must not
    # find it echoed into a condition, an Event or a log.
    if len(value) != KEY_CHARS:
        raise InvalidKeyError(f"{what} must be {KEY_CHARS} characters of base64 (a WireGuard key), got {len(value)}")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters
        raise InvalidKeyError(
            f"{what} must be base64 (letters, digits, '+', '/', ending in '='), as wg prints keys"
        ) from None
    if len(raw) != KEY_BYTES:
        raise InvalidKeyError(f"{what} decodes to {len(raw)} bytes; a WireGuard key is {KEY_BYTES} bytes")
    # base64 decoders ignore the unused low bits of the last character, so several strings decode to
    # the same key; accept only the one wg prints, so a key has one spelling wherever it is compared.
    if _encode(raw) != value:
        raise InvalidKeyError(f"{what} is not a key as wg prints it: its last character before '=' is altered")
    return raw
