"""What the WireGuard apps accept in a file, for the tests of the files kvpn writes for them.

The apps' parsers (wireguard-apple for iOS and macOS, wireguard-android, wireguard-windows without
scripts) take these keys and refuse a file with any other. Written out here, not imported from the code,
so that widening the code's list is a decision a test sees.
"""

from __future__ import annotations

APP_KEYS = {
    "Interface": {"PrivateKey", "Address", "DNS", "MTU", "ListenPort"},
    "Peer": {"PublicKey", "PresharedKey", "AllowedIPs", "Endpoint", "PersistentKeepalive"},
}


def parse_like_the_apps(text: str) -> dict[str, dict[str, str]]:
    """The apps' grammar: `#` starts a comment anywhere, [Interface] once, [Peer] sections, Key = value
    lines inside a section; anything else is an error, as it is to them."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line in ("[Interface]", "[Peer]"):
            assert line.strip("[]") not in sections, f"line {number}: a second {line}"
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"line {number}: {raw!r} outside a section"
        key, equals, value = line.partition("=")
        assert equals, f"line {number}: {raw!r} is not Key = value"
        assert key.strip() not in current, f"line {number}: {key.strip()} twice"
        current[key.strip()] = value.strip()
    return sections


def assert_only_app_keys(text: str) -> dict[str, dict[str, str]]:
    """The file parsed as the apps parse it, with both sections and no key the apps refuse."""
    sections = parse_like_the_apps(text)
    assert set(sections) == set(APP_KEYS), sections
    for section, fields in sections.items():
        assert set(fields) <= APP_KEYS[section], (section, set(fields) - APP_KEYS[section])
    return sections
