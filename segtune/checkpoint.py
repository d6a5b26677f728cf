"""Trial checkpoints: trainable weights as safetensors, optimizer state, epoch and the config used.

A checkpoint directory holds:
  model.safetensors      the parameters the policy trains (the rest comes from the base model)
  optimizer.safetensors  the optimizer's state tensors; its param groups in the file's metadata
  state.json             epoch, metrics, best-so-far, and the whole experiment config
Checkpoints written before optimizer.safetensors hold `optimizer.pt` (a `torch.save`d state
dict) instead; it is still read, with `weights_only=True`.
A checkpoint is therefore enough to rebuild the model: `load_model` builds the base model the
config names, then loads the trained weights over it, strictly.

A *full* checkpoint (`write_full`, what a registered model carries) holds every weight instead,
base and trained merged, with `"weights": "full"` in state.json and the files the
architecture needs besides the config in `assets/` (CLIPSeg's HF config and tokenizer):
`load_model` builds the bare architecture and loads the whole state dict over it, strictly, so
neither `model.checkpoint` nor a download is needed where it loads. Every state.json has URI
passwords and secret environment values masked (tracking.redact), as params and tags do.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from segtune.config import ExperimentConfig, validate
from segtune.errors import CheckpointError
from segtune.models import Segmenter, build_architecture, build_model, load_state_strict
from segtune.tensorfile import Packed, pack
from tracking.artifacts import recorded_hashes, verify_manifest, write_manifest
from tracking.errors import TrackingError
from tracking.redact import redact

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
LEGACY_OPTIMIZER = "optimizer.pt"
STATE = "state.json"
CARRIED = "best"  # the best epoch's checkpoint, inside a later one (CheckpointWriter.finish)
OPTIMIZER_META = "segtune.optimizer"  # optimizer.safetensors' metadata key: param groups, non-tensor state
FULL = "full"  # state.json's "weights" in a full checkpoint (write_full)
ASSETS = "assets"  # a full checkpoint's folder of Segmenter.save_assets files


class CheckpointWriter:
    """Writes one epoch's checkpoint while the loop validates.

    `start` copies the trainable weights and the optimizer state, already laid out as the files'
    bytes (the next step must not change what is being written), and writes them on a thread;
    `finish`, once the epoch's metrics are known, waits for it, adds state.json and the
    manifest, and swaps the directory in whole, so a crash mid-write never leaves a half
    checkpoint under the real name.
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
        # The copy is taken here, as the files' bytes (segtune.tensorfile); the thread only writes.
        files = {WEIGHTS: pack(model.trainable_state())}
        if optimizer is not None:
            files[OPTIMIZER] = _pack_optimizer(optimizer)
        self._error, self._hashes = None, {}

        def write() -> None:
            try:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp.mkdir(parents=True)
                # Hashed as written, off the loop's thread, for the manifest finish() writes.
                self._hashes = {name: packed.write(self.tmp / name) for name, packed in files.items()}
            except BaseException as err:  # re-raised on the loop's thread by finish()
                self._error = err

        self._thread = threading.Thread(target=write, name="segtune-checkpoint", daemon=True)
        self._thread.start()

    def finish(self, cfg: ExperimentConfig, state: dict[str, Any], carry: Path | None = None) -> Path:
        """Complete the checkpoint; `carry`, an earlier checkpoint (the best epoch's), goes
        inside it as `best/`, linked, and under the same manifest."""
        if self._thread is None:
            raise RuntimeError("CheckpointWriter.finish called before start")
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        write_state(self.tmp, {**state, "config": cfg.model_dump()})
        known = dict(self._hashes)
        if carry is not None:
            link_copy(carry, self.tmp / CARRIED)
            # Its files were hashed when it was written; its manifest says so.
            known.update({f"{CARRIED}/{name}": digest for name, digest in recorded_hashes(self.tmp / CARRIED).items()})
        write_manifest(self.tmp, known)  # so a copy cut short in transit is recognised (first_intact)
        shutil.rmtree(self.path, ignore_errors=True)
        self.tmp.rename(self.path)
        return self.path


def _pack_optimizer(optimizer: torch.optim.Optimizer) -> Packed:
    """The optimizer's state dict as one safetensors file: state tensors named
    "<param index>.<name>", param groups and any non-tensor state in the metadata."""
    sd = optimizer.state_dict()
    tensors, values = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            (tensors if isinstance(value, torch.Tensor) else values)[f"{index}.{name}"] = value
    meta = json.dumps({"param_groups": sd["param_groups"], "values": values})
    return pack(tensors, {OPTIMIZER_META: meta})


def _read_optimizer(f: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimizer.safetensors file back as a state dict for `optimizer`."""
    with safe_open(str(f), "pt") as handle:
        meta = json.loads((handle.metadata() or {})[OPTIMIZER_META])
        state: dict[int, dict[str, Any]] = {}
        for key in handle.keys():  # noqa: SIM118 — safe_open handles are not mappings
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = handle.get_tensor(key)
    for key, value in meta["values"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = meta["param_groups"]
    # JSON has no tuples; give back the ones the optimizer keeps as tuples (Adam's betas).
    for saved, live in zip(groups, optimizer.param_groups, strict=False):  # a mismatch is refused by load_state_dict
        for k, v in saved.items():
            if isinstance(live.get(k), tuple) and isinstance(v, list):
                saved[k] = tuple(v)
    return {"state": state, "param_groups": groups}


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


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """state.json, with URI passwords and secret environment values masked."""
    (Path(folder) / STATE).write_text(redact(json.dumps(state, indent=2, default=float)))


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
    f, legacy = Path(path) / OPTIMIZER, Path(path) / LEGACY_OPTIMIZER
    if not f.is_file() and not legacy.is_file():
        return False
    try:
        if f.is_file():
            state = _read_optimizer(f, optimizer)
        else:
            f = legacy
            state = torch.load(f, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)
    except Exception as err:  # corrupt, truncated, another optimizer's, or a pickle that is more than tensors
        raise CheckpointError(f"{f}: cannot read the optimizer state ({err.__class__.__name__}: "
                              f"{(str(err).splitlines() or [''])[0][:200]}).") from None
    return True


def first_intact(candidates: list[Path], log=print) -> Path | None:
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
    """Rebuild the model a checkpoint was trained as, with its weights, and the config used.

    A full checkpoint (`write_full`) is loaded into the bare architecture, every key strictly;
    a trial's checkpoint (trainable weights) over the base model its config names."""
    path = Path(path)
    state = read_state(path)
    cfg = validate(state["config"], f"{path}/{STATE}")
    if state.get("weights") == FULL:
        model = build_architecture(cfg.model, path / ASSETS)
        f = path / WEIGHTS
        try:
            weights = load_file(str(f))
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{f}: cannot read the model's weights ({err}).") from None
        load_state_strict(model, weights, str(f))
        return model, cfg
    model = build_model(cfg.model)
    load_weights(path, model)
    return model, cfg


def write_full(src: Path, dst: Path, extra: dict[str, Any] | None = None) -> Path:
    """A full checkpoint of trial checkpoint `src` in `dst`: every weight of the trained model
    (base and trained parts merged) as safetensors, its state and config (masked), the
    architecture's assets, and a sha256 manifest. Needs what `load_model(src)` needs (the base
    weights `model.checkpoint` names); what it writes needs none of it."""
    from safetensors.torch import save_file

    model, _ = load_model(src)
    dst = Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    # Cloned: tensors that share storage (tied weights) cannot be saved as they are.
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()},
              str(dst / WEIGHTS))
    model.save_assets(dst / ASSETS)
    state = read_state(src)
    write_state(dst, {**state, "weights": FULL, **(extra or {})})
    write_manifest(dst)
    return dst
