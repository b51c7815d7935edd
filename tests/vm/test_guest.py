"""What the kernel tier relies on inside the guest; tests/vm/test_vm.py runs this file there (`vm` marker).

In file order on purpose: the first test is the first to need the WireGuard module, so it proves the
kernel's own module loader (request_module) finds it, not an earlier modprobe.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm


def sh(*argv: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kvt-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def test_the_kernel_loads_wireguard_on_demand(netns: str) -> None:
    assert not Path("/sys/module/wireguard").exists(), "something loaded wireguard before this test"
    sh("ip", "-n", netns, "link", "add", "wg0", "type", "wireguard")
    assert "wireguard" in sh("ip", "-n", netns, "-d", "link", "show", "wg0").stdout
    assert Path("/sys/module/wireguard").is_dir()


def test_modprobe_loads_a_module() -> None:
    assert not Path("/sys/module/dummy").exists()
    sh("modprobe", "dummy", "numdummies=0")
    assert Path("/sys/module/dummy").is_dir()


def test_namespaces_reach_each_other_over_a_veth(netns: str) -> None:
    other = f"{netns}-b"
    sh("ip", "netns", "add", other)
    try:
        sh("ip", "link", "add", "va", "netns", netns, "type", "veth", "peer", "name", "vb", "netns", other)
        for ns, dev, address in ((netns, "va", "10.99.0.1/24"), (other, "vb", "10.99.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", address, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # Nothing listens on the far side: "connection refused" is its kernel's answer, a timeout is none.
        curl = sh(
            "ip", "netns", "exec", netns, "curl", "-s", "--max-time", "10", "http://10.99.0.2:9/", check=False
        )  # fmt: skip
        assert curl.returncode == 7, f"curl exited {curl.returncode} (7: refused, 28: no answer)"
    finally:
        sh("ip", "netns", "del", other, check=False)


def test_nft_takes_a_ruleset_on_stdin(netns: str) -> None:
    ruleset = "table inet kvpn_vm {\n  chain input {\n    type filter hook input priority 0; policy accept;\n  }\n}\n"
    sh("ip", "netns", "exec", netns, "nft", "-f", "-", stdin=ruleset)
    listed = json.loads(sh("ip", "netns", "exec", netns, "nft", "-j", "list", "tables").stdout)
    assert {"family": "inet", "name": "kvpn_vm"} in [
        {k: v["table"][k] for k in ("family", "name")} for v in listed["nftables"] if "table" in v
    ]


def test_wireguard_go_and_wg(netns: str, tmp_path: Path) -> None:
    name = f"kvg{secrets.token_hex(3)}"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, "wireguard-go", "--foreground", name],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        socket = Path(f"/var/run/wireguard/{name}.sock")
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert proc.poll() is None, f"wireguard-go exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"wireguard-go made no {socket}"
            time.sleep(0.1)
        key = tmp_path / "key"
        key.write_text(sh("wg", "genkey").stdout)
        sh("ip", "netns", "exec", netns, "wg", "set", name, "listen-port", "51999", "private-key", str(key))
        dump = sh("ip", "netns", "exec", netns, "wg", "show", name, "dump").stdout.split("\t")
        assert dump[0] == key.read_text().strip()
        assert dump[2] == "51999"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_venv_python_has_the_project() -> None:
    assert sys.prefix != sys.base_prefix, "not the project's venv"
    assert shutil.which("python") == str(Path(sys.prefix) / "bin" / "python")
    import kubernetes  # noqa: PLC0415 -- the import is what is tested
    import pyroute2  # noqa: PLC0415

    assert kubernetes.__version__
    assert pyroute2.__version__
