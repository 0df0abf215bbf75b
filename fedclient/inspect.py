"""Decisions on new images: the files ``fedclient score`` and ``fedclient inspect`` write, and
the folder watcher behind ``fedclient inspect --watch DIR``.

For every image (one line each, flushed as it is decided, so a crash loses nothing decided):

* ``decisions.csv`` with the columns of :data:`COLUMNS`, and ``decisions.jsonl`` with the same
  fields (plus the per-stage times of the image's batch under ``"ms"``);
* ``masks/<name>.png``: the defect mask, white where the anomaly map exceeds the pixel
  threshold. It has the image's original size when the extractor's transform does not crop
  (the map is upsampled bilinearly, then thresholded), else the model's input geometry (the
  centre crop the model saw).

Columns: ``image`` (the dataset name category/defect/stem, or the file's path relative to the
watched folder), ``score`` (raw, feature-distance units), ``normalised_score`` (0..1, 0.5 = the
threshold, core.calibration.Normalisation), ``decision`` ("anomalous" iff score > threshold,
else "normal"), ``threshold``, ``mask`` (path of the mask PNG relative to the output folder),
``mask_pixels`` / ``mask_fraction`` (pixels above the pixel threshold), ``label`` (the ground
truth "good" / defect type where the data has labels, empty otherwise), ``latency_ms`` (read
to decision of the image's batch; empty for ``score``'s batch run), ``bank_version``.

The watcher takes file events from watchdog (inotify on Linux), waits until a file has been
quiet for ``settle_s`` (or its writer closed it), reads and scores it; a file that cannot be
read yet (half written, or corrupt) is retried ``retries`` times ``retry_delay_s`` apart, then
skipped with one line. Nothing a file holds stops the watcher. The model stays in memory; when
the site model file is replaced (a new round's bank, recalibrated by ``fedclient run``), the
watcher reloads it between images and says so.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

import numpy as np
import torch
from PIL import Image

from core.data.errors import DatasetError
from core.data.imageio import IMAGE_SUFFIXES, read_rgb
from core.evaluation import upsample_to_original
from core.inference import Scored
from core.preprocess import ImageTransform
from core.sitemodel import SITE_MODEL_FILE, SiteModel, labels_and_masks

logger = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "DECISIONS_CSV",
    "DECISIONS_JSONL",
    "MASK_DIR",
    "Decision",
    "DecisionWriter",
    "FolderWatcher",
    "InspectSummary",
    "calibrate_file",
    "decide",
    "inspect_paths",
    "labelled_rates",
]

DECISIONS_CSV = "decisions.csv"
DECISIONS_JSONL = "decisions.jsonl"
MASK_DIR = "masks"
#: The CSV header, in order (module docstring).
COLUMNS: tuple[str, ...] = (
    "image", "score", "normalised_score", "decision", "threshold", "mask", "mask_pixels",
    "mask_fraction", "label", "latency_ms", "bank_version",
)


@dataclass(frozen=True)
class Decision:
    """One image's decision (the fields of :data:`COLUMNS`; see the module docstring)."""

    image: str
    score: float
    normalised_score: float
    anomalous: bool
    threshold: float
    mask: str | None
    mask_pixels: int
    mask_fraction: float
    label: str | None = None
    latency_ms: float | None = None
    bank_version: int | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)

    @property
    def decision(self) -> str:
        return "anomalous" if self.anomalous else "normal"

    def row(self) -> dict[str, object]:
        return {
            "image": self.image, "score": self.score, "normalised_score": self.normalised_score,
            "decision": self.decision, "threshold": self.threshold, "mask": self.mask,
            "mask_pixels": self.mask_pixels, "mask_fraction": self.mask_fraction,
            "label": self.label, "latency_ms": self.latency_ms, "bank_version": self.bank_version,
        }


def _mask(
    anomaly_map: np.ndarray,
    threshold: float,
    transform: ImageTransform,
    original: tuple[int, int] | None,
) -> np.ndarray:
    """bool mask: at the original size when the transform does not crop, else the map's."""
    if original is not None and transform.output_shape(*original) == transform.resized_shape(
        *original
    ):
        return upsample_to_original(anomaly_map, original, transform) > threshold
    return anomaly_map > threshold


def decide(
    site_model: SiteModel,
    names: Sequence[str],
    scored: Scored,
    *,
    originals: Sequence[tuple[int, int] | None] | None = None,
    labels: Sequence[str | None] | None = None,
    latency_ms: float | None = None,
) -> list[tuple[Decision, np.ndarray]]:
    """(decision, mask) of each image of a scored batch with ``site_model``'s calibration.

    names: the images' names (mask file names follow them); originals: their original
    (H, W) for masks at that size (None: at the model's geometry).
    """
    calibration = site_model.calibration
    if calibration is None:
        raise ValueError("the model is not calibrated: it has no threshold to decide with")
    n = len(names)
    if scored.image_scores.shape != (n,):
        raise ValueError(f"{scored.image_scores.shape} scores for {n} names")
    normalised = calibration.image_normalisation(scored.image_scores)
    anomalous = calibration.decide(scored.image_scores)
    transform = site_model.model.config.features.transform
    stage = {k: 1000.0 * v / max(n, 1) for k, v in scored.times.as_dict().items()}
    out = []
    for i, name in enumerate(names):
        original = originals[i] if originals is not None else None
        mask = _mask(scored.anomaly_maps[i], calibration.pixel_threshold, transform, original)
        pixels = int(mask.sum())
        out.append((Decision(
            image=name,
            score=float(scored.image_scores[i]),
            normalised_score=float(normalised[i]),
            anomalous=bool(anomalous[i]),
            threshold=calibration.threshold,
            mask=f"{MASK_DIR}/{name}.png",
            mask_pixels=pixels,
            mask_fraction=pixels / mask.size,
            label=labels[i] if labels is not None else None,
            latency_ms=latency_ms,
            bank_version=site_model.bank_version,
            stage_ms=stage,
        ), mask))
    return out


class DecisionWriter:
    """Appends decisions to ``decisions.csv`` / ``decisions.jsonl`` in ``out_dir`` and writes
    their masks; every line is flushed at once. ``append=False`` starts both files afresh."""

    def __init__(self, out_dir: Path, *, append: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        csv_path = self.out_dir / DECISIONS_CSV
        fresh = not append or not csv_path.exists() or csv_path.stat().st_size == 0
        mode = "w" if fresh else "a"
        self._csv_file: TextIO = csv_path.open(mode, newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=list(COLUMNS))
        if fresh:
            self._csv.writeheader()
        self._jsonl: TextIO = (self.out_dir / DECISIONS_JSONL).open(mode, encoding="utf-8")
        self.count = 0

    def write(self, decision: Decision, mask: np.ndarray | None) -> None:
        if mask is not None and decision.mask is not None:
            path = self.out_dir / decision.mask
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        row = decision.row()
        self._csv.writerow({k: ("" if v is None else v) for k, v in row.items()})
        self._csv_file.flush()
        record = {**row, "ms": {k: round(v, 3) for k, v in decision.stage_ms.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self.count += 1

    def close(self) -> None:
        self._csv_file.close()
        self._jsonl.close()

    def __enter__(self) -> DecisionWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def labelled_rates(anomalous: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """False-positive rate (good images flagged) and miss rate (defective images passed) of
    decisions [N] against labels [N] (1 = defective); None where a class is absent."""
    flagged = np.asarray(anomalous, bool)
    truth = np.asarray(labels).astype(bool)
    good, bad = ~truth, truth
    return {
        "false_positive_rate": float(flagged[good].mean()) if good.any() else None,
        "miss_rate": float((~flagged[bad]).mean()) if bad.any() else None,
    }


# --- inspection: files as they arrive ----------------------------------------------------------


@dataclass
class InspectSummary:
    """What an inspection run did: counts per decision, skipped files, per-image latency."""

    counts: dict[str, int] = field(default_factory=lambda: {"anomalous": 0, "normal": 0})
    skipped: list[tuple[str, str]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    retries: int = 0
    reloads: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def images(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        seconds = time.perf_counter() - self.started
        text = (f"inspected {self.images} image(s): {self.counts['anomalous']} anomalous, "
                f"{self.counts['normal']} normal, {len(self.skipped)} skipped")
        if self.latencies_ms:
            ordered = sorted(self.latencies_ms)
            p99 = ordered[min(len(ordered) - 1, int(np.ceil(0.99 * len(ordered))) - 1)]
            text += (f"; latency p50 {statistics.median(ordered):.0f} ms, p99 {p99:.0f} ms; "
                     f"{self.images / seconds:.2f} images/s over {seconds:.1f} s")
        return text


def _is_candidate(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


class _Events:
    """watchdog handler -> {path: time it is ready} (thread-safe)."""

    def __init__(self, settle_s: float) -> None:
        self.settle_s = settle_s
        self.lock = threading.Condition()
        self.pending: dict[Path, float] = {}

    def touch(self, path: str | bytes, *, closed: bool = False) -> None:
        p = Path(os.fsdecode(path))
        if not _is_candidate(p):
            return
        with self.lock:
            # A close ends the write: ready now; any other event restarts the quiet period.
            self.pending[p] = time.monotonic() + (0.0 if closed else self.settle_s)
            self.lock.notify()

    def ready(self, limit: int, wait_s: float) -> list[Path]:
        """Up to ``limit`` paths whose quiet period is over (waits up to ``wait_s``)."""
        with self.lock:
            now = time.monotonic()
            due = sorted((t, p) for p, t in self.pending.items() if t <= now)
            if not due:
                upcoming = min(self.pending.values(), default=now + wait_s)
                self.lock.wait(timeout=max(0.0, min(wait_s, upcoming - now)))
                now = time.monotonic()
                due = sorted((t, p) for p, t in self.pending.items() if t <= now)
            picked = [p for _, p in due[:limit]]
            for p in picked:
                del self.pending[p]
            return picked

    def retry(self, path: Path, delay_s: float) -> None:
        with self.lock:
            self.pending.setdefault(path, time.monotonic() + delay_s)
            self.lock.notify()


def _handler(events: _Events) -> object:
    from watchdog.events import FileSystemEventHandler

    class Handler(FileSystemEventHandler):  # type: ignore[misc]
        def on_created(self, event):  # type: ignore[no-untyped-def]
            if not event.is_directory:
                events.touch(event.src_path)

        def on_modified(self, event):  # type: ignore[no-untyped-def]
            if not event.is_directory:
                events.touch(event.src_path)

        def on_moved(self, event):  # type: ignore[no-untyped-def]
            if not event.is_directory:
                events.touch(event.dest_path)

        def on_closed(self, event):  # type: ignore[no-untyped-def]
            if not event.is_directory:
                events.touch(event.src_path, closed=True)

    return Handler()


class _Scorer:
    """Reads, scores and decides batches of files; reloads the model file when it changes."""

    def __init__(
        self,
        model_path: Path | None,
        site_model: SiteModel,
        writer: DecisionWriter,
        summary: InspectSummary,
        echo: Callable[[str], None],
        *,
        root: Path | None,
        load_model: Callable[[Path], SiteModel] | None,
    ) -> None:
        self.model_path = model_path
        self.site_model = site_model
        self.inferencer = site_model.inferencer()
        self.inferencer.warm_up()
        self.writer = writer
        self.summary = summary
        self.echo = echo
        self.root = root
        self.load_model = load_model
        self._stamp = self._model_stamp()

    def _model_stamp(self) -> tuple[int, int] | None:
        if self.model_path is None:
            return None
        try:
            stat = self.model_path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def maybe_reload(self) -> None:
        stamp = self._model_stamp()
        if stamp is None or stamp == self._stamp or self.load_model is None:
            return
        self._stamp = stamp
        assert self.model_path is not None
        try:
            fresh = self.load_model(self.model_path)
        except Exception as exc:  # a half-replaced or refused file: keep the warm model
            self.echo(f"kept the loaded model: cannot reload {self.model_path}: {exc}")
            return
        if fresh.calibration is None:
            self.echo(f"kept the loaded model: {self.model_path} is not calibrated")
            return
        self.site_model, self.inferencer = fresh, fresh.inferencer()
        self.inferencer.warm_up()
        self.summary.reloads += 1
        self.echo(f"reloaded {self.model_path}: bank v{fresh.bank_version}, "
                  f"{fresh.calibration.summary()}")

    def name(self, path: Path) -> str:
        if self.root is not None:
            try:
                return path.resolve().relative_to(self.root.resolve()).with_suffix("").as_posix()
            except ValueError:
                pass
        return path.with_suffix("").name

    def read(self, path: Path) -> np.ndarray:
        """uint8 [H, W, 3]; DatasetError for a missing, empty, half-written or corrupt file."""
        image = read_rgb(path)
        if image.size == 0:
            raise DatasetError(f"image {path} is empty")
        return image

    def score(self, items: Sequence[tuple[Path, np.ndarray]], started: float) -> None:
        """Score images already read (one transformed size per batch), decide, write."""
        transform = self.inferencer.transform
        groups: dict[tuple[int, ...], list[tuple[Path, torch.Tensor, tuple[int, int]]]] = {}
        for path, image in items:
            pixels = transform.image(image)
            groups.setdefault(tuple(pixels.shape), []).append((path, pixels, image.shape[:2]))
        load_s = time.perf_counter() - started
        for group in groups.values():
            scored = self.inferencer.score_pixels(torch.stack([g[1] for g in group]),
                                                  load_s=load_s * len(group) / len(items))
            latency = 1000.0 * (time.perf_counter() - started)
            decided = decide(self.site_model, [self.name(g[0]) for g in group], scored,
                             originals=[g[2] for g in group], latency_ms=latency)
            for (path, _, _), (decision, mask) in zip(group, decided, strict=True):
                self.writer.write(decision, mask)
                self.summary.counts[decision.decision] += 1
                self.summary.latencies_ms.append(latency)
                self.echo(f"{decision.decision:<9} {decision.normalised_score:.3f}  {path}  "
                          f"(score {decision.score:.4f}, {latency:.0f} ms)")


class FolderWatcher:
    """``fedclient inspect --watch DIR``: score each new image file in ``folder`` as it arrives.

    Args:
        site_model: a calibrated site model (kept warm).
        folder: the folder watched (recursively).
        out_dir: where decisions.csv / .jsonl and masks/ are appended.
        model_path: the site model's file; when it is replaced, the model is reloaded with
            ``load_model`` (None: never reloaded).
        batch_size: files scored together when several are ready at once.
        settle_s: quiet time after a file's last event before it is read (a close event from
            the writer makes it ready at once).
        retries / retry_delay_s: attempts to read a file that fails, and the wait between them.
        include_existing: also score the images already in ``folder`` at start.
        echo: where the per-image and status lines go (default: stdout, flushed).
    """

    def __init__(
        self,
        site_model: SiteModel,
        folder: Path,
        out_dir: Path,
        *,
        model_path: Path | None = None,
        load_model: Callable[[Path], SiteModel] | None = None,
        batch_size: int = 1,
        settle_s: float = 0.2,
        retries: int = 3,
        retry_delay_s: float = 0.5,
        include_existing: bool = False,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        if site_model.calibration is None:
            raise ValueError("inspection needs a calibrated site model (fedclient run or "
                             "fedclient calibrate writes one)")
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"watched folder {folder} does not exist")
        if batch_size < 1 or retries < 0:
            raise ValueError(f"batch_size must be >= 1 and retries >= 0, got {batch_size}, "
                             f"{retries}")
        self.folder = Path(folder)
        self.batch_size = batch_size
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.include_existing = include_existing
        self.summary = InspectSummary()
        self.echo = echo or _print
        self._events = _Events(settle_s)
        self._stop = threading.Event()
        self._attempts: dict[Path, int] = {}
        self._done: dict[Path, tuple[int, int]] = {}
        self._writer = DecisionWriter(out_dir, append=True)
        self._scorer = _Scorer(model_path, site_model, self._writer, self.summary, self.echo,
                               root=self.folder, load_model=load_model)
        self.started = threading.Event()

    def stop(self) -> None:
        """Ask :meth:`run` to return (from another thread or a signal handler)."""
        self._stop.set()
        with self._events.lock:
            self._events.lock.notify()

    def run(self, *, max_images: int | None = None) -> InspectSummary:
        """Watch until :meth:`stop` or ``max_images`` images are decided or skipped."""
        from watchdog.observers import Observer

        observer = Observer()
        observer.schedule(_handler(self._events), str(self.folder), recursive=True)  # type: ignore[arg-type]
        observer.start()
        try:
            if self.include_existing:
                for path in sorted(self.folder.rglob("*")):
                    if path.is_file():
                        self._events.touch(str(path), closed=True)
            self.echo(f"watching {self.folder} (bank v{self._scorer.site_model.bank_version}, "
                      f"{self._scorer.site_model.calibration.summary()})")  # type: ignore[union-attr]
            self.started.set()
            while not self._stop.is_set():
                if max_images is not None and self._handled() >= max_images:
                    break
                paths = self._events.ready(self.batch_size, wait_s=0.5)
                if paths:
                    self._process(paths)
        finally:
            observer.stop()
            observer.join(timeout=5)
            self._writer.close()
        return self.summary

    def _handled(self) -> int:
        return self.summary.images + len(self.summary.skipped)

    def _process(self, paths: Iterable[Path]) -> None:
        self._scorer.maybe_reload()
        started = time.perf_counter()
        items: list[tuple[Path, np.ndarray]] = []
        for path in paths:
            signature = _signature(path)
            if signature is None:
                continue  # gone again (a temporary file renamed away): nothing to decide
            if self._done.get(path) == signature:
                continue  # an event for a file already decided in this form
            try:
                image = self._scorer.read(path)
            except DatasetError as exc:
                self._failed(path, str(exc))
                continue
            self._done[path] = signature
            self._attempts.pop(path, None)
            items.append((path, image))
        if items:
            try:
                self._scorer.score(items, started)
            except (DatasetError, ValueError, RuntimeError) as exc:
                for path, _ in items:  # e.g. an image too small for the transform's crop
                    self._skip(path, f"cannot score it: {exc}")

    def _failed(self, path: Path, reason: str) -> None:
        attempt = self._attempts.get(path, 0) + 1
        if attempt <= self.retries:
            self._attempts[path] = attempt
            self.summary.retries += 1
            self._events.retry(path, self.retry_delay_s)
            logger.info("retrying %s (%d/%d): %s", path, attempt, self.retries, reason)
            return
        self._attempts.pop(path, None)
        self._done[path] = _signature(path) or (0, 0)
        self._skip(path, reason)

    def _skip(self, path: Path, reason: str) -> None:
        self.summary.skipped.append((str(path), reason))
        self.echo(f"skipped   {path}: {reason}")


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _print(line: str) -> None:
    print(line, flush=True)


def inspect_paths(
    site_model: SiteModel,
    lines: Iterable[str],
    out_dir: Path,
    *,
    max_images: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> InspectSummary:
    """``fedclient inspect --watch -``: score each image path read from ``lines`` (stdin), one
    at a time as it comes; an unreadable path gets one line and is skipped."""
    if site_model.calibration is None:
        raise ValueError("inspection needs a calibrated site model")
    echo = echo or _print
    summary = InspectSummary()
    with DecisionWriter(out_dir, append=True) as writer:
        scorer = _Scorer(None, site_model, writer, summary, echo, root=None, load_model=None)
        for line in lines:
            text = line.strip()
            if not text:
                continue
            path = Path(text)
            started = time.perf_counter()
            try:
                image = scorer.read(path)
                scorer.score([(path, image)], started)
            except (DatasetError, ValueError, RuntimeError) as exc:
                summary.skipped.append((text, str(exc)))
                echo(f"skipped   {text}: {exc}")
            if max_images is not None and summary.images + len(summary.skipped) >= max_images:
                break
    return summary


def stdin_lines(stream: IO[str] | None = None) -> Iterable[str]:
    """Lines of stdin as they arrive (no read-ahead buffering beyond one line)."""
    source = stream or sys.stdin
    yield from iter(source.readline, "")



def calibrate_file(
    source: Path,
    data: Path,
    out_dir: Path,
    *,
    categories: tuple[str, ...] | None = None,
    weights: str | None = None,
    device: str | None = None,
    target_fpr: float = 0.01,
    pixel_target_fpr: float = 0.01,
    knn: str = "auto",
    batch_size: int = 8,
) -> tuple[SiteModel, Path]:
    """``fedclient calibrate``: calibrate the bank of ``source`` (a bank or a site model file)
    on ``data`` and write ``out_dir/site-model.safetensors``; returns it and its path.

    ``data`` with a labelled test split (MVTec / AutoVI layout): its test images, labels and
    masks (F1-optimal thresholds when it has defects); a plain folder: all its images, as good
    ones (order-statistic thresholds at the target rates).
    """
    from fedclient.site import load_site_data

    loaded = SiteModel.load(source, weights=weights, device=device)
    site_model = SiteModel.from_model(loaded.model, search=knn, provenance=loaded.provenance)
    train, test = load_site_data(data, categories)
    images = test if test is not None else train
    labels, masks = (labels_and_masks(images, loaded.model.config.features.transform)
                     if test is not None else (None, None))
    site_model.calibrate(images, labels=labels, masks=masks, target_fpr=target_fpr,
                         pixel_target_fpr=pixel_target_fpr, batch_size=batch_size)
    path = site_model.save(Path(out_dir) / SITE_MODEL_FILE)
    return site_model, path
