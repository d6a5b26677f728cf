"""Exceptions a user can act on.

Every error here carries a one-paragraph message that names the file, folder or field involved
and what was expected. The CLI catches :class:`SegtuneError` and prints the message without a
traceback, so messages must stand on their own.
"""

from __future__ import annotations


class SegtuneError(Exception):
    """Base class for errors whose message is meant for the user, printed as-is."""


class DataError(SegtuneError):
    """Raw dataset files or a prepared store are missing, unreadable or inconsistent."""


class ConfigError(SegtuneError):
    """An experiment file or a ``--set`` override is invalid."""


class TrackingError(SegtuneError):
    """The tracking server cannot be reached or refused a request."""


class CheckpointError(SegtuneError):
    """A checkpoint is missing, unreadable or does not match its recorded hash."""


class ClusterError(SegtuneError):
    """The Ray cluster cannot be reached, or cannot run the sweep's trials as configured."""


class TrainingError(SegtuneError):
    """Training cannot go on as configured, e.g. the loss became NaN or infinite."""


class GateError(SegtuneError):
    """A model version failed a promotion gate and may not take the `champion` alias."""
