"""`python -m pneumonia fit-ood MODEL DATA_DIR`: fits the out-of-distribution gate of a model.

The training part of train/ gives the pixel bounds and the feature density; the validation
part (the same patient-grouped split the model was trained with, from its card) gives the
thresholds and the false-refusal rate. Then the gate is measured on images that are not chest
X-rays, built here, which never set a threshold. `train` runs this for every new model.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from pneumonia.errors import TrainingError
from pneumonia.reading.decoding import decode_xray
from pneumonia.serving.card import CARD_NAME, ModelCard, MonitorReference, file_sha256, write_card
from pneumonia.serving.classifier import XrayClassifier
from pneumonia.serving.drift import monitor_reference
from pneumonia.serving.gate import GATE_FILE, OodGate, feature_thresholds, fit_feature_density, pixel_bounds
from pneumonia.serving.outcomes import GateVerdict
from pneumonia.serving.preprocessing import resize_xray
from pneumonia.training import dataset


def pixel_stats_of(files: dataset.SplitFiles, log=print) -> list:
    """What the pixel checks measure, for every file of a split (unreadable ones are skipped)."""
    stats = []
    for path in files.paths:
        try:
            stats.append(decode_xray(path)[1])
        except ValueError as err:
            log(f"skipping {path.name}: {err}")
    return stats


def fit_gate(
    classifier: XrayClassifier, train_pixels, train_labels, train_stats, val_pixels, val_stats
) -> tuple[OodGate, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Pixel bounds and feature density from the training part, thresholds from validation.
    Returns the gate, the validation distances and the validation (features, logits)."""
    bounds = pixel_bounds(train_stats)
    train_features, _ = classifier.features_and_logits_of_pixels(train_pixels)
    density = fit_feature_density(train_features, train_labels)
    val_features, val_logits = classifier.features_and_logits_of_pixels(val_pixels)
    val_scores = density.distance(val_features)
    thresholds = feature_thresholds(val_scores)
    model = classifier.runtime.model
    logit_layer = model.get_layer("logit")
    info = {
        "method": "pixel checks (bounds from training percentiles), then the Mahalanobis distance of the pooled "
        "features to the nearer class mean (shared Ledoit-Wolf covariance from the training part); "
        "thresholds are quantiles of the validation part's distances",
        "layer": next(layer.name for layer in model.layers if layer.output is logit_layer.input),
        "feature_dim": int(train_features.shape[1]),
        "model_sha256": file_sha256(classifier.keras_path),
        "fitted_on": {"train_images": int(len(train_pixels)), "validation_images": int(len(val_pixels))},
    }
    gate = OodGate(bounds, density, thresholds, info)
    gate.info["validation"] = verdict_counts(gate, val_stats, val_scores)
    return gate, val_scores, (val_features, val_logits)


VALIDATION_PART = "validation part of train/ (patient-grouped)"


def validation_reference(
    card: ModelCard, val_logits, val_scores, gate: OodGate | None, val_files: dataset.SplitFiles
) -> MonitorReference:
    """The drift monitor's reference (serving/drift.py) on the validation part, at the card's calibration and
    thresholds, with the design effect of its patients: what `fit-ood` (and so `train`) writes in the card."""
    return monitor_reference(
        val_logits,
        None if gate is None else val_scores,
        (card.calibration.slope, card.calibration.intercept),
        card.thresholds.as_dict(),
        None if gate is None else gate.thresholds,
        f"{VALIDATION_PART}, {len(val_logits)} images",
        groups=[dataset.patient_id(path) for path in val_files.paths],
    )


def write_monitor_reference(model_path: str | Path, data_dir: str | Path, cache_dir: str | None = None, log=print):
    """`fit-ood --monitor-only`: the drift monitor's reference of an existing model and gate, computed on the
    validation part its card records (refused when the part found differs), written in its card."""
    classifier = XrayClassifier(model_path)
    val, info = dataset.validation_part(data_dir, classifier.card)
    if not info["fingerprint_matches"]:
        raise TrainingError(f"{info['warning']}: the reference must come from the card's own validation part")
    pixels, _, kept = dataset.load_pixels(val, classifier.image_size, cache_dir, log)
    if len(kept.paths) != len(val.paths):
        raise TrainingError("some validation images could not be read: the reference would not be the card's part")
    features, logits = classifier.features_and_logits_of_pixels(pixels)
    gate = classifier.gate
    scores = gate.density.distance(features) if gate is not None else None
    reference = validation_reference(classifier.card, logits, scores, gate, kept)
    model_dir = classifier.keras_path.parent
    write_card(model_dir, dataclasses.replace(ModelCard.load(model_dir / CARD_NAME), monitor=reference))
    return reference


def verdict_counts(gate: OodGate, stats: list, scores: np.ndarray) -> dict:
    """Shares of images refused (by pixel checks or features) and flagged unusual."""
    verdicts = [gate.verdict(s, score) for s, score in zip(stats, scores)]
    refused_by: dict[str, int] = {}
    for v in verdicts:
        if not v.accepted:
            refused_by[v.reason] = refused_by.get(v.reason, 0) + 1
    n = max(1, len(verdicts))
    return {
        "images": len(verdicts),
        "refused_fraction": sum(refused_by.values()) / n,
        "unusual_fraction": sum(v.verdict == GateVerdict.UNUSUAL for v in verdicts) / n,
        "refused_by": refused_by,
    }


# --- Images that are not chest X-rays, to measure the gate on ---------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def not_xray_sets(val_paths: list[Path], seed: int = 0) -> dict[str, list[bytes]]:
    """Named sets of encoded images that are not (usable) chest X-rays."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # china.jpg, flower.jpg
    photo_crops = [p.crop((x, y, x + 300, y + 300)) for p in photos for x, y in ((0, 0), (300, 100), (150, 50))]
    size = 512
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    ramps = [x, y, (x + y) / 2, np.hypot(x - 0.5, y - 0.5) * 1.4, 1 - x, np.sin(6 * np.pi * x) / 2 + 0.5]
    xrays = [Image.open(p).convert("L") for p in val_paths[:24]]
    return {
        "photos (scikit-learn samples and crops)": [_jpeg(p) for p in photos + photo_crops],
        "the same photos in greyscale": [_jpeg(ImageOps.grayscale(p)) for p in photos + photo_crops],
        "blank (black, white, grey, faint noise)": [_png(_blank(level, rng)) for level in (0, 255, 128, 60, 200, 30)],
        "noise (uniform, Gaussian)": [_png(_noise(kind, rng)) for kind in ("uniform", "gaussian") for _ in range(4)],
        "ramps and stripes": [_png(Image.fromarray(np.uint8(np.clip(r, 0, 1) * 255))) for r in ramps],
        "rendered text": [_png(_text_page(i, rng)) for i in range(6)],
        "colour pictures (shapes)": [_jpeg(_colour_shapes(rng)) for _ in range(8)],
        "X-rays cropped to a quarter": [_png(im.crop((0, 0, im.width // 2, im.height // 2))) for im in xrays],
        "X-rays rotated 90 degrees": [_png(im.rotate(90, expand=True)) for im in xrays],
        "X-rays inverted": [_png(ImageOps.invert(im)) for im in xrays],
    }


def _blank(level: int, rng) -> Image.Image:
    return Image.fromarray(np.uint8(np.clip(level + rng.normal(0, 1.0, (400, 400)), 0, 255)))


def _noise(kind: str, rng) -> Image.Image:
    values = rng.uniform(0, 255, (400, 400)) if kind == "uniform" else rng.normal(128, 40, (400, 400))
    return Image.fromarray(np.uint8(np.clip(values, 0, 255)))


def _text_page(index: int, rng) -> Image.Image:
    background, ink = (255, 0) if index % 2 == 0 else (0, 255)
    page = Image.new("L", (600, 800), background)
    draw = ImageDraw.Draw(page)
    for line in range(30):
        words = " ".join("".join(chr(c) for c in rng.integers(97, 123, rng.integers(2, 9))) for _ in range(8))
        draw.text((20, 20 + 25 * line), words, fill=ink, font_size=18)
    return page


def _colour_shapes(rng) -> Image.Image:
    picture = Image.new("RGB", (480, 360), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(picture)
    for _ in range(12):
        x0, y0 = rng.integers(0, 400), rng.integers(0, 300)
        box = (x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return picture


def detection_figures(
    classifier: XrayClassifier, gate: OodGate, sets: dict[str, list[bytes]], val_scores: np.ndarray
) -> dict:
    """Per set: refused and unusual fractions through the serving path, and the AUROC of the
    feature distance against the validation distances (pixel checks aside)."""
    from sklearn.metrics import roc_auc_score

    figures = {}
    for name, images in sets.items():
        decoded = [decode_xray(data) for data in images]
        pixels = np.stack([resize_xray(xray, classifier.image_size) for xray, _ in decoded])  # (n, S, S)
        scores = gate.density.distance(classifier.features_and_logits_of_pixels(pixels)[0])  # one batch
        verdicts = [gate.verdict(stats, score) for (_, stats), score in zip(decoded, scores)]
        labels = np.r_[np.zeros(len(val_scores)), np.ones(len(scores))]
        figures[name] = {
            "n": len(images),
            "refused_fraction": float(np.mean([not v.accepted for v in verdicts])),
            "unusual_fraction": float(np.mean([v.verdict == GateVerdict.UNUSUAL for v in verdicts])),
            "auroc": float(roc_auc_score(labels, np.r_[val_scores, scores])),
        }
    return figures


def fit_ood(model_path: str | Path, data_dir: str | Path, cache_dir: str | None = None, log=print) -> OodGate:
    """Fits, measures and stores the gate beside the model (`ood.npz`, and the card's `ood`)."""
    classifier = XrayClassifier(model_path, runtime="keras")  # fitting needs the Keras model's layer names
    config = classifier.card.training.config
    val_fraction, seed = classifier.card.data.val_fraction, config.seed
    all_train = dataset.scan_split(data_dir, "train")
    if all_train is None or not all_train.paths:
        raise TrainingError(f"{data_dir} has no train/NORMAL or train/PNEUMONIA images")
    train_files, val_files, _ = dataset.training_parts(all_train, val_fraction, seed, config.hold_out_series)
    if classifier.card.data.validation_fingerprint != dataset.fingerprint(val_files):
        log(
            "warning: this validation part differs from the one in the model card (other data, or another split); "
            "the gate's thresholds will come from this one"
        )
    train_x, train_y, train_files = dataset.load_pixels(train_files, classifier.image_size, cache_dir, log)
    val_x, _, val_files = dataset.load_pixels(val_files, classifier.image_size, cache_dir, log)
    log(f"pixel statistics of {len(train_files.paths)} training and {len(val_files.paths)} validation images")
    train_stats, val_stats = pixel_stats_of(train_files, log), pixel_stats_of(val_files, log)
    log("features, density and thresholds")
    gate, val_scores, (val_features, val_logits) = fit_gate(classifier, train_x, train_y, train_stats, val_x, val_stats)
    log("measuring on images that are not chest X-rays")
    gate.info["detection"] = detection_figures(classifier, gate, not_xray_sets(val_files.paths), val_scores)
    model_dir = classifier.keras_path.parent
    gate.save(model_dir / GATE_FILE)
    card = ModelCard.load(model_dir / CARD_NAME)
    served = OodGate.load(model_dir / GATE_FILE)  # the stored (float32) gate: the scores a screening gets
    reference = validation_reference(card, val_logits, served.density.distance(val_features), served, val_files)
    write_card(model_dir, dataclasses.replace(card, ood={**gate.summary(), "file": GATE_FILE}, monitor=reference))
    return gate


def format_gate(gate: OodGate) -> str:
    v = gate.info["validation"]
    lines = [
        f"thresholds: unusual {gate.thresholds[GateVerdict.UNUSUAL]:.2f}, "
        f"rejected {gate.thresholds[GateVerdict.REJECTED]:.2f}",
        f"validation: {v['images']} images, refused {100 * v['refused_fraction']:.2f} %, "
        f"unusual {100 * v['unusual_fraction']:.1f} %",
        "",
        "| set | n | refused | unusual | AUROC |",
        "|---|---|---|---|---|",
    ]
    for name, d in gate.info.get("detection", {}).items():
        lines.append(
            f"| {name} | {d['n']} | {100 * d['refused_fraction']:.0f} % | {100 * d['unusual_fraction']:.0f} % "
            f"| {d['auroc']:.3f} |"
        )
    return "\n".join(lines)
