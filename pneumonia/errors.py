"""Errors whose messages are meant for a person, shared by the modules that raise them."""


class XrayReadError(ValueError):
    """An input that cannot be turned into an X-ray."""
