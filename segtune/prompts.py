"""Prompts from ground-truth masks: points, boxes and text, registered in PROMPTS by YAML name.

A prompt builder takes one mask `(H,W)` (numpy, 0/1), a numpy Generator and `PromptOptions`,
and returns a `Prompt`. For a store prepared with `dataset.masks: instances` the mask is the
sample's instance label map instead (0 background, 1..n one value per object) and
`PromptOptions.instances` is true: every builder treats any value > 0 as foreground, and
`k_points` places its points on the objects, not on connected components (which merge
touching objects). Points are `(x, y)` pixel coordinates with label 1 (foreground), as SAM
expects. Randomness comes only from the generator, so eval prompts are reproducible from a seed.

Empty masks: point and box prompts need foreground, so `needs_foreground(name)` is true for
them and the loaders leave empty-mask samples out (and say how many); `text` and `none` do not
look at the mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import ndimage


@dataclass
class Prompt:
    points: np.ndarray | None = None  # (N,2) float32 x,y
    labels: np.ndarray | None = None  # (N,) int64, 1 = foreground, 0 = background
    box: np.ndarray | None = None  # (4,) float32 x0,y0,x1,y1
    text: str | None = None


@dataclass(frozen=True)
class PromptOptions:
    """What a builder may need beyond the mask: train/eval, the text source, k, the box jitter."""

    train: bool = False
    text: str | None = None  # the YAML's fixed text, else the sample's own (class name, description)
    k: int = 3
    box_jitter: int = 20
    instances: bool = False  # the mask is an instance label map (see the module docstring)


def _fg(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("this prompt needs foreground, and the mask is empty")
    return ys, xs


def _points(xs: np.ndarray, ys: np.ndarray) -> Prompt:
    pts = np.stack([xs, ys], axis=1).astype(np.float32)
    return Prompt(points=pts, labels=np.ones(len(pts), dtype=np.int64))


def random_point(mask: np.ndarray, rng: np.random.Generator, opts: PromptOptions) -> Prompt:
    """One foreground pixel chosen uniformly (the thesis's training prompt)."""
    ys, xs = _fg(mask)
    i = rng.integers(len(xs))
    return _points(xs[i : i + 1], ys[i : i + 1])


def center_point(mask: np.ndarray, rng: np.random.Generator, opts: PromptOptions) -> Prompt:
    """The foreground pixel farthest from the boundary (inside even for rings and L-shapes)."""
    _fg(mask)
    dist = ndimage.distance_transform_edt(np.pad(mask > 0, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return _points(np.array([x]), np.array([y]))


def k_points(mask: np.ndarray, rng: np.random.Generator, opts: PromptOptions) -> Prompt:
    """`k` foreground points: one per object first (largest first), then at random.

    The objects are the instance labels when `opts.instances` (the mask is a label map),
    else the connected components of the mask.
    """
    ys, xs = _fg(mask)
    if opts.instances:
        ids, flat = np.unique(mask[ys, xs], return_inverse=True)
        sizes = np.bincount(flat.ravel(), minlength=len(ids))
        order = np.argsort(-sizes, kind="stable")  # equal sizes: the lower label first
    else:
        labels, n = ndimage.label(mask > 0)
        flat = labels[ys, xs] - 1
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
        order = np.argsort(-sizes)
    chosen: list[int] = []
    for obj in order[: opts.k]:
        members = np.flatnonzero(flat == obj)
        chosen.append(int(rng.choice(members)))
    while len(chosen) < opts.k:
        chosen.append(int(rng.integers(len(xs))))
    idx = np.array(chosen)
    return _points(xs[idx], ys[idx])


def box(mask: np.ndarray, rng: np.random.Generator, opts: PromptOptions) -> Prompt:
    """The tight box; at train time each side moves 0..box_jitter px outward (MedSAM's recipe)."""
    ys, xs = _fg(mask)
    h, w = mask.shape
    b = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)
    if opts.train and opts.box_jitter > 0:
        shift = rng.integers(0, opts.box_jitter + 1, size=4).astype(np.float32)
        b += shift * np.array([-1, -1, 1, 1], dtype=np.float32)
        b = np.clip(b, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)
    return Prompt(box=b)


def jittered_box(mask: np.ndarray, rng: np.random.Generator, opts: PromptOptions) -> Prompt:
    """An eval prompt: the tight box with the training-time jitter of `box` (each side 0..box_jitter
    px outward), drawn from the seeded generator like every eval prompt (segtune robustness)."""
    return box(mask, rng, replace(opts, train=True))


def text(mask: np.ndarray, rng: np.random.Generator, opts: PromptOptions) -> Prompt:
    """A text prompt: the YAML's `prompt.text`, else the sample's class name or description."""
    if not opts.text:
        raise ValueError("the text prompt needs prompt.text in the experiment file or a dataset "
                         "whose samples carry text (a class name or description)")
    return Prompt(text=opts.text)


def none(mask: np.ndarray, rng: np.random.Generator, opts: PromptOptions) -> Prompt:
    """No prompt: automatic mask generation."""
    return Prompt()


PROMPTS: dict[str, Callable[[np.ndarray, np.random.Generator, PromptOptions], Prompt]] = {
    "random_point": random_point,
    "center_point": center_point,
    "k_points": k_points,
    "box": box,
    "jittered_box": jittered_box,
    "text": text,
    "none": none,
}

_MASK_FREE = {"text", "none"}


def needs_foreground(name: str) -> bool:
    """Whether the strategy reads points or boxes off the mask (so empty masks are skipped)."""
    return name not in _MASK_FREE


@dataclass
class PromptBatch:
    """Prompts for a batch, stacked as tensors (each field None when the strategy has none)."""

    points: torch.Tensor | None = None  # (B,N,2)
    labels: torch.Tensor | None = None  # (B,N)
    boxes: torch.Tensor | None = None  # (B,4)
    texts: list[str] | None = None

    def to(self, device: torch.device, **_: object) -> PromptBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptBatch(move(self.points), move(self.labels), move(self.boxes), self.texts)


def stack(prompts: list[Prompt]) -> PromptBatch:
    """Stack per-image prompts into tensors; all prompts of a batch come from one strategy."""
    first = prompts[0]
    batch = PromptBatch()
    if first.points is not None:
        batch.points = torch.from_numpy(np.stack([p.points for p in prompts]))
        batch.labels = torch.from_numpy(np.stack([p.labels for p in prompts]))
    if first.box is not None:
        batch.boxes = torch.from_numpy(np.stack([p.box for p in prompts]))
    if first.text is not None:
        batch.texts = [p.text for p in prompts]
    return batch
