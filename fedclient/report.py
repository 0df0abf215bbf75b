"""What a site writes after scoring: ``metrics.json``, anomaly-map overlay PNGs, report.html.

Overlays show the image as the model saw it (after the extractor's resize/crop, so pixels line
up with the anomaly map [H, W]) with the map blended on top in a blue -> red colour ramp. The
ramp is scaled by one range for all images of a run (``vmin``/``vmax``), so a brighter overlay
means a higher score across images, not only within one.

``report.html`` (:func:`write_site_report`) is one self-contained page for people: the metrics
table (per category and over all images), the image ROC and PRO curves, overlays of the most
anomalous test images and of the worst false positives (the highest-scoring good images), and
where the bank came from (round, version, rows, codec, extractor fingerprint, coverage
certificate). It opens with where the backbone's weights came from, in red when they are random.
Its numbers are the ones in metrics.json. With a calibrated site model it also shows the
decisions (counts, thresholds and what backs them, "calibration uncertain" when the
validation images could not support the target), each shown image's decision and normalised
score in its caption (new images from a plain folder get no "good" label), and with labels the
false-positive and miss rates at the threshold beside AUROC.
"""

from __future__ import annotations

import html
import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from PIL import Image
from scipy import ndimage

from core.data import AnomalyDataset
from core.evaluation import AU_PRO_FPR_LIMIT
from core.htmlreport import fmt, image_tag, json_safe, page, section, table, write_atomic
from core.metrics import Curve
from core.preprocess import ImageTransform

logger = logging.getLogger(__name__)

__all__ = [
    "Example",
    "colorize",
    "colour_range",
    "examples",
    "overlay",
    "write_metrics",
    "write_overlays",
    "write_site_report",
]

#: Images shown per overlay group of the HTML report.
REPORT_EXAMPLES = 6
#: Points per plotted curve (the exact curves keep one point per distinct score).
_PLOT_POINTS = 2000

# Anchors of the colour ramp (value in [0, 1] -> RGB): dark blue, cyan, yellow, red.
_RAMP_POINTS = np.array([0.0, 0.35, 0.65, 1.0])
_RAMP_COLOURS = np.array(
    [[0, 0, 140], [0, 200, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float64
)


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """[H, W] scores -> uint8 [H, W, 3] colours; values are clipped to [vmin, vmax]."""
    span = vmax - vmin
    scaled = np.clip((values - vmin) / span, 0.0, 1.0) if span > 0 else np.zeros_like(values)
    channels = [np.interp(scaled, _RAMP_POINTS, _RAMP_COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    transform: ImageTransform,
    *,
    vmin: float,
    vmax: float,
    alpha: float = 0.45,
) -> np.ndarray:
    """uint8 [H0, W0, 3] image + [H, W] map -> uint8 [H, W, 3] blend at the map's geometry."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    tensor = torch.tensor(image).permute(2, 0, 1).float()[None] / 255.0
    size = transform.resized_shape(*image.shape[:2])
    tensor = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True)
    tensor = transform._crop(tensor)[0]  # the same geometry the model saw
    if tuple(tensor.shape[-2:]) != anomaly_map.shape:
        raise ValueError(
            f"image transforms to {tuple(tensor.shape[-2:])}, the anomaly map is "
            f"{anomaly_map.shape}"
        )
    base = (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).astype(np.float64)
    heat = colorize(anomaly_map, vmin, vmax).astype(np.float64)
    return ((1 - alpha) * base + alpha * heat).round().astype(np.uint8)


def colour_range(anomaly_maps: np.ndarray) -> tuple[float, float]:
    """(vmin, vmax) of the overlay colour ramp: the 1st and 99.9th percentiles of all maps
    [N, H, W], so one hot pixel does not wash out every other image."""
    low, high = np.percentile(anomaly_maps, [1.0, 99.9])
    return float(low), float(high)


def write_overlays(
    out_dir: Path,
    names: Sequence[str],
    anomaly_maps: np.ndarray,
    transform: ImageTransform,
    *,
    load_image: Callable[[int], np.ndarray],
) -> list[Path]:
    """Write one ``<name>.png`` overlay per image into ``out_dir``; returns the paths.

    ``anomaly_maps`` [N, H, W]; ``load_image(i)`` gives image i as uint8 [H0, W0, 3] (one at a
    time, so a large test set is never held in memory). The colour range is the 1st to 99.9th
    percentile of all maps.
    """
    if len(names) != anomaly_maps.shape[0]:
        raise ValueError(f"{len(names)} names for {anomaly_maps.shape[0]} anomaly maps")
    out_dir.mkdir(parents=True, exist_ok=True)
    vmin, vmax = colour_range(anomaly_maps)
    paths = []
    for i, name in enumerate(names):
        blended = overlay(load_image(i), anomaly_maps[i], transform, vmin=vmin, vmax=vmax)
        path = out_dir / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(blended).save(path)
        paths.append(path)
    logger.info("wrote %d overlay(s) to %s (colour range %.4f .. %.4f)", len(paths), out_dir,
                vmin, vmax)
    return paths


def write_metrics(path: Path, metrics: Mapping[str, object]) -> Path:
    """Write ``metrics`` as indented JSON atomically (temp file + rename): a reader never sees
    half a file, even if the site is killed while writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(metrics), indent=2, sort_keys=True) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- the HTML report ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Example:
    """One image shown in the report.

    name: category/defect/stem; score: its image score; defect: "good" or the defect folder
    (None for new, unlabelled images); image: uint8 [h, w, 3] overlay at the model's geometry,
    the ground truth outlined in white; decision: "anomalous" / "normal" with a calibrated
    model (None without), normalised: its normalised score (0.5 = the threshold).
    """

    name: str
    score: float
    defect: str | None
    image: np.ndarray
    decision: str | None = None
    normalised: float | None = None

    def caption(self) -> str:
        parts = [self.name]
        if self.defect is not None:
            parts.append(self.defect)
        if self.decision is not None:
            parts.append(f"{self.decision} ({fmt(self.normalised, 3)})")
        parts.append(f"score {fmt(self.score)}")
        return " | ".join(parts)


def examples(
    dataset: AnomalyDataset,
    names: Sequence[str],
    image_scores: np.ndarray,
    anomaly_maps: np.ndarray,
    transform: ImageTransform,
    *,
    count: int = REPORT_EXAMPLES,
    anomalous: np.ndarray | None = None,
    labelled: bool = True,
    normalise: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, list[Example]]:
    """The report's overlays: {"most_anomalous": the ``count`` highest-scoring images,
    "false_positives": the ``count`` highest-scoring good images} (the second only when the set
    has defective images too, i.e. when "false positive" means something).

    ``image_scores`` [N], ``anomaly_maps`` [N, h, w] (the model's output for ``dataset``). Only
    the picked images are loaded; ties are broken by position, so the pick is reproducible.
    ``anomalous`` [N] and ``normalise`` (a calibrated model's decisions and normalisation) put
    the decision in each caption; ``labelled=False`` (new images) leaves the folder's "good"
    out of it, and there are no false positives to show.
    """
    n = len(dataset)
    if image_scores.shape != (n,) or anomaly_maps.shape[0] != n or len(names) != n:
        raise ValueError(
            f"examples: {len(names)} names, scores {image_scores.shape} and maps "
            f"{anomaly_maps.shape} for a dataset of {n} images"
        )
    vmin, vmax = colour_range(anomaly_maps)
    order = np.argsort(-image_scores, kind="stable")
    labels = dataset.labels
    groups = {"most_anomalous": order[:count].tolist()}
    if labelled and labels.any() and not labels.all():
        groups["false_positives"] = [int(i) for i in order if labels[i] == 0][:count]

    def render(i: int) -> Example:
        blended = overlay(dataset.load_image(i), anomaly_maps[i], transform, vmin=vmin, vmax=vmax)
        if dataset[i].mask_paths:
            mask = transform.mask(dataset.load_mask(i))
            edge = mask & ~ndimage.binary_erosion(mask)
            blended[edge] = 255
        decision = None if anomalous is None else ("anomalous" if anomalous[i] else "normal")
        normalised = (None if normalise is None
                      else float(normalise(image_scores[i : i + 1])[0]))
        return Example(names[i], float(image_scores[i]),
                       dataset[i].defect if labelled else None, blended, decision, normalised)

    return {group: [render(i) for i in picked] for group, picked in groups.items()}


def _plot(curve: Curve, *, title: str, ylabel: str, limit: float | None) -> bytes:
    """One curve as PNG bytes (matplotlib's Agg canvas; no pyplot, so no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    thin = curve.thinned(_PLOT_POINTS)
    figure = Figure(figsize=(4.6, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(thin.fpr, thin.y, color="#c0392b", linewidth=1.6)
    if limit is not None:
        axes.axvline(limit, color="#777", linestyle="--", linewidth=1)
        axes.text(limit, 0.04, f" FPR {limit:g}", color="#555", fontsize=8)
    else:
        axes.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("false-positive rate")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    # Fixed margins instead of tight_layout(), which lays the figure out twice (half the time).
    figure.subplots_adjust(left=0.14, right=0.97, bottom=0.14, top=0.91)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


_METRIC_COLUMNS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"),
                   ("au_pro", f"AU-PRO@{AU_PRO_FPR_LIMIT:g}"))
#: Shown only when the scores were decided with a calibrated model and the images have labels.
_RATE_COLUMNS = (("false_positive_rate", "FPR at threshold"), ("miss_rate", "miss rate at "
                 "threshold"))


def _metrics_table(test: Mapping[str, object]) -> str:
    """Rows: each category (when there are several), then all images."""
    spro = sorted((k for k in test if k.startswith("au_spro@")),
                  key=lambda k: float(k.split("@")[1]))
    rates = [(k, h) for k, h in _RATE_COLUMNS if k in test]
    headers = ["category", "images", "anomalous", *(h for _, h in _METRIC_COLUMNS),
               *(h for _, h in rates), *(f"AU-sPRO@{k.split('@')[1]}" for k in spro)]
    rows = []
    per_category = test.get("per_category")
    named = dict(per_category) if isinstance(per_category, Mapping) else {}
    named["all"] = test
    for name, values in named.items():
        assert isinstance(values, Mapping)
        rows.append([name, values.get("num_images"), values.get("num_anomalous"),
                     *(values.get(k) for k, _ in _METRIC_COLUMNS),
                     *(values.get(k) for k, _ in rates), *(values.get(k) for k in spro)])
    return table(headers, rows, table_id="metrics")


def _decisions_section(decisions: Mapping[str, object], calibration: object) -> str:
    """Counts per decision and what the threshold rests on (core.calibration)."""
    rows: list[tuple[str, object]] = [
        ("anomalous", decisions.get("anomalous")),
        ("normal", decisions.get("normal")),
        ("image threshold (raw score)", decisions.get("threshold")),
        ("pixel threshold (mask)", decisions.get("pixel_threshold")),
    ]
    note = None
    if isinstance(calibration, Mapping) and isinstance(calibration.get("image"), Mapping):
        image = calibration["image"]
        rows += [
            ("threshold method", image.get("method")),
            ("target false-positive rate", image.get("target_fpr")),
            ("good validation images", image.get("num_good")),
            ("expected false-positive rate", image.get("expected_fpr")),
            ("95 % upper bound on it", image.get("fpr_upper")),
        ]
        note = str(image.get("note") or "") or None
    title = "Decisions"
    if decisions.get("uncertain"):
        title += " (calibration uncertain)"
    return section(title, table(["", "value"], [(k, v) for k, v in rows if v is not None],
                                table_id="decisions"), note=note)


def _weights_section(weights: object) -> str:
    """Where the backbone's weights came from, first on the page; a warning when they are
    random, since every number below then comes from features that mean nothing."""
    if not isinstance(weights, Mapping):
        return section("Backbone weights", note="Not recorded (a bank saved by an older "
                       "version): the metrics' weights are unknown.")
    text = html.escape(str(weights.get("text", weights.get("kind"))))
    if weights.get("kind") == "random":
        return section("Backbone weights", f'<p class="bad" id="weights">{text}. Run with '
                       "pretrained weights (the default, or --weights FILE on a site without "
                       "network) for metrics that mean something.</p>")
    return section("Backbone weights", f'<p id="weights">{text}</p>')


def _provenance(metrics: Mapping[str, object]) -> str:
    codec = metrics.get("codec")
    codec_text = (
        f"{codec['value_type']}, zstd level {codec['zstd_level']}"
        + (", byte shuffle" if codec.get("byte_shuffle") else "")
        if isinstance(codec, Mapping) else None
    )
    rounds = metrics.get("rounds")
    last_round = (rounds[-1].get("round") if isinstance(rounds, list) and rounds
                  else metrics.get("round"))
    rows = [
        ("site", metrics.get("site_id")),
        ("server", metrics.get("server")),
        ("bank file", metrics.get("bank_file")),
        ("round", last_round),
        ("bank version", metrics.get("bank_version")),
        ("bank rows", metrics.get("bank_rows")),
        ("bank rows asked (the server's k)", metrics.get("global_bank_size")),
        ("bank short", short.get("note") if isinstance(short := metrics.get("bank_short"),
                                                       Mapping) else None),
        ("codec", codec_text),
        ("feature extractor", metrics.get("backbone")),
        ("weights", weights.get("text") if isinstance(weights := metrics.get("weights"), Mapping)
         else None),
        ("feature fingerprint", metrics.get("feature_fingerprint")),
        ("r_S (server coverage radius)", metrics.get("server_coverage_radius")),
        ("max r_i (largest site coverage radius)", metrics.get("max_site_coverage_radius")),
        ("coverage certificate (max r_i + r_S)", metrics.get("certificate")),
        # The r_i the server counts adds the upload codec's error (core.federated's
        # decoded_coverage_radius), so it can be a little larger than this one.
        ("this site's r_i (float32 rows, before the upload codec)",
         metrics.get("local_coverage_radius")),
        ("this site's coreset rows", metrics.get("local_coreset_rows")),
    ]
    shown = [(k, v) for k, v in rows if v is not None]
    out = table(["", "value"], shown, table_id="provenance")
    if isinstance(rounds, list) and rounds:
        out += table(
            # bytes this run moved: a rerun after a complete upload sends nothing again
            ["round", "rows up", "chunks", "bytes up (this run)", "bytes down (this run)",
             "download",
             "upload s", "wait s", "download s"],
            [[r.get("round"), r.get("rows_up"), r.get("chunks_total"), r.get("bytes_up"),
              r.get("bytes_down"),
              f"{'delta' if r.get('bank_delta') else 'full'} v{r.get('bank_version')}",
              r.get("seconds_upload"), r.get("seconds_wait"), r.get("seconds_download")]
             for r in rounds],
            table_id="rounds", digits=2,
        )
    return out


def write_site_report(
    path: Path,
    metrics: Mapping[str, object],
    *,
    curves: Mapping[str, Curve],
    shown: Mapping[str, Sequence[Example]],
) -> Path:
    """Write the site's self-contained ``report.html`` (module docstring).

    ``metrics``: what metrics.json holds (its "test" entry has the scores); ``curves``: "roc"
    and / or "pro" from ``evaluate(..., curves=True)``; ``shown``: from :func:`examples`.
    """
    t0 = time.perf_counter()
    test = metrics.get("test")
    test = test if isinstance(test, Mapping) else {}
    site = metrics.get("site_id") or "scored images"
    sections = [_weights_section(metrics.get("weights"))]
    short = metrics.get("bank_short")
    if isinstance(short, Mapping):
        sections.insert(0, section("Bank short", f'<p class="bad" id="bank-short">'
                                   f'{html.escape(str(short["note"]))}: the uploads could not '
                                   "fill the bank the server asked for, so it covers the "
                                   "sites' patches with fewer rows than planned.</p>"))
    labelled = test.get("image_auroc") is not None or test.get("pixel_auroc") is not None
    decisions = test.get("decisions")
    protocol = test.get("protocol")
    if not labelled:
        note: str | None = (
            "The images carry no labels (no defective images or no ground truth): there is "
            "nothing to compute AUROC or PRO from"
            + ("; the decisions below come from the site's calibration." if decisions else
               "; scores only (the model has no calibration, so no decisions).")
        )
    else:
        note = f"Metrics {protocol}." if protocol else None
    sections.append(section("Metrics", _metrics_table(test), note=note))
    if isinstance(decisions, Mapping):
        sections.append(_decisions_section(decisions, metrics.get("calibration")))
    plots = []
    if "roc" in curves:
        plots.append(image_tag(_plot(curves["roc"], title="image ROC", ylabel="true-positive "
                                     "rate", limit=None), "image ROC curve", css_class="plot"))
    if "pro" in curves:
        plots.append(image_tag(_plot(curves["pro"], title="per-region overlap (PRO)",
                                     ylabel="PRO", limit=AU_PRO_FPR_LIMIT),
                               "PRO curve", css_class="plot"))
    if plots:
        sections.append(section("Curves (all images)", *plots))
    titles = {
        "most_anomalous": ("Most anomalous test images", "highest image scores; ground truth "
                           "outlined in white"),
        "false_positives": ("Worst false positives", "good images with the highest scores"),
    }
    for group, items in shown.items():
        title, note = titles[group]
        figures = [image_tag(e.image, e.name, caption=e.caption()) for e in items]
        sections.append(section(title, *figures, note=note + "; one colour range for all "
                                "images (blue low, red high)"))
    sections.append(section("Bank provenance", _provenance(metrics)))
    subtitle = (f"{test.get('num_images', 0)} test image(s), bank v{metrics.get('bank_version')}"
                f" ({metrics.get('bank_rows')} rows); written "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    out = write_atomic(path, page(f"FedPatchCore report: {site}", subtitle, sections))
    logger.info("wrote %s in %.2f s", out, time.perf_counter() - t0)
    return out
