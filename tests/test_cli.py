"""`python -m pneumonia train | evaluate | predict` end to end, in fresh interpreters."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import re
import shutil
import sys

import numpy as np
import pytest
from builders import minimal_card, probability_of, run_cli
from sklearn.metrics import roc_auc_score

from pneumonia import cli
from pneumonia.cli.options import MODEL_HELP, RUNTIME_HELP
from pneumonia.evaluation.report import model_folder_names
from pneumonia.serving.card import write_card
from pneumonia.serving.classifier import XrayClassifier, default_model_path
from pneumonia.serving.preprocessing import UNIT_NORMALIZATION
from pneumonia.serving.runtime import RUNTIMES
from pneumonia.training import dataset

PLOTS = ("confusion_matrix_default.png", "confusion_matrix_screening.png", "roc_curve.png", "pr_curve.png")
THRESHOLD_KEYS = {"threshold", "accuracy", "precision", "recall", "specificity", "f1", "confusion_matrix"}


def assert_metrics_schema(metrics: dict, n_normal: int, n_pneumonia: int) -> None:
    assert {"model", "split", "n", "auc", "average_precision", "loss", "thresholds", "ci95"} <= set(metrics)
    assert metrics["n"] == {"NORMAL": n_normal, "PNEUMONIA": n_pneumonia}
    for value in (metrics["auc"], metrics["average_precision"]):
        assert 0 <= value <= 1
    assert metrics["loss"] > 0
    assert set(metrics["thresholds"]) == {"default", "screening"}
    for entry in metrics["thresholds"].values():
        assert set(entry) == THRESHOLD_KEYS
        cm = entry["confusion_matrix"]
        assert set(cm) == {"tn", "fp", "fn", "tp"}
        assert cm["tn"] + cm["fp"] == n_normal and cm["fn"] + cm["tp"] == n_pneumonia
        assert entry["recall"] == pytest.approx(cm["tp"] / n_pneumonia)
        assert entry["specificity"] == pytest.approx(cm["tn"] / n_normal)
    assert set(metrics["ci95"]) == {"auc", "accuracy", "recall", "specificity"}
    for low, high in metrics["ci95"].values():
        assert 0 <= low <= high <= 1
    assert metrics["ci95"]["auc"][0] <= metrics["auc"] <= metrics["ci95"]["auc"][1]


def assert_plots(folder) -> None:
    for name in PLOTS:
        data = (folder / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000, name


def test_train_writes_the_model_its_card_and_a_report(densenet_cli_run):
    out, result = densenet_cli_run
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((out / "model.json").read_text())
    assert f"validation AUC {card['validation']['auc']:.4f}" in result.stdout
    assert f"screening {card['thresholds']['screening']:.3f}" in result.stdout
    assert (out / "densenet121.keras").is_file() and card["file"] == "densenet121.keras"
    for name in ("last.keras", "state.json"):
        assert (out / "checkpoints" / name).is_file()
    assert_plots(out / "report")
    assert (out / "report" / "training_curves.png").stat().st_size > 5_000
    assert json.loads((out / "report" / "metrics.json").read_text()) == card["validation"]
    assert card["training"]["command"].startswith("python -m pneumonia train ")
    assert "--arch densenet121" in card["training"]["command"]


@pytest.fixture(scope="module")
def evaluated(densenet_cli_run, learnable_data_dir, tmp_path_factory):
    out, _ = densenet_cli_run
    report = tmp_path_factory.mktemp("evaluate") / "report"
    result = run_cli("evaluate", learnable_data_dir, "--model", out, "--out", report, cwd=report.parent)
    return report, result


def test_evaluate_writes_metrics_and_plots(evaluated, densenet_cli_run, learnable_data_dir):
    report, result = evaluated
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["model"] == "densenet121" and metrics["split"] == "test"
    assert_metrics_schema(metrics, 12, 12)
    assert_plots(report)
    assert f"AUC {metrics['auc']:.4f}" in result.stdout and "test: 24 images" in result.stdout
    # the numbers are those of the model on these images
    classifier = XrayClassifier(densenet_cli_run[0])
    files = dataset.scan_split(learnable_data_dir, "test")
    probs = np.array([probability_of(classifier, path) for path in files.paths])
    assert metrics["auc"] == pytest.approx(roc_auc_score(files.labels, probs), abs=1e-6)
    screening = classifier.thresholds["screening"]
    assert metrics["thresholds"]["screening"]["threshold"] == pytest.approx(screening)
    assert metrics["thresholds"]["screening"]["confusion_matrix"]["tp"] == int(
        ((probs >= screening) & (np.array(files.labels) == 1)).sum()
    )


def test_evaluate_several_models_keeps_each_report(densenet_cli_run, tiny_model_dir, learnable_data_dir, tmp_path):
    """Two runs of the custom CNN are both named "custom" on their cards: each still gets
    its own folder, and the comparison has a column for each."""
    twin = shutil.copytree(tiny_model_dir, tmp_path / "twin_run")
    report = tmp_path / "comparison"
    result = run_cli(
        "evaluate",
        learnable_data_dir,
        "--model",
        tiny_model_dir,
        "--model",
        twin,
        "--model",
        densenet_cli_run[0],
        "--out",
        report,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folders = [f"custom-{tiny_model_dir.name}", "custom-twin_run", "densenet121"]
    assert sorted(p.name for p in report.iterdir() if p.is_dir()) == sorted(folders)
    reports = {}
    for folder in folders:
        reports[folder] = json.loads((report / folder / "metrics.json").read_text())
        assert_metrics_schema(reports[folder], 12, 12)
        assert_plots(report / folder)
    assert reports[folders[0]]["model"] == reports[folders[1]]["model"] == "custom"
    assert reports[folders[0]]["auc"] == pytest.approx(reports[folders[1]]["auc"], abs=1e-9)  # the same model
    table = (report / "comparison.md").read_text()
    assert "| metric | " + " | ".join(folders) + " |" in table
    auc_row = next(line for line in table.splitlines() if line.startswith("| AUC |"))
    assert [float(cell) for cell in auc_row.strip("|").split("|")[1:]] == pytest.approx(
        [reports[f]["auc"] for f in folders], abs=1e-4
    )
    for row in ("recall @ screening", "specificity @ default", "threshold @ screening"):
        assert f"| {row} |" in table


def test_model_folder_names_are_unique(tmp_path):
    for folder, name in (("a", "custom"), ("b", "custom"), ("c", "densenet121")):
        (tmp_path / folder).mkdir()
        write_card(tmp_path / folder, minimal_card(name, "m.keras", 32, ("f", [8, 8]), UNIT_NORMALIZATION))
        (tmp_path / folder / "m.keras").write_bytes(b"")
    paths = [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), str(tmp_path / "a" / "m.keras")]
    names = model_folder_names(paths)
    assert len(set(names)) == len(names) == 4
    assert names[2] == "densenet121" and names[0] == "custom-a" and names[1] == "custom-b"


@pytest.fixture(scope="module")
def images(synthetic_data_dir, tmp_path_factory):
    """Two readable test images and a corrupt one."""
    good = dataset.scan_split(synthetic_data_dir, "test").paths
    folder = tmp_path_factory.mktemp("predict")
    corrupt = folder / "corrupt.jpeg"
    corrupt.write_bytes(good[0].read_bytes()[:200])
    return [good[0], good[-1]], corrupt


def test_predict_prints_one_line_per_image(ungated_model_dir, images, tmp_path):
    good, _ = images
    result = run_cli("predict", *good, "--model", ungated_model_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    classifier = XrayClassifier(ungated_model_dir)
    for line, path in zip(lines, good):
        fields = line.split("\t")
        assert fields[0] == str(path)
        probability = probability_of(classifier, path)
        assert float(fields[1]) == pytest.approx(probability, abs=6e-5)
        labels = classifier.labels(probability)
        assert fields[2] == f"default({classifier.thresholds['default']:.3f}): {labels['default']}"
        assert fields[3] == f"screening({classifier.thresholds['screening']:.3f}): {labels['screening']}"


def test_predict_json_reports_a_bad_file_and_still_scores_the_others(ungated_model_dir, images, tmp_path):
    good, corrupt = images
    missing = tmp_path / "absent.png"
    result = run_cli(
        "predict", good[0], corrupt, good[1], missing, "--model", ungated_model_dir, "--json", cwd=tmp_path
    )
    assert result.returncode == 1
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [row["path"] for row in rows] == [str(good[0]), str(corrupt), str(good[1]), str(missing)]
    classifier = XrayClassifier(ungated_model_dir)
    for row, path in ((rows[0], good[0]), (rows[2], good[1])):
        assert {"path", "probability", "label", "screening_label"} <= set(row) and "error" not in row
        probability = probability_of(classifier, path)
        assert row["probability"] == pytest.approx(probability, abs=1e-6)  # printed to 6 decimals
        expected = classifier.labels(probability)
        assert (row["label"], row["screening_label"]) == (expected["default"], expected["screening"])
        assert expected["default"] == ("PNEUMONIA" if probability >= classifier.thresholds["default"] else "NORMAL")
    assert set(rows[1]) == {"path", "probability", "error"} and "truncated" in rows[1]["error"].lower()
    assert rows[1]["probability"] is None  # the API's shape for a file not screened (result_formats.screening_json)
    assert set(rows[3]) == {"path", "probability", "error"} and "No such image file" in rows[3]["error"]
    assert "Traceback" not in result.stderr


def test_cli_errors_are_messages_not_tracebacks(tmp_path, synthetic_data_dir, capsys):
    """In-process (the fresh-interpreter path is covered above): each failure exits 2 with
    a message naming what is missing."""
    missing_model = tmp_path / "no_model"
    assert cli.main(["predict", str(tmp_path / "x.png"), "--model", str(missing_model)]) == 2
    assert str(missing_model) in capsys.readouterr().err
    assert (
        cli.main(["evaluate", str(synthetic_data_dir), "--model", str(missing_model), "--out", str(tmp_path / "r")])
        == 2
    )
    assert str(missing_model) in capsys.readouterr().err
    assert cli.main(["evaluate", str(synthetic_data_dir), "--split", "val", "--out", str(tmp_path / "r")]) == 2
    assert "no val/NORMAL or val/PNEUMONIA images" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_evaluate_on_one_class_says_so(tmp_path, tiny_model_dir, synthetic_data_dir, capsys):
    one_class = tmp_path / "data" / "test"
    shutil.copytree(synthetic_data_dir / "test" / "PNEUMONIA", one_class / "PNEUMONIA")
    assert (
        cli.main(["evaluate", str(tmp_path / "data"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r")])
        == 2
    )
    err = capsys.readouterr().err
    assert "needs readable NORMAL and PNEUMONIA images" in err and "NORMAL 0, PNEUMONIA 12" in err


def test_custom_cnn_trains_without_pretrained_weights_by_default(tmp_path, monkeypatch, capsys):
    """`--arch custom` without --init: no ImageNet download, no InitError."""
    import keras

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download ImageNet weights for the custom CNN")

    monkeypatch.setattr(keras.utils, "get_file", no_download)
    (tmp_path / "data" / "train" / "NORMAL").mkdir(parents=True)
    arguments = ["train", str(tmp_path / "data"), "--arch", "custom", "--out", str(tmp_path / "run"), "--no-cache"]
    assert cli.main(arguments) == 2
    assert "error: " in (err := capsys.readouterr().err) and "no train/NORMAL or train/PNEUMONIA images" in err
    configs = []

    def fake_train(config, log=print):
        configs.append(config)
        card = minimal_card("m", "m.keras", 32, ("f", [8, 8]), UNIT_NORMALIZATION)
        return dataclasses.replace(card, validation=dataclasses.replace(card.validation, auc=0.5))

    monkeypatch.setattr("pneumonia.training.fitting.train", fake_train)
    assert cli.main(["train", "d"]) == 0 and cli.main(["train", "d", "--arch", "custom"]) == 0
    assert cli.main(["train", "d", "--init", "none"]) == 0
    assert [(c.arch, c.init, c.image_size) for c in configs] == [
        ("densenet121", "imagenet", 128),
        ("custom", "none", 320),
        ("densenet121", "none", 128),
    ]


# --- predict on folders: CSV, Grad-CAM overlays, progress ----------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_predict_draws_its_progress_on_a_terminal_between_the_lines_it_prints(gap_model_dir, mixed_folder, monkeypatch):
    root, reported, _ = mixed_folder
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(sys, "stdout", terminal)  # one screen: each line printed where the bar was
    assert cli.main(["predict", str(root), "--model", str(gap_model_dir)]) == 1  # one file is unreadable
    drawn = terminal.getvalue()
    for path in reported:  # the bar wiped, the line printed (the bar is drawn again after it)
        assert re.search(r"\r +\r" + re.escape(path) + "\t", drawn), path
    assert re.search(r"\r100%\|[^\r\n]*\| 5/5 \[[^\]]*image/s\]\n5 file\(s\): 4 screened", drawn), drawn[-500:]


def test_predict_a_folder_writes_a_csv_row_and_an_overlay_for_every_file(gap_model_dir, mixed_folder, tmp_path):
    """A corrupt file, a DICOM without an extension and a PNG named .txt: a row for each."""
    import csv

    import cv2

    root, reported, _ = mixed_folder
    table, overlays = tmp_path / "results.csv", tmp_path / "gradcam"
    result = run_cli(
        "predict",
        root,
        "--model",
        gap_model_dir,
        "--csv",
        table,
        "--gradcam",
        overlays,
        "--batch-size",
        2,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]  # one file was unreadable
    assert "\r" not in result.stderr and "image/s" not in result.stderr  # piped: no progress bar
    assert "skipped 1 file(s)" in result.stderr and "notes.txt" in result.stderr
    assert "5 file(s): 4 screened, 0 refused by the gate, 1 unreadable" in result.stderr
    assert [line.split("\t")[0] for line in result.stdout.strip().splitlines()] == reported
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == reported
    corrupt = rows[1]
    assert corrupt["probability"] == corrupt["gradcam"] == "" and "truncated" in corrupt["error"].lower()
    classifier = XrayClassifier(gap_model_dir)
    for row in rows[:1] + rows[2:]:
        probability = probability_of(classifier, row["path"])
        assert float(row["probability"]) == pytest.approx(probability, abs=1e-5)
        labels = classifier.labels(probability)
        assert (row["label_default"], row["label_screening"]) == (labels["default"], labels["screening"])
        assert row["ood_verdict"] == "unchecked" and row["error"] == ""  # this model has no gate
        assert float(row["threshold_screening"]) == pytest.approx(classifier.thresholds["screening"])
        overlay = cv2.imread(row["gradcam"])
        height, width = cv2.imread(row["path"]).shape[:2] if not row["path"].endswith("IM0001") else (128, 160)
        assert overlay.shape == (height, width, 3)  # under 1024 px: the X-ray's own size
    assert sorted(p.name for p in overlays.iterdir()) == [
        "00001-a-normal.png",
        "00003-c-wrong-extension.png",
        "00004-IM0001.png",
        "00005-z-pneumonia.png",
    ]


def test_predict_draws_a_progress_bar_on_a_terminal(gap_model_dir, mixed_folder, tmp_path, monkeypatch, capsys):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    root, reported, _ = mixed_folder
    assert cli.main(["predict", str(root / "ward-b"), "--model", str(gap_model_dir), "--json"]) == 0
    assert "| 2/2 [" in terminal.getvalue() and "image/s]" in terminal.getvalue()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["path"] for line in lines] == reported[3:] and all(0 <= line["probability"] <= 1 for line in lines)
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(tmp_path / "empty"), "--model", str(gap_model_dir)]) == 2
    assert "no image files in" in terminal.getvalue()
    with pytest.raises(SystemExit):
        cli.main(["predict", str(root), "--batch-size", "0"])


def test_train_help_lists_no_rejected_lever(capsys):
    """The lever study's rejected options are gone from the product (model/report/levers.md keeps them)."""
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for retired in (
        "clahe",
        "--mixup",
        "--ema",
        "--label-smoothing",
        "--match-sharpness",
        "normal-framing",
    ):
        assert retired not in text, retired
    for kept in (
        "--contrast {none,equalize}",
        "--augment {standard,acquisition}",
        "--threshold-rule",
        "--hold-out-series",
    ):
        assert kept in text, kept


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its name ('pacs screen' for a command under a command)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                found[prefix + name] = command
                found |= subcommands(command, prefix + name + " ")
    return found


def option_of(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((action for action in parser._actions if flag in action.option_strings), None)


# export-web declares its own --model until the branch that owns pneumonia/cli/export_web.py takes
# add_model_option (issue 41); then this set is empty.
OWN_MODEL_OPTION: set[str] = set()


def test_every_command_taking_model_shows_the_same_help_and_runtime_choices():
    commands = subcommands(cli.build_parser())
    with_model = {name: option_of(p, "--model") for name, p in commands.items() if option_of(p, "--model")}
    with_runtime = {name: option_of(p, "--runtime") for name, p in commands.items() if option_of(p, "--runtime")}
    # the commands that screen or score with a model, each found (pacs's through its actions)
    assert set(with_model) >= {"archive", "calibrate", "evaluate", "monitor", "pacs screen", "pacs watch", "predict"}
    assert set(with_runtime) == {"archive", "pacs screen", "pacs watch", "predict"}
    helps = {name: option.help for name, option in with_model.items() if name not in OWN_MODEL_OPTION}
    assert set(helps.values()) == {MODEL_HELP}, helps
    for option in with_runtime.values():
        assert tuple(option.choices) == RUNTIMES and option.help == RUNTIME_HELP


def test_model_defaults_to_the_shipped_one_and_evaluate_collects_each_model(monkeypatch, tmp_path):
    monkeypatch.delenv("PNEUMONIA_MODEL_PATH", raising=False)
    parser = cli.build_parser()
    shipped = str(default_model_path())
    assert parser.parse_args(["predict", "x.png"]).model == shipped
    assert parser.parse_args(["pacs", "screen", "http://pacs"]).model == shipped
    # archive leaves the model to its driver, which resolves it once for every node
    assert parser.parse_args(["archive", "x", "--out", str(tmp_path)]).model is None
    evaluate = parser.parse_args(["evaluate", "data", "--model", "a", "--model", "b"])
    assert evaluate.model == ["a", "b"] and evaluate.default_model == shipped
    assert parser.parse_args(["evaluate", "data"]).model is None
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "x.png", "--runtime", "tensorrt"])
