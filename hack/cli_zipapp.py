"""Builds kubectl-vpn as one file (`make cli-zipapp`): a zipapp of the CLI and what it needs, for a stock python3.

    .venv/bin/python hack/cli_zipapp.py [--output dist/kubectl-vpn]

What goes in: kvpn_cli and kvpn_core from this working tree, and the distributions that pyproject.toml's
base dependencies (the CLI's, per its comment) need, followed through their own requirements, as they are
installed in the venv that `make setup` made: the versions the tests ran against, files checked against
each distribution's RECORD, nothing fetched. Left out, each for the reason given at LEFT_OUT: kubernetes'
asyncio client and the aiohttp stack only it uses, and kubernetes' own tests.

Compiled code: CPython imports extension modules only from files, so every top-level package that holds
one (and certifi, see ON_DISK) is stored under kvpn-native/ in the archive and unpacked once into a cache
folder by the archive's __main__.py (hack/cli_zipapp_main.py); the rest is imported from the archive with
bytecode compiled here. The extensions are the venv's, built for its Python and platform (e.g.
cpython-311-x86_64-linux-gnu), so the file is per-platform and per-Python-minor: __main__ checks that
and says what to do on another Python.

The same venv and working tree give the same bytes: sorted entries, fixed timestamps and modes,
unchecked-hash bytecode compiled with PYTHONHASHSEED=0 (set frozenset constants marshal in hash order).
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import importlib.metadata
import io
import json
import os
import py_compile
import re
import sys
import sysconfig
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
SOURCES = {"kvpn_cli": REPO / "cli" / "kvpn_cli", "kvpn_core": REPO / "core" / "kvpn_core"}
MAIN = Path(__file__).with_name("cli_zipapp_main.py")
NATIVE = "kvpn-native/"  # not an importable name: nothing in it is found from the archive itself
INFO = "kvpn-zipapp.json"
SHEBANG = b"#!/usr/bin/env python3\n"
EPOCH = (1980, 1, 1, 0, 0, 0)  # the zip format's first date

LEFT_OUT: dict[str, tuple[set[str], tuple[str, ...]]] = {
    # distribution: (requirements not followed, file patterns not copied)
    # kubernetes.aio is a second, asyncio client of the whole API (40 MB of source); the CLI uses the
    # synchronous one, and aiohttp and aiohttp-retry (with their compiled multidict, yarl, frozenlist and
    # propcache) are there for kubernetes.aio alone. Its *_test.py modules are kubernetes' unit tests.
    "kubernetes": ({"aiohttp", "aiohttp-retry"}, ("kubernetes/aio/*", "*_test.py")),
}

ON_DISK = {
    # certifi.where() hands OpenSSL a file name; from a zip, importlib.resources would copy the bundle to a
    # new temporary file on every run.
    "certifi",
}

SHARED_OBJECT = re.compile(r"\.(so|pyd|dylib)(\.[0-9.]+)?$")


@dataclass(frozen=True)
class Entry:
    """One file of the archive, by its name there."""

    name: str
    data: bytes


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})  # noqa: S606
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--output", type=Path, default=REPO / "dist" / "kubectl-vpn")
    output: Path = args.parse_args().output
    info = build(output)
    size = output.stat().st_size
    print(
        f"zipapp: {output} ({size / 1e6:.1f} MB): kvpn_cli, kvpn_core and {len(info['distributions'])} distributions, "
        f"{', '.join(info['unpacked'])} unpacked at the first run; for CPython {info['python']} on {info['platform']}",
        file=sys.stderr,
    )


def build(output: Path) -> dict[str, object]:
    """Writes the archive to `output` (whole or not at all); returns what kvpn-zipapp.json in it says."""
    distributions = closure(base_requirements())
    files: dict[str, bytes] = {}
    for dist in distributions:
        files.update(installed_files(dist))
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            files[f"{package}/{path.relative_to(folder).as_posix()}"] = path.read_bytes()
    native_tops = sorted(
        {name.split("/")[0] for name in files if SHARED_OBJECT.search(name)}
        | {top for top in ON_DISK if any(name.split("/")[0] == top for name in files)}
    )
    entries: list[Entry] = []
    native: list[Entry] = []
    with tempfile.TemporaryDirectory() as work:
        for name, data in sorted(files.items()):
            if name.split("/")[0] in native_tops:
                native.append(Entry(NATIVE + name, data))
            else:
                entries.append(Entry(name, data))
                if name.endswith(".py"):
                    entries.append(Entry(name[:-3] + ".pyc", bytecode(name, data, Path(work))))
    digest = hashlib.sha256()
    for entry in native:
        digest.update(f"{entry.name}\0{len(entry.data)}\0".encode())
        digest.update(entry.data)
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
    facts = {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "ext_suffix": ext_suffix,
        "platform": sysconfig.get_platform(),
        "native": NATIVE,
        "digest": digest.hexdigest()[:16],
    }
    info: dict[str, object] = {
        **facts,
        "unpacked": native_tops,
        "distributions": {dist.metadata["Name"]: dist.version for dist in distributions},
    }
    main_source = MAIN.read_text().replace("BUILD: dict[str, str] = {}", f"BUILD: dict[str, str] = {facts!r}", 1)
    if repr(facts) not in main_source:
        sys.exit(f"zipapp: {MAIN} has no `BUILD: dict[str, str] = {{}}` line to fill in")
    entries += [
        Entry("__main__.py", main_source.encode()),
        Entry(INFO, json.dumps(info, indent=2, sort_keys=True).encode() + b"\n"),
        *native,
    ]
    write(output, sorted(entries, key=lambda entry: entry.name))
    return info


def base_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies without extras: what the kubectl plugin needs on a laptop."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def closure(requirements: Iterable[Requirement]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that `requirements` need, followed through theirs, less LEFT_OUT."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [(requirement, "pyproject.toml") for requirement in requirements]
    while pending:
        requirement, wanted_by = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = canonicalize_name(requirement.name)
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            sys.exit(f"zipapp: {requirement.name} (needed by {wanted_by}) is not installed here: run `make venv`")
        if not requirement.specifier.contains(dist.version, prereleases=True):
            sys.exit(f"zipapp: {wanted_by} needs {requirement}, this venv has {dist.version}: run `make venv`")
        found[key] = dist
        skip = LEFT_OUT.get(key, (set(), ()))[0]
        for text in dist.requires or ():
            child = Requirement(text)
            if canonicalize_name(child.name) not in skip:
                pending.append((child, dist.metadata["Name"]))
    return sorted(found.values(), key=lambda dist: canonicalize_name(dist.metadata["Name"]))


def installed_files(dist: importlib.metadata.Distribution) -> Iterator[tuple[str, bytes]]:
    """The distribution's files in site-packages as its RECORD lists them, each checked against its hash.

    Not copied: bytecode (compiled here instead), what lies outside site-packages (scripts), the
    installer's own records, and LEFT_OUT's patterns."""
    patterns = LEFT_OUT.get(canonicalize_name(dist.metadata["Name"]), (set(), ()))[1]
    for file in dist.files or ():
        name = file.as_posix()
        pure = PurePosixPath(name)
        if name.startswith("../") or "__pycache__" in pure.parts or pure.suffix == ".pyc":
            continue
        if pure.parent.name.endswith(".dist-info") and pure.name in {"RECORD", "INSTALLER", "REQUESTED"}:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            continue
        data = Path(str(file.locate())).read_bytes()
        if file.hash is not None:
            actual = base64.urlsafe_b64encode(hashlib.new(file.hash.mode, data).digest()).rstrip(b"=").decode()
            if actual != file.hash.value:
                sys.exit(f"zipapp: {file.locate()} differs from {dist.metadata['Name']}'s RECORD: reinstall it")
        yield name, data


def bytecode(name: str, source: bytes, work: Path) -> bytes:
    """The module's bytecode as zipimport loads it from beside its source (unchecked: the archive is immutable)."""
    py, pyc = work / "module.py", work / "module.pyc"
    py.write_bytes(source)
    py_compile.compile(
        str(py),
        cfile=str(pyc),
        dfile=name,  # tracebacks name the module's path inside the archive
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    return pyc.read_bytes()


def write(output: Path, entries: list[Entry]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    buffer.write(SHEBANG)
    with zipfile.ZipFile(buffer, "w") as archive:
        for entry in entries:
            info = zipfile.ZipInfo(entry.name, date_time=EPOCH)
            info.create_system = 3  # unix, wherever it is built, so that external_attr reads as a mode
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, entry.data, compresslevel=9)
    partial = output.with_name(f".{output.name}.partial")
    partial.write_bytes(buffer.getvalue())
    partial.chmod(0o755)
    partial.replace(output)


if __name__ == "__main__":
    main()
