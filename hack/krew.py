"""Wraps the zipapp in the archive krew installs and renders krew/vpn.yaml for it (`make krew`).

    .venv/bin/python hack/krew.py [--zipapp dist/kubectl-vpn] [--out dist/krew]
                                  [--release-url URL] [--homepage URL]

krew installs from .tar.gz or .zip archives only (the zipapp itself, a zip behind a shebang line, reads
as text to krew's type sniffing), so the zipapp goes into kubectl-vpn-vVERSION-OS-ARCH-pyX.Y.tar.gz,
made the same way each time (fixed times, owner and mode). The manifest's version comes from
pyproject.toml; its os, arch and the Python in its caveats from the zipapp's kvpn-zipapp.json, so that it
describes what was built; its sha256 from the archive. The uri is RELEASE_URL/vVERSION/ARCHIVE: nothing
is published yet, and the defaults are placeholders (the reserved .invalid domain).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "krew" / "vpn.yaml"
RELEASE_URL = "https://kvpn.invalid/releases/download"
HOMEPAGE = "https://kvpn.invalid/"
BIN = "kubectl-vpn"
MTIME = 315532800  # 1980-01-01, as the zipapp's entries
PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")

# sysconfig.get_platform()'s words (linux-x86_64, macosx-11.0-arm64) in krew's (GOOS, GOARCH) terms.
KREW_OS = {"linux": "linux", "macosx": "darwin"}
KREW_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class Release:
    """What `make krew` wrote: the manifest and the archive it names."""

    manifest: Path
    archive: Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zipapp", type=Path, default=REPO / "dist" / BIN)
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "krew")
    parser.add_argument("--release-url", default=RELEASE_URL, help=f"where releases live (default {RELEASE_URL})")
    parser.add_argument("--homepage", default=HOMEPAGE, help=f"the manifest's homepage (default {HOMEPAGE})")
    args = parser.parse_args()
    release = build(args.zipapp, args.out, release_url=args.release_url, homepage=args.homepage)
    print(f"krew: {release.manifest} for {release.archive}", file=sys.stderr)


def build(zipapp: Path, out: Path, *, release_url: str = RELEASE_URL, homepage: str = HOMEPAGE) -> Release:
    with zipfile.ZipFile(zipapp) as zipped:
        facts = json.loads(zipped.read("kvpn-zipapp.json"))
    krew_os, krew_arch = krew_platform(facts["platform"])
    version = "v" + tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{BIN}-{version}-{krew_os}-{krew_arch}-py{facts['python']}.tar.gz"
    archive.write_bytes(pack(zipapp.read_bytes()))
    values = {
        "version": version,
        "homepage": homepage,
        "python": facts["python"],
        "os": krew_os,
        "arch": krew_arch,
        "uri": f"{release_url.rstrip('/')}/{version}/{archive.name}",
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
    }
    manifest = out / TEMPLATE.name
    body = render(TEMPLATE.read_text(), values).splitlines(keepends=True)
    while body and body[0].startswith("#"):  # the template's own header, which is about the template
        body.pop(0)
    header = f"# Rendered by hack/krew.py (`make krew`) from krew/vpn.yaml for {archive.name}; edit the template.\n"
    manifest.write_text(header + "".join(body))
    return Release(manifest, archive)


def krew_platform(platform: str) -> tuple[str, str]:
    """linux-x86_64 -> (linux, amd64); macosx-11.0-arm64 -> (darwin, arm64)."""
    system, machine = platform.partition("-")[0], platform.rpartition("-")[2]
    if system not in KREW_OS or machine not in KREW_ARCH:
        sys.exit(f"krew: no krew platform for {platform}")
    return KREW_OS[system], KREW_ARCH[machine]


def pack(executable: bytes) -> bytes:
    """A .tar.gz holding `executable` as kubectl-vpn, the same bytes for the same input."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(BIN)
        info.size, info.mode, info.mtime = len(executable), 0o755, MTIME
        tar.addfile(info, io.BytesIO(executable))
    gz_bytes = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz_bytes, mtime=MTIME) as gz:
        gz.write(tar_bytes.getvalue())
    return gz_bytes.getvalue()


def render(template: str, values: Mapping[str, str]) -> str:
    """The template with each {name} replaced; a name it has no value for is an error (comments aside)."""
    lines = []
    for line in template.splitlines(keepends=True):
        if line.lstrip().startswith("#"):
            lines.append(line)
            continue
        missing = [name for name in PLACEHOLDER.findall(line) if name not in values]
        if missing:
            sys.exit(f"krew: no value for {{{missing[0]}}} in {TEMPLATE}")
        lines.append(PLACEHOLDER.sub(lambda match: values[match.group(1)], line))
    return "".join(lines)


if __name__ == "__main__":
    main()
