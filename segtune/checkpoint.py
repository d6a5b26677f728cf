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
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from segtune.config import ExperimentConfig, validate
from segtune.errors import CheckpointError
from segtune.models import Segmenter, build_model, load_state_strict
from tracking.artifacts import sha256_file, verify_manifest, write_manifest
from tracking.errors import TrackingError

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


class CheckpointWriter:
    """Writes one epoch's checkpoint while the loop validates.

    `start` copies the trainable weights and the optimizer state (the next step must not change
    what is being written) and serialises them on a thread; `finish`, once the epoch's metrics
    are known, waits for it, adds state.json and the manifest, and swaps the directory in whole,
    so a crash mid-write never leaves a half checkpoint under the real name.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._hashes: dict[str, str] = {}

    def start(self, model: Segmenter, optimizer: torch.optim.Optimizer | None) -> None:
        if self._thread is not None:
            raise RuntimeError("CheckpointWriter.start called twice without finish")
        weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.trainable_state().items()}
        opt_state = _copied(optimizer.state_dict()) if optimizer is not None else None
        self._error, self._hashes = None, {}

        def write() -> None:
            try:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp.mkdir(parents=True)
                save_file(weights, str(self.tmp / WEIGHTS))
                if opt_state is not None:
                    torch.save(opt_state, self.tmp / OPTIMIZER)
                # Hashed here too, off the loop's thread, for the manifest finish() writes.
                self._hashes = {p.name: sha256_file(p) for p in self.tmp.iterdir() if p.is_file()}
            except BaseException as err:  # re-raised on the loop's thread by finish()
                self._error = err

        self._thread = threading.Thread(target=write, name="segtune-checkpoint", daemon=True)
        self._thread.start()

    def finish(self, cfg: ExperimentConfig, state: dict[str, Any]) -> Path:
        if self._thread is None:
            raise RuntimeError("CheckpointWriter.finish called before start")
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        (self.tmp / STATE).write_text(json.dumps({**state, "config": cfg.model_dump()}, indent=2, default=float))
        write_manifest(self.tmp, self._hashes)  # so a copy cut short in transit is recognised (first_intact)
        shutil.rmtree(self.path, ignore_errors=True)
        self.tmp.rename(self.path)
        return self.path


def _copied(value: Any) -> Any:
    """A copy of an optimizer state dict whose tensors the next step cannot change."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


def save_checkpoint(path: Path, model: Segmenter, optimizer: torch.optim.Optimizer | None,
                    cfg: ExperimentConfig, state: dict[str, Any]) -> Path:
    """Write a checkpoint directory (replacing one already there) and return its path."""
    writer = CheckpointWriter(path)
    writer.start(model, optimizer)
    return writer.finish(cfg, state)


def link_copy(src: Path, dst: Path) -> None:
    """Copy a checkpoint directory as hard links where the filesystem allows.

    Checkpoint files are never rewritten in place (a new epoch's land in a new directory that
    is renamed over the old), so a linked copy stays what it was when it was taken.
    """

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # another filesystem, or links not supported
            shutil.copy2(a, b)

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=link)


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
