"""Evaluation: metrics, plots, a model evaluated on a labelled split, and recalibration for a new site."""
