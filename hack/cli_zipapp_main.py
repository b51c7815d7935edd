"""kubectl-vpn in one file: unpacks the archive's compiled packages once, then runs the CLI.

hack/cli_zipapp.py copies this file into the archive as its __main__.py and writes the build's facts into
BUILD below. `python3 kubectl-vpn ...` puts the archive first on sys.path, so the pure-Python packages
(kvpn_cli, kvpn_core, kubernetes, ...) are imported from it directly, with the bytecode compiled at build
time. A compiled extension cannot be imported from a zip (the dynamic loader needs a file), so the packages
that hold one (pydantic_core, cryptography, cffi, PyYAML, charset_normalizer), and certifi, whose CA bundle
OpenSSL opens by path, are unpacked at the first run into ${XDG_CACHE_HOME:-~/.cache}/kvpn/zipapp/DIGEST/
(KVPN_ZIPAPP_CACHE overrides the parent folder) and put on sys.path right after the archive. DIGEST
covers exactly what is unpacked: a rebuilt archive with the same dependencies reuses the folder, and two
first runs at once are safe (each unpacks into a folder of its own and renames it into place).

The extensions are built for one interpreter ABI and platform (BUILD["ext_suffix"]): another Python runs
the same file through python3.X when that is on PATH, or is told what to do. sys.path is then the archive, that
folder and the standard library: nothing of the machine's site-packages, whatever it has installed.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

BUILD: dict[str, str] = {}  # filled in by hack/cli_zipapp.py: python, ext_suffix, platform, native, digest


def main() -> None:
    archive = str(Path(__file__).absolute().parent)  # the CLI imports pathlib anyway
    _check_interpreter(archive)
    sys.path[:] = [archive, _unpacked(archive), *_standard_library()]
    from kvpn_cli.main import main as cli_main  # noqa: PLC0415 - only once sys.path holds the extensions

    sys.exit(cli_main())


def _check_interpreter(archive: str) -> None:
    wanted = f"python{BUILD['python']}"
    tried = os.environ.pop("KVPN_ZIPAPP_REEXEC", None) == wanted  # popped: the CLI's own children never see it
    if sysconfig.get_config_var("EXT_SUFFIX") == BUILD["ext_suffix"]:
        return
    if not tried:
        from shutil import which  # noqa: PLC0415 - only on the rare path

        other = which(wanted)
        if other:
            os.environ["KVPN_ZIPAPP_REEXEC"] = wanted  # once: never a loop between two interpreters
            os.execv(other, [other, archive, *sys.argv[1:]])  # noqa: S606 - the same program, its own Python
    version = ".".join(map(str, sys.version_info[:3]))
    why = f"{wanted} on PATH is not that Python either" if tried else f"there is no {wanted} on PATH"
    sys.exit(
        f"error: this kubectl-vpn was built for CPython {BUILD['python']} on {BUILD['platform']} (its compiled "
        f"dependencies are *{BUILD['ext_suffix']}); this is Python {version} on {sysconfig.get_platform()}, and "
        f"{why}. Install {wanted}, or the CLI with `pipx install .` from a clone (where `make cli-zipapp` builds "
        "this file for the Python of its .venv)."
    )


def _standard_library() -> list[str]:
    """sys.path's entries of the standard library: none of site-packages, the user's or PYTHONPATH.

    The archive holds every module the CLI needs; an optional import elsewhere (oauthlib tries blinker) must
    not pick up whatever this machine has installed."""
    paths = sysconfig.get_paths()
    stdlib = (paths["stdlib"], paths["platstdlib"])
    zipped = f"python{sys.version_info.major}{sys.version_info.minor}.zip"
    return [
        entry
        for entry in sys.path
        if (entry.startswith(stdlib) or Path(entry).name == zipped)
        and not {"site-packages", "dist-packages"} & set(Path(entry).parts)  # some systems keep them in stdlib's
    ]


def _unpacked(archive: str) -> str:
    """The folder holding the archive's packages with compiled code; unpacked there on the first run."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    parent = Path(os.environ.get("KVPN_ZIPAPP_CACHE") or Path(cache, "kvpn", "zipapp"))
    target = parent / BUILD["digest"]
    if target.is_dir():  # a folder appears only complete: it is renamed into place
        return str(target)
    import shutil  # noqa: PLC0415 - the first run only
    import tempfile  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    parent.mkdir(parents=True, exist_ok=True)
    prefix = BUILD["native"]
    work = Path(tempfile.mkdtemp(prefix=".unpack-", dir=parent))
    try:
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                if not info.filename.startswith(prefix) or info.is_dir():
                    continue
                relative = info.filename[len(prefix) :]
                if relative.startswith("/") or ".." in relative.split("/"):
                    sys.exit(f"error: {archive} holds a path outside its folder: {info.filename}")
                path = work / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(info) as source, path.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
        work.chmod(0o755)  # mkdtemp makes it 0700; the files in it follow the user's umask
        try:
            work.rename(target)
        except OSError:
            if not target.is_dir():  # else another first run renamed its folder into place first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(target)


if __name__ == "__main__":
    main()
