"""Pneumonia screening from chest X-rays: data, one preprocessing path, models, training,
evaluation and prediction. A research tool, not a medical device."""

__version__ = "0.1.0"
