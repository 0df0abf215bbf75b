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

__all__ = ["RESULTS", "append_results", "machine", "markdown_table", "peak_rss_mib"]


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


def append_results(title: str, table: str, notes: str = "", *, append: bool = False) -> None:
    """Print ``table`` and, only if ``append``, append it to RESULTS.md with the command line
    and machine."""
    script = Path(sys.argv[0])
    if script.parent.name == "benchmarks":  # run as `python -m benchmarks.x`: say so
        head = f"python -m benchmarks.{script.stem}"
    else:
        head = "python " + shlex.quote(sys.argv[0])
    command = " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"\n## {title}\n\n{stamp} | `{command}`  \nMachine: {machine()}\n\n{table}\n"
        + (f"\n{notes}\n" if notes else "")
    )
    print(block)
    if append:
        with RESULTS.open("a") as handle:
            handle.write(block)
