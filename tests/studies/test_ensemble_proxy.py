import numpy as np
import pytest

from pneumonia.serving.card import sigmoid
from studies.ensemble_proxy import averaged, ensemble_rows, log_odds


def test_averaged_log_odds_of_two_members_is_their_mean_logit():
    a, b = np.array([0.1, 0.5, 0.9]), np.array([0.3, 0.5, 0.99])
    np.testing.assert_allclose(averaged([a, b]), (log_odds(a) + log_odds(b)) / 2)
    np.testing.assert_allclose(sigmoid(averaged([a, a])), a)


def test_ensemble_is_calibrated_and_thresholded_on_the_unshifted_part_only():
    """Two members with independent errors: the average ranks better than either; a shift that
    raises every NORMAL score lowers specificity at the thresholds fixed on the baseline."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 300)
    signal = 1.5 * (2 * labels - 1)
    members = [sigmoid(signal + rng.normal(0, 1.5, labels.size)) for _ in range(2)]
    shifted = [sigmoid(log_odds(p) + 2.0 * (labels == 0)) for p in members]
    fitted, rows = ensemble_rows(labels, {"none": members, "brighter": shifted}, 0.98)
    by_shift = {r["shift"]: r for r in rows}
    from sklearn.metrics import roc_auc_score

    assert by_shift["none"]["auc"] > max(roc_auc_score(labels, p) for p in members) + 0.01
    assert fitted["screening"] <= fitted["default"]
    assert by_shift["none"]["screening"]["recall"] >= 0.98
    assert by_shift["brighter"]["default"]["specificity"] < by_shift["none"]["default"]["specificity"] - 0.2
    assert by_shift["brighter"]["normal_mean_p"] > by_shift["none"]["normal_mean_p"]
    assert by_shift["none"]["normal_mean_p"] == pytest.approx(
        1 - by_shift["none"]["pneumonia_mean_p"], abs=0.05
    )  # Platt on the baseline: symmetric classes get symmetric probabilities
