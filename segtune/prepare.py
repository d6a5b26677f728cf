"""Checks and data every command runs before it starts anything: names, folders, the patch store."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from segtune.config import ExperimentConfig
from segtune.data import carries_text, dataset_options, open_store, prepare_store
from segtune.errors import ConfigError
from segtune.losses import LOSSES
from segtune.models import MODELS, PROMPT_KINDS
from segtune.prompts import PROMPTS

Log = Callable[[str], None]


def prepare_data(cfg: ExperimentConfig, log: Log = print) -> tuple[Path, str]:
    """Prepare (or reuse) the experiment's patch store; returns its path and content hash."""
    d = cfg.dataset
    store = prepare_store(d.name, Path(d.root), Path(d.cache_dir), patch_size=d.patch_size,
                          drop_empty=d.drop_empty, val_fraction=d.val_fraction, seed=cfg.train.seed,
                          fit=d.fit, options=dataset_options(d), progress=log)
    return store.resolve(), open_store(store).hash


def prepare_run_data(cfg: ExperimentConfig, tags: dict[str, str], split: str = "val",
                     log: Log = print) -> tuple[Path, str]:
    """The store a finished run was scored on, from its config and tags: for a member of a trial
    with repeats (segtune.repeats), the sweep's store (`segtune.data_seed`, not the member's own
    train.seed) and, with `segtune.fold`, that fold's validation samples (segtune.data.folds).
    Returns the store (or fold view) and the store's content hash."""
    from segtune.data.folds import fold_view

    if tags.get("segtune.data_seed"):
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": int(tags["segtune.data_seed"])})})
    store, data_hash = prepare_data(cfg, log)
    if tags.get("segtune.fold") and split == "val":
        fold, k = (int(x) for x in tags["segtune.fold"].split("/"))
        store = fold_view(store, k, fold)
    return store, data_hash


def check_experiment(cfg: ExperimentConfig) -> None:
    """Everything about an experiment that can be judged before data or models are built: the
    registry names, and whether model, prompts and data fit together. Every command calls it first."""
    checks = [("model.name", cfg.model.name, MODELS), ("train.loss", cfg.train.loss, LOSSES),
              ("prompt.train", cfg.prompt.train, PROMPTS), ("prompt.eval", cfg.prompt.eval, PROMPTS)]
    for field, value, registry in checks:
        if value not in registry:
            raise ConfigError(f"{field}: unknown value {value!r}; expected one of {', '.join(registry)}.")
    check_fit(cfg)


def check_fit(cfg: ExperimentConfig) -> None:
    """The model answers the prompts asked of it, and text prompts have text to give."""
    name, takes = cfg.model.name, PROMPT_KINDS.get(cfg.model.name, ())
    if cfg.eval.protocol == "amg" and name != "sam":
        raise ConfigError(f"eval.protocol: amg is SAM's automatic mask generator; model.name is {name!r}. "
                          "Set model.name: sam, or eval.protocol: prompted.")
    # Zero-shot AMG draws no prompt; everything else draws prompt.eval, and training prompt.train.
    used = [("prompt.train", cfg.prompt.train)]
    if cfg.eval.protocol == "prompted":
        used.append(("prompt.eval", cfg.prompt.eval))
    for field, kind in used:
        if kind not in takes:
            fix = f"Set {field} to one of those" + (", or model.name: clipseg, the model that takes text"
                                                    if kind == "text" else "")
            raise ConfigError(f"{field}: model {name} does not take {kind!r} prompts; it takes "
                              f"{', '.join(takes)} (MedSAM was fine-tuned on boxes, CLIPSeg on text). {fix}.")
        if kind == "text" and not cfg.prompt.text and not carries_text(cfg.dataset.name, dataset_options(cfg.dataset)):
            raise ConfigError(f"prompt.text: {field} is `text`, but no prompt.text is set and the samples of "
                              f"dataset {cfg.dataset.name!r} carry no text of their own (Cityscapes' class names "
                              "and QaTa-COV19's descriptions with dataset.description_file do). Set prompt.text, "
                              "e.g. --set prompt.text=\"mitochondria\".")


def check_writable(cfg: ExperimentConfig, *, tune_storage: bool = True) -> None:
    """The folders a run writes to, tried before anything starts: the store's and the spool's,
    and with `tune_storage` Tune's `search.storage_path` (a URI storage is checked elsewhere)."""
    folders = {"dataset.cache_dir": cfg.dataset.cache_dir, "tracking.spool_dir": cfg.tracking.spool_dir}
    if tune_storage and "://" not in cfg.search.storage_path:
        folders["search.storage_path"] = cfg.search.storage_path
    for field, folder in folders.items():
        path = Path(folder).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".segtune-write-test-"):
                pass
        except OSError as err:
            raise ConfigError(f"{field}: cannot write to {path} ({err.strerror or err}); "
                              "point it at a folder this user can write to.") from None
