"""The image built from the Dockerfile by hack/image.sh, as a node gets it: from the OCI archive.

Every console script pyproject.toml declares answers --help inside it; the chart's uid 65532 has a
name; it runs as that uid by default; nothing of the build (pip's cache, the source tree, build
secrets, compilers) is left in it; and the archive names the image the way the chart's defaults
ask containerd for it. The archive is unpacked into a private buildah store, removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "image.sh"
UID = 65532
# containerd's name for the chart's default image.repository, `kvpn`.
REPOSITORY = "docker.io/library/kvpn"


@dataclass(frozen=True)
class Built:
    """What hack/image.sh printed: its archive and the references in it, and how long it took."""

    stdout: str
    archive: Path
    references: list[str]
    seconds: float


def build(*args: str) -> Built:
    started = time.monotonic()
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=1200, check=False, cwd=REPO)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        pytest.fail(f"hack/image.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    pairs = [line.split("=", 1) for line in proc.stdout.splitlines()]
    archives = [value for key, value in pairs if key == "archive"]
    references = [value for key, value in pairs if key == "image"]
    assert len(archives) == 1, proc.stdout
    assert references, proc.stdout
    return Built(proc.stdout, Path(archives[0]), references, seconds)


def archive_json(archive: Path, member: str) -> Any:
    with tarfile.open(archive) as tar:
        file = tar.extractfile(member)
        assert file is not None, f"{member} is missing from {archive}"
        return json.load(file)


def archive_manifests(archive: Path) -> dict[str, Any]:
    """Each reference in the archive's index.json and its image manifest."""
    return {
        entry["annotations"]["org.opencontainers.image.ref.name"]: archive_json(
            archive, "blobs/" + entry["digest"].replace(":", "/")
        )
        for entry in archive_json(archive, "index.json")["manifests"]
    }


class Buildah:
    """buildah with a store of its own under `root`; every command that runs one uses the host's
    network (buildah's default network would leave a bridge and iptables chains behind)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        conf = root / "containers.conf"
        # Its CNI lock file stays here, not in /etc/cni/net.d.
        conf.write_text(f'[network]\nnetwork_config_dir = "{root / "cni"}"\n')
        (root / "tmp").mkdir()
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf), "TMPDIR": str(root / "tmp")}

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["buildah", "--root", str(self.root / "store"), "--runroot", str(self.root / "run")]
        argv += ["--cgroup-manager", "cgroupfs", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=300, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def run(self, container: str, command: Sequence[str], user: str = "") -> subprocess.CompletedProcess[str]:
        """`command` in the container, as the image's own user unless `user` says otherwise."""
        as_user = ["--user", user] if user else []
        return self("run", "--network", "host", *as_user, container, "--", *command, check=False)

    def remove_all(self) -> None:
        self("rm", "--all", check=False)
        self("rmi", "--all", "--force", check=False)
        # The overlay driver bind-mounts its own folder privately; nothing may stay mounted.
        overlay = self.root / "store" / "overlay"
        if os.path.ismount(overlay):
            subprocess.run(["umount", str(overlay)], check=False)


@pytest.fixture(scope="module")
def built() -> Built:
    """hack/image.sh's image: built once (a few minutes cold), then about a second."""
    if os.geteuid() != 0:
        pytest.fail("the image tests need root (buildah's store): run them as root after `make setup`", pytrace=False)
    if shutil.which("buildah") is None or shutil.which("debootstrap") is None:
        pytest.fail("buildah or debootstrap is missing: run `make setup`", pytrace=False)
    return build()


@pytest.fixture(scope="module")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buildah]:
    tool = Buildah(tmp_path_factory.mktemp("buildah"))
    try:
        yield tool
    finally:
        tool.remove_all()
        shutil.rmtree(tool.root, ignore_errors=True)


@pytest.fixture(scope="module")
def container(built: Built, buildah: Buildah) -> Iterator[str]:
    """A working container of the image the chart names, unpacked from the archive a node imports."""
    reference = f"{REPOSITORY}:{chart_app_version()}"
    name = buildah("from", "--pull-never", "--quiet", f"oci-archive:{built.archive}:{reference}").stdout.strip()
    try:
        yield name
    finally:
        buildah("rm", name, check=False)


def chart_app_version() -> str:
    chart = yaml.safe_load((REPO / "helm" / "kvpn" / "Chart.yaml").read_text())
    return str(chart["appVersion"])


def declared_scripts() -> list[str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return sorted(tomllib.load(f)["project"]["scripts"])


# --- what a node and the chart see -----------------------------------------------------------------


def test_archive_names_the_image_the_chart_asks_for(built: Built) -> None:
    """image.repository `kvpn` and the default tag (appVersion) are found with pullPolicy Never."""
    names = set(archive_manifests(built.archive))
    assert f"{REPOSITORY}:{chart_app_version()}" in names
    assert set(built.references) == names
    # The last reference names exactly this content.
    assert built.references[-1].startswith(f"{REPOSITORY}:src-")


def test_second_run_with_nothing_changed_is_quick_and_prints_the_same(built: Built) -> None:
    again = build()
    assert again.stdout == built.stdout
    assert again.seconds < 5, f"a warm run took {again.seconds:.1f} s"


def test_another_tag_is_another_image_id_with_the_same_layers(built: Built) -> None:
    """hack/image.sh --tag NAME: what a DaemonSet rolling-update test switches the chart to."""
    variant = build("--tag", "test-variant")
    assert variant.references == [f"{REPOSITORY}:test-variant"]
    main = archive_manifests(built.archive)[built.references[-1]]
    other = archive_manifests(variant.archive)[variant.references[0]]
    assert other["layers"] == main["layers"]
    assert other["config"]["digest"] != main["config"]["digest"]


# --- inside the image --------------------------------------------------------------------------------


def test_runs_as_uid_65532_by_default(buildah: Buildah, container: str) -> None:
    config = json.loads(buildah("inspect", "--type", "container", container).stdout)["OCIv1"]["config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Cmd"] == ["kvpn-operator"]
    proc = buildah.run(container, ["id", "-u"])
    assert (proc.returncode, proc.stdout.strip()) == (0, str(UID)), proc.stderr


def test_uid_65532_has_a_name_for_getpass(buildah: Buildah, container: str) -> None:
    """kopf derives its peering identity from getpass.getuser(), which needs a passwd entry."""
    probe = (
        "import getpass, grp, os, pwd;"
        "print(getpass.getuser(), grp.getgrgid(os.getgid()).gr_name, pwd.getpwuid(os.getuid()).pw_dir)"
    )
    proc = buildah.run(container, ["python3", "-c", probe])
    assert proc.returncode == 0, proc.stderr
    user, group, home = proc.stdout.split()
    assert (user, group) == ("nonroot", "nonroot")
    assert home == "/nonexistent"


@pytest.mark.parametrize("script", declared_scripts())
def test_every_declared_entry_point_answers_help(buildah: Buildah, container: str, script: str) -> None:
    proc = buildah.run(container, [script, "--help"])
    assert proc.returncode == 0, f"{script} --help in the image:\n{proc.stderr[-3000:]}"
    assert "usage" in proc.stdout.lower()


def test_the_build_left_nothing_behind(buildah: Buildah, container: str) -> None:
    """No source tree, pip cache, build secret, compiler or build backend; the project is compiled."""
    checks = {
        "the source tree": "test ! -e /src",
        "a pip cache": "test -z \"$(find / -xdev -type d -path '*/.cache/pip' -print -quit)\"",
        "files in /tmp": 'test -z "$(ls -A /tmp)"',
        "apt's package lists": 'test -z "$(ls -A /var/lib/apt/lists | grep -v -x -e lock -e partial)"',
        "apt's downloaded packages": 'test -z "$(find /var/cache/apt -name "*.deb" -o -name "*.bin")"',
        "a build secret": "test ! -e /run/secrets/pip-conf && test ! -e /run/secrets/pip-cert",
        "a pip configuration": 'test ! -e /etc/pip.conf && test -z "${PIP_CONFIG_FILE:-}" && test -z "${PIP_CERT:-}"',
        "a compiler or make": "! command -v gcc && ! command -v cc && ! command -v make",
        "the build backend": "! python3 -c 'import hatchling'",
        "uncompiled project modules": (
            'cd "$(python3 -c \'import sysconfig; print(sysconfig.get_paths()["purelib"])\')"'
            " && for p in kvpn_operator kvpn_agent kvpn_cli; do ls $p/__pycache__/main.cpython-*.pyc; done"
            " && ls kvpn_core/__pycache__/api.cpython-*.pyc"
        ),
    }
    failed = []
    for what, command in checks.items():
        proc = buildah.run(container, ["sh", "-c", command], user="0:0")
        if proc.returncode != 0:
            failed.append(f"{what}: {proc.stdout.strip()} {proc.stderr.strip()}")
    assert not failed, "\n".join(failed)
