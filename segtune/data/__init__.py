"""Datasets and the prepared patch store.

``DATASETS`` maps the name an experiment file uses (``dataset.name``) to a module-level
builder ``build(root, **options) -> RawDataset``: it locates the raw files under ``root``
(generating them first for the ``synthetic_*`` twins) without decoding anything; its
keyword-only parameters are the dataset's options (``classes`` for cityscapes, ...).
:func:`check_dataset` validates every raw file; :func:`prepare_store` turns a dataset into
memory-mapped patches once; :func:`open_store` gives torch Datasets over them.

Each real layout has a synthetic twin that writes the same files (``SYNTH``, used by
``segtune data synth``, the tests and the demo); ``synthetic_<x>`` reads it back with the
real reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segtune.data.raw import DataProblems, RawDataset, RawItem, Target
from segtune.data.registry import (
    DATASETS,
    OPTION_DEFAULTS,
    OPTION_FIELDS,
    SYNTH,
    TWINS,
    carries_text,
    check_dataset,
)
from segtune.data.store import SegDataset, Store, open_store, prepare_store
from segtune.data.synthetic import synth_em
from segtune.data.synthetic_layouts import synth_cityscapes, synth_fire, synth_folder, synth_qata


def synthesize(name: str, out: Path, seed: int = 0) -> str:
    """Write the synthetic twin of ``name`` (a real or ``synthetic_*`` name) into ``out``.

    Returns the real dataset name whose reader reads it.
    """
    from segtune.errors import ConfigError

    real = TWINS.get(name, name)
    if real not in SYNTH:
        raise ConfigError(f"No synthetic generator for {name!r}; known names: "
                          f"{', '.join(sorted([*SYNTH, *TWINS]))}.")
    SYNTH[real](Path(out), seed=seed)
    return real


def dataset_options(config: Any) -> dict[str, Any]:
    """The dataset options set in a ``DatasetConfig``: the fields of OPTION_FIELDS that are
    not None and not at their default (``intensity: auto``, ``masks: binary``)."""
    options = {name: getattr(config, name, None) for name in OPTION_FIELDS}
    return {name: value for name, value in options.items()
            if value is not None and value != OPTION_DEFAULTS.get(name)}


__all__ = ["DATASETS", "OPTION_FIELDS", "SYNTH", "TWINS", "DataProblems", "RawDataset",
           "RawItem", "SegDataset", "Store", "Target", "carries_text", "check_dataset", "dataset_options",
           "open_store", "prepare_store", "synth_cityscapes", "synth_em", "synth_fire",
           "synth_folder", "synth_qata", "synthesize"]
