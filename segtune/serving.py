"""The MLflow pyfunc model a promoted checkpoint is registered as ("models from code").

MLflow logs this file itself, not a pickled object; loading it rebuilds the model with
segtune from the checkpoint artifact. segtune must be installed where the model is loaded.

    model = mlflow.pyfunc.load_model("models:/segtune-sam_tiny-synthetic_em@champion")
    masks = model.predict({"image": img, "points": [[120, 88]]})   # img: (H,W) or (H,W,C) uint8

Input: one dict, or a list of dicts, each with `image` and a prompt — `points` (N x 2, x/y
pixels, with optional `labels`, 1 = foreground) or `box` (x0, y0, x1, y1). Without a prompt the
image centre is used as a point. Output: uint8 masks (0/1), one `(H,W)` array per input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class SegtuneMaskModel(PythonModel):
    # We take one dict or a list of dicts of numpy arrays, which no type hint MLflow validates
    # expresses; this attribute (MLflow's own, see PythonModel.__init_subclass__) says so.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from segtune.checkpoint import load_model  # torch is needed only once the model loads

        self.model, self.cfg = load_model(Path(context.artifacts["checkpoint"]))
        self.model.eval()

    def _one(self, item: dict) -> np.ndarray:
        import torch

        from segtune.prompts import PromptBatch

        image = np.asarray(item["image"], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        h, w = image.shape[:2]
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        prompts = PromptBatch()
        if item.get("box") is not None:
            prompts.boxes = torch.tensor(np.asarray(item["box"], dtype=np.float32)).reshape(1, 4)
        else:
            pts = np.asarray(item.get("points", [[w / 2, h / 2]]), dtype=np.float32).reshape(-1, 2)
            labels = np.asarray(item.get("labels", np.ones(len(pts))), dtype=np.int64)
            prompts.points, prompts.labels = torch.from_numpy(pts)[None], torch.from_numpy(labels)[None]
        with torch.no_grad():
            logits = self.model(x, prompts)
        return (logits[0, 0] > 0).numpy().astype(np.uint8)

    def predict(self, context, model_input, params=None):
        items = model_input if isinstance(model_input, list) else [model_input]
        return [self._one(dict(item)) for item in items]


mlflow.models.set_model(SegtuneMaskModel())
