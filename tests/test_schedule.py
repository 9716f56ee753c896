"""The learning-rate schedule: its shape, its round trip through a checkpoint, a resume that continues
it step for step, and a diverging run that stops and keeps its last good checkpoint."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest

from pneumonia.errors import TrainingError
from pneumonia.training import fitting
from pneumonia.training.config import TrainConfig
from pneumonia.training.schedule import WarmupCosine, warmup_cosine

TRAINING_CALLBACKS = fitting.training_callbacks  # as train has them, before a test adds its own
TINY = dict(arch="custom", init="none", image_size=32, epochs=3, batch_size=16, val_fraction=0.25, seed=0)


def rates(schedule, steps) -> np.ndarray:
    return np.array([float(schedule(step)) for step in steps])


def test_warm_up_is_linear_to_the_peak_then_a_cosine_to_zero():
    schedule = WarmupCosine(peak=1e-3, total_steps=100, warmup_steps=10)
    warm_up = rates(schedule, range(10))
    np.testing.assert_allclose(warm_up, 1e-3 * np.arange(1, 11) / 10, rtol=1e-6)
    decay = rates(schedule, range(10, 100))
    assert decay[0] == pytest.approx(1e-3) and decay[-1] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(decay) < 0)  # falls at every step after the warm-up
    assert float(schedule(55)) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 45 / 89)), rel=1e-5)
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-12)  # past the end it stays at zero


def test_the_warm_up_is_a_fraction_of_all_steps():
    schedule = warmup_cosine(2e-3, epochs=15, steps_per_epoch=74, warmup_fraction=0.1)
    assert (schedule.total_steps, schedule.warmup_steps, schedule.peak) == (1110, 111, 2e-3)
    assert warmup_cosine(1e-3, 1, 1, 0.1).warmup_steps == 0  # one step: no warm-up, the peak at once
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(1e-3, total_steps=10, warmup_steps=10)


def test_the_schedule_travels_with_a_checkpoint(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(WarmupCosine(1e-3, 50, 5)), loss="mse")
    model.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=4, epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert int(loaded.optimizer.iterations) == 4
    assert float(loaded.optimizer.learning_rate) == pytest.approx(float(WarmupCosine(1e-3, 50, 5)(4)))


class Interrupted(Exception):
    """Stands for a run killed between two epochs (after its checkpoint was written)."""


def recording(monkeypatch, learning_rates: list, interrupt_after: int | None = None, on_epoch_begin=None):
    """Appends to train's callbacks one that records (global step, learning rate) before every step and,
    after the checkpoint of epoch `interrupt_after`, stops the run as a kill would."""

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if on_epoch_begin:
                on_epoch_begin(self.model, epoch)

        def on_train_batch_begin(self, batch, logs=None):
            optimizer = self.model.optimizer
            learning_rates.append((int(optimizer.iterations), float(optimizer.learning_rate)))

        def on_epoch_end(self, epoch, logs=None):
            if interrupt_after == epoch + 1:
                raise Interrupted

    monkeypatch.setattr(fitting, "training_callbacks", lambda *args: [*TRAINING_CALLBACKS(*args), Record()])


def test_a_resumed_run_follows_the_uninterrupted_schedule_step_for_step(synthetic_data_dir, tmp_path, monkeypatch):
    config = TrainConfig(data_dir=str(synthetic_data_dir), cache_dir=None, **TINY)
    uninterrupted: list = []
    recording(monkeypatch, uninterrupted, interrupt_after=config.epochs)  # the whole schedule, no post-processing
    with pytest.raises(Interrupted):
        fitting.train(TrainConfig(**{**vars(config), "out": str(tmp_path / "whole")}), log=lambda *_: None)

    out = tmp_path / "interrupted"
    before: list = []
    recording(monkeypatch, before, interrupt_after=1)
    with pytest.raises(Interrupted):
        fitting.train(TrainConfig(**{**vars(config), "out": str(out)}), log=lambda *_: None)
    assert json.loads((out / "checkpoints" / "state.json").read_text())["epochs_done"] == 1
    after: list = []
    recording(monkeypatch, after)
    log: list = []
    card = fitting.train(TrainConfig(**{**vars(config), "out": str(out), "resume": True}), log=log.append)

    steps_per_epoch = len(uninterrupted) // config.epochs
    assert any(f"resuming after epoch 1, at step {steps_per_epoch}" in line for line in log)
    assert [step for step, _ in after] == list(range(steps_per_epoch, config.epochs * steps_per_epoch))
    resumed = before + after
    assert [step for step, _ in resumed] == [step for step, _ in uninterrupted]
    np.testing.assert_allclose([lr for _, lr in resumed], [lr for _, lr in uninterrupted], rtol=1e-6)
    assert uninterrupted[-1][1] < 0.02 * config.learning_rate  # the last step's rate is near zero
    assert card.training.epochs_run == config.epochs and card.lineage[-1].epochs_run == config.epochs


def test_resuming_with_another_schedule_is_refused(synthetic_data_dir, tmp_path, monkeypatch):
    config = TrainConfig(data_dir=str(synthetic_data_dir), cache_dir=None, out=str(tmp_path / "run"), **TINY)
    recording(monkeypatch, [], interrupt_after=1)
    with pytest.raises(Interrupted):
        fitting.train(config, log=lambda *_: None)
    longer = TrainConfig(**{**vars(config), "epochs": config.epochs + 2, "resume": True})
    with pytest.raises(TrainingError, match="--epochs, --batch-size, --learning-rate and --warmup-fraction"):
        fitting.train(longer, log=lambda *_: None)


def test_a_diverging_run_stops_with_a_message_and_keeps_its_last_good_checkpoint(
    synthetic_data_dir, tmp_path, monkeypatch
):
    def poison_in_epoch_2(model, epoch):
        if epoch == 1:
            model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])

    config = TrainConfig(data_dir=str(synthetic_data_dir), cache_dir=None, out=str(tmp_path / "run"), **TINY)
    recording(monkeypatch, [], on_epoch_begin=poison_in_epoch_2)
    with pytest.raises(fitting.DivergedError, match=r"not finite at epoch 2, step 1\. The last good checkpoint"):
        fitting.train(config, log=lambda *_: None)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert json.loads((checkpoints / "state.json").read_text())["epochs_done"] == 1
    kept = keras.saving.load_model(checkpoints / "last.keras", compile=False)
    assert all(np.isfinite(w).all() for w in kept.get_weights())
    assert not (tmp_path / "run" / "custom.keras").exists()  # no model is written from a diverged run
