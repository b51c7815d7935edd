"""Config assembly: the local private key goes in, DNS is handled as asked per platform, wg-quick and the
WireGuard apps accept the result; the stamp join writes; files replaced whole."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.wgfiles import assert_only_app_keys, parse_like_the_apps
from kvpn_cli import dns as dns_support
from kvpn_cli.cluster import CliError
from kvpn_cli.wgquick import (
    DnsMode,
    Platform,
    Stamp,
    assemble,
    dns_mode_of,
    interface_name,
    macos_resolver_files,
    split_dns_hooks,
    stamp_of,
    stamped,
    this_machine,
    write_private,
)
from kvpn_core import keys
from kvpn_core.wgquick import ClientConfig, Dns, allowed_ips, dns_of, render_client_config

PRIVATE = keys.generate_private_key()
PSK = keys.generate_preshared_key()


def byo_config(preshared_key: str | None = PSK) -> str:
    """wg0.conf as the operator renders it for a bring-your-own-key peer."""
    return render_client_config(
        ClientConfig(
            private_key=None,
            public_key=keys.public_key_of(PRIVATE),
            addresses=["10.8.0.2"],
            dns_servers=["10.96.0.10"],
            dns_search=["svc.cluster.local", "cluster.local"],
            mtu=1420,
            server_public_key=keys.public_key_of(keys.generate_private_key()),
            preshared_key=preshared_key,
            endpoint="vpn.example.com:51820",
            allowed_ips=["10.96.0.0/12", "10.244.0.0/16"],
            persistent_keepalive=25,
            name="dev/laptop",
        )
    )


def test_the_local_key_replaces_the_placeholder() -> None:
    config = assemble(byo_config(), PRIVATE, DnsMode.FULL)
    assert f"[Interface]\nPrivateKey = {PRIVATE}\nAddress = 10.8.0.2/32\n" in config
    assert "# PrivateKey" not in config
    assert "DNS = 10.96.0.10, svc.cluster.local, cluster.local\n" in config


def test_a_preshared_key_from_the_secret_is_added_when_the_file_lacks_it() -> None:
    config = assemble(byo_config(preshared_key=None), PRIVATE, DnsMode.FULL, preshared_key=PSK)
    assert f"[Peer]\nPresharedKey = {PSK}\n" in config
    assert assemble(byo_config(), PRIVATE, DnsMode.FULL, preshared_key=PSK).count("PresharedKey") == 1


def test_split_dns_hands_the_cluster_domains_to_resolved() -> None:
    config = assemble(byo_config(), PRIVATE, DnsMode.SPLIT)
    assert "DNS =" not in config
    assert (
        "MTU = 1420\n"
        "PostUp = resolvectl dns %i 10.96.0.10; resolvectl domain %i svc.cluster.local cluster.local\n"
        "PreDown = resolvectl revert %i\n\n[Peer]\n"
    ) in config


def test_dns_none_leaves_dns_alone() -> None:
    config = assemble(byo_config(), PRIVATE, DnsMode.NONE)
    assert "DNS" not in config
    assert "resolvectl" not in config


def test_split_tunnel_only() -> None:
    assert allowed_ips(assemble(byo_config(), PRIVATE, DnsMode.SPLIT)) == ["10.96.0.0/12", "10.244.0.0/16"]


def test_dns_line_splits_into_servers_and_domains() -> None:
    assert dns_of("DNS = 10.96.0.10, fd00::a, svc.cluster.local\n") == Dns(
        ["10.96.0.10", "fd00::a"], ["svc.cluster.local"]
    )
    assert split_dns_hooks(Dns([], ["cluster.local"])) == []


def test_macos_resolver_files_one_per_domain() -> None:
    assert macos_resolver_files(Dns(["10.96.0.10"], ["svc.cluster.local", "cluster.local"])) == {
        "/etc/resolver/svc.cluster.local": "nameserver 10.96.0.10\n",
        "/etc/resolver/cluster.local": "nameserver 10.96.0.10\n",
    }


def test_interface_names_fit_the_kernel_limit() -> None:
    assert interface_name("dev") == "kvpn-dev"
    assert len(interface_name("a-very-long-server-name")) <= 15


def test_write_private_is_owner_only_even_over_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "kvpn-dev.conf"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, "new")
    assert path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", list(DnsMode))
def test_wg_quick_strip_accepts_every_mode(tmp_path: Path, mode: DnsMode) -> None:
    # wg-quick re-runs itself through sudo unless root, even to strip: this needs both, never skips.
    if shutil.which("wg-quick") is None or os.geteuid() != 0:
        pytest.fail("needs wg-quick (make setup) and root", pytrace=False)
    path = tmp_path / "kvpn-dev.conf"
    write_private(path, stamped(assemble(byo_config(), PRIVATE, mode), STAMP))
    result = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert f"PrivateKey = {PRIVATE}" in result.stdout
    assert "resolvectl" not in result.stdout
    assert "DNS" not in result.stdout

    # wg parses the whole file before it looks for the interface: on one that does not exist, the only
    # error left is about the interface (as in tests/unit/core/test_wgquick.py).
    # wg resolves a host name while it parses: an address keeps the check off this machine's DNS.
    path.write_text(result.stdout.replace("vpn.example.com:51820", "203.0.113.10:51820"))
    parsed = subprocess.run(["wg", "setconf", "kvpn-no-such0", str(path)], capture_output=True, text=True, check=False)
    assert "Configuration parsing error" not in parsed.stderr
    assert "Unable to modify interface" in parsed.stderr


# --- the platforms ---------------------------------------------------------------------------

APPS = [Platform.MACOS, Platform.IOS, Platform.ANDROID, Platform.WINDOWS]
STAMP = Stamp("kvpn", "dev", "0123456789abcdef", DnsMode.SPLIT, Platform.LINUX)


@pytest.mark.parametrize("mode", list(DnsMode))
@pytest.mark.parametrize("platform", APPS)
def test_the_apps_files_have_only_keys_the_apps_read(platform: Platform, mode: DnsMode) -> None:
    text = stamped(assemble(byo_config(), PRIVATE, mode, platform=platform), STAMP)
    sections = assert_only_app_keys(text)
    assert sections["Interface"]["PrivateKey"] == PRIVATE
    assert sections["Peer"]["AllowedIPs"] == "10.96.0.0/12, 10.244.0.0/16"
    assert ("DNS" in sections["Interface"]) is (mode is DnsMode.FULL)


def test_the_apps_files_lose_whatever_wg_quick_key_the_secret_might_carry() -> None:
    secret = byo_config().replace("MTU = 1420\n", "MTU = 1420\nPostUp = echo up\nTable = off\n")
    for platform in APPS:
        assert set(parse_like_the_apps(assemble(secret, PRIVATE, DnsMode.FULL, platform=platform))["Interface"]) == {
            "PrivateKey",
            "Address",
            "DNS",
            "MTU",
        }
    assert "PostUp = echo up" in assemble(secret, PRIVATE, DnsMode.FULL, platform=Platform.LINUX)


def test_macos_split_dns_lives_in_resolver_files_not_the_file() -> None:
    text = assemble(byo_config(), PRIVATE, DnsMode.SPLIT, platform=Platform.MACOS)
    assert "resolvectl" not in text
    assert "PostUp" not in text
    assert "DNS" not in text
    assert assemble(byo_config(), PRIVATE, DnsMode.SPLIT, platform=Platform.LINUX).count("resolvectl") == 3


@pytest.mark.parametrize(
    ("value", "platform"),
    [("linux", Platform.LINUX), ("darwin", Platform.MACOS), ("win32", Platform.WINDOWS), ("freebsd14", Platform.LINUX)],
)
def test_this_machine(value: str, platform: Platform) -> None:
    assert this_machine(value) is platform


def test_split_dns_is_the_default_only_where_it_can_work() -> None:
    assert [p.default_dns for p in Platform] == [DnsMode.SPLIT, DnsMode.SPLIT, DnsMode.FULL, DnsMode.FULL, DnsMode.FULL]


@pytest.mark.parametrize("platform", [Platform.IOS, Platform.ANDROID, Platform.WINDOWS])
def test_split_dns_for_an_app_says_what_to_choose(platform: Platform) -> None:
    with pytest.raises(CliError) as refused:
        dns_support.check_mode(DnsMode.SPLIT, platform)
    assert str(refused.value) == (
        f"the WireGuard app on {platform.label} cannot send only the cluster's domains to cluster DNS: use "
        "--dns full (every lookup goes to cluster DNS while connected) or --dns none (cluster names will not resolve)"
    )
    dns_support.check_mode(DnsMode.FULL, platform)
    dns_support.check_mode(DnsMode.NONE, platform)


def test_split_dns_on_linux_needs_resolved_here_but_not_for_another_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dns_support, "resolved_running", lambda: False)
    dns_support.check_mode(DnsMode.SPLIT, Platform.MACOS)
    monkeypatch.setattr("kvpn_cli.wgquick.this_machine", lambda: Platform.LINUX)
    with pytest.raises(CliError, match="split DNS needs systemd-resolved"):
        dns_support.check_mode(DnsMode.SPLIT, Platform.LINUX)
    monkeypatch.setattr("kvpn_cli.wgquick.this_machine", lambda: Platform.MACOS)
    dns_support.check_mode(DnsMode.SPLIT, Platform.LINUX)  # a file for a Linux machine, written on a Mac


def test_macos_split_dns_prints_the_resolver_commands(capsys: pytest.CaptureFixture[str]) -> None:
    cluster_dns = Dns(["10.96.0.10"], ["svc.cluster.local", "cluster.local"])
    dns_support.print_followup(DnsMode.SPLIT, Platform.MACOS, cluster_dns)
    dns_support.print_followup(DnsMode.SPLIT, Platform.LINUX, cluster_dns)
    dns_support.print_followup(DnsMode.FULL, Platform.MACOS, cluster_dns)
    assert capsys.readouterr().out.splitlines() == [
        "split DNS: sudo mkdir -p /etc/resolver && printf 'nameserver 10.96.0.10\\n' | sudo tee "
        "/etc/resolver/svc.cluster.local",
        "split DNS: sudo mkdir -p /etc/resolver && printf 'nameserver 10.96.0.10\\n' | sudo tee "
        "/etc/resolver/cluster.local",
    ]


# --- the stamp -------------------------------------------------------------------------------


def test_the_stamp_follows_the_header_and_reads_back() -> None:
    text = stamped(assemble(byo_config(), PRIVATE, DnsMode.SPLIT), STAMP)
    lines = text.splitlines()
    assert lines[0].startswith("# kvpn: WireGuard tunnel of VpnPeer dev/laptop ")
    assert lines[2] == "# kvpn: server kvpn/dev revision 0123456789abcdef (--dns split --platform linux)"
    assert lines[3:5] == ["", "[Interface]"]
    assert stamp_of(text) == STAMP


def test_a_new_stamp_replaces_the_old_one() -> None:
    newer = Stamp("kvpn", "dev", "fedcba9876543210", DnsMode.FULL, Platform.MACOS)
    unstamped = byo_config()
    text = stamped(stamped(unstamped, STAMP), newer)
    assert text.count("# kvpn: server ") == 1
    assert stamp_of(text) == newer
    assert text.replace(newer.line() + "\n", "") == unstamped


def test_a_file_without_a_stamp_or_with_a_strange_one() -> None:
    assert stamp_of(byo_config()) is None
    assert stamp_of("# kvpn: server a/b revision unknown\n") == Stamp("a", "b", None)
    assert stamp_of("# kvpn: server a/b revision 1 (--dns carrier-pigeon --platform plan9)\n") == Stamp("a", "b", "1")


def test_the_dns_mode_of_a_file() -> None:
    assert dns_mode_of(stamped(byo_config(), Stamp("a", "b", "1", DnsMode.SPLIT, Platform.MACOS))) is DnsMode.SPLIT
    # Files written before the stamp: what their lines show.
    assert dns_mode_of(assemble(byo_config(), PRIVATE, DnsMode.SPLIT)) is DnsMode.SPLIT
    assert dns_mode_of(assemble(byo_config(), PRIVATE, DnsMode.FULL)) is DnsMode.FULL
    assert dns_mode_of(assemble(byo_config(), PRIVATE, DnsMode.NONE)) is DnsMode.NONE


# --- writing ---------------------------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file_and_no_scratch(tmp_path: Path) -> None:
    path = tmp_path / "kvpn-dev.conf"
    write_private(path, "old")
    with pytest.raises(UnicodeEncodeError):
        write_private(path, "new \udc80")  # a lone surrogate: the encoder fails half way through
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["kvpn-dev.conf"]


def test_write_private_replaces_a_symlinks_target(tmp_path: Path) -> None:
    target = tmp_path / "dotfiles" / "kvpn-dev.conf"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "kvpn-dev.conf"
    link.symlink_to(target)
    write_private(link, "new")
    assert link.is_symlink()
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o600
