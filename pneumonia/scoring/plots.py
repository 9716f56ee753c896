"""The report's pictures: confusion matrices at each threshold, ROC and PR curves, training curves."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from pneumonia.labels import CLASS_NAMES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plots(labels, probs, metrics: dict, out_dir: str | Path) -> list[Path]:
    """confusion_matrix_<name>.png for each threshold, roc_curve.png, pr_curve.png."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

    for name, entry in metrics["thresholds"].items():
        cm = entry["confusion_matrix"]
        fig, ax = plt.subplots(figsize=(4, 3.6))
        grid = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
        skm.ConfusionMatrixDisplay(grid, display_labels=CLASS_NAMES).plot(ax=ax, cmap="Blues", colorbar=False)
        ax.set_title(f"{name} threshold {entry['threshold']:.3f}")
        save(fig, f"confusion_matrix_{name}.png")
    curves = {
        "roc_curve.png": (skm.RocCurveDisplay, f"ROC, AUC {metrics['auc']:.3f}"),
        "pr_curve.png": (skm.PrecisionRecallDisplay, f"PR, AP {metrics['average_precision']:.3f}"),
    }
    for filename, (display, title) in curves.items():
        fig, ax = plt.subplots(figsize=(4, 4))
        display.from_predictions(labels, probs, ax=ax, name=metrics["model"])
        ax.set_title(f"{metrics['model']} on {metrics['split']}\n{title}", fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, filename)
    return written


def plot_history(history_csv: Path, out_png: Path) -> None:
    plt = _pyplot()
    rows = list(csv.DictReader(history_csv.open()))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("loss", "auc")):
        ax.plot(epochs, [float(r[metric]) for r in rows], label=f"train {metric}")
        ax.plot(epochs, [float(r[f"val_{metric}"]) for r in rows], label=f"validation {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
