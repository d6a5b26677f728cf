"""What a trial could not send to the tracking server, kept on local disk until it can.

When the server is down, a trial keeps training; its metric batches, tags, final status and
checkpoint uploads are appended to `<spool_dir>/<run_id>.jsonl` (one JSON object per line, in
order). The same trial delivers them at its next successful flush; whatever is left when it
ends is delivered by the sweep driver, or later by `segtune sync`. Delivery skips metric points
the server already has (same key and step), so retrying never duplicates a point.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient


def spool_file(spool_dir: Path, run_id: str) -> Path:
    return Path(spool_dir) / f"{run_id}.jsonl"


def append(spool_dir: Path, run_id: str, entry: dict[str, Any]) -> None:
    """Add one entry (`metrics`, `tags`, `artifacts` or `terminate`) to the run's spool."""
    path = spool_file(spool_dir, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry["type"] == "artifacts":
        # The trial's folder may be gone by delivery time: keep our own copy.
        keep = path.with_suffix("") / f"artifacts-{sum(1 for _ in _entries(path))}"
        shutil.copytree(entry["local_dir"], keep, dirs_exist_ok=True)
        entry = {**entry, "local_dir": str(keep)}
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _entries(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill: its batch was never acknowledged either
    return out


def logged_steps(client: MlflowClient, run_id: str, keys: set[str]) -> set[tuple[str, int]]:
    """(key, step) pairs the server already holds for these keys."""
    have = set()
    for key in keys:
        have |= {(m.key, m.step) for m in client.get_metric_history(run_id, key)}
    return have


def deliver(client: MlflowClient, spool_dir: Path, run_id: str) -> int:
    """Send a run's spooled entries in order; remove the spool when all went. Returns entries sent.

    Raises whatever the client raises if the server is still unreachable (the spool stays).
    """
    path = spool_file(spool_dir, run_id)
    entries = _entries(path)
    if not entries:
        return 0
    keys = {m["key"] for e in entries if e["type"] == "metrics" for m in e["metrics"]}
    have = logged_steps(client, run_id, keys)
    for e in entries:
        if e["type"] == "metrics":
            fresh = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in e["metrics"]
                     if (m["key"], m["step"]) not in have]
            for i in range(0, len(fresh), 1000):
                client.log_batch(run_id, metrics=fresh[i : i + 1000])
            have |= {(m.key, m.step) for m in fresh}
        elif e["type"] == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in e["tags"].items()])
        elif e["type"] == "artifacts":
            client.log_artifacts(run_id, e["local_dir"], e["artifact_path"])
        elif e["type"] == "terminate":
            client.set_terminated(run_id, e["status"])
    path.unlink()
    shutil.rmtree(path.with_suffix(""), ignore_errors=True)
    return len(entries)


def deliver_all(uri: str, spool_dir: Path) -> dict[str, int | str]:
    """Deliver every spooled run under `spool_dir`: run id -> entries sent, or the error text."""
    client = MlflowClient(uri)
    report: dict[str, int | str] = {}
    for path in sorted(Path(spool_dir).glob("*.jsonl")):
        try:
            report[path.stem] = deliver(client, spool_dir, path.stem)
        except Exception as err:  # still unreachable, or refused: keep the spool, say why
            report[path.stem] = f"{err.__class__.__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return report
