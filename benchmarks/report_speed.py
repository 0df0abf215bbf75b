"""What report.html costs a site: ``fedclient score`` on the demo's data with and without it.

The demo's setting (``python3 dev.py demo``): the generated AutoVI-layout dataset at 128 px, one
site = one object (20 training, 12 test images), resnet18 with random weights, D = 1024, a bank
of 10 % of the site's patches. Each measurement is a fresh child process that runs
``fedclient.site.score`` once, as ``fedclient score`` does, so the report's one-off costs
(importing matplotlib, the first figure) are counted as a site pays them. Runs alternate
with / without the report; the table gives the median and the spread (min..max) of the score
call's seconds and of the report alone (write_site_report, from its log line).

Run: ``python -m benchmarks.report_speed [--repeats 3] [--record]``. ``--quick``: 64 px, 4
training images, 1 repeat (the smoke test). Prints the table; appends it to RESULTS.md only with
``--record``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import append_results, markdown_table
from core.data import AutoVIDataset, generate_synthetic_dataset
from core.features import FeatureConfig
from core.patchcore import PatchCore, PatchCoreConfig
from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)

_REPORT_LINE = re.compile(r"wrote \S+report\.html in ([0-9.]+) s")


def _child(bank: Path, data: Path, category: str, out: Path, report: bool) -> None:
    """One score call in this process; prints {"seconds": ..., "report_seconds": ...}."""
    import io

    from fedclient.site import score

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("fedclient.report").addHandler(handler)
    logging.getLogger("fedclient.report").setLevel(logging.INFO)
    t0 = time.perf_counter()
    score(bank, data, out, categories=(category,), overlays=False, report=report)
    seconds = time.perf_counter() - t0
    match = _REPORT_LINE.search(stream.getvalue())
    print(json.dumps({"seconds": seconds,
                      "report_seconds": float(match.group(1)) if match else None}))


def _measure(bank: Path, data: Path, category: str, out: Path, report: bool) -> dict:
    command = [sys.executable, "-m", "benchmarks.report_speed", "--child", str(bank), str(data),
               category, str(out), "1" if report else "0"]
    done = subprocess.run(command, check=True, capture_output=True, text=True,
                          env=os.environ.copy())
    return json.loads(done.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        bank, data, category, out, report = argv[1:6]
        _child(Path(bank), Path(data), category, Path(out), report == "1")
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report_speed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 px, 4 images, 1 repeat")
    parser.add_argument("--record", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args(argv)
    size, train, repeats = (64, 4, 1) if args.quick else (128, 20, args.repeats)
    category = "stripes"
    with tempfile.TemporaryDirectory(prefix="report-speed-") as tmp:
        root = generate_synthetic_dataset(Path(tmp) / "data", categories=(category,),
                                          num_train=train, image_size=size, seed=0,
                                          layout="autovi")
        features = FeatureConfig("resnet18", pretrained=False,
                                 transform=ImageTransform(resize=size, crop=None))
        model = PatchCore(PatchCoreConfig(features=features, coreset_ratio=0.1))
        model.fit(AutoVIDataset(root, [category], split="train"))
        bank = model.save(Path(tmp) / "bank.safetensors", extra={"bank_version": 1})
        test_images = len(AutoVIDataset(root, [category], split="test"))
        times: dict[bool, list[dict]] = {False: [], True: []}
        for i in range(repeats):
            for report in (False, True):
                times[report].append(_measure(bank, root, category, Path(tmp) / f"out{i}",
                                              report))
    without = [t["seconds"] for t in times[False]]
    with_report = [t["seconds"] for t in times[True]]
    alone = [t["report_seconds"] for t in times[True]]
    ratio = statistics.median(with_report) / statistics.median(without)
    table = markdown_table(
        ["setting", "test images", "score s, no report", "score s, with report",
         "report.html alone s", "with / without"],
        [[f"{size} px, resnet18 random, D=1024", test_images, _spread(without),
          _spread(with_report), _spread(alone), f"{ratio:.2f}"]],
    )
    notes = (f"Median (min..max) of {repeats} fresh child process(es) each, alternating. "
             f"Load average at the end: {os.getloadavg()[0]:.1f} (shared machine).")
    append_results("report.html cost on the demo's data (fedclient score)", table, notes,
                   append=args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
