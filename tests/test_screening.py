"""pneumonia/serving/screening.py, result_formats.py and reading/image_files.py: files found by
content, chunks through one model pass giving what one image at a time gives, bounded memory, a row
for every file, its outcome and the tally, a result's values, CSV and JSON."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from builders import REAL_XRAYS, SHIPPED_MODEL, noise_png, sample_photo, screen_one, xray_jpeg

from pneumonia.reading.image_files import find_images
from pneumonia.serving import preprocessing
from pneumonia.serving.classifier import XrayClassifier
from pneumonia.serving.gate import Verdict
from pneumonia.serving.outcomes import GateVerdict, Outcome
from pneumonia.serving.result_formats import CSV_COLUMNS, csv_text, overlay_file_name
from pneumonia.serving.screening import BatchScreener, ScreenedImage, Screening, Tally


@pytest.fixture(scope="module")
def screener(gap_model_dir):
    """The GAP CNN (its logits vary from image to image; the tiny CNN's can be constant), with Grad-CAM."""
    return BatchScreener(XrayClassifier(gap_model_dir))


@pytest.fixture(scope="module")
def shipped_screener():
    """The shipped DenseNet121 and its gate. (The tiny model's gate is fitted on near-constant
    features: its distances swing across its thresholds with float32 rounding, batched or not.)"""
    return BatchScreener(XrayClassifier(SHIPPED_MODEL))


def drawn_xrays(count: int) -> list[tuple[str, bytes]]:
    return [(f"x{i}.jpeg", xray_jpeg(240 + 8 * (i % 5), 200, seed=100 + i, label=i % 2)) for i in range(count)]


def test_find_images_by_content_or_name_in_walk_order(mixed_folder, tmp_path):
    root, reported, skipped = mixed_folder
    found = find_images([root])
    assert found.files == reported and found.skipped == skipped
    missing = tmp_path / "absent.png"
    given = find_images([reported[3], missing, root / "ward-b"])  # files as given, a missing one too
    assert given.files == [reported[3], str(missing), *reported[3:]]


@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_batched_rows_equal_one_image_at_a_time(screener, mixed_folder, chunk_size):
    classifier = screener.classifier
    files = find_images([mixed_folder[0]]).files
    sources = [(path, path) for path in files] + drawn_xrays(7)
    rows = list(screener.screen(sources, chunk_size))
    assert [row.name for row in rows] == [name for name, _ in sources]
    assert "truncated" in rows[1].error.lower() and rows[1].probability is None and rows[1].verdict is None
    probabilities = []
    for row, (name, source) in zip(rows, sources):
        if name != files[1]:
            assert row.error is None and row.verdict is None  # no gate: no verdict
            assert row.probability == pytest.approx(screen_one(classifier, source)[0], abs=1e-5)
            assert row.labels == classifier.labels(row.probability)
            probabilities.append(row.probability)
    assert np.ptp(probabilities) > 0.1  # the model tells these images apart: the comparison means something


def test_batched_gate_verdicts_equal_one_image_at_a_time(shipped_screener, tmp_path):
    """Real X-rays pass, a colour photo is refused by the pixel checks, noise by the feature distance."""
    sources = [(str(path), path) for path in REAL_XRAYS] + [
        ("photo", sample_photo("flower.jpg")),
        ("noise", noise_png()),
    ]
    rows = list(shipped_screener.screen(sources, chunk_size=4))
    for row, (_, source) in zip(rows, sources):
        probability, verdict = screen_one(shipped_screener.classifier, source)
        assert (row.verdict.verdict, row.verdict.reason) == (verdict.verdict, verdict.reason)
        assert row.verdict.score == pytest.approx(verdict.score, rel=1e-4)
        assert (
            row.probability == pytest.approx(probability, abs=1e-5)
            if probability is not None
            else row.outcome == Outcome.REFUSED
        )
    assert [row.verdict.reason for row in rows[-2:]] == ["colour", "features"]
    assert all(row.probability is not None for row in rows[:-2])


def test_each_chunk_is_one_model_pass_and_no_file_is_decoded_in_this_process(screener, monkeypatch):
    passes = []
    forward = screener.classifier.runtime.forward
    monkeypatch.setattr(preprocessing, "decode_xray", lambda *args: pytest.fail("decoded in the serving process"))
    monkeypatch.setattr(
        screener.classifier.runtime, "forward", lambda inputs: passes.append(len(inputs)) or forward(inputs)
    )
    rows = list(screener.screen(drawn_xrays(30), chunk_size=8, display_side=64))
    assert passes == [8, 8, 8, 6]
    assert all(row.probability is not None and max(row.display.shape) == 64 for row in rows)


def test_grad_cam_rows_carry_the_map_and_the_same_probability(screener):
    sources = drawn_xrays(6)
    plain = list(screener.screen(sources, 4))
    explained = list(screener.screen(sources, 4, display_side=100, with_gradcam=True))
    map_size = screener.classifier.runtime.map_size
    assert any(row.probability is not None for row in explained)
    for row, reference in zip(explained, plain):
        assert row.outcome == reference.outcome
        if row.probability is not None:
            assert row.probability == pytest.approx(reference.probability, abs=1e-5)
            assert row.heat.shape == map_size and 0 <= row.heat.min() and row.heat.max() <= 1
            assert row.display.dtype == np.uint8 and max(row.display.shape) == 100
        else:
            assert row.heat is None


def test_a_decoder_failure_is_a_row_not_the_end_of_the_run(screener, caplog):
    """A failure of ours in a decoding child comes back as its type only (pneumonia/serving/sandbox.py); the
    run goes on and the row says it was unexpected."""
    sandbox = screener.sandbox

    class FailingOnBoom:
        def prepare(self, source, *args, **kwargs):
            if source == b"boom":
                raise RuntimeError("It could not be read (KeyError).")
            return sandbox.prepare(source, *args, **kwargs)

    batch = BatchScreener(screener.classifier, sandbox=FailingOnBoom())
    rows = list(batch.screen([("a", xray_jpeg()), ("b", b"boom"), ("c", xray_jpeg(seed=5))], 8))
    assert rows[0].probability is not None and rows[2].probability is not None
    assert rows[1].screening.unexpected and "KeyError" in rows[1].error
    assert "Unexpected error while decoding a file" in caplog.text


def test_csv_has_a_row_per_file_and_quotes_formula_like_text():
    thresholds = {"default": 0.5, "screening": 0.3}
    rows = [
        ScreenedImage(
            "=HYPERLINK(x).png",
            Screening.screened(0.7, {"default": "PNEUMONIA", "screening": "PNEUMONIA"}, Verdict("unusual", None, 40.0)),
        ),
        ScreenedImage("b.png", Screening.failed("b.png is empty.")),
        ScreenedImage(
            "c.png",
            Screening(
                Outcome.REFUSED,
                verdict=Verdict(GateVerdict.REJECTED, "colour", 71.5, 16.0),
                error="Not screened: colour",
            ),
        ),
    ]
    table = list(csv.reader(io.StringIO(csv_text(rows, "file", thresholds, gated=True))))
    assert table[0] == ["file", *CSV_COLUMNS]
    assert table[1] == [
        "'=HYPERLINK(x).png",
        "0.700000",
        "PNEUMONIA",
        "PNEUMONIA",
        "0.500000",
        "0.300000",
        "unusual",
        "",
        "40.000",
        "",
    ]
    assert table[2][1:3] == ["", ""] and table[2][6] == "" and table[2][-1] == "b.png is empty."
    assert table[3][6:] == ["rejected", "colour", "71.500", "Not screened: colour"]
    ungated = list(
        csv.reader(
            io.StringIO(
                csv_text(
                    rows[:1]
                    + [ScreenedImage("d", Screening.screened(0.1, {"default": "NORMAL", "screening": "NORMAL"}, None))],
                    "path",
                    thresholds,
                    gated=False,
                )
            )
        )
    )
    assert ungated[2][6] == "unchecked"


def test_overlay_file_names_are_unique_and_safe():
    assert overlay_file_name(3, "/data/ward b/IM 0001.dcm") == "00003-IM_0001.png"
    assert overlay_file_name(12, "../../etc/passwd") == "00012-passwd.png"


# --- One outcome, one tally ------------------------------------------------------------------------


def test_a_screening_carries_its_outcome_and_cannot_be_changed():
    import dataclasses

    labels = {"default": "NORMAL", "screening": "PNEUMONIA"}
    screened = Screening.screened(0.2, labels, Verdict("ok", None, 1.0))
    assert (screened.outcome, screened.probability, screened.labels, screened.error) == ("screened", 0.2, labels, None)
    refused = Screening.refused(Verdict(GateVerdict.REJECTED, "colour", 71.5, 16.0))
    assert refused.outcome == Outcome.REFUSED and refused.probability is None
    assert refused.error.startswith("Not screened: ") and refused.verdict.reason == "colour"
    failed = Screening.failed("x.png is empty.", unexpected=True)
    assert (failed.outcome, failed.error, failed.unexpected, failed.verdict) == (
        "failed",
        "x.png is empty.",
        True,
        None,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        screened.outcome = "failed"


def test_the_pipeline_decides_each_outcome_once(shipped_screener):
    rows = shipped_screener.screen_chunk(
        [("x", REAL_XRAYS[0].read_bytes()), ("photo", sample_photo("flower.jpg")), ("junk", b"not an image")]
    )
    assert [row.outcome for row in rows] == ["screened", "refused", "failed"]
    assert rows[2].error == "the upload is not a supported image (JPEG, PNG, BMP, TIFF or DICOM)."
    named = BatchScreener(shipped_screener.classifier, names_in_messages=True).screen_chunk([("junk.png", b"no")])
    assert named[0].error == "junk.png is not a supported image (JPEG, PNG, BMP, TIFF or DICOM)."


def test_a_tally_counts_each_outcome_and_says_so():
    tally = Tally()
    for outcome in ("screened", "failed", "screened", "refused"):
        tally.count(outcome)
    assert (tally.files, tally.screened, tally.refused, tally.failed) == (4, 2, 1, 1)
    assert tally.summary() == "4 file(s): 2 screened, 1 refused by the gate, 1 unreadable"


# --- One serialisation of a result -----------------------------------------------------------------


def test_result_values_are_what_the_csv_parquet_and_sr_are_written_from():
    from pneumonia.serving.result_formats import result_values, text_cell

    thresholds = {"default": 0.5, "screening": 0.25}
    labels = {"default": "PNEUMONIA", "screening": "PNEUMONIA"}
    screened = ScreenedImage("a", Screening.screened(0.1234567, labels, Verdict("unusual", None, 40.12345)))
    values = result_values(screened, thresholds, gated=True)
    assert values == {
        "probability": 0.1234567,
        "label_default": "PNEUMONIA",
        "label_screening": "PNEUMONIA",
        "threshold_default": 0.5,
        "threshold_screening": 0.25,
        "ood_verdict": "unusual",
        "ood_reason": None,
        "ood_score": 40.12345,
        "error": None,
    }
    assert [text_cell(values[c], c) for c in ("probability", "ood_score", "ood_reason")] == ["0.123457", "40.123", ""]
    failed = result_values(ScreenedImage("b", Screening.failed("=cmd|' /C calc'!A0")), thresholds, gated=False)
    assert failed["probability"] is failed["label_default"] is failed["ood_verdict"] is None
    assert text_cell(failed["error"], "error") == "'=cmd|' /C calc'!A0"  # a spreadsheet would run it
    refused = Screening.refused(Verdict(GateVerdict.REJECTED, "colour", 71.5, 16.0))
    assert result_values(ScreenedImage("c", refused), thresholds, gated=True)["ood_verdict"] == "rejected"


def test_screening_json_says_per_outcome_what_the_api_answers_and_predict_prints():
    from types import SimpleNamespace

    from pneumonia.serving.result_formats import screening_json

    classifier = SimpleNamespace(
        card=SimpleNamespace(shown_probability=lambda p: f"{100 * p:.0f} %"),
        thresholds={"default": 0.5, "screening": 0.25},
        gate=None,
        gate_status="no ood.npz",
    )
    labels = {"default": "NORMAL", "screening": "PNEUMONIA"}
    assert screening_json(Screening.screened(0.3, labels, None), classifier) == {
        "probability": 0.3,
        "probability_text": "30 %",
        "label": "NORMAL",
        "screening_label": "PNEUMONIA",
        "thresholds": {"default": 0.5, "screening": 0.25},
        "ood": {"verdict": "unchecked", "gate": "off", "detail": "no ood.npz"},
    }
    assert screening_json(Screening.failed("x is empty."), classifier) == {"probability": None, "error": "x is empty."}
