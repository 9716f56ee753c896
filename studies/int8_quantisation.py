"""Would int8 weights serve as well and faster? The shipped export quantised with ONNX Runtime, scored
against float32 on the validation part (bootstrap intervals) and the originals, and timed.

    python -m studies.int8_quantisation ../shared/data/chest_xray --model model \
        --originals ../shared/samples/original-val --out reports/int8

Static QDQ quantisation of the convolutions only (per channel; activations calibrated on images of the
training part, never the validation part). `reduce_range` (7-bit weights) because this machine's
AVX2 has no VNNI: ONNX Runtime's u8 x s8 kernels then add pairs of products in int16, which saturate
with 8-bit weights; measured here, the full range moved a logit by up to 5.1, the reduced one by 0.12.
The explain graph's gradient half (ConvTranspose) stays float32. Writes int8.json and int8.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from pneumonia.errors import ModelLoadError
from pneumonia.scoring.metrics import bootstrap_ci, metrics_at_threshold
from pneumonia.serving.card import ExportFile
from pneumonia.serving.classifier import SHIPPED_MODEL_DIR, XrayClassifier
from pneumonia.serving.outcomes import GateVerdict
from pneumonia.serving.preprocessing import model_input
from pneumonia.serving.runtime import OnnxModel
from pneumonia.training.dataset import DataError, scan_split, training_parts, validation_part
from pneumonia.training.shifts import model_pixels
from studies.robustness import decode_all, decoded_originals

CALIBRATION_IMAGES = 128
FIGURES = ("accuracy", "recall", "specificity")


def calibration_inputs(data_dir, classifier: XrayClassifier) -> np.ndarray:
    """float32 (N, S, S, 3): model inputs of CALIBRATION_IMAGES images of the training part."""
    card = classifier.card
    config = card.training.config
    train, _, _ = training_parts(
        scan_split(data_dir, "train"), card.data.val_fraction, config.seed, config.hold_out_series
    )
    paths = sorted(train.paths)
    random.Random(0).shuffle(paths)
    decoded = decode_all(paths[:CALIBRATION_IMAGES])
    pixels = np.stack([model_pixels(image, classifier.image_size) for image in decoded.values()])
    return model_input(pixels, classifier.preprocessing)


def quantise(classifier: XrayClassifier, inputs: np.ndarray, out: Path) -> OnnxModel:
    """int8 copies of the export's two graphs in `out`, loaded as a runtime like the shipped one."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, size: int):
            self.batches = iter([{"xray": inputs[i : i + size]} for i in range(0, len(inputs), size)])

        def get_next(self):
            return next(self.batches, None)

    folder = classifier.keras_path.parent
    files = {}
    for name in ("explain", "forward"):
        entry = classifier.card.export.files[name]
        whole, prepared, quantised = (out / f"{name}.{kind}.onnx" for kind in ("f32", "pre", "int8"))
        onnx.save(onnx.load(folder / entry.file), whole)  # one file: the pre-processor cannot follow external data
        quant_pre_process(str(whole), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantised),
            Batches(1 if name == "explain" else 8),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            op_types_to_quantize=["Conv"],
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        files[name] = ExportFile(file=quantised.name, sha256="")
    return OnnxModel(out, replace(classifier.card.export, files=files), classifier.runtime.threads)


def scored(labels, probs, thresholds: dict) -> dict:
    row = {"auc": float(roc_auc_score(labels, probs))}
    for name, t in thresholds.items():
        at = metrics_at_threshold(labels, probs, t)
        row[name] = {k: at[k] for k in FIGURES}
    return row


def intervals(labels, probs, thresholds: dict) -> dict:
    """95 % bootstrap intervals of the float32 model's AUC and of each threshold's figures."""
    by_threshold = {name: bootstrap_ci(labels, probs, t) for name, t in thresholds.items()}
    return {"auc": by_threshold["default"]["auc"], **{n: {k: ci[k] for k in FIGURES} for n, ci in by_threshold.items()}}


def inside(value: float, interval) -> bool:
    return interval[0] <= value <= interval[1]


def cam_agreement(f32: OnnxModel, int8: OnnxModel, inputs: np.ndarray) -> dict:
    """Per image: |logit difference|, correlation of the two CAMs, the largest CAM difference / its peak.

    A CAM that is not finite on int8 is counted, not scored (a quantised zero-range tensor gives NaN:
    seen on an untrained test model, whose gradients are ~1e-8)."""
    rows, not_finite = [], 0
    for x in inputs:
        (za, cam_a, _), (zb, cam_b, _) = f32.explain(x[None]), int8.explain(x[None])
        if not np.isfinite(cam_b).all():
            not_finite += 1
            continue
        varying = min(cam_a.std(), cam_b.std()) > 0
        rows.append(
            (
                abs(za - zb),
                np.corrcoef(cam_a.ravel(), cam_b.ravel())[0, 1] if varying else np.nan,
                np.abs(cam_a - cam_b).max() / max(np.abs(cam_a).max(), 1e-12),
            )
        )
    rows = np.array(rows).reshape(-1, 3)
    correlations = rows[:, 1][~np.isnan(rows[:, 1])]
    return {
        "images": len(inputs),
        "cam_not_finite": not_finite,
        "logit_diff_max": float(rows[:, 0].max()) if len(rows) else None,
        "cam_correlation_min": float(correlations.min()) if len(correlations) else None,
        "cam_relative_diff_max": float(rows[:, 2].max()) if len(rows) else None,
    }


def p50_ms(call, model, repeats: int) -> float:
    call(model)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(model)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def timings(f32: OnnxModel, int8: OnnxModel, inputs: np.ndarray, rounds: int = 3) -> dict:
    """p50 ms of one explain call and of a 16-image forward call, the two runtimes taking turns."""
    calls = {
        "explain, 1 image": lambda m: m.explain(inputs[:1]),
        "forward, 16 images": lambda m: m.forward(inputs[:16]),
    }
    out = {}
    for what, call in calls.items():
        runs = {"float32": [], "int8": []}
        for _ in range(rounds):
            for name, model in (("float32", f32), ("int8", int8)):
                runs[name].append(p50_ms(call, model, 20 if "explain" in what else 5))
        out[what] = {name: float(np.median(v)) for name, v in runs.items()}
    return out


def markdown(result: dict) -> str:
    lines = [
        "| figure | float32 (95 % interval) | int8 | inside |",
        "|---|---|---|---|",
    ]
    for split in ("validation", "originals"):
        entry = result.get(split)
        if not entry:
            continue
        f32, int8, ci = entry["float32"], entry["int8"], entry["intervals"]
        lines.append(
            f"| **{split}** (n={entry['n']}) AUC | {f32['auc']:.4f} ({ci['auc'][0]:.4f}–{ci['auc'][1]:.4f}) "
            f"| {int8['auc']:.4f} | {'yes' if inside(int8['auc'], ci['auc']) else 'no'} |"
        )
        for t in ("default", "screening"):
            for k in FIGURES:
                lo, hi = ci[t][k]
                lines.append(
                    f"| {t} {k} | {f32[t][k]:.3f} ({lo:.3f}–{hi:.3f}) | {int8[t][k]:.3f} "
                    f"| {'yes' if inside(int8[t][k], ci[t][k]) else 'no'} |"
                )
        lines.append(f"| largest probability difference | | {entry['probability_diff_max']:.4f} | |")
        if "gate" in entry:
            gate = entry["gate"]
            lines.append(
                f"| gate ok / unusual / rejected | {'/'.join(str(n) for n in gate['verdicts_float32'].values())} "
                f"| {'/'.join(str(n) for n in gate['verdicts_int8'].values())} | {gate['verdicts_changed']} changed |"
            )
    cam = result["cam"]
    lines += [
        "",
        f"Grad-CAM on {cam['images']} validation images: {cam['cam_not_finite']} not finite on int8; "
        f"on the others the logit at most {cam['logit_diff_max']} apart, CAM correlation ≥ "
        f"{cam['cam_correlation_min']}, largest difference {cam['cam_relative_diff_max']} of the CAM's peak.",
        "",
        "| call, p50 ms | float32 | int8 |",
        "|---|---|---|",
    ]
    for what, t in result["timings"].items():
        lines.append(f"| {what} | {t['float32']:.1f} | {t['int8']:.1f} |")
    return "\n".join(lines) + "\n"


def compare(classifier: XrayClassifier, int8: OnnxModel, images: dict, files) -> dict:
    paths = [p for p in files.paths if p in images]
    labels = np.asarray([files.labels[files.paths.index(p)] for p in paths])
    pixels = np.stack([model_pixels(images[p], classifier.image_size) for p in paths])
    f32_runtime = classifier.runtime
    features_f32, logits_f32 = classifier.features_and_logits_of_pixels(pixels)
    classifier.runtime = int8
    features_int8, logits_int8 = classifier.features_and_logits_of_pixels(pixels)
    classifier.runtime = f32_runtime
    probs_f32, probs_int8 = classifier.calibrated(logits_f32), classifier.calibrated(logits_int8)
    entry = {
        "n": len(paths),
        "float32": scored(labels, probs_f32, classifier.thresholds),
        "int8": scored(labels, probs_int8, classifier.thresholds),
        "intervals": intervals(labels, probs_f32, classifier.thresholds),
        "probability_diff_max": float(np.abs(probs_f32 - probs_int8).max()),
        "logit_diff_max": float(np.abs(logits_f32 - logits_int8).max()),
    }
    if classifier.gate is not None:
        entry["gate"] = gate_agreement(classifier.gate, features_f32, features_int8)
    return entry, model_input(pixels[:32], classifier.preprocessing)


def gate_agreement(gate, features_f32: np.ndarray, features_int8: np.ndarray) -> dict:
    """The gate's feature verdicts on both runtimes' features, and how far its distances move."""
    distances = [gate.density.distance(f) for f in (features_f32, features_int8)]
    verdicts = [[gate.check_score(float(d)).verdict for d in ds] for ds in distances]
    return {
        "verdicts_float32": {v: verdicts[0].count(v) for v in GateVerdict},
        "verdicts_int8": {v: verdicts[1].count(v) for v in GateVerdict},
        "verdicts_changed": sum(a != b for a, b in zip(*verdicts)),
        "distance_relative_diff_max": float(np.max(np.abs(distances[1] - distances[0]) / distances[0])),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.int8_quantisation", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR))
    parser.add_argument("--originals", default=None)
    parser.add_argument("--out", default="reports/int8")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        classifier = XrayClassifier(args.model, runtime="onnx")
        val, _ = validation_part(args.data_dir, classifier.card)
    except (ModelLoadError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    int8 = quantise(classifier, calibration_inputs(args.data_dir, classifier), out)
    result = {}
    result["validation"], inputs = compare(classifier, int8, decode_all(val.paths), val)
    originals, decoded = decoded_originals(args.originals)
    if originals is not None:
        result["originals"], _ = compare(classifier, int8, decoded, originals)
    result["cam"] = cam_agreement(classifier.runtime, int8, inputs)
    result["timings"] = timings(classifier.runtime, int8, inputs)
    (out / "int8.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "int8.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
