"""`python -m pneumonia train`: data -> model, card and validation report in one folder.

DIR/
  <arch>.keras          the final weights (the schedule ends at a rate of zero; no epoch is picked)
  model.json            the card
  report/               validation metrics.json, plots, history.csv, training_curves.png
  checkpoints/          last.keras + state.json (for --resume)
"""

from __future__ import annotations

import csv
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from pneumonia.errors import TrainingError
from pneumonia.labels import CLASS_NAMES
from pneumonia.scoring.metrics import write_metrics
from pneumonia.scoring.plots import plot_history, save_plots
from pneumonia.serving.card import CARD_NAME, DataRecord, Gradcam, Metrics, ModelCard, Run, Training, write_card
from pneumonia.serving.keras_graphs import features_and_logit_model, gradcam_layer_for
from pneumonia.serving.preprocessing import normalize_contrast, preprocessing_spec
from pneumonia.training import dataset
from pneumonia.training.architectures import build_model, normalization_for, resolve_init
from pneumonia.training.augmentation import augmentation_for, class_weights, make_dataset
from pneumonia.training.config import RULES_BY_NAME, TrainConfig
from pneumonia.training.export import export
from pneumonia.training.gate_fitting import fit_ood, format_gate
from pneumonia.training.operating_points import OperatingPoint, operating_point
from pneumonia.training.schedule import WarmupCosine, describe, warmup_cosine
from pneumonia.training.threshold_rules import apply_threshold_rule


def logits_of(model, batches) -> np.ndarray:
    """The "logit" layer's output (N,) for the inputs of a tf.data of (x, y) batches, in order."""
    logit_model = features_and_logit_model(model)
    out = [np.asarray(logit_model(x, training=False)[1]).reshape(-1) for x, _ in batches]
    return np.concatenate(out) if out else np.zeros(0)


def exact_val_auc_callback(val_ds, val_y):
    """Replaces each epoch's `val_auc` with the exact ROC AUC of the validation logits.

    Keras' AUC metric counts probabilities in 200 buckets. Early in training, while the
    BatchNormalization moving statistics are far from the batch statistics (the custom CNN's
    activations have variances of 1e-5..1e-8 against a moving variance that starts at 1), a
    model can rank the validation images well yet put every probability in one bucket: the
    bucketed AUC reads exactly 0.5, and best-epoch selection and early stopping, which watch
    `val_auc`, keep the first epoch. Ranks of the logits have neither the bucketing nor float32
    sigmoid saturation. Put it before the callbacks that read `val_auc`.
    """
    labels = np.asarray(val_y)

    class ExactValidationAUC(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is not None and len(np.unique(labels)) == 2:
                logs["val_auc"] = float(roc_auc_score(labels, logits_of(self.model, val_ds)))

    return ExactValidationAUC()


class DivergedError(TrainingError):
    """A run whose loss became NaN or infinite; its last good checkpoint is kept."""


def divergence_guard(checkpoints: Path):
    """Stops training at the first step whose loss is not finite, before the epoch's end could
    checkpoint NaN weights; the message says what was kept."""

    class DivergenceGuard(keras.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch + 1

        def on_train_batch_end(self, batch, logs=None):
            if logs is None or np.isfinite(float(logs.get("loss", 0.0))):
                return
            kept = (
                f"The last good checkpoint ({checkpoints / 'last.keras'}, after epoch {self.epoch - 1}) is kept; "
                if self.epoch > 1
                else "No epoch finished, so there is no checkpoint; "
            )
            raise DivergedError(
                f"training diverged: the loss is not finite at epoch {self.epoch}, step {batch + 1}. {kept}"
                "try a lower --learning-rate or a longer warm-up (--warmup-fraction)."
            )

    return DivergenceGuard()


def resume_state_callback(checkpoint_dir: Path, started: float):
    """Saves last.keras + state.json after every epoch, so --resume can continue.

    `started` is the clock time training would have begun had it never stopped, so the
    recorded wall time adds up across resumes.
    """

    class SaveResumeState(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.save(checkpoint_dir / "last.keras")
            state = {"epochs_done": epoch + 1, "wall_time_s": time.time() - started}
            (checkpoint_dir / "state.json").write_text(json.dumps(state))

    return SaveResumeState()


@dataclass
class TrainingData:
    """The patient-grouped training and validation parts, decoded, resized and contrast-normalised."""

    train_x: np.ndarray  # uint8 (N, S, S)
    train_y: np.ndarray  # int (N,)
    val_x: np.ndarray
    val_y: np.ndarray
    train_files: dataset.SplitFiles
    val_files: dataset.SplitFiles


def load_training_data(config: TrainConfig, log=print) -> TrainingData:
    all_train = dataset.scan_split(config.data_dir, "train")
    if all_train is None or not all_train.paths:
        raise TrainingError(f"{config.data_dir} has no train/NORMAL or train/PNEUMONIA images")
    log(dataset.describe("train/ (all)", all_train))
    train_files, val_files, held_out = dataset.training_parts(
        all_train, config.val_fraction, config.seed, config.hold_out_series
    )
    train_x, train_y, train_files = dataset.load_pixels(train_files, config.image_size, config.cache_dir, log)
    val_x, val_y, val_files = dataset.load_pixels(val_files, config.image_size, config.cache_dir, log)
    log(dataset.describe("training part", train_files))
    log(dataset.describe("validation part (patient-grouped, from train/)", val_files))
    if config.hold_out_series:
        log(dataset.describe(f"held out: NORMAL series {config.hold_out_series}", held_out))
    # The card's contrast normalisation before augmentation: what `model_input` does when serving.
    return TrainingData(
        normalize_contrast(train_x, config.contrast),
        train_y,
        normalize_contrast(val_x, config.contrast),
        val_y,
        train_files,
        val_files,
    )


def compile_for_training(model, learning_rate, jit_compile: bool = False) -> None:
    """Adam at `learning_rate`: a number, or a schedule of the step (schedule.WarmupCosine). XLA
    (`jit_compile`) is off: bench/benchmark_training.py compares the two on this machine."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )


@dataclass
class Progress:
    """Where training starts: a fresh model at epoch 0, or the checkpoint of an earlier run."""

    model: object
    initial_epoch: int = 0
    earlier_wall_time_s: float = 0.0


def model_to_fit(config: TrainConfig, init: dict, schedule: WarmupCosine, checkpoints: Path, log=print) -> Progress:
    """A fresh model compiled with the run's schedule, or (--resume) the last checkpoint, whose optimizer
    carries the schedule and the global step it reached."""
    state_file = checkpoints / "state.json"
    if config.resume and state_file.exists():
        state = json.loads(state_file.read_text())
        model = keras.saving.load_model(checkpoints / "last.keras")
        saved = model.optimizer.get_config()["learning_rate"]
        if not isinstance(saved, dict) or saved.get("config") != schedule.get_config():
            raise TrainingError(
                f"--resume: the checkpoint in {checkpoints} follows another schedule ({saved}); resume with the "
                "--epochs, --batch-size, --learning-rate and --warmup-fraction it was started with"
            )
        log(f"resuming after epoch {state['epochs_done']}, at step {int(model.optimizer.iterations)} of the schedule")
        return Progress(model, state["epochs_done"], state.get("wall_time_s", 0.0))
    if config.resume:
        log("--resume: no checkpoint found, starting from scratch")
    model = build_model(config.arch, config.image_size, init)
    compile_for_training(model, schedule)
    return Progress(model)


def training_callbacks(progress: Progress, val_ds, val_y, paths: dict, started: float) -> list:
    return [
        divergence_guard(paths["checkpoints"]),
        exact_val_auc_callback(val_ds, val_y),  # a report: it ranks no epoch (schedule.py says why)
        keras.callbacks.CSVLogger(paths["history"], append=progress.initial_epoch > 0),
        resume_state_callback(paths["checkpoints"], started),
    ]


def training_record(config: TrainConfig, schedule: WarmupCosine, history: list[dict], started: float) -> Training:
    return Training(
        config=config,
        epochs_run=len(history),
        best_epoch=None,
        command="python -m pneumonia " + shlex.join(sys.argv[1:]),
        wall_time_s=round(time.time() - started, 1),
        optimizer="Adam",
        loss="binary cross-entropy, balanced class weights",
        weights="the final epoch's",
        schedule=describe(schedule),
    )


def lineage(init: dict, training: Training, train_fingerprint: str) -> list[Run]:
    """The runs before this one (from the card beside a trained model it started from), then this one."""
    earlier: list[Run] = []
    if init["kind"] == "file" and init["file"].endswith(".keras"):
        started_from = "a trained model"
        card_path = Path(init["file"]).with_name(CARD_NAME)
        if card_path.is_file() and ModelCard.load(card_path).file == Path(init["file"]).name:
            earlier = ModelCard.load(card_path).lineage
    else:
        started_from = {"none": "random initialisation", "imagenet": "ImageNet weights"}.get(
            init["kind"], "a weights file"
        )
    run = Run(
        started_from=started_from,
        command=training.command,
        train_fingerprint=train_fingerprint,
        epochs_run=training.epochs_run,
        best_epoch=training.best_epoch,
        wall_time_s=training.wall_time_s,
        init_sha256=init.get("sha256"),
    )
    return [*earlier, run]


def data_record(config: TrainConfig, data: TrainingData) -> DataRecord:
    return DataRecord(
        source=str(Path(config.data_dir).name),
        train=data.train_files.counts(),
        validation=data.val_files.counts(),
        val_fraction=config.val_fraction,
        train_fingerprint=dataset.fingerprint(data.train_files),
        validation_fingerprint=dataset.fingerprint(data.val_files),
    )


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def run_paths(out: Path) -> dict[str, Path]:
    """The run folder's parts (module docstring), created."""
    paths = {
        "checkpoints": out / "checkpoints",
        "report": out / "report",
        "history": out / "report" / "history.csv",
    }
    paths["checkpoints"].mkdir(parents=True, exist_ok=True)
    paths["report"].mkdir(parents=True, exist_ok=True)
    return paths


def fit(config: TrainConfig, progress: Progress, data: TrainingData, train_ds, val_ds, paths: dict, started: float):
    """Fits `progress.model` from where it stands to `config.epochs`; DivergedError if the loss stops being finite."""
    if progress.initial_epoch >= config.epochs:
        return
    progress.model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        initial_epoch=progress.initial_epoch,
        class_weight=class_weights(data.train_y),
        callbacks=training_callbacks(progress, val_ds, data.val_y, paths, started),
        verbose=1,
        shuffle=False,
    )  # train_ds shuffles itself; Keras warns about shuffle=True


def model_card(
    config: TrainConfig,
    init: dict,
    data: TrainingData,
    model,
    schedule: WarmupCosine,
    point: OperatingPoint,
    paths: dict,
    started: float,
) -> ModelCard:
    layer = gradcam_layer_for(model)
    training = training_record(config, schedule, list(csv.DictReader(paths["history"].open())), started)
    record = data_record(config, data)
    return ModelCard(
        name=config.arch,
        architecture=config.arch,
        file=f"{config.arch}.keras",
        input_size=config.image_size,
        class_names=list(CLASS_NAMES),
        preprocessing=preprocessing_spec(config.image_size, normalization_for(config.arch), config.contrast),
        calibration=point.calibration,
        thresholds=point.thresholds,
        validation=Metrics.of(point.metrics),
        data=record,
        training=training,
        lineage=lineage(init, training, record.train_fingerprint),
        gradcam=Gradcam(layer, [int(n) for n in model.get_layer(layer).output.shape[1:3]]),
        versions=versions(),
    )


def save_for_serving(model, path: Path) -> None:
    """The model without its optimizer: a compiled model's file carries Adam's two moments per weight
    (85.6 MB against 29.7 MB for DenseNet121), which serving never reads and the slug would pay for.
    Saved, loaded uncompiled and saved again: Keras writes no optimizer for an uncompiled model."""
    model.save(path)
    keras.saving.load_model(path, compile=False).save(path)


def train(config: TrainConfig, log=print) -> ModelCard:
    """Data -> fitted model, calibration, thresholds, card, report and gate in `config.out`."""
    started = time.time()
    out = Path(config.out)
    paths = run_paths(out)
    init = resolve_init(config.init, config.arch)  # stops at once when ImageNet weights cannot be had
    log(f"initial weights: {init['description']}")
    keras.utils.set_random_seed(config.seed)
    data = load_training_data(config, log)
    normalization = normalization_for(config.arch)
    train_ds = make_dataset(
        data.train_x,
        data.train_y,
        normalization,
        config.batch_size,
        config.seed,
        augment=augmentation_for(config.augment, config.seed),
        shuffle=True,
    )
    val_ds = make_dataset(data.val_x, data.val_y, normalization, config.batch_size, config.seed)

    steps_per_epoch = -(-len(data.train_y) // config.batch_size)
    schedule = warmup_cosine(config.learning_rate, config.epochs, steps_per_epoch, config.warmup_fraction)
    progress = model_to_fit(config, init, schedule, paths["checkpoints"], log)
    started -= progress.earlier_wall_time_s  # the recorded wall time adds up across resumes
    fit(config, progress, data, train_ds, val_ds, paths, started)
    plot_history(paths["history"], paths["report"] / "training_curves.png")

    model = progress.model  # the final weights
    point = operating_point(data.val_y, logits_of(model, val_ds), config.arch, config.target_sensitivity)
    write_metrics(point.metrics, paths["report"])
    save_plots(data.val_y, point.probabilities, point.metrics, paths["report"])
    card = model_card(config, init, data, model, schedule, point, paths, started)
    save_for_serving(model, out / card.file)
    card_path = write_card(out, card)
    log(f"wrote {out / card.file} and {card_path}")
    export(out, log)
    # On the export's runtime: scoring the validation part under the rule's shifts needs no gradients.
    apply_threshold_rule(out, config.data_dir, RULES_BY_NAME[config.threshold_rule], log)
    log("fitting the out-of-distribution gate")
    log(format_gate(fit_ood(out, config.data_dir, config.cache_dir, log)))
    return ModelCard.load(card_path)
