"""SAM's automatic mask generator (AMG) scored against a binary class mask.

The generator segments *everything* in an image and knows nothing of the class asked for, so
its masks have to be matched to the ground truth before an IoU means anything. Two protocols,
both logged (docs/study.md says which one the thesis's 92.3% most plausibly is):

- **union inside** (`test/iou`, `test/dice`): the union of the generated masks of which at least
  `eval.amg.inside_threshold` of the area lies inside the ground truth, scored against it. A
  class mask made of several objects (five cars) is covered by several masks, as a person
  picking SAM's masks for "car" would do.
- **best single mask** (`test/iou_best_mask`, `test/dice_best_mask`): the one generated mask
  (or none) with the highest IoU against the ground truth; SAM's own "oracle" evaluation.

Both use the ground truth to choose among the masks, so both are upper bounds on what an
automatic pipeline would get; they differ in how many masks may be chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from segtune.config import AmgConfig
from segtune.errors import ConfigError
from segtune.models import Segmenter


def iou_np(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty (as segtune.metrics.iou)."""
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def dice_np(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (as segtune.metrics.dice)."""
    total = pred.sum() + gt.sum()
    return float(2 * np.logical_and(pred, gt).sum() / total) if total else 1.0


def union_inside(masks: Sequence[np.ndarray], gt: np.ndarray, inside: float) -> tuple[np.ndarray, int]:
    """The union of the masks lying mostly inside `gt` (fraction >= `inside`), and how many did."""
    gt = gt.astype(bool)
    union = np.zeros(gt.shape, dtype=bool)
    kept = 0
    for m in masks:
        m = m.astype(bool)
        area = m.sum()
        if area and np.logical_and(m, gt).sum() / area >= inside:
            union |= m
            kept += 1
    return union, kept


def best_single(masks: Sequence[np.ndarray], gt: np.ndarray) -> np.ndarray:
    """The generated mask with the highest IoU against `gt`; the empty mask competes too,
    so an image where SAM found nothing (or the ground truth is empty) is scored fairly."""
    gt = gt.astype(bool)
    best, best_iou = np.zeros(gt.shape, dtype=bool), iou_np(np.zeros(gt.shape, dtype=bool), gt)
    for m in masks:
        score = iou_np(m.astype(bool), gt)
        if score > best_iou:
            best, best_iou = m.astype(bool), score
    return best


def amg_scores(masks: Sequence[np.ndarray], gt: np.ndarray, inside: float) -> tuple[dict[str, float], np.ndarray]:
    """Both protocols for one image: metrics (without split prefix) and the union mask."""
    union, kept = union_inside(masks, gt, inside)
    single = best_single(masks, gt)
    gt = gt.astype(bool)
    metrics = {"iou": iou_np(union, gt), "dice": dice_np(union, gt),
               "iou_best_mask": iou_np(single, gt), "dice_best_mask": dice_np(single, gt),
               "masks": float(len(masks)), "masks_inside": float(kept)}
    return metrics, union


def build_generator(model: Segmenter, amg: AmgConfig):
    """A `SamAutomaticMaskGenerator` over the segment-anything `Sam` inside a segtune SAM.

    Only plain SAM (with or without encoder adapters, whose hooks live inside the `Sam`):
    MedSAM normalises images differently and PA-SAM decodes through its adapter, and the
    generator would silently bypass both.
    """
    from segment_anything import SamAutomaticMaskGenerator

    from segtune.models.sam import SamSegmenter

    if type(model) is not SamSegmenter:
        raise ConfigError(f"eval.protocol: amg runs SAM's automatic mask generator, which needs model.name sam "
                          f"(got {type(model).__name__}; MedSAM and PA-SAM preprocess or decode differently)")
    if amg.min_mask_region_area > 0:
        try:
            import cv2  # noqa: F401 — segment-anything needs it for small-region removal
        except ImportError:
            raise ConfigError("eval.amg.min_mask_region_area > 0 needs OpenCV (pip install "
                              "opencv-python-headless), as segment-anything removes small regions with it; "
                              "or set it to 0") from None
    return SamAutomaticMaskGenerator(
        model.sam, points_per_side=amg.points_per_side, points_per_batch=amg.points_per_batch,
        pred_iou_thresh=amg.pred_iou_thresh, stability_score_thresh=amg.stability_score_thresh,
        box_nms_thresh=amg.box_nms_thresh, crop_n_layers=amg.crop_n_layers,
        min_mask_region_area=amg.min_mask_region_area, output_mode="binary_mask",
    )


def hwc_rgb(image: torch.Tensor) -> np.ndarray:
    """A store image `(C,H,W)` uint8 as the generator wants it: `(H,W,3)` uint8 RGB."""
    x = image.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else np.ascontiguousarray(x)


def generate(generator, image: torch.Tensor) -> list[np.ndarray]:
    """The generator's binary masks `(H,W)` for one store image."""
    return [ann["segmentation"] for ann in generator.generate(hwc_rgb(image))]
