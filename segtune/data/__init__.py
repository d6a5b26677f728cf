"""Datasets and the prepared patch store.

``DATASETS`` maps the name an experiment file uses (``dataset.name``) to a module-level
builder ``build(root) -> RawDataset``: it locates the raw files under ``root`` (generating them
first for synthetic datasets) without decoding anything. :func:`prepare_store` turns a dataset
into memory-mapped patches once; :func:`open_store` gives torch Datasets over them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from segtune.data import lucchi_em, synthetic
from segtune.data.store import RawDataset, SegDataset, Store, open_store, prepare_store
from segtune.data.synthetic import synth_em

DATASETS: dict[str, Callable[[Path], RawDataset]] = {
    "lucchi_em": lucchi_em.build,
    "synthetic_em": synthetic.build,
}

__all__ = ["DATASETS", "RawDataset", "SegDataset", "Store", "open_store", "prepare_store",
           "synth_em"]
