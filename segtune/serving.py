"""The MLflow pyfunc model a promoted trial is registered as ("models from code").

MLflow logs this file itself, not a pickled object. The registered version carries everything
it needs (segtune.promotion): the full weights and config (artifact `model`, a full checkpoint,
segtune.checkpoint.write_full), CLIPSeg's tokenizer files, segtune's own code (`code_paths`)
and pinned requirements, so it loads where neither the training folders nor segtune are.

    model = mlflow.pyfunc.load_model("models:/segtune-sam_tiny-synthetic_em@champion")
    masks = model.predict({"image": img, "points": [[120, 88]]})   # img: (H,W) or (H,W,C) uint8
    # (trained with dataset.intensity other than auto: raw 16-bit or float pixels, mapped alike)
    masks = model.predict({"image": img, "box": [80, 60, 170, 130]})
    masks = clipseg.predict({"image": img, "text": "mitochondria"})

Input: one dict, a list of dicts, or a DataFrame (what MLflow hands over after checking the
signature), each with `image` and at most one kind of prompt: `points` (N x 2, x/y pixels,
with optional `labels`, 1 = foreground), `box` (x0, y0, x1, y1) or `text`. Which kinds a
model answers follows its family (segtune.models.PROMPT_KINDS). Without a prompt: the config's
`prompt.text` for CLIPSeg, the whole image as box for a box-only family (MedSAM), else the
image centre as a point. Output: uint8 masks (0/1), one `(H,W)` array per input.

An ensemble (`segtune promote --ensemble`, a trial's K members) is one such model: its `model`
folder holds `ensemble.json` and one full checkpoint per member, whose mask logits are
averaged before the threshold (`load_registered`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

PROMPT_FIELDS = ("points", "labels", "box", "text")
ENSEMBLE = "ensemble.json"  # {"members": [subfolder, ...]}: full checkpoints averaged at the logit level


def _given(value: Any) -> bool:
    """False for what a DataFrame row holds where a field was left out (None, NaN)."""
    if value is None:
        return False
    return not (isinstance(value, float) and math.isnan(value))


def request_kinds(family_kinds: tuple[str, ...]) -> set[str]:
    """The request fields a family's prompt strategies answer: points, box, text."""
    from segtune.models import POINTS  # torch comes with it: only once a model is in play

    out = set()
    for kind in family_kinds:
        if kind in POINTS:
            out.add("points")
        elif kind in ("box", "text"):
            out.add(kind)
    return out


def logit_mean(models: list) -> Any:
    """One module whose mask logits are the mean of `models`' (each images + prompts in)."""
    import torch

    class LogitMean(torch.nn.Module):
        def __init__(self, members: list) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(members)

        def forward(self, images, prompts):
            return torch.stack([m(images, prompts) for m in self.members]).mean(0)

    return LogitMean(models)


def load_registered(path: Path) -> tuple[Any, Any]:
    """(model, config) of a registered `model` folder: one full checkpoint, or an ensemble of
    them (`ENSEMBLE`: the members' logits averaged; the first member's config)."""
    from segtune.checkpoint import load_model

    path = Path(path)
    if not (path / ENSEMBLE).is_file():
        return load_model(path)
    loaded = [load_model(path / sub) for sub in json.loads((path / ENSEMBLE).read_text())["members"]]
    return logit_mean([m for m, _ in loaded]), loaded[0][1]


class SegtuneMaskModel(PythonModel):
    # We take one dict, a list of dicts or a DataFrame of numpy arrays, which no type hint MLflow
    # validates expresses; this attribute (MLflow's own, see PythonModel.__init_subclass__) says so.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        import torch

        from segtune.models import PROMPT_KINDS  # torch is needed only once the model loads
        from tracking.artifacts import MANIFEST, verify_manifest

        # `model`: a full checkpoint; `checkpoint`: versions registered before it existed.
        path = Path(context.artifacts.get("model") or context.artifacts["checkpoint"])
        if (path / MANIFEST).is_file():
            verify_manifest(path)  # raises naming a file altered since it was registered
        self.model, self.cfg = load_registered(path)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.kinds = request_kinds(PROMPT_KINDS.get(self.cfg.model.name, ()))

    def _prompt(self, item: dict, h: int, w: int):
        import torch

        from segtune.prompts import PromptBatch

        asked = [k for k in ("points", "box", "text") if _given(item.get(k))]
        if len(asked) > 1:
            raise ValueError(f"one prompt per image: got {' and '.join(asked)}")
        if not asked:  # the model's own default
            if "text" in self.kinds and self.cfg.prompt.text:
                item, asked = {"text": self.cfg.prompt.text}, ["text"]
            elif "points" not in self.kinds and "box" in self.kinds:
                item, asked = {"box": [0, 0, w - 1, h - 1]}, ["box"]
            elif "points" in self.kinds:
                item, asked = {"points": [[w / 2, h / 2]]}, ["points"]
            else:
                raise ValueError(f"{self.cfg.model.key} needs a prompt: one of {sorted(self.kinds)}")
        kind = asked[0]
        if kind not in self.kinds:
            raise ValueError(f"{self.cfg.model.key} answers {' or '.join(sorted(self.kinds))} prompts, not {kind}")
        prompts = PromptBatch()
        if kind == "text":
            prompts.texts = [str(item["text"])]
        elif kind == "box":
            box = np.array(item["box"], dtype=np.float32)
            if box.size != 4:
                raise ValueError(f"box: expected [x0, y0, x1, y1], got {box.size} numbers")
            prompts.boxes = torch.from_numpy(box.reshape(1, 4))
        else:
            pts = np.array(item["points"], dtype=np.float32).reshape(-1, 2)
            labels = item.get("labels")
            labels = np.array(labels if _given(labels) else np.ones(len(pts)), dtype=np.int64).reshape(-1)
            if len(labels) != len(pts):
                raise ValueError(f"labels: {len(labels)} labels for {len(pts)} points")
            prompts.points, prompts.labels = torch.from_numpy(pts)[None], torch.from_numpy(labels)[None]
        return prompts

    def _eight_bit(self, image: np.ndarray) -> np.ndarray:
        """The request's pixels as the store held them in training: mapped to 8 bit by the
        training data's `dataset.intensity` (a 16-bit microscope image as it comes), or, under
        `auto`, clipped to 0..255."""
        # Not segtune.data: its package imports every dataset module and their dependencies,
        # which a served model's environment does not carry.
        from segtune.intensity import parse_intensity, to_uint8

        intensity = parse_intensity(self.cfg.dataset.intensity)
        if intensity == "auto" or image.dtype == np.uint8:
            return np.clip(image, 0, 255).astype(np.uint8)
        return to_uint8(image, intensity, Path("the request's image"))

    def _one(self, item: dict) -> np.ndarray:
        import torch

        if not _given(item.get("image")):
            raise ValueError("each input needs an `image`: (H,W) or (H,W,C) numbers 0-255")
        image = np.asarray(item["image"])
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ValueError(f"image: expected (H,W) or (H,W,C) with C 1 or 3, got shape {image.shape}")
        image = self._eight_bit(image)
        h, w = image.shape[:2]
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(self.device)
        prompts = self._prompt(item, h, w).to(self.device)
        with torch.no_grad():
            logits = self.model(x, prompts)
        return (logits[0, 0] > 0).cpu().numpy().astype(np.uint8)

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a DataFrame
            items = model_input.to_dict("records")
        else:
            items = model_input if isinstance(model_input, list) else [model_input]
        return [self._one(dict(item)) for item in items]


mlflow.models.set_model(SegtuneMaskModel())
