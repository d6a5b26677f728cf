"""Model families behind one interface (`Segmenter`), registered in MODELS by YAML name.

Each entry is a thin builder `(ModelConfig) -> Segmenter`: the config's variant, checkpoint
and training policy (which may add modules, such as SAM's encoder adapters).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from segtune.config import ModelConfig
from segtune.errors import ConfigError
from segtune.models.base import Segmenter, load_state_strict
from segtune.models.clipseg import build_clipseg
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
    "sam": (*POINTS, "box", "none"),
    "medsam": ("box",),
    "pasam": (*POINTS, "box"),
    "clipseg": ("text",),
}

# Random initialisation is seeded with this, so the frozen part of a randomly initialised model
# (the tiny presets) is the same in every process and a checkpoint of trainable weights suffices.
INIT_SEED = 0


def build_model(cfg: ModelConfig) -> Segmenter:
    """Build the model a config names, with its training policy applied."""
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {cfg.name!r}; expected one of {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        model = MODELS[cfg.name](cfg)
    model.set_policy(cfg.freeze_policy)
    return model


__all__ = ["MODELS", "PROMPT_KINDS", "Segmenter", "build_model", "load_state_strict"]
