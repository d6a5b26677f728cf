"""Tables as run artifacts: a CSV to open anywhere, and the JSON that `mlflow.log_table` writes.

`MlflowClient.log_table` stores a table as pandas' `orient="split"` JSON (`{"columns": [...],
"data": [[...], ...]}`) and lists its path in the run's tag `mlflow.loggedArtifacts`, where
`MlflowClient.load_table` and the UI find it. Writing the same file here lets the table go up
with a run's other files in one upload (segtune.overlay_log), with neither pandas nor a second
round trip; `logged_tables_tag` is the tag to set once it is up.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One line per row under a header of every key, in first-seen order (missing: empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_table_json(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """The rows as `mlflow.log_table`'s JSON (pandas `orient="split"`, no index)."""
    columns = _columns(rows)
    path.write_text(json.dumps({"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}))
    return path


def logged_tables_tag(artifact_files: Sequence[str]) -> dict[str, str]:
    """The tag that lists tables on a run as `log_table` does (it names every table of the run)."""
    # mlflow only where a run is tracked
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    return {MLFLOW_LOGGED_ARTIFACTS: json.dumps([{"path": p, "type": "table"} for p in artifact_files])}
