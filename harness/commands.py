"""Running a program and failing loudly: the one ``run`` the harnesses, tests and benchmarks share."""

from __future__ import annotations

import subprocess
from typing import Any

TIMEOUT = 30.0
"""Per command: enough for the VM tier, where everything runs 10-20 times slower."""

STDERR_LIMIT = 2000
"""How much of a failed command's stderr its error carries."""


def run(
    *argv: str, check: bool = True, timeout: float = TIMEOUT, error: type[Exception] = RuntimeError, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """``argv`` to completion, its output captured as text unless ``stdout`` is given; with ``check``, a
    non-zero exit raises ``error`` with the command line, the status and the start of stderr."""
    if "stdout" not in kwargs:
        kwargs["capture_output"] = True
    proc = subprocess.run(argv, text=True, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise error(f"{' '.join(argv)} failed ({proc.returncode}): {(proc.stderr or '').strip()[:STDERR_LIMIT]}")
    return proc
