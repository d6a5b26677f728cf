"""Checks and data every command runs before it starts anything: names, folders, the patch store."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from segtune.config import ExperimentConfig
from segtune.data import dataset_options, open_store, prepare_store
from segtune.errors import ConfigError
from segtune.losses import LOSSES
from segtune.models import MODELS
from segtune.prompts import PROMPTS

Log = Callable[[str], None]


def prepare_data(cfg: ExperimentConfig, log: Log = print) -> tuple[Path, str]:
    """Prepare (or reuse) the experiment's patch store; returns its path and content hash."""
    d = cfg.dataset
    store = prepare_store(d.name, Path(d.root), Path(d.cache_dir), patch_size=d.patch_size,
                          drop_empty=d.drop_empty, val_fraction=d.val_fraction, seed=cfg.train.seed,
                          fit=d.fit, options=dataset_options(d), progress=log)
    return store.resolve(), open_store(store).hash


def check_names(cfg: ExperimentConfig) -> None:
    """Registry names and policies in the config, checked before anything starts."""
    checks = [("model.name", cfg.model.name, MODELS), ("train.loss", cfg.train.loss, LOSSES),
              ("prompt.train", cfg.prompt.train, PROMPTS), ("prompt.eval", cfg.prompt.eval, PROMPTS)]
    for field, value, registry in checks:
        if value not in registry:
            raise ConfigError(f"{field}: unknown value {value!r}; expected one of {', '.join(registry)}.")


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
