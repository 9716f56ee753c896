"""Errors whose messages are meant for a person, shared by the modules that raise them."""


class XrayReadError(ValueError):
    """An input that cannot be turned into an X-ray."""


class TrainingError(RuntimeError):
    """Training or fitting cannot go on (no images, a checkpoint of another schedule, a loss that diverged);
    the message says why and what to do."""


class ModelLoadError(RuntimeError):
    """The model, its card or its export is missing or unreadable; the message says which and where."""
