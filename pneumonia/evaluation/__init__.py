"""Evaluation workflows over a trained model: `report` (a model on a labelled split) and
`recalibration` (for a new site). Above training, whose dataset and operating points they use; the
metrics and plots they write are in `pneumonia.scoring`."""
