#!/usr/bin/env python3
"""One entry point for the two things a newcomer does first: run the demo and run the tests.

    python3 dev.py demo    # a fedserver process and one fedclient process per site on 127.0.0.1
    python3 dev.py demo --in-process   # the same federation simulated in one process
    python3 dev.py test    # the whole test suite (what CI runs)

Each command creates `.venv/` on first use and installs the project into it (editable, with the
`dev` extra and the pinned torch/torchvision pair from constraints.txt); later runs reuse it and
reinstall only when pyproject.toml or constraints.txt changed. Needs only Python >= 3.11.
Extra arguments after the command go to the demo CLI or to pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".fedpatchcore-install-stamp"
INSTALL_INPUTS = ("pyproject.toml", "constraints.txt")


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _install_fingerprint() -> str:
    digest = hashlib.sha256()
    for name in INSTALL_INPUTS:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_environment() -> Path:
    """Create/refresh .venv so that it holds the project as described by pyproject.toml."""
    if sys.version_info < (3, 11):  # noqa: UP036 (dev.py itself may run on an older python3)
        raise SystemExit(f"FedPatchCore needs Python >= 3.11, this is {sys.version.split()[0]}")
    python = _venv_python()
    if not python.exists():
        print(f"[dev] creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    fingerprint = _install_fingerprint()
    if not STAMP.exists() or STAMP.read_text() != fingerprint:
        print("[dev] installing fedpatchcore[dev] (first run takes a few minutes)", flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet",
             "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[dev]"],
            check=True,
        )
        STAMP.write_text(fingerprint)
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    python = ensure_environment()
    if command == "test":
        args = [str(python), "-m", "pytest", *rest]
    else:
        args = [str(python), "-m", "fedclient.demo", *rest]
    return subprocess.run(args, cwd=ROOT).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
