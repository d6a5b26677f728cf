"""A trial's overlay figures, drawn and uploaded on a thread of their own.

The masks are predicted on the caller's thread, from the model as it is at that moment; the
PNG strips are then drawn (mostly zlib) and uploaded while the next epoch trains. For the tiny
SAM with 4 overlays that leaves 29 ms of a 116 ms round on the loop's thread
(benchmarks/bench_overlays.py; benchmarks/RESULTS.md, benchmark 1).

A figure never fails a trial: the first error, from either thread, is set on the run as tag
`segtune.overlay_error` when the log closes (an upload the server refused included). Only the
closing thread talks to the tracker's spool and tags; the uploads go straight to its client.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from segtune.models import Segmenter

ERROR_TAG = "segtune.overlay_error"


class OverlayLog:
    """Overlays of the first `count` samples of a loader, logged under a run's artifact paths."""

    def __init__(self, tracker: Any, count: int):
        self.tracker, self.count = tracker, count
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._error: str | None = None

    def log(self, model: Segmenter, loader: DataLoader, artifact_path: str = "overlays") -> None:
        """Predict now; draw and upload in the background."""
        if self.tracker is None or self.count <= 0 or getattr(self.tracker, "offline", False):
            return
        from segtune.evaluate import first_batches, score_prompted

        was_training = model.training
        try:
            _, examples = score_prompted(model, first_batches(loader, self.count), keep=self.count)
        except Exception as err:
            self._note(err)
            return
        finally:
            model.train(was_training)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="segtune-overlays")
        self._pending.append(self._pool.submit(_draw_and_upload, examples, self.tracker, artifact_path))

    def close(self) -> None:
        """Wait for every upload, then tag the run with the first failure, if any."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for future in self._pending:
            if future.exception() is not None:
                self._note(future.exception())
        self._pending = []
        if self._error is not None and self.tracker is not None:
            from tracking.runs import UNREACHABLE  # mlflow: only where a run is tracked

            try:
                self.tracker.set_tags({ERROR_TAG: self._error})
            except UNREACHABLE:  # a server that is away takes neither figures nor the reason
                pass
            self._error = None

    def _note(self, err: BaseException) -> None:
        if self._error is None:
            self._error = f"{err.__class__.__name__}: {err}"[:1000]

    def __enter__(self) -> "OverlayLog":
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        try:
            self.close()
        except Exception:
            if exc_type is None:  # else the error that ended the block is the one to see
                raise


def _draw_and_upload(examples: list, tracker: Any, artifact_path: str) -> None:
    from segtune.evaluate import write_overlays

    with tempfile.TemporaryDirectory(prefix="segtune-overlays-") as tmp:
        write_overlays(examples, Path(tmp))
        tracker.client.log_artifacts(tracker.run_id, tmp, artifact_path)
