"""Packaging: the source roots never shadow the standard library's `operator`; the console script runs."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

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
