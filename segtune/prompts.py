"""Prompts from ground-truth masks: points and boxes, registered in PROMPTS by YAML name.

A prompt builder takes one mask `(H,W)` (numpy, 0/1) and a numpy Generator and returns a
`Prompt`. Points are `(x, y)` pixel coordinates with label 1 (foreground), as SAM expects.
Randomness comes only from the generator, so eval prompts are reproducible from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass
class Prompt:
    points: np.ndarray | None = None  # (N,2) float32 x,y
    labels: np.ndarray | None = None  # (N,) int64, 1 = foreground, 0 = background
    box: np.ndarray | None = None  # (4,) float32 x0,y0,x1,y1
    text: str | None = None


def _centre_fallback(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    return np.array([[w / 2, h / 2]], dtype=np.float32)


def random_point(mask: np.ndarray, rng: np.random.Generator) -> Prompt:
    """One point drawn uniformly from the foreground (the image centre if the mask is empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        pts = _centre_fallback(mask)
    else:
        i = rng.integers(len(xs))
        pts = np.array([[xs[i], ys[i]]], dtype=np.float32)
    return Prompt(points=pts, labels=np.ones(1, dtype=np.int64))


def center_point(mask: np.ndarray, rng: np.random.Generator) -> Prompt:
    """The foreground pixel nearest the mask's centroid (always inside the mask)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        pts = _centre_fallback(mask)
    else:
        cy, cx = ys.mean(), xs.mean()
        i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        pts = np.array([[xs[i], ys[i]]], dtype=np.float32)
    return Prompt(points=pts, labels=np.ones(1, dtype=np.int64))


def box(mask: np.ndarray, rng: np.random.Generator) -> Prompt:
    """The tight bounding box of the foreground (the whole image if the mask is empty)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    b = [0, 0, w - 1, h - 1] if len(xs) == 0 else [xs.min(), ys.min(), xs.max(), ys.max()]
    return Prompt(box=np.asarray(b, dtype=np.float32))


PROMPTS: dict[str, Callable[[np.ndarray, np.random.Generator], Prompt]] = {
    "random_point": random_point,
    "center_point": center_point,
    "box": box,
}


@dataclass
class PromptBatch:
    """Prompts for a batch, stacked as tensors (each field None when the strategy has none)."""

    points: torch.Tensor | None = None  # (B,N,2)
    labels: torch.Tensor | None = None  # (B,N)
    boxes: torch.Tensor | None = None  # (B,4)

    def to(self, device: torch.device) -> "PromptBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptBatch(move(self.points), move(self.labels), move(self.boxes))


def stack(prompts: list[Prompt]) -> PromptBatch:
    """Stack per-image prompts into tensors; all prompts of a batch come from one strategy."""
    first = prompts[0]
    batch = PromptBatch()
    if first.points is not None:
        batch.points = torch.from_numpy(np.stack([p.points for p in prompts]))
        batch.labels = torch.from_numpy(np.stack([p.labels for p in prompts]))
    if first.box is not None:
        batch.boxes = torch.from_numpy(np.stack([p.box for p in prompts]))
    return batch
