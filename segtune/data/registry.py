"""The dataset registry: ``DATASETS`` by the name experiment files use, and its lookups.

Each entry is a module-level builder ``build(root, **options) -> RawDataset`` (one module per
dataset); ``SYNTH`` writes each real layout's synthetic twin, and ``synthetic_<x>`` reads the
twin back with the real reader. :func:`resolve` looks a name up and builds it;
:func:`check_dataset` validates every raw file of one.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from segtune.data import cityscapes, corsican_fire, folder, lucchi_em, qata_cov19, synthetic
from segtune.data.raw import RawDataset, scan
from segtune.data.synthetic import synth_em
from segtune.data.synthetic_layouts import synth_cityscapes, synth_fire, synth_folder, synth_qata
from segtune.errors import ConfigError

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
OPTION_FIELDS = ("classes", "description_file", "test_fraction", "split_seed", "intensity",
                 "masks", "channel")
#: Options whose default is spelled out in DatasetConfig: left out of the options (and so of
#: the store's key) at their default, so stores prepared before they existed are reused.
OPTION_DEFAULTS = {"intensity": "auto", "masks": "binary"}
#: Why a dataset has no such option, where that is worth saying.
_NO_OPTION = {("cityscapes", "masks"): "its masks are the label ids of the classes named by "
                                       "dataset.classes, one binary target per class"}


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

#: Real dataset name -> whether its samples carry their own text prompt, given its options:
#: Cityscapes' class names; QaTa-COV19's LViT descriptions when `description_file` is set.
#: The others' samples have none, so `prompt: text` there needs `prompt.text`.
SAMPLE_TEXT: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "cityscapes": lambda options: True,
    "qata_cov19": lambda options: bool(options.get("description_file")),
}


def carries_text(name: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether dataset `name` (a real name or its synthetic twin) gives samples their own text."""
    real = TWINS.get(name, name)
    return real in SAMPLE_TEXT and SAMPLE_TEXT[real](dict(options or {}))


def resolve(name: str, root: Path, options: Mapping[str, Any] | None = None) -> RawDataset:
    """Look ``name`` up in ``DATASETS`` and build it; ConfigError for unknown names/options.

    Options are the builder's keyword-only parameters (e.g. ``classes`` for cityscapes), so
    an option a dataset does not take is refused instead of silently ignored.
    """
    if name not in DATASETS:
        raise ConfigError(f"Unknown dataset {name!r} in dataset.name; known datasets: "
                          f"{', '.join(sorted(DATASETS))}.")
    builder = DATASETS[name]
    accepted = [p.name for p in inspect.signature(builder).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options or {}) - set(accepted))
    if unknown:
        why = _NO_OPTION.get((TWINS.get(name, name), unknown[0]))
        raise ConfigError(f"dataset.{unknown[0]}: the {name} dataset has no option "
                          f"{', '.join(unknown)}" + (f" ({why})" if why else "") + "; its "
                          f"options are {', '.join(accepted) if accepted else 'none'}.")
    return builder(Path(root), **dict(options or {}))


def check_dataset(name: str, root: Path, *, patch_size: int = 256, drop_empty: bool = True,
                  fit: str | None = None, options: Mapping[str, Any] | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Validate every raw file of a dataset without writing anything (``segtune data check``).

    Returns counts per raw split (items, samples, dropped as empty) and per class; raises
    :class:`DataProblems` listing every problem, each naming its file.
    """
    raw = resolve(name, Path(root), options)
    counts = scan(name, raw, patch_size=patch_size, fit=fit or raw.fit, drop_empty=drop_empty,
                  where=f"in the {name} data at {raw.root}",
                  say=progress or (lambda line: None))
    return {"dataset": name, "root": str(raw.root), "fit": fit or raw.fit,
            "patch_size": patch_size, **counts.summary()}
