"""Packaging: the source roots never shadow the standard library's `operator`; the console script runs; the
one-file CLI (hack/cli_zipapp.py) carries what the CLI imports; the krew manifest has krew's shape."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from hack import cli_zipapp, krew
from packaging.utils import canonicalize_name

import kvpn_operator

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_operator_is_the_standard_library_module_in_this_process() -> None:
    import operator  # noqa: PLC0415 - the import under test

    assert Path(operator.__file__ or "").resolve().parent == STDLIB
    assert callable(operator.itemgetter)


def test_operator_is_the_standard_library_module_with_the_source_roots_first_on_the_path() -> None:
    """From the repository root ('' first on sys.path) with operator/ and the root on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO)])}
    probe = "import operator, collections; print(operator.__file__); print(operator.itemgetter(1)([0, 42]))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    location, value = result.stdout.splitlines()
    assert Path(location).resolve().parent == STDLIB
    assert value == "42"


def test_source_roots_are_not_packages() -> None:
    source_root = Path(kvpn_operator.__file__ or "").resolve().parent.parent
    assert source_root == REPO / "operator"
    assert not (source_root / "__init__.py").exists()
    for root in ("core", "agent", "cli", "relay"):
        assert not (REPO / root / "__init__.py").exists()


@pytest.mark.parametrize(
    ("script", "options"),
    [
        ("kvpn-operator", ("--all-namespaces", "--liveness-port", "--log-format")),
        ("kvpn-relay", ("--port", "--health-port", "--max-streams", "--log-format")),
    ],
)
def test_console_script_help(script: str, options: tuple[str, ...]) -> None:
    """Without a cluster: the image's build runs every script's --help."""
    path = Path(sys.executable).with_name(script)
    env = {**os.environ, "KUBECONFIG": "/nonexistent"}
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60, check=False, env=env)
    assert result.returncode == 0, result.stderr
    for option in options:
        assert option in result.stdout


SERVER_SIDE = ("kopf", "pyroute2", "prometheus_client")
"""The operator's and the agent's own dependencies, which a laptop's install of the CLI must not need."""

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not installed on a laptop")
sys.meta_path.insert(0, Block())
"""


def test_the_cli_installs_and_runs_without_the_operators_or_the_agents_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    assert not [name for name in ("kopf", "pyroute2", "prometheus-client") if name in base]
    assert project["optional-dependencies"]["operator"]
    assert project["optional-dependencies"]["agent"]
    # Every module of the CLI and of the core imports, and `kubectl-vpn --help` runs, with them absent.
    probe = BLOCKER.format(blocked=set(SERVER_SIDE)) + (
        "import pkgutil, importlib, kvpn_cli, kvpn_core, sys\n"
        "for package in (kvpn_core, kvpn_cli):\n"
        "    for module in pkgutil.iter_modules(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(module.name)\n"
        "from kvpn_cli.main import main\n"
        "sys.argv = ['kubectl-vpn', '--help']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "join" in result.stdout


def _third_party_imports(*folders: Path) -> set[str]:
    """Top-level names the modules under `folders` import, less the standard library's and kvpn's own."""
    names: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and not name.startswith("kvpn_")}


def test_the_zipapp_holds_what_the_cli_imports_and_none_of_the_server_side() -> None:
    """hack/cli_zipapp.py's distributions: the base dependencies followed through, as installed here."""
    carried = {canonicalize_name(dist.metadata["Name"]) for dist in cli_zipapp.closure(cli_zipapp.base_requirements())}
    providers = importlib.metadata.packages_distributions()
    imported = _third_party_imports(REPO / "cli" / "kvpn_cli", REPO / "core" / "kvpn_core")
    assert {"kubernetes", "pydantic", "cryptography", "yaml", "segno"} <= imported
    for name in imported:
        assert {canonicalize_name(dist) for dist in providers[name]} & carried, f"{name} is not in the zipapp"
    left_out = {"kopf", "pyroute2", "prometheus-client", "aiohttp", "aiohttp-retry", "pytest", "mypy"}
    assert not carried & left_out


KREW_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _fake_zipapp(path: Path) -> Path:
    """What hack/krew.py reads of a zipapp: its kvpn-zipapp.json."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__main__.py", "print('kubectl-vpn')\n")
        archive.writestr("kvpn-zipapp.json", json.dumps({"platform": "linux-x86_64", "python": "3.11"}))
    return path


def test_the_krew_manifest_names_the_archive_it_was_rendered_for(tmp_path: Path) -> None:
    """`make krew`: krew's Plugin schema, the sha256 of the archive beside it, kubectl-vpn inside that archive."""
    zipapp = _fake_zipapp(tmp_path / "kubectl-vpn")
    release = krew.build(zipapp, tmp_path / "krew", release_url="https://example.invalid/releases/")
    manifest = yaml.safe_load(release.manifest.read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

    assert manifest["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2"
    assert manifest["kind"] == "Plugin"
    assert manifest["metadata"] == {"name": "vpn"}
    spec = manifest["spec"]
    assert spec["version"] == f"v{version}"
    for key in ("homepage", "shortDescription", "description", "caveats"):
        assert isinstance(spec[key], str), key
        assert spec[key].strip(), key
    assert spec["homepage"].startswith("https://")
    assert "3.11" in spec["caveats"]
    [platform] = spec["platforms"]
    assert platform["selector"] == {"matchLabels": {"os": "linux", "arch": "amd64"}}
    assert platform["bin"] == "kubectl-vpn"
    assert platform["files"] == [{"from": "kubectl-vpn", "to": "."}]
    assert platform["uri"] == f"https://example.invalid/releases/v{version}/{release.archive.name}"
    assert KREW_SHA256.match(platform["sha256"])
    assert platform["sha256"] == hashlib.sha256(release.archive.read_bytes()).hexdigest()
    assert "{" not in release.manifest.read_text()  # every placeholder filled in

    with tarfile.open(release.archive) as tar:
        [member] = tar.getmembers()
        assert (member.name, member.mode, member.isfile()) == ("kubectl-vpn", 0o755, True)
        extracted = tar.extractfile(member)
        assert extracted is not None
        assert extracted.read() == zipapp.read_bytes()
    again = krew.build(zipapp, tmp_path / "again")
    assert again.archive.read_bytes() == release.archive.read_bytes()


@pytest.mark.parametrize(
    ("platform", "labels"),
    [
        ("linux-x86_64", ("linux", "amd64")),
        ("linux-aarch64", ("linux", "arm64")),
        ("macosx-11.0-arm64", ("darwin", "arm64")),
    ],
)
def test_krew_platforms_are_the_zipapps(platform: str, labels: tuple[str, str]) -> None:
    assert krew.krew_platform(platform) == labels
