"""Scoring a model's probabilities against labels: metrics (AUC, thresholds, bootstrap intervals,
calibration) and the report's plots. Below training and evaluation, which both use them; imports
nothing of the package but the labels."""
