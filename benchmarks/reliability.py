"""``fedbench reliability``: the full reliability and security campaign of tests/.

The campaign is a set of pytest tests marked ``reliability`` (tests/test_reliability_*.py):
faults injected by a proxy and by killing the server, more than 30 bad-input cases against a
live daemon, hypothesis fuzzing (10,500 cases in the full run), 32 concurrent sites with a
peak-RSS bound, TLS / mTLS with generated certificates. The normal suite runs a fast subset;
this command runs all of it (``pytest -m reliability -s tests/``; ``-s`` shows the figures the
tests print). Arguments after the command go to pytest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbench reliability",
        description="Run the full reliability campaign: pytest -m reliability -s tests/ "
                    "(from a checkout of the repository; takes several minutes).",
    )
    parser.epilog = "Any other argument goes to pytest, e.g. -k fuzz, -x or -q."
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _, pytest_args = build_parser().parse_known_args(argv)
    tests = ROOT / "tests"
    if not (tests / "test_reliability_input.py").is_file():
        print(f"fedbench reliability: no test suite at {tests} (run it from a checkout of the "
              "repository, not an installed wheel)", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "pytest", "-m", "reliability", "-s", str(tests),
               *pytest_args]
    print("running:", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
