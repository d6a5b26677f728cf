"""A run's figures and per-image tables, drawn and uploaded on a thread of their own.

The masks are predicted on the caller's thread, from the model as it is at that moment; the
PNG strips are then drawn (mostly zlib) and uploaded while the next epoch trains. For the tiny
SAM with 4 overlays that leaves 29 ms of a 116 ms round on the loop's thread
(benchmarks/bench_overlays.py; benchmarks/RESULTS.md, benchmark 1).

`log_per_image` logs where a model fails on a scored split (a trial's test split, an
evaluation's split): the per-image table (`per_image/<split>.csv`, and `<split>.json` as
`mlflow.log_table` writes it), a histogram of the scores (`per_image/<split>_histogram.png`)
and overlays of the `eval.worst_k` lowest-IoU samples (`per_image/<split>_worst/`), re-read from the
loader's dataset by their store index and predicted again, so the scoring pass keeps no image.

A figure never fails a trial: the first error, from either thread, is set on the run as tag
`segtune.overlay_error` when the log closes (an upload the server refused included). Only the
closing thread talks to the tracker's spool and tags; the uploads go straight to its client.
Like every figure, the tables are skipped while the tracker is offline (the run's metrics,
their means, are spooled and arrive later).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Subset

from segtune.data import open_store
from segtune.models import Segmenter
from segtune.scoring import Example, ImageScore, first_batches, score_loader
from tracking.figures import overlay_strip, plot_histograms
from tracking.tables import write_csv, write_table_json

ERROR_TAG = "segtune.overlay_error"
PER_IMAGE = "per_image"
# Each row's id: the store sample index, then where index.json says the sample was cut from.
SAMPLE_COLUMNS = ("source", "slice", "y", "x", "class")


def write_overlays(examples: list[Example], folder: Path, names: Sequence[str] | None = None) -> list[Path]:
    """One PNG strip per example (tracking.figures.overlay_strip): image+prompt, truth, prediction;
    named `overlay_NN.png`, or `names[i]`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ex in enumerate(examples):
        img = overlay_strip(ex.image, ex.gt, ex.pred, points=ex.points, box=ex.box, text=ex.text, caption=ex.caption)
        paths.append(folder / (names[i] if names is not None else f"overlay_{i:02d}.png"))
        # zlib level 1: 2.5x faster to encode than PIL's default 6, and no larger on noisy
        # microscopy or X-ray strips (measured: 14 vs 34 ms, 317 vs 476 kB for a 768x256 strip).
        img.save(paths[-1], compress_level=1)
    return paths


def per_image_rows(records: Sequence[ImageScore], samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-image table, one row per scored sample in store order: `sample` (its index in the
    store), where it was cut from (`SAMPLE_COLUMNS`, from index.json's `samples`), then its scores
    (`iou`, `dice`, `foreground` and `predicted` fractions, and any boundary metric)."""
    return [{"sample": r.index, **{c: samples[r.index].get(c) for c in SAMPLE_COLUMNS}, **r.scores}
            for r in sorted(records, key=lambda r: r.index)]


def worst(records: Sequence[ImageScore], k: int) -> list[ImageScore]:
    """The `k` lowest-IoU samples, worst first (ties: lower store index first)."""
    return sorted(records, key=lambda r: (r.scores["iou"], r.index))[:max(k, 0)]


def write_per_image(records: Sequence[ImageScore], store: Path, split: str, folder: Path) -> list[Path]:
    """`<split>.csv`, `<split>.json` (mlflow.log_table's format) and `<split>_histogram.png` (the
    scores' distribution, tracking.figures.plot_histograms) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = per_image_rows(records, open_store(store).index["samples"])
    scores = [k for k in (records[0].scores if records else {}) if k not in ("foreground", "predicted")]
    scores = sorted(scores, key=lambda k: ("iou", "dice").index(k) if k in ("iou", "dice") else 2)
    return [write_csv(rows, folder / f"{split}.csv"), write_table_json(rows, folder / f"{split}.json"),
            plot_histograms({k: [row[k] for row in rows] for k in scores}, folder / f"{split}_histogram.png",
                            f"{split}: per-image scores of {len(rows)} images")]


def _store_indices(dataset: Any) -> np.ndarray:
    # A store split (SegDataset.indices), or one wrapped by the embedding cache (CachedSplit.split).
    while not hasattr(dataset, "indices"):
        dataset = dataset.split
    return np.asarray(dataset.indices)


def worst_examples(model: Segmenter, loader: DataLoader, chosen: Sequence[ImageScore]) -> list[Example]:
    """The `chosen` samples predicted again, in their order, re-read from `loader`'s dataset by
    store index with its collate (the same prompts: eval prompts are seeded by sample). The
    caption is the score the table holds."""
    position = {int(s): i for i, s in enumerate(_store_indices(loader.dataset))}
    subset = Subset(loader.dataset, [position[r.index] for r in chosen])
    batches = DataLoader(subset, batch_size=min(len(chosen), 8) or 1, collate_fn=loader.collate_fn)
    _, examples = score_loader(model, batches, keep=len(chosen))
    for rank, (ex, r) in enumerate(zip(examples, chosen, strict=True)):
        ex.caption = f"worst {rank + 1}: sample {r.index}, IoU {r.scores['iou']:.2f}"
    return examples


class OverlayLog:
    """Overlays of the first `count` samples of a loader (and, by `log_per_image`, a split's
    per-image table and worst samples), logged under a run's artifact paths.

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
        self._submit(_draw_and_upload, examples, self.tracker, artifact_path)

    def log_per_image(self, model: Segmenter, loader: DataLoader, records: Sequence[ImageScore], *,
                      store: Path, split: str, worst_k: int) -> None:
        """Where the model fails on `split`: its per-image table and histogram (`per_image/`) and
        overlays of its `worst_k` lowest-IoU samples (`per_image/<split>_worst/worst_NN_sample_S.png`),
        predicted now from `loader`'s dataset; written and uploaded in the background."""
        if self.tracker.offline or not records:
            return
        chosen, examples = worst(records, worst_k), []
        if chosen:
            was_training = model.training
            try:
                examples = worst_examples(model, loader, chosen)
            except Exception as err:
                self._note(err)
            finally:
                model.train(was_training)
        names = [f"worst_{i:02d}_sample_{r.index}.png" for i, r in enumerate(chosen)]
        self._submit(_write_per_image_and_upload, list(records), store, split, examples, names, self.tracker)

    def _submit(self, fn: Any, *args: Any) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="segtune-overlays")
        self._pending.append(self._pool.submit(fn, *args))

    def close(self) -> None:
        """Wait for every upload, then tag the run with the first failure, if any, and with the
        tables that went up (`mlflow.loggedArtifacts`, as `mlflow.log_table` sets it)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        tables = []
        for future in self._pending:
            if future.exception() is not None:
                self._note(future.exception())
            elif isinstance(future.result(), str):  # a per-image table, uploaded
                tables.append(future.result())
        self._pending = []
        tags = {} if self._error is None else {ERROR_TAG: self._error}
        if tables:
            from tracking.tables import logged_tables_tag

            tags.update(logged_tables_tag(tables))
        if tags:
            from tracking.runs import UNREACHABLE  # mlflow: only where a run is tracked

            try:
                self.tracker.set_tags(tags)
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


def _write_per_image_and_upload(records: list[ImageScore], store: Path, split: str, examples: list[Example],
                                names: list[str], tracker: Any) -> str:
    """Write and upload the table, histogram and worst overlays; returns the table's artifact path."""
    with tempfile.TemporaryDirectory(prefix="segtune-per-image-") as tmp:
        write_per_image(records, store, split, Path(tmp) / "table")
        tracker.upload(Path(tmp) / "table", PER_IMAGE)
        if examples:
            write_overlays(examples, Path(tmp) / "worst", names)
            tracker.upload(Path(tmp) / "worst", f"{PER_IMAGE}/{split}_worst")
    return f"{PER_IMAGE}/{split}.json"
