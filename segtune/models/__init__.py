"""Model families behind one interface (`Segmenter`), registered in MODELS by YAML name.

Each entry is a thin builder `(ModelConfig) -> Segmenter`: the config's variant, checkpoint
and training policy (which may add modules, such as SAM's encoder adapters).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from segtune.config import ModelConfig
from segtune.errors import ConfigError
from segtune.models.base import Segmenter, load_state_strict
from segtune.models.clipseg import build_clipseg, clipseg_architecture
from segtune.models.pasam import build_pasam
from segtune.models.sam import build_medsam, build_sam

MODELS: dict[str, Callable[[ModelConfig], Segmenter]] = {
    "sam": build_sam,
    "medsam": build_medsam,
    "pasam": build_pasam,
    "clipseg": build_clipseg,
}

POINTS = ("random_point", "center_point", "k_points")
#: The prompt strategies (segtune.prompts.PROMPTS) each family answers, checked before anything
#: is built: SAM and PA-SAM points and boxes (`none`: SAM's automatic mask generator), MedSAM
#: the box it was fine-tuned with (its published recipe), CLIPSeg text.
PROMPT_KINDS: dict[str, tuple[str, ...]] = {
    "sam": (*POINTS, "box", "jittered_box", "none"),
    "medsam": ("box", "jittered_box"),
    "pasam": (*POINTS, "box", "jittered_box"),
    "clipseg": ("text",),
}

# Random initialisation is seeded with this, so the frozen part of a randomly initialised model
# (the tiny presets) is the same in every process and a checkpoint of trainable weights suffices.
INIT_SEED = 0


#: How each family builds its architecture with no weights file read (random init), from the
#: config and the folder its `Segmenter.save_assets` wrote: a registered model loads its full
#: state dict over it, so it needs neither `model.checkpoint` nor a download.
ARCHITECTURES: dict[str, Callable[[ModelConfig, Path | None], Segmenter]] = {
    "sam": lambda cfg, _: build_sam(cfg, weights=False),
    "medsam": lambda cfg, _: build_medsam(cfg, weights=False),
    "pasam": lambda cfg, _: build_pasam(cfg, weights=False),
    "clipseg": clipseg_architecture,
}


def _seeded(make: Callable[[], Segmenter], cfg: ModelConfig) -> Segmenter:
    """`make()` under the fixed INIT_SEED (without touching the caller's RNG), policy applied."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = make()
    model.set_policy(cfg.freeze_policy)
    return model


def build_model(cfg: ModelConfig) -> Segmenter:
    """Build the model a config names, with its training policy applied."""
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {cfg.name!r}; expected one of {', '.join(MODELS)}")
    return _seeded(lambda: MODELS[cfg.name](cfg), cfg)


def build_architecture(cfg: ModelConfig, assets: Path | None = None) -> Segmenter:
    """The model a config names with random weights and no file read (`ARCHITECTURES`), its
    training policy applied: what a full state dict (a registered model's) loads into."""
    if cfg.name not in ARCHITECTURES:
        raise ConfigError(f"model.name: unknown model {cfg.name!r}; expected one of {', '.join(ARCHITECTURES)}")
    bare = cfg.model_copy(update={"checkpoint": None, "adapter_checkpoint": None})
    return _seeded(lambda: ARCHITECTURES[cfg.name](bare, assets), cfg)


__all__ = ["ARCHITECTURES", "MODELS", "PROMPT_KINDS", "Segmenter", "build_architecture", "build_model",
           "load_state_strict"]
