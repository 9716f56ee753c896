"""The drift monitor (pneumonia/serving/drift.py), measured: how often it alarms when nothing has changed,
and after how many images it alarms when something has.

Everything here is on the validation part of train/ (recreated from the card, its fingerprint checked),
never on a test split:

1. **False alarms.** The reference is the card's (the whole validation part); windows of n images are drawn
   at random from the same part, without replacement, and the share of windows that alarm is counted. That
   check is optimistic (each window is a subset of the reference), so a second one is harder: the validation
   part is split in two by patient, the reference is built from one half and windows are drawn, with
   replacement, from the other; repeated over many random splits.
2. **Detection delay.** Each shift proxy of `pneumonia/training/shifts.py` (blur, contrast, framing, noise,
   ...; the ones `studies/robustness.py` uses) is applied to every validation image before the package's
   preprocessing, and a site whose images are all shifted is simulated: images arrive in random order and
   the monitor is checked after each one, from its minimum on; the delay is the number of images at the
   first alarm. Mixtures: half of the images shifted, and a mix of several shifts in equal parts.

    python -m studies.drift_monitor ../shared/data/chest_xray [--model model] [--out runs/drift-monitor]

prints the figures (markdown) and writes them as JSON; the model's scores under each shift are cached in OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumonia.serving.card import MonitorReference, platt
from pneumonia.serving.classifier import find_card
from pneumonia.serving.drift import (
    ALPHA,
    MIN_IMAGES,
    SIGNALS,
    TOLERANCE,
    WINDOW,
    acceptance,
    monitor_reference,
    signal_alpha,
)
from pneumonia.serving.outcomes import GateVerdict
from pneumonia.training import dataset
from pneumonia.training.shifts import BASELINE, SHIFTS, apply_shift, model_pixels, shift_seed

MIXTURES = {
    "half crop_80": {"crop_80": 0.5, BASELINE: 0.5},
    "half blur_r2": {"blur_r2": 0.5, BASELINE: 0.5},
    "half contrast_0.8": {"contrast_0.8": 0.5, BASELINE: 0.5},
    "blur, contrast, crop, noise": {"blur_r1": 0.25, "contrast_0.8": 0.25, "crop_80": 0.25, "noise_s5": 0.25},
}


def scores_under_shifts(data_dir, model_path, cache: Path, log=print) -> dict:
    """{"shifts": names, "logits": (S, N), "scores": (S, N) gate distances, "patients": (N,)}, cached."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    from pneumonia.reading.decoding import load_xray
    from pneumonia.serving.classifier import XrayClassifier

    classifier = XrayClassifier(model_path)
    val, info = dataset.validation_part(data_dir, classifier.card)
    if not info["fingerprint_matches"]:
        raise SystemExit(f"error: {info['warning']}")
    decoded = {path: load_xray(path) for path in val.paths}
    names = [BASELINE] + [shift.name for shift in SHIFTS]
    logits, scores = [], []
    for name in names:
        pixels = np.stack(
            [model_pixels(apply_shift(name, decoded[p], shift_seed(p)), classifier.image_size) for p in val.paths]
        )
        features, shift_logits = classifier.features_and_logits_of_pixels(pixels)
        logits.append(shift_logits)
        scores.append(classifier.gate.density.distance(features))
        log(f"scored {name}")
    result = {
        "shifts": np.asarray(names),
        "logits": np.stack(logits),
        "scores": np.stack(scores),
        "patients": np.asarray([dataset.patient_id(p) for p in val.paths]),
        "labels": np.asarray(val.labels),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **result)
    return result


# --- The monitor on arrays: membership of each image in each signal's band -------------------------


@dataclass(frozen=True)
class Setting:
    """What the monitor needs besides the reference: the card's calibration and the gate's thresholds."""

    platt: tuple[float, float]
    thresholds: dict[str, float]
    gate: dict[str, float]


def setting_of(card) -> Setting:
    return Setting(
        (card.calibration.slope, card.calibration.intercept), card.thresholds.as_dict(), card.ood["thresholds"]
    )


def values(setting: Setting, logits, scores) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, scores) as the web app sees them: no probability for an image the gate refuses."""
    probabilities = platt(np.asarray(logits, float), *setting.platt)
    return np.where(scores > setting.gate[GateVerdict.REJECTED], np.nan, probabilities), np.asarray(scores, float)


def reference_of(setting: Setting, logits, scores, patients) -> MonitorReference:
    return monitor_reference(
        logits, scores, setting.platt, setting.thresholds, setting.gate, "validation (a study)", groups=patients
    )


def membership(reference: MonitorReference, probabilities, scores) -> tuple[np.ndarray, np.ndarray]:
    """(inside, present): bool (N, signals) arrays, in the reference's signal order."""
    by_quantity = {"probability": probabilities, "gate_score": scores}
    inside, present = [], []
    for band in reference.bands.values():
        value = by_quantity[band.quantity]
        has = ~np.isnan(value)
        filled = np.where(has, value, 0.0)
        lower = filled >= band.low if band.low is not None else True
        upper = filled < band.high if band.high is not None else True
        inside.append(has & lower & upper)
        present.append(has)
    return np.stack(inside, axis=1), np.stack(present, axis=1)


def acceptance_table(reference: MonitorReference, largest: int) -> tuple[np.ndarray, np.ndarray]:
    """low, high: (signals, largest + 1) arrays, the shares that do not alarm for each denominator 0..largest."""
    each = signal_alpha(reference)
    low = np.zeros((len(reference.bands), largest + 1))
    high = np.zeros_like(low)
    for s, (name, band) in enumerate(reference.bands.items()):
        for n in range(largest + 1):
            low[s, n], high[s, n] = acceptance(n, band.count, band.of, each, SIGNALS[name].sided, band.design_effect)
    return low, high


def alarms(counts: np.ndarray, ofs: np.ndarray, images: np.ndarray, table, min_images: int = MIN_IMAGES) -> np.ndarray:
    """(..., signals) counts and denominators of windows of `images` screenings -> (...) bool: the monitor alarms."""
    low, high = table
    signal = np.arange(low.shape[0])
    share = counts / np.maximum(ofs, 1)
    outside = (share < low[signal, ofs] - TOLERANCE) | (share > high[signal, ofs] + TOLERANCE)
    return ((ofs >= min_images) & outside).any(axis=-1) & (images >= min_images)


# --- 1. False alarms ------------------------------------------------------------------------------


def windows_of(inside, present, index: np.ndarray):
    """index: (windows, n) image indices -> counts, denominators (windows, signals)."""
    return inside[index].sum(axis=1), present[index].sum(axis=1)


def false_alarms_in_part(data: dict, setting: Setting, sizes, windows: int, rng) -> dict:
    """Reference = the whole validation part; windows drawn from it without replacement."""
    if not sizes:
        return {}
    probabilities, scores = values(setting, data["logits"][0], data["scores"][0])
    reference = reference_of(setting, data["logits"][0], scores, data["patients"])
    inside, present = membership(reference, probabilities, scores)
    table = acceptance_table(reference, max(sizes))
    result = {}
    for n in sizes:
        index = np.stack([rng.choice(len(scores), n, replace=False) for _ in range(windows)])
        counts, ofs = windows_of(inside, present, index)
        result[n] = float(alarms(counts, ofs, np.full(windows, n), table).mean())
    return result


def patient_halves(patients: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    unique = np.unique(patients)
    first = set(rng.permutation(unique)[: len(unique) // 2].tolist())
    mask = np.array([p in first for p in patients])
    return np.nonzero(mask)[0], np.nonzero(~mask)[0]


def false_alarms_split_half(data: dict, setting: Setting, sizes, splits: int, windows: int, rng) -> dict:
    """Reference from half of the patients, windows drawn without replacement from the other half, both ways:
    a random subset of an independent sample is itself an independent sample of the population, so each window
    is what a site like the validation part's patients would send (with replacement, a window would repeat
    images and follow the half's own quirks twice)."""
    logits, scores = data["logits"][0], data["scores"][0]
    alarmed: dict[int, list] = {n: [] for n in sizes}
    if not sizes:
        return {}
    for _ in range(splits):
        for ref, win in patient_halves(data["patients"], rng), patient_halves(data["patients"], rng)[::-1]:
            reference = reference_of(setting, logits[ref], scores[ref], data["patients"][ref])
            inside, present = membership(reference, *values(setting, logits[win], scores[win]))
            table = acceptance_table(reference, max(sizes))
            for n in (n for n in sizes if n <= len(win)):
                index = np.stack([rng.choice(len(win), n, replace=False) for _ in range(windows)])
                counts, ofs = windows_of(inside, present, index)
                alarmed[n].append(alarms(counts, ofs, np.full(windows, n), table))
    return {n: float(np.concatenate(found).mean()) for n, found in alarmed.items() if found}


# --- 2. Detection delay ---------------------------------------------------------------------------


def stream_alarms(inside, present, index: np.ndarray, table, window: int = WINDOW) -> np.ndarray:
    """index: (streams, length) images in arrival order -> (streams, length) bool: the monitor alarms after each."""

    def cumulative(flags):
        summed = np.cumsum(flags[index], axis=1)
        return np.concatenate([np.zeros_like(summed[:, :1]), summed], axis=1)

    counts, ofs = cumulative(inside), cumulative(present)
    ends = np.arange(1, index.shape[1] + 1)
    starts = np.maximum(0, ends - window)
    in_window = counts[:, ends] - counts[:, starts]
    of_window = ofs[:, ends] - ofs[:, starts]
    return alarms(in_window, of_window, np.minimum(ends, window)[None, :], table)


def first_alarm(alarmed: np.ndarray, after: int = 0) -> np.ndarray:
    """Images after `after` until the first alarm (from `after` on), per stream; -1 when none."""
    tail = alarmed[:, after:]
    return np.where(tail.any(axis=1), tail.argmax(axis=1) + 1, -1)


def delay_figures(delays: np.ndarray) -> dict:
    caught = delays[delays > 0]
    return {
        "caught": float(len(caught) / len(delays)),
        "median": float(np.median(caught)) if len(caught) else None,
        "p90": float(np.quantile(caught, 0.9)) if len(caught) else None,
    }


def mixture_index(shift_names: list[str], mixture: dict[str, float], images: int, shape, rng) -> tuple:
    """(shift row, image) indices of a stream whose images come from the mixture's shifts."""
    rows = rng.choice([shift_names.index(name) for name in mixture], size=shape, p=list(mixture.values()))
    return rows, rng.integers(0, images, shape)


def detection(data: dict, setting: Setting, streams: int, length: int, rng) -> dict:
    """Per shift and mixture: a new site (every image shifted) and a change after WINDOW clean images."""
    names = data["shifts"].tolist()
    reference = reference_of(setting, data["logits"][0], data["scores"][0], data["patients"])
    probabilities, scores = values(setting, data["logits"], data["scores"])  # (S, N)
    inside, present = membership(reference, probabilities.ravel(), scores.ravel())
    table = acceptance_table(reference, WINDOW)
    images = probabilities.shape[1]
    cases = {name: {name: 1.0} for name in names}
    cases |= {case: mixture for case, mixture in MIXTURES.items() if set(mixture) <= set(names)}
    figures = {}
    for case, mixture in cases.items():
        rows, picks = mixture_index(names, mixture, images, (streams, length), rng)
        new_site = stream_alarms(inside, present, rows * images + picks, table)
        clean = rng.integers(0, images, (streams, WINDOW))  # row 0: no shift
        changed = stream_alarms(inside, present, np.concatenate([clean, rows * images + picks], axis=1), table)
        figures[case] = {
            "operating": operating(setting, data, mixture),
            "new_site": delay_figures(first_alarm(new_site)),
            "after_change": delay_figures(first_alarm(changed, WINDOW)),
            "alarmed_before_change": float(changed[:, :WINDOW].any(axis=1).mean()),
        }
    return figures


def operating(setting: Setting, data: dict, mixture: dict[str, float]) -> dict | None:
    """Specificity and sensitivity at the screening threshold under a single shift (None for a mixture): what the
    shift does to the operating point, beside whether the monitor sees it."""
    if len(mixture) != 1:
        return None
    row = data["shifts"].tolist().index(next(iter(mixture)))
    probabilities, _ = values(setting, data["logits"][row], data["scores"][row])
    labels, positive = data["labels"].astype(bool), probabilities >= setting.thresholds["screening"]
    screened = ~np.isnan(probabilities)
    normal, pneumonia = (~labels & screened).sum(), (labels & screened).sum()
    if not normal or not pneumonia:
        return None
    return {
        "specificity": float((~positive & ~labels & screened).sum() / normal),
        "sensitivity": float((positive & labels).sum() / pneumonia),
    }


def study(data: dict, card, seed: int = 0, windows: int = 2000, splits: int = 100, streams: int = 200) -> dict:
    rng = np.random.default_rng(seed)
    setting = setting_of(card)
    images = data["logits"].shape[1]
    sizes = tuple(n for n in (MIN_IMAGES, 200, WINDOW) if n <= images)  # windows without replacement
    return {
        "images": int(images),
        "window": WINDOW,
        "min_images": MIN_IMAGES,
        "false_alarm_rate": ALPHA,
        "false_alarms_in_part": false_alarms_in_part(data, setting, sizes, windows, rng),
        "false_alarms_split_half": false_alarms_split_half(
            data, setting, tuple(n for n in sizes[:2] if n <= 0.4 * images), splits, windows // 20, rng
        ),
        "detection": detection(data, setting, streams, 2000, rng),
    }


def to_markdown(figures: dict) -> str:
    sizes = list(figures["false_alarms_in_part"])
    lines = [
        f"False alarms (stated: at most {100 * figures['false_alarm_rate']:g} % of windows), {figures['images']} "
        "validation images:",
        "",
        "| windows of | drawn from the reference itself | reference from half the patients, windows from the other |",
        "|---|---|---|",
    ]
    for n in sizes:
        in_part, split = figures["false_alarms_in_part"][n], figures["false_alarms_split_half"].get(n)
        lines.append(f"| {n} | {100 * in_part:.2f} % | {'-' if split is None else f'{100 * split:.2f} %'} |")
    lines += [
        "",
        f"Detection (window {figures['window']}, no alarm under {figures['min_images']}; images until the first alarm, "
        "median and 90th percentile of the streams that alarmed within 2,000):",
        "",
        "| shift | specificity / sensitivity at screening | new site: alarmed | median | p90 | after a change: "
        "alarmed | median | p90 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, found in figures["detection"].items():
        point = found["operating"]
        cells = ["-" if point is None else f"{point['specificity']:.3f} / {point['sensitivity']:.3f}"]
        for key in ("new_site", "after_change"):
            f = found[key]
            cells += [f"{100 * f['caught']:.0f} %", _count(f["median"]), _count(f["p90"])]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _count(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.drift_monitor", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--model", default="model")
    parser.add_argument("--out", default="runs/drift-monitor")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = scores_under_shifts(args.data_dir, args.model, out / "scores.npz", log=lambda m: print(m, file=sys.stderr))
    figures = study(data, find_card(args.model)[1], args.seed)
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(to_markdown(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
