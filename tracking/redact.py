"""Keep secrets out of what is logged: params, tags and error messages go through `redact`.

Two kinds of secret can reach a logged string: a password inside a URI
(`http://user:secret@host`, `postgresql://...`), and the value of a secret environment variable
(tokens, passwords, `AWS_*`, `MLFLOW_TRACKING_PASSWORD`) that found its way into a config value
or an exception message. Both are replaced by `***`.
"""

from __future__ import annotations

import os
import re

_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|API_?KEY|ACCESS_KEY|^AWS_", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^/@:\s]+:)(?P<pw>[^/@\s]+)(?=@)", re.IGNORECASE)
# Shorter values (e.g. AWS_DEFAULT_REGION=us) would blank out ordinary words.
_MIN_SECRET = 6


def secret_values() -> list[str]:
    """Values of environment variables whose names say they are secret, longest first."""
    found = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET}
    return sorted(found, key=len, reverse=True)


def redact(text: str, secrets: list[str] | None = None) -> str:
    """`text` with URI passwords and secret environment values replaced by `***`."""
    text = _URI_PASSWORD.sub(lambda m: m.group("head") + "***", text)
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, "***")
    return text
