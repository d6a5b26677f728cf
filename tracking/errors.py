"""Errors raised by the tracking package.

The tracking package must stay importable without segtune (it only depends on mlflow,
requests and the stdlib), so it defines its own exception instead of borrowing one from
``segtune.errors``. segtune's CLI catches :class:`TrackingError` and prints its message.
"""

from __future__ import annotations


class TrackingError(Exception):
    """A tracking-server or MLflow problem the user can act on.

    The message is meant to be printed as-is: one paragraph naming what was tried (the URI,
    the file) and what to do about it.
    """
