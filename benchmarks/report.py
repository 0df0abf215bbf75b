"""Shared helpers of the benchmark scripts: machine description, tables, RESULTS.md.

Every benchmark prints its table; only when asked (``--record``) does it append it, with the
exact command and the machine, to benchmarks/RESULTS.md, so trial runs leave the tracked file
alone. Targets are stated as ratios against a peer measured in the same run, since shared
machines are noisy.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
#: PNG plots of ``--record`` runs; RESULTS.md and the README link them relatively.
FIGURES = RESULTS.parent / "figures"

__all__ = [
    "FIGURES",
    "RESULTS",
    "append_results",
    "machine",
    "markdown_table",
    "peak_rss_mib",
    "plot_path",
    "save_figure",
]


def machine() -> str:
    """One line describing where the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {cores} cores, {gpu}; Python {platform.python_version()}, torch "
        f"{torch.__version__}, torch threads {torch.get_num_threads()}"
    )


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_path(name: str) -> Path:
    """Where a plot called ``name`` (a .png file name) goes: benchmarks/figures/name."""
    if "/" in name or not name.endswith(".png"):
        raise ValueError(f"plot name must be a bare .png file name, got {name!r}")
    return FIGURES / name


def save_figure(figure: object, path: Path) -> Path:
    """Save a matplotlib figure as PNG (Agg backend, 120 dpi) at ``path`` and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)  # type: ignore[attr-defined]
    plt.close(figure)  # type: ignore[arg-type]
    return path


def _command_line() -> str:
    """The command that ran, as a user would type it."""
    script = Path(sys.argv[0])
    if os.environ.get("FEDBENCH_COMMAND"):  # set by `fedbench` / `python -m benchmarks`
        head = os.environ["FEDBENCH_COMMAND"]
    elif script.parent.name == "benchmarks":  # run as `python -m benchmarks.x`: say so
        head = f"python -m benchmarks.{script.stem}"
    else:
        head = "python " + shlex.quote(sys.argv[0])
    return " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])


def _git_commit() -> str:
    """Short commit of the checkout the benchmark ran from (+ "-dirty" with local changes)."""
    import subprocess

    root = RESULTS.parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("-dirty" if dirty else "")


def append_results(
    title: str,
    table: str,
    notes: str = "",
    *,
    append: bool = False,
    figures: Sequence[Path] = (),
) -> None:
    """Print ``table`` and, only if ``append``, append it to RESULTS.md with the command line,
    the git commit and the machine. ``figures``: PNG files under benchmarks/ to link below."""
    command = _command_line()
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = f" | commit {_git_commit()}"
    images = "".join(
        f"\n![{p.stem}]({p.resolve().relative_to(RESULTS.parent).as_posix()})\n" for p in figures
    )
    block = (
        f"\n## {title}\n\n{stamp} | `{command}`{commit}  \nMachine: {machine()}\n\n{table}\n"
        + (f"\n{notes}\n" if notes else "") + images
    )
    print(block)
    if append:
        with RESULTS.open("a") as handle:
            handle.write(block)
