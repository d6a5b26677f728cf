"""From a prepared store to batches with prompts: which samples, how they batch, how prompts are drawn.

Training (`make_loaders`) and scoring without training (`eval_split`, `eval_loader`) draw
prompts the same way and drop the same samples: those whose mask is empty, when the prompt
needs foreground (a point or a box), via `SegDataset.with_foreground`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from segtune.cache import EmbeddingCache
from segtune.config import ExperimentConfig
from segtune.data import SegDataset, open_store
from segtune.errors import ConfigError
from segtune.prompts import PROMPTS, PromptOptions, needs_foreground, stack


class PromptCollate:
    """Batches samples and draws each one's prompt from its mask.

    The generator is seeded by (seed, epoch, sample index): training prompts change every
    epoch, evaluation prompts (epoch fixed at 0) are the same in every trial and every run.
    Samples of a `dataset.masks: instances` store carry `instances`, their objects' label
    map: prompts are drawn from it (one `k_points` point per object), the 0/1 mask still
    goes to the loss and the scores.
    """

    def __init__(self, strategy: str, seed: int, opts: PromptOptions):
        if strategy not in PROMPTS:
            raise ConfigError(f"prompt: unknown prompt strategy {strategy!r}; expected one of {', '.join(PROMPTS)}")
        self.build, self.seed, self.opts, self.epoch = PROMPTS[strategy], seed, opts, 0

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        prompts = []
        for it in items:
            opts = self.opts if self.opts.text else replace(self.opts, text=it.get("text") or None)
            rng = np.random.default_rng([self.seed, self.epoch, it["index"]])
            if "instances" in it:  # an instance label map (segtune.data.store)
                opts = replace(opts, instances=True)
                prompts.append(self.build(it["instances"][0].numpy(), rng, opts))
            else:
                prompts.append(self.build(it["mask"][0].numpy(), rng, opts))
        batch = {"image": torch.stack([it["image"] for it in items]),
                 "mask": torch.stack([it["mask"] for it in items]),
                 "prompts": stack(prompts),
                 "text": [it["text"] for it in items],
                 # Store sample indices: the per-image table's ids (segtune.scoring.score_loader).
                 "index": torch.tensor([it["index"] for it in items], dtype=torch.int64)}
        if "embedding" in items[0]:  # an embedding-cache split (segtune.cache)
            batch["embedding"] = torch.stack([it["embedding"] for it in items])
        return batch


def prompt_options(cfg: ExperimentConfig, *, train: bool = False) -> PromptOptions:
    """The `prompt:` section as the prompt builders take it."""
    p = cfg.prompt
    return PromptOptions(train=train, text=p.text, k=p.k, box_jitter=p.box_jitter)


def make_loaders(cfg: ExperimentConfig, store: Path, log: Callable[[str], None] = print,
                 cache: EmbeddingCache | None = None) -> tuple[DataLoader, DataLoader, DataLoader, PromptCollate]:
    """Train, validation and test loaders over the prepared store, with prompts drawn per sample.

    With `cache`, every batch also carries its images' cached encoder output (`embedding`).
    Returns the training loader's collate too: the loop sets its epoch.
    """
    data = open_store(store)
    splits = {s: data.split(s) for s in ("train", "val", "test")}
    caps = {"train": cfg.dataset.max_train, "val": cfg.dataset.max_eval, "test": cfg.dataset.max_eval}
    for s, cap in caps.items():
        strategy = cfg.prompt.train if s == "train" else cfg.prompt.eval
        if needs_foreground(strategy):
            before = len(splits[s])
            splits[s] = splits[s].with_foreground()
            if len(splits[s]) < before:
                log(f"{s}: {before - len(splits[s])} of {before} samples have an empty mask and no "
                    f"{strategy} prompt; left out")
        if cap is not None and len(splits[s]) > cap:
            splits[s] = splits[s].subset(cap)
        if len(splits[s]) == 0:
            raise ConfigError(f"dataset: the {s} split of {store} is empty; lower dataset.val_fraction "
                              "or check the data")
    if cache is not None:
        splits = {s: cache.wrap(ds) for s, ds in splits.items()}
    train_collate = PromptCollate(cfg.prompt.train, cfg.train.seed, prompt_options(cfg, train=True))
    eval_collate = PromptCollate(cfg.prompt.eval, cfg.train.seed, prompt_options(cfg))
    gen = torch.Generator().manual_seed(cfg.train.seed)
    io = loader_options(cfg)
    train = DataLoader(splits["train"], batch_size=cfg.train.batch_size, shuffle=True, generator=gen,
                       collate_fn=train_collate, drop_last=len(splits["train"]) > cfg.train.batch_size, **io)
    val = DataLoader(splits["val"], batch_size=cfg.train.batch_size, collate_fn=eval_collate, **io)
    test = DataLoader(splits["test"], batch_size=cfg.train.batch_size, collate_fn=eval_collate, **io)
    return train, val, test, train_collate


def loader_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """DataLoader workers and pinning from the trial's resources.

    The store is memory-mapped and nothing is decoded, so a batch costs little more than a
    copy and drawing prompts: one CPU of a trial's share stays with the loop, the others (up
    to 4) load batches; `resources.loader_workers` overrides. Workers are not persistent: the
    collate function's epoch (which seeds training prompts) reaches them as each epoch starts.
    Pinned memory only when there is a GPU to copy to.
    """
    workers = cfg.resources.loader_workers
    if workers is None:
        workers = max(0, min(4, int(cfg.resources.per_worker()["CPU"]) - 1))
    return {"num_workers": workers, "pin_memory": torch.cuda.is_available()}


def eval_split(cfg: ExperimentConfig, store: Path, split: str, sample: int | None) -> SegDataset:
    """The samples scored without training: the split, without empty masks where the eval
    prompt needs foreground (as in training), capped at `sample`."""
    ds = open_store(store).split(split)
    if cfg.eval.protocol == "prompted" and needs_foreground(cfg.prompt.eval):
        ds = ds.with_foreground()
    if sample is not None:
        ds = ds.subset(sample)
    if len(ds) == 0:
        raise ConfigError(f"eval: the {split} split of {store} has no sample to score with prompt.eval "
                          f"{cfg.prompt.eval!r}")
    return ds


def eval_loader(cfg: ExperimentConfig, ds: SegDataset) -> DataLoader:
    """Batches with eval prompts drawn exactly as a trial's test loader draws them."""
    collate = PromptCollate(cfg.prompt.eval, cfg.train.seed, prompt_options(cfg))
    return DataLoader(ds, batch_size=cfg.train.batch_size, collate_fn=collate)
