"""`segtune serve`: a registered model behind `mlflow models serve`, smoke-tested before it is ready.

The server runs in its own process group on 127.0.0.1 (`--env-manager local`: this Python
environment, which must hold the model's requirements) and is stopped by the pid it was
started with. Ready means: `/ping` answers, and `POST /invocations` with the model's own
serving input example (saved when it was registered) returns one mask per image.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tracking.errors import TrackingError
from tracking.redact import redact, secret_values
from tracking.registry import CHAMPION


@dataclass
class ServedModel:
    """A running model server started by `start`."""

    model_uri: str
    url: str
    port: int
    process: subprocess.Popen
    log: Path

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the server's process group (the pid `start` got), SIGKILL after `grace`."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


def model_uri(ref: str) -> str:
    """`NAME`, `NAME@ALIAS`, `NAME/VERSION` or `models:/...` as a models:/ URI (default alias champion)."""
    ref = ref.removeprefix("models:/")
    if not ref or ref.startswith(("@", "/")):
        raise TrackingError(f"{ref!r}: expected a registered model, NAME[@ALIAS] or NAME/VERSION, "
                            "e.g. segtune-sam_tiny-synthetic_em@champion.")
    if "@" not in ref and "/" not in ref:
        ref = f"{ref}@{CHAMPION}"
    return f"models:/{ref}"


def serving_example(tracking_uri: str, uri: str) -> dict[str, Any]:
    """The model's `serving_input_example.json` (a request body `mlflow models serve` takes)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tracking.runs import quiet_mlflow

    quiet_mlflow()
    # MLflow resolves a models:/ URI with the default registry, whatever registry_uri says.
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="segtune-serve-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/serving_input_example.json",
                                                        dst_path=tmp)
        except MlflowException as err:
            raise TrackingError(f"{uri}: no such model, or it carries no serving input example, at "
                                f"{redact(tracking_uri)} ({err.message.splitlines()[0][:200]}); expected a "
                                "version registered by `segtune promote`.") from None
        return json.loads(Path(local).read_text())


def _copy_masked(process: subprocess.Popen, log: Path) -> None:
    """The server's output into `log`, line by line, with URI passwords and secret values masked
    (its errors may quote the tracking URI)."""
    secrets = secret_values()
    assert process.stdout is not None
    with open(log, "a") as out:
        for raw in process.stdout:
            out.write(redact(raw.decode(errors="replace"), secrets))
            out.flush()


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def check_masks(body: dict[str, Any], payload: Any) -> list[tuple[int, ...]]:
    """The mask shapes of an /invocations answer; TrackingError unless one 2-D 0/1 mask per image."""
    import numpy as np

    preds = payload.get("predictions") if isinstance(payload, dict) else None
    inputs = body.get("inputs", body.get("dataframe_records"))
    count = len(inputs) if isinstance(inputs, list) else 1
    if not isinstance(preds, list) or len(preds) != count:
        raise TrackingError(f"the model server answered {str(payload)[:300]!r}; expected {count} mask(s) "
                            "under 'predictions'.")
    shapes = []
    for p in preds:
        mask = np.asarray(p)
        if mask.ndim != 2 or not set(np.unique(mask).tolist()) <= {0, 1}:
            raise TrackingError(f"the model server answered a mask of shape {mask.shape}; expected (H, W) of 0/1.")
        shapes.append(tuple(mask.shape))
    return shapes


def start(tracking_uri: str, ref: str, *, port: int, log_dir: Path, timeout: float = 600.0,
          log: Callable[[str], None] = print) -> ServedModel:
    """Start `mlflow models serve` for `ref` on 127.0.0.1:`port`, wait for /ping, send the model's
    serving input example and check the masks; return the running server (stop it with .stop())."""
    uri = model_uri(ref)
    example = serving_example(tracking_uri, uri)  # also: the model exists, before anything starts
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"serve-{port}.log"
    # MLflow starts `uvicorn` by name: this environment's, also when it is not on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri, "PATH": path}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    threading.Thread(target=_copy_masked, args=(process, log_file), name="segtune-serve-log", daemon=True).start()
    served = ServedModel(uri, f"http://127.0.0.1:{port}", port, process, log_file)
    session = requests.Session()
    session.trust_env = False  # our own loopback server: no proxy
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise TrackingError(f"`mlflow models serve` for {uri} exited with code {process.returncode} "
                                    f"before it answered; the end of its log ({log_file}):\n"
                                    + redact(_tail(log_file)))
            with contextlib.suppress(requests.RequestException):
                if session.get(f"{served.url}/ping", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TrackingError(f"the model server for {uri} did not answer /ping within {timeout:g} s; "
                                    f"see {log_file}.")
            time.sleep(0.5)
        resp = session.post(f"{served.url}/invocations", json=example, timeout=300)
        if resp.status_code != 200:
            raise TrackingError(f"the smoke request to {uri} failed: HTTP {resp.status_code} "
                                f"{redact(resp.text[:500])}")
        shapes = check_masks(example, resp.json())
        log(f"smoke request answered: mask {' '.join('x'.join(map(str, s)) for s in shapes)}")
    except BaseException:
        served.stop()
        raise
    return served
