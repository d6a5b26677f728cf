"""Trial checkpoints: trainable weights as safetensors, optimizer state, epoch and the config used.

A checkpoint directory holds:
  model.safetensors   the parameters the policy trains (the rest comes from the base model)
  optimizer.pt        the optimizer's state dict (read back with `weights_only=True`)
  state.json          epoch, metrics, best-so-far, and the whole experiment config
A checkpoint is therefore enough to rebuild the model: `load_model` builds the base model the
config names, then loads the trained weights over it, strictly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from segtune.config import ExperimentConfig, validate
from segtune.errors import CheckpointError
from segtune.models import Segmenter, build_model, load_state_strict
from tracking.artifacts import verify_manifest, write_manifest
from tracking.errors import TrackingError

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def save_checkpoint(path: Path, model: Segmenter, optimizer: torch.optim.Optimizer | None,
                    cfg: ExperimentConfig, state: dict[str, Any]) -> Path:
    """Write a checkpoint directory (replacing one already there) and return its path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model.trainable_state(), str(tmp / WEIGHTS))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    (tmp / STATE).write_text(json.dumps({**state, "config": cfg.model_dump()}, indent=2, default=float))
    write_manifest(tmp)  # so a copy cut short in transit is recognised (first_intact)
    # Swap in whole, so a crash mid-write never leaves a half checkpoint under the real name.
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's state.json, with a clear error when it is not a segtune checkpoint."""
    f = Path(path) / STATE
    if not f.is_file():
        raise CheckpointError(f"{path}: not a segtune checkpoint (no {STATE}); expected a directory "
                              f"with {WEIGHTS}, {STATE} and optionally {OPTIMIZER}.")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{f}: corrupt checkpoint state ({err}).") from None


def load_weights(path: Path, model: Segmenter) -> None:
    """Load a checkpoint's trained weights into `model` (strict on the trainable keys)."""
    f = Path(path) / WEIGHTS
    try:
        state = load_file(str(f))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{f}: cannot read the checkpoint weights ({err}).") from None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    load_state_strict(model, state, str(f), only=trainable)


def load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> bool:
    """Restore optimizer state if the checkpoint has it; True when it did."""
    f = Path(path) / OPTIMIZER
    if not f.is_file():
        return False
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or a pickle that is more than tensors
        raise CheckpointError(f"{f}: cannot read the optimizer state ({err.__class__.__name__}: "
                              f"{(str(err).splitlines() or [''])[0][:200]}).") from None
    optimizer.load_state_dict(state)
    return True


def first_intact(candidates: list[Path], log=print) -> Path | None:  # noqa: ANN001
    """The first checkpoint whose files match their manifest and whose state reads; None if none.

    Used on restore: when the newest checkpoint was cut short (a node died mid-upload), the
    trial goes on from the one before rather than failing or trusting damaged weights.
    """
    for path in candidates:
        try:
            verify_manifest(path)
            read_state(path)
            return path
        except (TrackingError, CheckpointError) as err:
            log(f"checkpoint {path} is damaged, trying an older one: {err}")
    return None


def load_model(path: Path) -> tuple[Segmenter, ExperimentConfig]:
    """Rebuild the model a checkpoint was trained as, with its weights, and the config used."""
    state = read_state(path)
    cfg = validate(state["config"], f"{path}/{STATE}")
    model = build_model(cfg.model)
    load_weights(path, model)
    return model, cfg
