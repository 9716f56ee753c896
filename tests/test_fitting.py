"""`train` end to end at tiny sizes: both architectures learn, the card says what was done,
the saved model reproduces it, and --resume continues where a run stopped."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import keras
import numpy as np
import pytest
from builders import LEARNABLE, probability_of, write_synthetic_dataset
from sklearn.metrics import log_loss, roc_auc_score

from pneumonia.errors import TrainingError
from pneumonia.serving.card import ModelCard, file_sha256
from pneumonia.serving.classifier import XrayClassifier
from pneumonia.serving.preprocessing import IMAGENET_NORMALIZATION, UNIT_NORMALIZATION, preprocess
from pneumonia.training import architectures as models
from pneumonia.training import dataset
from pneumonia.training.augmentation import class_weights, make_dataset
from pneumonia.training.config import TrainConfig
from pneumonia.training.fitting import train

# 600 training images in batches of 4: 150 steps an epoch, enough for the BatchNormalization moving
# statistics to catch up (models.BN_MOMENTUM) before the final weights are kept: with 75 steps an
# epoch, a model that ranked the validation images well still had inference outputs offset or
# squeezed together (useless at any fixed threshold) in about one run in three.
CUSTOM = dict(
    arch="custom",
    init="none",
    image_size=32,
    epochs=2,
    batch_size=4,
    learning_rate=1e-3,
    val_fraction=0.25,
    seed=0,
    cache_dir=None,
)
CUSTOM_IMAGES_PER_CLASS = 400


def history(out) -> list[dict]:
    return list(csv.DictReader((out / "report" / "history.csv").open()))


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    data = write_synthetic_dataset(
        tmp_path_factory.mktemp("custom_data"), per_class=CUSTOM_IMAGES_PER_CLASS, seed=20, **LEARNABLE
    )
    out = tmp_path_factory.mktemp("custom_run")
    config = TrainConfig(data_dir=str(data), out=str(out), **CUSTOM)
    train(config, log=lambda *_: None)
    return out, json.loads((out / "model.json").read_text()), config  # the card as written


def _assert_learned(out, card):
    rows = history(out)
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0], losses  # the training loss falls
    # the card's validation AUC is computed on the final weights, with scikit-learn
    validation = card["validation"]
    assert validation["auc"] > 0.9, validation["auc"]
    assert max(float(r["val_auc"]) for r in rows) > 0.9
    # and its outputs are usable, not only well ranked: the default threshold separates the classes
    assert validation["thresholds"]["default"]["accuracy"] >= 0.8, validation["thresholds"]["default"]


def test_custom_cnn_learns(custom_run):
    out, card, _ = custom_run
    _assert_learned(out, card)
    assert len(history(out)) == CUSTOM["epochs"]


def test_densenet121_learns(densenet_cli_run):
    out, result = densenet_cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((out / "model.json").read_text())
    _assert_learned(out, card)
    assert len(history(out)) == 2
    assert card["architecture"] == "densenet121" and card["lineage"][0]["started_from"] == "random initialisation"
    assert card["preprocessing"]["normalization"] == dataclasses.asdict(IMAGENET_NORMALIZATION)
    layer, size = card["gradcam"]["layer"], card["gradcam"]["map_size"]
    assert min(size) >= 7
    model = keras.saving.load_model(out / card["file"], compile=False)
    assert list(model.get_layer(layer).output.shape[1:3]) == size


def test_validation_auc_in_the_history_is_exact(custom_run):
    """val_auc (a report of each epoch) is the AUC of the validation logits, not Keras' 200-bucket
    estimate, which reads 0.5 while the outputs are squeezed together; the last epoch's is the model's."""
    out, card, config = custom_run
    rows = history(out)
    assert card["training"]["best_epoch"] is None  # no epoch is picked: the final weights are the model
    all_train = dataset.scan_split(config.data_dir, "train")
    _, val_files = dataset.patient_grouped_split(all_train, config.val_fraction, config.seed)
    final = keras.saving.load_model(out / card["file"], compile=False)
    logit_model = keras.Model(final.input, final.get_layer("logit").output)
    inputs = np.stack([preprocess(p, ModelCard.load(out / "model.json").preprocessing) for p in val_files.paths])
    logits = np.asarray(logit_model(inputs, training=False)).reshape(-1)
    assert roc_auc_score(val_files.labels, logits) == pytest.approx(float(rows[-1]["val_auc"]), abs=1e-6)


def test_card_records_what_was_done(custom_run):
    out, card, config = custom_run
    assert card["architecture"] == "custom" and card["name"] == "custom" and card["file"] == "custom.keras"
    assert card["input_size"] == 32 and card["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert card["preprocessing"]["image_size"] == 32
    assert card["preprocessing"]["normalization"] == dataclasses.asdict(UNIT_NORMALIZATION)
    assert [run["started_from"] for run in card["lineage"]] == ["random initialisation"]
    assert card["lineage"][0]["init_sha256"] is None and card["lineage"][0]["epochs_run"] == config.epochs
    assert card["lineage"][0]["train_fingerprint"] == card["data"]["train_fingerprint"]
    thresholds = card["thresholds"]
    assert 0 < thresholds["screening"] <= thresholds["default"] <= 1
    assert thresholds["target_sensitivity"] == config.target_sensitivity
    assert thresholds["rule_name"] == config.threshold_rule == "worst:framing"  # the shipped rule by default
    assert set(card["expectations"]["framing"]) == {"crop_90", "crop_80"}
    validation = card["validation"]
    assert validation["thresholds"]["screening"]["recall"] >= config.target_sensitivity
    assert validation["thresholds"]["screening"]["threshold"] == thresholds["screening"]
    assert json.loads((out / "report" / "metrics.json").read_text()) == validation
    for key in ("auc", "average_precision", "loss", "ci95", "n"):
        assert key in validation
    # data: counts add up, fingerprints are those of the patient-grouped split
    data = card["data"]
    assert sum(data["train"].values()) + sum(data["validation"].values()) == 2 * CUSTOM_IMAGES_PER_CLASS
    assert data["validation"] == validation["n"]
    all_train = dataset.scan_split(config.data_dir, "train")
    train_files, val_files = dataset.patient_grouped_split(all_train, config.val_fraction, config.seed)
    assert data["train_fingerprint"] == dataset.fingerprint(train_files)
    assert data["validation_fingerprint"] == dataset.fingerprint(val_files)
    assert data["train_fingerprint"] != data["validation_fingerprint"]
    training = card["training"]
    assert training["epochs_run"] == config.epochs and training["best_epoch"] is None
    assert training["weights"] == "the final epoch's"
    steps = config.epochs * 150  # 600 training images in batches of 4
    assert training["schedule"] == (
        f"linear warm-up over {steps // 10} steps to 0.001, then cosine decay to 0 at step {steps}; "
        "the final weights are kept"
    )
    assert training["config"]["seed"] == 0 and training["config"]["epochs"] == CUSTOM["epochs"]
    assert training["config"]["learning_rate"] == CUSTOM["learning_rate"]
    assert 0 < training["wall_time_s"] < 600
    assert set(card["versions"]) >= {"python", "tensorflow", "keras", "numpy"}
    assert card["versions"]["keras"] == keras.__version__
    calibration = card["calibration"]
    assert calibration["slope"] > 0 and np.isfinite(calibration["intercept"])  # higher logit, higher probability
    assert 0 <= calibration["ece_after"] <= 1 and 0 <= calibration["ece_before"] <= 1
    assert card["gradcam"] == {"layer": "block64_conv2", "map_size": [8, 8]}
    for name in (
        "confusion_matrix_default.png",
        "confusion_matrix_screening.png",
        "roc_curve.png",
        "pr_curve.png",
        "training_curves.png",
        "history.csv",
    ):
        assert (out / "report" / name).stat().st_size > 100, name
    for name in ("last.keras", "state.json"):
        assert (out / "checkpoints" / name).is_file()
    assert not (out / "checkpoints" / "best.keras").exists()


def test_saved_model_reproduces_the_validation_numbers(custom_run):
    """save -> load: the shipped .keras and card give, image by image, the calibrated
    probabilities the validation metrics were computed from."""
    out, card, config = custom_run
    classifier = XrayClassifier(out)
    all_train = dataset.scan_split(config.data_dir, "train")
    _, val_files = dataset.patient_grouped_split(all_train, config.val_fraction, config.seed)
    probs = np.array([probability_of(classifier, p) for p in val_files.paths])
    assert roc_auc_score(val_files.labels, probs) == pytest.approx(card["validation"]["auc"], abs=1e-9)
    # the screening threshold is one validation positive's own score; one image at a time (not in
    # batches, as in training) its probability can differ in the 7th decimal
    screening, positive = card["thresholds"]["screening"], np.array(val_files.labels) == 1
    tp = card["validation"]["thresholds"]["screening"]["confusion_matrix"]["tp"]
    assert ((probs >= screening + 1e-6) & positive).sum() <= tp <= ((probs >= screening - 1e-6) & positive).sum()
    # the shipped file is the last checkpoint: the final weights
    inputs = np.stack([preprocess(p, ModelCard.load(out / "model.json").preprocessing) for p in val_files.paths[:8]])
    shipped = keras.saving.load_model(out / "custom.keras", compile=False)
    last = keras.saving.load_model(out / "checkpoints" / "last.keras", compile=False)
    np.testing.assert_array_equal(shipped.predict(inputs, verbose=0), last.predict(inputs, verbose=0))


def test_save_and_load_give_identical_predictions(tmp_path):
    keras.utils.set_random_seed(1)
    model = models.build_custom_cnn(32)
    inputs = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype("float32")
    before = model.predict(inputs, verbose=0)
    model.save(tmp_path / "m.keras")
    after = keras.saving.load_model(tmp_path / "m.keras", compile=False).predict(inputs, verbose=0)
    np.testing.assert_array_equal(before, after)


@pytest.mark.slow  # trains for an epoch
def test_resume_without_a_checkpoint_starts_afresh(synthetic_data_dir, tmp_path):
    log = []
    config = TrainConfig(
        data_dir=str(synthetic_data_dir),
        out=str(tmp_path / "run"),
        **{**CUSTOM, "epochs": 1, "batch_size": 32, "resume": True},
    )
    card = train(config, log=log.append)
    assert any("no checkpoint found" in line for line in log)
    assert card.training.epochs_run == 1


def test_equalisation_reaches_the_card_and_the_served_model(custom_run, tmp_path):
    """--contrast equalize: the card says so, and the saved model served through `preprocess` (which
    applies the card's contrast) gives the validation loss that training computed on its own
    contrast-normalised pixels; serving without the step would not."""
    config = TrainConfig(
        data_dir=custom_run[2].data_dir, out=str(tmp_path / "run"), **{**CUSTOM, "contrast": "equalize"}
    )
    card = train(config, log=lambda *_: None)
    assert card.preprocessing.contrast == "equalize"
    classifier = XrayClassifier(tmp_path / "run")
    _, val_files = dataset.patient_grouped_split(
        dataset.scan_split(config.data_dir, "train"), config.val_fraction, config.seed
    )
    probs = np.array([probability_of(classifier, p) for p in val_files.paths])
    assert probs.std() > 0.01  # the loss below can tell one preprocessing from another
    served_loss = log_loss(val_files.labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])
    # Batched training logits and one-image serving logits differ in float rounding only.
    assert served_loss == pytest.approx(card.validation.loss, rel=1e-3)
    without_contrast = dataclasses.replace(card.preprocessing, contrast="none")
    unnormalised = np.array(
        [
            classifier.calibrated(classifier.features_and_logits(preprocess(p, without_contrast)[None])[1])[0]
            for p in val_files.paths
        ]
    )
    assert np.abs(unnormalised - probs).max() > 1e-3  # the contrast step is not a no-op on these images
    skewed_loss = log_loss(val_files.labels, np.clip(unnormalised, 1e-7, 1 - 1e-7), labels=[0, 1])
    # Serving without the card's contrast step would miss the card's loss by far more than rounding.
    assert abs(skewed_loss - card.validation.loss) > 10 * abs(served_loss - card.validation.loss)


def test_a_fine_tune_carries_the_lineage_of_the_model_it_started_from(custom_run, tmp_path):
    """--init a trained .keras: the card lists the earlier run, then this one, which started from that
    model's sha256, so a fine-tune of a from-scratch model never reads as pretrained weights."""
    out, first, config = custom_run
    config = TrainConfig(
        **{**vars(config), "out": str(tmp_path / "tuned"), "init": str(out / "custom.keras"), "epochs": 1}
    )
    card = train(config, log=lambda *_: None)
    assert [run.started_from for run in card.lineage] == ["random initialisation", "a trained model"]
    assert card.lineage[0].command == first["lineage"][0]["command"]
    assert card.lineage[1].init_sha256 == file_sha256(out / "custom.keras") and card.lineage[1].epochs_run == 1


def test_a_held_out_series_is_neither_trained_nor_validated_on_and_is_reported(custom_run, tmp_path):
    """--hold-out-series NORMAL2-IM: those NORMAL images are in no part, the card reports their
    specificity at the chosen thresholds, and the robustness tool recreates the same validation part."""
    data = tmp_path / "data"
    shutil.copytree(custom_run[2].data_dir, data)  # the data set the custom CNN learns in two epochs
    normal = sorted((data / "train" / "NORMAL").iterdir())
    for path in normal[:60]:  # thirty patients of the second series
        path.rename(path.with_name("NORMAL2-" + path.name))
    config = TrainConfig(data_dir=str(data), out=str(tmp_path / "run"), **{**CUSTOM, "hold_out_series": "NORMAL2-IM"})
    card = train(config, log=lambda *_: None)
    held = card.held_out_series
    assert held["series"] == "NORMAL2-IM" and held["n_normal"] == 60
    assert card.data.train["NORMAL"] + card.data.validation["NORMAL"] == CUSTOM_IMAGES_PER_CLASS - 60
    classifier = XrayClassifier(tmp_path / "run")
    probs = np.array([probability_of(classifier, p) for p in sorted((data / "train" / "NORMAL").glob("NORMAL2-*"))])
    assert held["normal_mean_p"] == pytest.approx(probs.mean(), abs=1e-5)
    # at the card's thresholds, those the threshold rule chose last (not the validation part's first pick)
    assert held["thresholds"] == {"default": card.thresholds.default, "screening": card.thresholds.screening}
    for name in ("default", "screening"):
        assert held["specificity"][name] == pytest.approx((probs < held["thresholds"][name]).mean())
    _, info = dataset.validation_part(data, card)
    assert info["fingerprint_matches"], info


def test_training_without_images_stops_with_a_message(tmp_path):
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(TrainingError, match="no train/NORMAL or train/PNEUMONIA images"):
        train(TrainConfig(data_dir=str(tmp_path), out=str(tmp_path / "out"), **CUSTOM), log=lambda *_: None)


def test_class_weights_balance_the_classes():
    labels = np.array([0] * 10 + [1] * 30)
    weights = class_weights(labels)
    assert weights[0] * 10 == pytest.approx(weights[1] * 30) == pytest.approx(20)


def test_augmentation_changes_images_but_keeps_range_and_labels():
    from pneumonia.training.augmentation import augmentation_for

    rng = np.random.default_rng(0)
    pixels = rng.integers(60, 200, (8, 32, 32), dtype=np.uint8)
    labels = np.arange(8) % 2
    plain = np.concatenate([x.numpy() for x, _ in make_dataset(pixels, labels, UNIT_NORMALIZATION, 4, 0)])
    batches = list(make_dataset(pixels, labels, UNIT_NORMALIZATION, 4, 0, augment=augmentation_for("standard", 0)))
    augmented = np.concatenate([x.numpy() for x, _ in batches])
    assert augmented.shape == plain.shape == (8, 32, 32, 3)
    assert 0 <= augmented.min() and augmented.max() <= 1  # clipped to 0..255 before normalising
    assert np.abs(augmented - plain).mean() > 0.01
    assert np.concatenate([y.numpy() for _, y in batches]).tolist() == labels.tolist()
    # each pass over the data set (each epoch) draws new transformations
    pipeline = make_dataset(pixels, labels, UNIT_NORMALIZATION, 4, 0, augment=augmentation_for("standard", 0))
    first_pass = np.concatenate([x.numpy() for x, _ in pipeline])
    second_pass = np.concatenate([x.numpy() for x, _ in pipeline])
    assert np.abs(first_pass - second_pass).mean() > 0.01


def test_acquisition_shift_blurs_or_sharpens_changes_gamma_and_stays_in_range():
    import tensorflow as tf

    from pneumonia.training.augmentation import acquisition_shift, augmentation_for

    rng = np.random.default_rng(1)
    batch = tf.constant(rng.integers(40, 220, (16, 32, 32, 1)).astype("float32"))
    shifted = acquisition_shift(0)(batch).numpy()
    assert shifted.shape == (16, 32, 32, 1) and shifted.min() >= 0 and shifted.max() <= 255
    # per image, not per batch: the change in edge content differs from image to image
    edges = lambda x: np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))  # noqa: E731
    ratio = edges(shifted) / edges(batch.numpy())
    assert ratio.min() < 0.9 and ratio.max() > 1.0 and ratio.std() > 0.05
    unblurred = acquisition_shift(0, max_blur=0.0, gamma_range=0.0, max_noise=0.0)(batch).numpy()
    np.testing.assert_allclose(unblurred, batch.numpy(), atol=1e-3)  # no change with every strength at 0
    with pytest.raises(ValueError, match="choose from standard, acquisition"):
        augmentation_for("strong", 0)
