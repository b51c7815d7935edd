"""kubectl-vpn as one file (`make cli-zipapp`, hack/cli_zipapp.py), run as a laptop runs it: by the machine's own
python3, with no venv on PATH or PYTHONPATH and a HOME of its own. Its help and errors, what it holds, where every
module it loads comes from, that it builds to the same bytes, and join, status and qr against the real API server
and operator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from harness.controlplane import ControlPlane
from harness.kvpn import Kvpn, decode
from kvpn_core import keys

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")
LEFT_OUT = ("kopf", "pyroute2", "prometheus_client", "aiohttp")
"""The operator's and the agent's own dependencies, and the asyncio stack only kubernetes.aio uses."""
MAX_BYTES = 30_000_000  # 22.6 MB when written: kubernetes' generated client, as source and bytecode, is half of it
PEERS = "vpnpeers"


def build(output: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "cli_zipapp.py"), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"hack/cli_zipapp.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    return output


@pytest.fixture(scope="module")
def zipapp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from this working tree and this venv, as `make cli-zipapp` builds dist/kubectl-vpn."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"no {SYSTEM_PYTHON} on this machine")
    minor = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if minor != f"{sys.version_info.major}.{sys.version_info.minor}":
        pytest.skip(f"{SYSTEM_PYTHON} is {minor}; the zipapp is for the venv's Python, {sys.version_info[:2]}")
    return build(tmp_path_factory.mktemp("zipapp") / "kubectl-vpn")


@pytest.fixture
def laptop(tmp_path: Path) -> dict[str, str]:
    """A shell's environment on a laptop: the system's PATH, a fresh HOME, no Python settings."""
    home = tmp_path / "home"
    home.mkdir()
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def run(
    zipapp: Path, env: dict[str, str], *args: str, python: Path | None = SYSTEM_PYTHON
) -> subprocess.CompletedProcess[str]:
    """`python3 kubectl-vpn ARGS`, or with python=None the file itself, by its shebang (as kubectl runs plugins)."""
    command = [str(zipapp), *args] if python is None else [str(python), str(zipapp), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


def facts(zipapp: Path) -> dict[str, Any]:
    """The build's kvpn-zipapp.json: its Python, platform, distributions, what it unpacks and where to."""
    with zipfile.ZipFile(zipapp) as archive:
        info: dict[str, Any] = json.loads(archive.read("kvpn-zipapp.json"))
    return info


def test_help_runs_on_the_systems_python_and_unpacks_the_compiled_packages_once(
    zipapp: Path, laptop: dict[str, str]
) -> None:
    first = run(zipapp, laptop, "--help")
    assert first.returncode == 0, first.stderr
    assert "join" in first.stdout
    assert "status" in first.stdout
    assert first.stderr == ""
    cache = Path(laptop["HOME"], ".cache", "kvpn", "zipapp")
    [unpacked] = cache.iterdir()  # nothing half-done beside it
    assert unpacked.name == facts(zipapp)["digest"]
    assert {"pydantic_core", "cryptography", "yaml", "certifi"} <= {path.name for path in unpacked.iterdir()}
    before = {path: path.stat().st_mtime_ns for path in unpacked.rglob("*")}

    by_shebang = run(zipapp, laptop, "join", "--help", python=None)
    assert by_shebang.returncode == 0, by_shebang.stderr
    assert "--dns" in by_shebang.stdout
    assert {path: path.stat().st_mtime_ns for path in unpacked.rglob("*")} == before
    assert list(cache.iterdir()) == [unpacked]


def test_a_failure_is_one_line_and_the_exit_status(zipapp: Path, laptop: dict[str, str]) -> None:
    result = run(zipapp, {**laptop, "KUBECONFIG": "/nonexistent"}, "status")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("error: no cluster to talk to")


def test_it_holds_the_cli_and_its_dependencies_only(zipapp: Path) -> None:
    size = zipapp.stat().st_size
    assert size < MAX_BYTES, f"{size} bytes"
    assert zipapp.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(zipapp, os.X_OK)
    info = facts(zipapp)
    native = str(info["native"])
    with zipfile.ZipFile(zipapp) as archive:
        names = archive.namelist()
    tops = {name.removeprefix(native).split("/")[0] for name in names}
    assert {"__main__.py", "kvpn_cli", "kvpn_core", "kubernetes", "pydantic", "pydantic_core", "segno"} <= tops
    assert not {top for top in tops if top.split(".")[0] in LEFT_OUT}
    assert "kvpn_cli/main.py" in names
    assert "kvpn_cli/main.pyc" in names  # compiled at build time: zipimport never writes bytecode
    assert not [name for name in names if name.startswith("kubernetes/aio/") or name.endswith("_test.py")]
    # What cannot be imported from a zip is stored apart, to be unpacked.
    assert [name for name in names if name.endswith(".so") and not name.startswith(native)] == []
    assert {"pydantic_core", "cryptography"} <= set(info["unpacked"])
    distributions = {name.lower() for name in info["distributions"]}
    assert {"kubernetes", "pydantic", "cryptography", "pyyaml", "segno"} <= distributions
    assert not distributions & {"kopf", "pyroute2", "prometheus-client", "aiohttp"}


PROBE = """
import json, runpy, sys, sysconfig
before = set(sys.modules)  # the interpreter's own start-up, .pth files included, is not the zipapp's doing
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
stdlib = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
found = {name: getattr(module, "__file__", None) for name, module in sys.modules.items() if name not in before}
print(json.dumps({"stdlib": sorted(stdlib), "modules": found}), file=sys.stderr)
"""


def test_every_module_it_loads_comes_from_the_file_or_its_cache(zipapp: Path, laptop: dict[str, str]) -> None:
    """Not the system's dist-packages (Debian's python3-yaml is there), and nothing of the server side."""
    result = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", PROBE, str(zipapp)],
        env=laptop,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "usage: kubectl vpn" in result.stdout, result.stderr
    report = json.loads(result.stderr.splitlines()[-1])
    modules: dict[str, str | None] = report["modules"]
    cache = str(Path(laptop["HOME"], ".cache", "kvpn", "zipapp")) + "/"
    ours = (str(zipapp) + "/", cache)
    assert not [name for name in modules if name.split(".")[0] in LEFT_OUT]
    elsewhere = {
        name: path
        for name, path in modules.items()
        if path and not path.startswith(ours) and not path.startswith(tuple(report["stdlib"]))
    }
    assert elsewhere == {}
    for name in ("kvpn_cli.main", "kubernetes.client", "pydantic", "segno"):
        assert (modules[name] or "").startswith(str(zipapp) + "/"), name
    for name in ("pydantic_core._pydantic_core", "cryptography.hazmat.bindings._rust", "yaml"):
        assert (modules[name] or "").startswith(cache), name


def _other_python() -> Path | None:
    """A CPython of another minor version (3.8 or later) on PATH or under pyenv, if the machine has one."""
    this = f"{sys.version_info.major}.{sys.version_info.minor}"
    names = [f"python3.{minor}" for minor in range(8, 20) if f"3.{minor}" != this]
    for name in names:
        found = shutil.which(name)
        if found and "shims" not in Path(found).parts:  # pyenv's shims run only the versions it has selected
            return Path(found)
    for candidate in sorted(Path.home().glob(".pyenv/versions/3.*/bin/python3")):
        if not candidate.parent.parent.name.startswith((f"{this}.", "3.6", "3.7")):
            return candidate
    return None


def test_another_python_hands_it_to_the_right_one_or_says_what_to_do(zipapp: Path, laptop: dict[str, str]) -> None:
    other = _other_python()
    if other is None:
        pytest.skip("no Python of another minor version on this machine")
    handed = run(zipapp, laptop, "--help", python=other)  # python3.11 is on the laptop's PATH
    assert handed.returncode == 0, handed.stderr
    assert "join" in handed.stdout

    alone = run(zipapp, {**laptop, "PATH": "/nonexistent"}, "--help", python=other)
    assert alone.returncode == 1
    [line] = alone.stderr.splitlines()
    assert line.startswith(f"error: this kubectl-vpn was built for CPython {facts(zipapp)['python']}")
    assert "pipx install ." in line


def test_the_same_inputs_build_the_same_bytes(zipapp: Path, tmp_path: Path) -> None:
    again = build(tmp_path / "kubectl-vpn")
    assert again.read_bytes() == zipapp.read_bytes()


@pytest.mark.usefixtures("operator")
def test_join_status_and_qr_against_the_cluster(
    zipapp: Path, laptop: dict[str, str], control_plane: ControlPlane, api: client.ApiClient, namespace: str
) -> None:
    kvpn = Kvpn(api)
    env = {**laptop, "KUBECONFIG": str(control_plane.kubeconfig)}
    kvpn.server(namespace, "dev")
    routes = Path(laptop["HOME"], "routes.json")
    routes.write_text('[{"dst": "192.168.1.0/24", "dev": "eth0"}]')  # nothing that overlaps the server's
    conf = Path(laptop["HOME"], "kvpn-dev.conf")

    joined = run(
        zipapp, env, "join", "dev", "-n", namespace, "--name", "laptop", "--dns", "none",
        "-o", str(conf), "--routes-from", str(routes),
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    assert conf.stat().st_mode & 0o777 == 0o600
    private_key = next(line.split(" = ", 1)[1] for line in conf.read_text().splitlines() if line.startswith("Private"))
    peer = kvpn.get(PEERS, namespace, "laptop") or {}
    assert keys.public_key_of(private_key) == peer["status"]["publicKey"]

    status = run(zipapp, env, "status", "-n", namespace, "-o", "json")
    assert status.returncode == 0, status.stderr
    assert [(p["name"], p["address"], p["ready"]) for p in json.loads(status.stdout)] == [
        ("laptop", peer["status"]["address"], True)
    ]

    kvpn.peer(namespace, "phone")
    secret = kvpn.wait_ready(PEERS, namespace, "phone")["status"]["configSecretName"]
    wg0 = decode(kvpn.secret(namespace, secret) or {}, "wg0.conf")
    png = Path(laptop["HOME"], "phone.png")
    shown = run(zipapp, env, "qr", "phone", "-n", namespace, "--png", str(png))
    assert shown.returncode == 0, shown.stderr
    scanned = subprocess.run(["zbarimg", "--raw", "-q", str(png)], capture_output=True, text=True, check=True)
    assert scanned.stdout == f"{wg0}\n"
