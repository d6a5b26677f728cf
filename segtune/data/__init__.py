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

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segtune.data import cityscapes, corsican_fire, folder, lucchi_em, qata_cov19, synthetic
from segtune.data.raw import DataProblems, RawDataset, RawItem, Target, check_dataset
from segtune.data.store import SegDataset, Store, open_store, prepare_store
from segtune.data.synthetic import synth_em
from segtune.data.synthetic_layouts import (synth_cityscapes, synth_fire, synth_folder,
                                            synth_qata)

#: Real dataset name -> writer of its synthetic twin, ``write(out, *, seed) -> out``.
SYNTH: dict[str, Callable[..., Path]] = {
    "cityscapes": synth_cityscapes,
    "corsican_fire": synth_fire,
    "lucchi_em": synth_em,
    "qata_cov19": synth_qata,
    "folder": synth_folder,
}
#: Synthetic dataset name -> the real dataset whose layout it writes.
TWINS = {"synthetic_cityscapes": "cityscapes", "synthetic_fire": "corsican_fire",
         "synthetic_em": "lucchi_em", "synthetic_qata": "qata_cov19",
         "synthetic_folder": "folder"}
#: DatasetConfig fields that are dataset options (builder keyword arguments) when set.
OPTION_FIELDS = ("classes", "description_file", "test_fraction", "split_seed")


def _twin(real: str) -> Callable[..., RawDataset]:
    """A builder that writes the synthetic twin into an empty or missing root, then reads
    it with the real dataset's builder (whose options it takes)."""
    read = DATASETS[real]

    @functools.wraps(read)
    def build(root: Path, **options: Any) -> RawDataset:
        root = Path(root)
        if not root.is_dir() or not any(root.iterdir()):
            SYNTH[real](root)
        return read(root, **options)

    build.__doc__ = f"Synthetic {real}: written into ``root`` if it is empty, then read."
    return build


DATASETS: dict[str, Callable[..., RawDataset]] = {
    "cityscapes": cityscapes.build,
    "corsican_fire": corsican_fire.build,
    "lucchi_em": lucchi_em.build,
    "qata_cov19": qata_cov19.build,
    "folder": folder.build,
}
DATASETS.update({name: _twin(real) for name, real in TWINS.items() if name != "synthetic_em"})
# The EM twin keeps its own builder: it regenerates when any of the four stacks is missing.
DATASETS["synthetic_em"] = synthetic.build


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
    """The dataset options set in a ``DatasetConfig`` (the fields of OPTION_FIELDS not None)."""
    return {name: getattr(config, name) for name in OPTION_FIELDS
            if getattr(config, name, None) is not None}


__all__ = ["DATASETS", "OPTION_FIELDS", "SYNTH", "TWINS", "DataProblems", "RawDataset",
           "RawItem", "SegDataset", "Store", "Target", "check_dataset", "dataset_options",
           "open_store", "prepare_store", "synth_cityscapes", "synth_em", "synth_fire",
           "synth_folder", "synth_qata", "synthesize"]
