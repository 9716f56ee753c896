"""`python -m pneumonia train`: data -> model, card and validation report in one folder.

DIR/
  <arch>.keras          best epoch by validation AUC
  model.json            the card
  report/               validation metrics.json, plots, history.csv, training_curves.png
  checkpoints/          last.keras + state.json (for --resume), best.keras
"""

from __future__ import annotations

import csv
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from sklearn.metrics import roc_auc_score

from pneumonia import dataset
from pneumonia.card import Calibration, ModelCard, Thresholds, write_card
from pneumonia.evaluation import (
    choose_thresholds,
    evaluate_predictions,
    expected_calibration_error,
    fit_platt,
    platt,
    save_plots,
    sigmoid,
    write_metrics,
)
from pneumonia.export import export
from pneumonia.fit_ood import fit_ood, format_gate
from pneumonia.keras_graphs import features_and_logit_model
from pneumonia.models import build_model, gradcam_layer_for, normalization_for, resolve_init
from pneumonia.preprocessing import normalize, normalize_contrast, preprocessing_spec
from pneumonia.training_config import AUGMENTATIONS, TrainConfig


def augmentation(seed: int):
    """Small geometric and photometric changes an X-ray can plausibly have; no flips
    (the heart is on the left)."""
    return keras.Sequential(
        [
            layers.RandomRotation(0.03, fill_mode="constant", seed=seed),  # about +-10 degrees
            layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 1),
            layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
            layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 3),
            layers.RandomContrast(0.15, seed=seed + 4),
        ],
        name="augmentation",
    )


def gaussian_blur(sigma: float):
    """(B, S, S, 1) -> the same batch blurred by a separable Gaussian of `sigma` pixels."""
    taps = np.exp(-0.5 * (np.arange(-3, 4) / sigma) ** 2)
    kernel_1d = (taps / taps.sum()).astype("float32")
    kernel_x = tf.constant(kernel_1d.reshape(1, 7, 1, 1))
    kernel_y = tf.constant(kernel_1d.reshape(7, 1, 1, 1))
    return lambda x: tf.nn.conv2d(tf.nn.conv2d(x, kernel_x, 1, "SAME"), kernel_y, 1, "SAME")


def acquisition_shift(seed: int, max_blur: float = 1.0, gamma_range: float = 0.35, max_noise: float = 6.0):
    """(B, S, S, 1) float 0..255 -> the same batch as another machine might have taken it.

    Per image: a blend towards a Gaussian blur (sigma ~1 px) or away from it (an unsharp
    mask), a gamma in [1/(1+g), 1+g], and Gaussian noise of up to `max_noise` grey levels.
    """
    generator = tf.random.Generator.from_seed(seed)
    blur = gaussian_blur(sigma=1.0)

    def shift(x):
        batch = tf.shape(x)[0]
        blurred = blur(x)
        # > 0 blurs, < 0 sharpens (x + |a| (x - blur))
        amount = generator.uniform((batch, 1, 1, 1), -max_blur, max_blur)
        x = tf.clip_by_value(x + amount * (blurred - x), 0.0, 255.0)
        log_gamma = generator.uniform((batch, 1, 1, 1), -np.log1p(gamma_range), np.log1p(gamma_range))
        x = 255.0 * tf.pow(x / 255.0, tf.exp(log_gamma))
        noise = generator.uniform((batch, 1, 1, 1), 0.0, max_noise) * generator.normal(tf.shape(x))
        return tf.clip_by_value(x + noise, 0.0, 255.0)

    return shift


def edge_strength(x):
    """(B, S, S, 1) -> (B,): mean absolute horizontal grey-level step, a sharpness measure."""
    return tf.reduce_mean(tf.abs(x[:, :, 1:, :] - x[:, :, :-1, :]), axis=[1, 2, 3])


def sharpness_matching(seed: int, share: float = 0.5):
    """(B, S, S, 1) float 0..255 and labels (B,) -> the batch with about `share` of its images
    blurred or sharpened to the edge strength of a random image of the other class.

    In train/, PNEUMONIA X-rays are blurrier than NORMAL ones (edge strength 5.9 vs 7.4 at
    128 px), so a model can read blur as pneumonia and then flags blurrier normal X-rays of
    another site. Giving each class the other's sharpness makes sharpness carry no label.
    """
    generator = tf.random.Generator.from_seed(seed)
    blur = gaussian_blur(sigma=1.0)

    def match(x, y):
        blurred = blur(x)
        strength, blurred_strength = edge_strength(x), edge_strength(blurred)
        other_class = tf.cast(tf.not_equal(y[None, :], y[:, None]), tf.float32)  # (B, B)
        partner = tf.argmax(generator.uniform(tf.shape(other_class)) * other_class, axis=1)
        target = tf.gather(strength, partner)
        # x + a (blur - x) has edge strength close to g + a (g_blur - g): a > 0 blurs, a < 0 sharpens.
        amount = (strength - target) / tf.maximum(strength - blurred_strength, 1e-3)
        chosen = (generator.uniform(tf.shape(strength)) < share) & (tf.reduce_max(other_class, axis=1) > 0)
        amount = tf.where(chosen, tf.clip_by_value(amount, -1.5, 1.0), 0.0)[:, None, None, None]
        return tf.clip_by_value(x + amount * (blurred - x), 0.0, 255.0)

    return match


def normal_zoom(seed: int, share: float = 0.5):
    """(B, S, S, 1) and labels (B,) -> the batch with about `share` of its NORMAL images zoomed
    in to a 70-95 % field of view; PNEUMONIA images untouched."""
    zoom_in = layers.RandomZoom((-0.3, -0.05), fill_mode="constant", seed=seed)
    generator = tf.random.Generator.from_seed(seed)

    def zoom(x, y):
        chosen = tf.equal(y, 0.0) & (generator.uniform(tf.shape(y)) < share)
        return tf.where(chosen[:, None, None, None], zoom_in(x, training=True), x)

    return zoom


def mixup(seed: int, alpha: float, weights: dict[int, float]):
    """(B, S, S[, 1]) batch and labels (B,) -> (mixed batch, mixed labels, mixed class weights):
    each image blended with a random partner of the batch by lambda ~ Beta(alpha, alpha), its label
    and its class weight blended alike (Zhang et al. 2018). Soft labels between the classes are meant
    to keep the model from staking everything on one cue such as framing (model/report/levers.md: they did not)."""
    generator = tf.random.Generator.from_seed(seed)
    weight_of = tf.constant([weights[0], weights[1]], tf.float32)

    def beta(shape):
        # Beta(a, a) as the ratio of two Gamma(a) draws.
        a, b = (tf.random.stateless_gamma(shape, seed=generator.make_seeds(1)[:, 0], alpha=alpha) for _ in range(2))
        return a / tf.maximum(a + b, 1e-12)

    def mix(x, y):
        partner = tf.argsort(generator.uniform(tf.shape(y)))
        share = beta(tf.shape(y))  # (B,)
        per_image = tf.reshape(share, [-1] + [1] * (len(x.shape) - 1))  # broadcasts over (B, S, S[, 1])
        mixed = per_image * x + (1.0 - per_image) * tf.gather(x, partner)
        labels = share * y + (1.0 - share) * tf.gather(y, partner)
        class_weight = tf.gather(weight_of, tf.cast(y, tf.int32))
        sample_weight = share * class_weight + (1.0 - share) * tf.gather(class_weight, partner)
        return mixed, labels, sample_weight

    return mix


def augmentation_for(name: str, seed: int, match_sharpness: bool = False):
    """The training augmentation called `name` (AUGMENTATIONS): a function of a (B, S, S, 1)
    batch and its labels (B,), with `match_sharpness` first on the stored pixels."""
    standard = augmentation(seed)
    if name == "standard":
        augment = lambda x, y: standard(x, training=True)  # noqa: E731
    elif name == "framing":
        # Down to a 65 % field of view: NORMAL images in train/ show more margin around the chest
        # than PNEUMONIA ones, and the shipped model reads a tighter crop of a normal chest as
        # pneumonia (mean probability 0.08 -> 0.49 at an 80 % centre crop of its validation NORMALs).
        zoom_in = layers.RandomZoom((-0.35, 0.0), fill_mode="constant", seed=seed + 8)
        augment = lambda x, y: zoom_in(standard(x, training=True), training=True)  # noqa: E731
    elif name == "normal-framing":
        # Tightly framed normal chests (as in val/) without cropping what a pneumonia image shows.
        zoom_normals = normal_zoom(seed + 9)
        augment = lambda x, y: standard(zoom_normals(x, y), training=True)  # noqa: E731
    elif name == "acquisition":
        stronger_contrast = keras.layers.RandomContrast(0.3, seed=seed + 5)
        shift = acquisition_shift(seed + 6)
        augment = lambda x, y: shift(stronger_contrast(standard(x, training=True), training=True))  # noqa: E731
    else:
        raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")
    if not match_sharpness:
        return augment
    match = sharpness_matching(seed + 7)
    return lambda x, y: augment(match(x, y), y)


def make_dataset(pixels, labels, normalization, batch_size, seed, augment=None, shuffle=False, mix=None):
    """uint8 (N, S, S) + labels -> tf.data of normalized float32 (B, S, S, 3) batches, with
    `mix` (see `mixup`) also per-image weights."""
    ds = tf.data.Dataset.from_tensor_slices((pixels, labels.astype("float32")))
    if shuffle:
        ds = ds.shuffle(len(pixels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        # Augment in 0..255 greyscale (B, S, S, 1), then the shared normalisation.
        ds = ds.map(
            lambda x, y: (augment(tf.cast(x, tf.float32)[..., None], y)[..., 0], y), num_parallel_calls=tf.data.AUTOTUNE
        )
        ds = ds.map(lambda x, y: (tf.clip_by_value(x, 0.0, 255.0), y))
    if mix is not None:
        ds = ds.map(lambda x, y: mix(tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda x, *rest: (normalize(x, normalization), *rest), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Balanced: each class contributes equally to the loss (the data is about 1 : 2.9)."""
    counts = np.bincount(labels, minlength=2)
    return {i: float(len(labels) / (2 * counts[i])) for i in range(2)}


def plot_history(history_csv: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def resume_state_callback(checkpoint_dir: Path, best_val_auc: float | None, started: float):
    """Saves last.keras + state.json after every epoch, so --resume can continue.

    `started` is the clock time training would have begun had it never stopped, so the
    recorded wall time adds up across resumes.
    """

    class SaveResumeState(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = -np.inf if best_val_auc is None else best_val_auc

        def on_epoch_end(self, epoch, logs=None):
            self.best = max(self.best, float(logs.get("val_auc", -np.inf)))
            self.model.save(checkpoint_dir / "last.keras")
            state = {"epochs_done": epoch + 1, "best_val_auc": self.best, "wall_time_s": time.time() - started}
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
    held_out_x: np.ndarray  # the NORMAL images of a held-out series (empty without one)
    held_out_files: dataset.SplitFiles


def load_training_data(config: TrainConfig, log=print) -> TrainingData:
    all_train = dataset.scan_split(config.data_dir, "train")
    if all_train is None or not all_train.paths:
        raise SystemExit(f"{config.data_dir} has no train/NORMAL or train/PNEUMONIA images")
    log(dataset.describe("train/ (all)", all_train))
    train_files, val_files, held_out = dataset.training_parts(
        all_train, config.val_fraction, config.seed, config.hold_out_series
    )
    train_x, train_y, train_files = dataset.load_pixels(train_files, config.image_size, config.cache_dir, log)
    val_x, val_y, val_files = dataset.load_pixels(val_files, config.image_size, config.cache_dir, log)
    held_x, _, held_out = dataset.load_pixels(held_out, config.image_size, config.cache_dir, log)
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
        normalize_contrast(held_x, config.contrast),
        held_out,
    )


def ema_momentum(steps_per_epoch: int) -> float:
    """The momentum at which the weights the average starts from weigh 1 % by the end of the
    first epoch (a horizon of about a fifth of an epoch). Keras' fixed 0.99 has no bias
    correction: after one epoch of 150 steps it is still 22 % the random initial weights, and
    that first epoch's average can win the best-epoch choice with squeezed, useless outputs."""
    return 0.01 ** (1.0 / max(steps_per_epoch, 1))


def compile_for_training(
    model, learning_rate: float, label_smoothing: float = 0.0, ema_steps_per_epoch: int | None = None
) -> None:
    """`ema_steps_per_epoch` None trains plain weights; a step count adds a moving average of the weights."""
    ema = ema_steps_per_epoch is not None
    model.compile(
        optimizer=keras.optimizers.Adam(
            learning_rate, use_ema=ema, ema_momentum=ema_momentum(ema_steps_per_epoch) if ema else 0.99
        ),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
    )


@dataclass
class Progress:
    """Where training starts: a fresh model at epoch 0, or the checkpoint of an earlier run."""

    model: object
    initial_epoch: int = 0
    best_val_auc: float | None = None
    earlier_wall_time_s: float = 0.0


def model_to_fit(config: TrainConfig, init: dict, checkpoints: Path, steps_per_epoch: int, log=print) -> Progress:
    state_file = checkpoints / "state.json"
    if config.resume and state_file.exists():
        state = json.loads(state_file.read_text())
        log(f"resuming after epoch {state['epochs_done']} (best validation AUC so far {state['best_val_auc']:.4f})")
        return Progress(
            keras.saving.load_model(checkpoints / "last.keras"),
            state["epochs_done"],
            state["best_val_auc"],
            state.get("wall_time_s", 0.0),
        )
    if config.resume:
        log("--resume: no checkpoint found, starting from scratch")
    model = build_model(config.arch, config.image_size, init)
    compile_for_training(model, config.learning_rate, config.label_smoothing, steps_per_epoch if config.ema else None)
    return Progress(model)


def training_callbacks(config: TrainConfig, progress: Progress, val_ds, val_y, paths: dict, started: float) -> list:
    # With --ema the averaged weights are swapped in at each epoch's end, so validation, the
    # checkpoints and the saved model are the average.
    callbacks = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if config.ema else []
    return callbacks + [
        exact_val_auc_callback(val_ds, val_y),  # the callbacks below read its val_auc
        keras.callbacks.ModelCheckpoint(
            paths["best"],
            monitor="val_auc",
            mode="max",
            save_best_only=True,
            initial_value_threshold=progress.best_val_auc,
        ),
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=config.patience),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2, min_lr=1e-6),
        keras.callbacks.CSVLogger(paths["history"], append=progress.initial_epoch > 0),
        resume_state_callback(paths["checkpoints"], progress.best_val_auc, started),
    ]


@dataclass
class OperatingPoint:
    """What the validation logits of the best epoch give: calibration, thresholds and metrics."""

    calibration: Calibration
    thresholds: Thresholds
    metrics: dict
    probabilities: np.ndarray


def operating_point(val_y: np.ndarray, val_logits: np.ndarray, arch: str, target_sensitivity: float) -> OperatingPoint:
    """Platt calibration and both thresholds, from the validation part only."""
    slope, intercept = fit_platt(val_y, val_logits)
    probs = platt(val_logits, slope, intercept)
    calibration = Calibration(
        slope,
        intercept,
        expected_calibration_error(val_y, sigmoid(val_logits)),
        expected_calibration_error(val_y, probs),
    )
    chosen = choose_thresholds(val_y, probs, target_sensitivity)
    metrics = evaluate_predictions(val_y, probs, chosen, arch, "validation (patient-grouped from train/)")
    return OperatingPoint(calibration, Thresholds(**chosen, target_sensitivity=target_sensitivity), metrics, probs)


def training_record(config: TrainConfig, history: list[dict], started: float) -> dict:
    best_epoch = int(history[int(np.argmax([float(r["val_auc"]) for r in history]))]["epoch"]) + 1 if history else None
    return {
        "config": asdict(config),
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "command": "python -m pneumonia " + shlex.join(sys.argv[1:]),
        "wall_time_s": round(time.time() - started, 1),
        "optimizer": "Adam",
        "loss": "binary cross-entropy, balanced class weights"
        + (f", label smoothing {config.label_smoothing}" if config.label_smoothing else "")
        + (f", mixup Beta({config.mixup}, {config.mixup})" if config.mixup else ""),
        "weights": "exponential moving average over about the last fifth of an epoch (Adam use_ema)"
        if config.ema
        else "the best epoch's",
    }


def held_out_record(config: TrainConfig, model, data: TrainingData, point: OperatingPoint, log=print) -> dict:
    """How the NORMAL images of the held-out series fare: the specificity a new site's normal
    X-rays would get at the thresholds chosen without them."""
    if not config.hold_out_series:
        return {}
    normalization = normalization_for(config.arch)
    batches = make_dataset(data.held_out_x, np.zeros(len(data.held_out_x), int), normalization, config.batch_size, 0)
    probs = platt(logits_of(model, batches), point.calibration.slope, point.calibration.intercept)
    record = {
        "series": config.hold_out_series,
        "n_normal": len(probs),
        "normal_mean_p": float(probs.mean()),
        "specificity": {
            name: float((probs < getattr(point.thresholds, name)).mean()) for name in ("default", "screening")
        },
    }
    log(
        f"held-out series {config.hold_out_series}: {len(probs)} NORMAL images, mean p {record['normal_mean_p']:.3f}, "
        f"specificity {record['specificity']['default']:.3f} @ default, {record['specificity']['screening']:.3f} "
        "@ screening"
    )
    return {"held_out_series": record}


def data_record(config: TrainConfig, data: TrainingData) -> dict:
    return {
        "source": str(Path(config.data_dir).name),
        "train": data.train_files.counts(),
        "validation": data.val_files.counts(),
        "val_fraction": config.val_fraction,
        "train_fingerprint": dataset.fingerprint(data.train_files),
        "validation_fingerprint": dataset.fingerprint(data.val_files),
    }


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
        "best": out / "checkpoints" / "best.keras",
        "history": out / "report" / "history.csv",
    }
    paths["checkpoints"].mkdir(parents=True, exist_ok=True)
    paths["report"].mkdir(parents=True, exist_ok=True)
    return paths


def fit(config: TrainConfig, progress: Progress, data: TrainingData, train_ds, val_ds, paths: dict, started: float):
    """Fits from where `progress` stands to `config.epochs`; the best epoch is left in paths["best"]."""
    if progress.initial_epoch >= config.epochs:
        return
    progress.model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        initial_epoch=progress.initial_epoch,
        class_weight=None if config.mixup else class_weights(data.train_y),  # mixup weighs each image itself
        callbacks=training_callbacks(config, progress, val_ds, data.val_y, paths, started),
        verbose=1,
        shuffle=False,
    )  # train_ds shuffles itself; Keras warns about shuffle=True


def model_card(
    config: TrainConfig,
    init: dict,
    data: TrainingData,
    best,
    point: OperatingPoint,
    paths: dict,
    started: float,
    log=print,
) -> ModelCard:
    gradcam_layer = gradcam_layer_for(best)
    return ModelCard(
        name=config.arch,
        architecture=config.arch,
        file=f"{config.arch}.keras",
        input_size=config.image_size,
        class_names=list(dataset.CLASS_NAMES),
        preprocessing=preprocessing_spec(config.image_size, normalization_for(config.arch), config.contrast),
        init={**init, "file": Path(init["file"]).name} if "file" in init else init,
        calibration=point.calibration,
        thresholds=point.thresholds,
        validation=point.metrics,
        data=data_record(config, data),
        training=training_record(config, list(csv.DictReader(paths["history"].open())), started),
        gradcam={"layer": gradcam_layer, "map_size": list(best.get_layer(gradcam_layer).output.shape[1:3])},
        versions=versions(),
        extra=held_out_record(config, best, data, point, log),
    )


def train(config: TrainConfig, log=print) -> dict:
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
        augment=augmentation_for(config.augment, config.seed, config.match_sharpness),
        shuffle=True,
        mix=mixup(config.seed + 10, config.mixup, class_weights(data.train_y)) if config.mixup else None,
    )
    val_ds = make_dataset(data.val_x, data.val_y, normalization, config.batch_size, config.seed)

    progress = model_to_fit(config, init, paths["checkpoints"], len(train_ds), log)
    started -= progress.earlier_wall_time_s  # the recorded wall time adds up across resumes
    fit(config, progress, data, train_ds, val_ds, paths, started)
    plot_history(paths["history"], paths["report"] / "training_curves.png")

    best = keras.saving.load_model(paths["best"], compile=False)
    point = operating_point(data.val_y, logits_of(best, val_ds), config.arch, config.target_sensitivity)
    write_metrics(point.metrics, paths["report"])
    save_plots(data.val_y, point.probabilities, point.metrics, paths["report"])
    card = model_card(config, init, data, best, point, paths, started, log)
    best.save(out / card.file)
    card_path = write_card(out, card)
    log(f"wrote {out / card.file} and {card_path}")
    log("fitting the out-of-distribution gate")
    log(format_gate(fit_ood(out, config.data_dir, config.cache_dir, log)))
    export(out, log)
    return json.loads(card_path.read_text())
