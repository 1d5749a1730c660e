"""Errors shared by the BRA backends."""


class BackendUnavailable(ValueError):
    """A backend was asked for explicitly but cannot take this input; the message says why."""
