"""Config assembly: the local private key goes in, DNS is handled as asked, wg-quick accepts the result."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kvpn_cli.wgquick import (
    DnsMode,
    assemble,
    interface_name,
    macos_resolver_files,
    split_dns_hooks,
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
    write_private(path, assemble(byo_config(), PRIVATE, mode))
    result = subprocess.run(["wg-quick", "strip", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert f"PrivateKey = {PRIVATE}" in result.stdout
    assert "resolvectl" not in result.stdout
    assert "DNS" not in result.stdout
