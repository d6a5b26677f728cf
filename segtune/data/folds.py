"""K-fold splits of a prepared store, grouped by source image, and fold views of it.

`search.repeats: {folds: K}` trains K members of one configuration, each validating on a
different fold of the store's training pool (its `train` and `val` splits together); the
`test` split never moves. A fold never splits a source image: every patch of one image (a
file, or one slice of a stack: index.json's `source` and `slice`) lies on one side, so a
member is never validated on patches whose neighbours it trained on.

`fold_view` writes a small store folder that `open_store` reads like any other: the arrays and
the embedding cache are links to the store's own, only index.json's `splits` differ. Trials
take a store path, so a member takes its fold by taking its view.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segtune.errors import DataError

_LINKED = ("images.npy", "masks.npy", "instances.npy")


def source_groups(samples: Sequence[dict[str, Any]], pool: Sequence[int]) -> dict[str, list[int]]:
    """The pool's sample indices by source image (`source` and `slice`), in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i in pool:
        s = samples[i]
        groups.setdefault(f"{s['source']}#{s.get('slice')}", []).append(int(i))
    return groups


def grouped_folds(index: dict[str, Any], k: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """K (train, val) lists of sample indices over the store's train+val pool, grouped by source.

    Groups are shuffled with `seed`, then each, largest first, joins the fold with the fewest
    samples so far, so folds hold about equal numbers of samples. Fold i validates on its own
    groups and trains on every other fold's. DataError when the pool has fewer than K images.
    """
    pool = sorted(int(i) for i in index["splits"]["train"] + index["splits"]["val"])
    groups = list(source_groups(index["samples"], pool).values())
    if len(groups) < k:
        raise DataError(f"search.repeats.folds: {k} folds need at least {k} source images in the training "
                        f"pool; the store has {len(groups)}. Use fewer folds, or repeats: {{seeds: {k}}}.")
    order = np.random.default_rng(seed).permutation(len(groups))
    # Stable by size: among equal sizes, the shuffled order decides.
    ranked = sorted((groups[i] for i in order), key=len, reverse=True)
    folds: list[list[int]] = [[] for _ in range(k)]
    for group in ranked:
        min(folds, key=len).extend(group)
    out = []
    for i in range(k):
        val = sorted(folds[i])
        train = sorted(j for f, members in enumerate(folds) if f != i for j in members)
        out.append((train, val))
    return out


def fold_view(store: Path, k: int, fold: int) -> Path:
    """A store folder whose train/val splits are fold `fold` of `k` (`grouped_folds`), under
    `<store>/folds/`; made once and reused. The test split, the arrays and the content hash
    (`index.json`'s `hash`: the same patches) are the store's; `fold` records which fold it is."""
    store = Path(store)
    target = store / "folds" / f"{k}-{fold}"
    if (target / "index.json").is_file():
        return target
    index = json.loads((store / "index.json").read_text())
    train, val = grouped_folds(index, k, seed=int(index["params"].get("seed", 0)))[fold]
    index["splits"] = {"train": train, "val": val, "test": index["splits"]["test"]}
    index["counts"]["samples"] = {s: len(ids) for s, ids in index["splits"].items()}
    index["fold"] = {"k": k, "fold": fold, "store": str(store)}
    target.parent.mkdir(parents=True, exist_ok=True)
    # One embedding cache for every fold: the view links the store's (made here if none yet).
    (store / "embeddings").mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name in (*_LINKED, "embeddings"):
            if (store / name).exists():
                os.symlink(Path("..", "..", name), tmp / name)
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another member made it first: its view is the same
            if not (target / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
