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
from segtune.scoring import Example, first_batches, score_loader
from tracking.figures import overlay_strip

ERROR_TAG = "segtune.overlay_error"


def write_overlays(examples: list[Example], folder: Path) -> list[Path]:
    """One PNG strip per example (tracking.figures.overlay_strip): image+prompt, truth, prediction."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ex in enumerate(examples):
        img = overlay_strip(ex.image, ex.gt, ex.pred, points=ex.points, box=ex.box, text=ex.text, caption=ex.caption)
        paths.append(folder / f"overlay_{i:02d}.png")
        # zlib level 1: 2.5x faster to encode than PIL's default 6, and no larger on noisy
        # microscopy or X-ray strips (measured: 14 vs 34 ms, 317 vs 476 kB for a 768x256 strip).
        img.save(paths[-1], compress_level=1)
    return paths


class OverlayLog:
    """Overlays of the first `count` samples of a loader, logged under a run's artifact paths.

    `tracker` is a `segtune.train.Tracker`: figures go up through its `upload`, and none are
    made while it is `offline` (spooling while the server is away, or an untracked trial).
    """

    def __init__(self, tracker: Any, count: int):
        self.tracker, self.count = tracker, count
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._error: str | None = None

    def log(self, model: Segmenter, loader: DataLoader, artifact_path: str = "overlays") -> None:
        """Predict now; draw and upload in the background."""
        if self.count <= 0 or self.tracker.offline:
            return
        was_training = model.training
        try:
            _, examples = score_loader(model, first_batches(loader, self.count), keep=self.count)
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
        if self._error is not None:
            from tracking.runs import UNREACHABLE  # mlflow: only where a run is tracked

            try:
                self.tracker.set_tags({ERROR_TAG: self._error})
            except UNREACHABLE:  # a server that is away takes neither figures nor the reason
                pass
            self._error = None

    def _note(self, err: BaseException) -> None:
        if self._error is None:
            self._error = f"{err.__class__.__name__}: {err}"[:1000]

    def __enter__(self) -> OverlayLog:
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        try:
            self.close()
        except Exception:
            if exc_type is None:  # else the error that ended the block is the one to see
                raise


def _draw_and_upload(examples: list[Example], tracker: Any, artifact_path: str) -> None:
    with tempfile.TemporaryDirectory(prefix="segtune-overlays-") as tmp:
        write_overlays(examples, Path(tmp))
        tracker.upload(Path(tmp), artifact_path)
