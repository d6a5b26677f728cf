"""Figures from arrays and run data: mask overlays (PIL) and report plots (matplotlib, Agg).

Plain numpy/PIL/matplotlib, no torch: the trial loop and `segtune eval` hand over uint8 images
and boolean masks, and `segtune report` draws from what MLflow returns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GT_COLOUR, PRED_COLOUR, PROMPT_COLOUR = (0, 200, 0), (230, 30, 30), (255, 220, 0)


def _tint(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.45) -> np.ndarray:
    out = rgb.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.array(colour, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    if not text:
        return
    left, top, right, bottom = draw.textbbox(xy, text)
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.text(xy, text, fill=(255, 255, 255))


def overlay_strip(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, *, points: np.ndarray | None = None,
                  box: Sequence[float] | None = None, text: str | None = None, caption: str = "") -> Image.Image:
    """Three panels side by side, each the image's size: the image with its prompt drawn
    (points, box, text), the ground truth in green, the prediction in red.

    `image` is `(H,W)` or `(H,W,C)` uint8; `gt` and `pred` are `(H,W)` masks; `points` is
    `(N,2)` x/y pixels; `box` is x0, y0, x1, y1. The PNG is `(3W, H)`: no margins, so the
    pixels line up with the patch the model saw.
    """
    rgb = np.asarray(image, dtype=np.uint8)
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    h, w = gt.shape
    panels = [Image.fromarray(rgb), Image.fromarray(_tint(rgb, gt, GT_COLOUR)),
              Image.fromarray(_tint(rgb, pred, PRED_COLOUR))]
    first = ImageDraw.Draw(panels[0])
    r = max(2, w // 64)
    for x, y in ([] if points is None else np.asarray(points).reshape(-1, 2)):
        first.ellipse((x - r, y - r, x + r, y + r), outline=PROMPT_COLOUR, width=2)
        first.line((x - r, y, x + r, y), fill=PROMPT_COLOUR)
    if box is not None:
        first.rectangle(tuple(float(v) for v in box), outline=PROMPT_COLOUR, width=2)
    _label(first, (4, h - 14), f'"{text}"' if text else "")
    _label(first, (4, 4), caption)
    _label(ImageDraw.Draw(panels[1]), (4, 4), "ground truth")
    _label(ImageDraw.Draw(panels[2]), (4, 4), "prediction")
    strip = Image.new("RGB", (3 * w, h))
    for i, panel in enumerate(panels):
        strip.paste(panel, (i * w, 0))
    return strip


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_curves(histories: dict[str, dict[str, list[tuple[int, float]]]], path: Path, title: str) -> Path:
    """`train/dice_loss` and `val/dice` by epoch, one line per trial: `{trial: {metric: [(step, value)]}}`."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("train/dice_loss", "val/dice"), strict=True):
        for trial, metrics in sorted(histories.items()):
            points = sorted(metrics.get(key, []))
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", ms=3, label=trial)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_bars(rows: list[str], series: dict[str, list[float | None]], thesis: dict[str, list[float | None]],
              path: Path, title: str = "test IoU per model and dataset") -> Path:
    """Grouped bars of test IoU per row and setting, the thesis's value as a black marker."""
    plt = _plt()
    names = list(series)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))]
        ours = [v if v is not None else 0.0 for v in series[name]]
        ax.bar(xs, ours, width, label=name)
        refs = [(x, v) for x, v in zip(xs, thesis.get(name, []), strict=False) if v is not None]
        if refs:
            ax.scatter([x for x, _ in refs], [v for _, v in refs], marker="_", s=160, c="black", zorder=3,
                       label="thesis" if j == 0 else None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test IoU")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if "thesis" not in labels:  # the marker's legend entry, even when the first series had none
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", marker="_", ls="", ms=15))
        labels.append("thesis")
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_parallel(trials: list[dict[str, float]], axes: list[str], metric: str, path: Path, title: str) -> Path:
    """Parallel coordinates: one line per trial through its hyperparameters and `metric`,
    coloured by the metric. Each axis is scaled to its own range (lr on a log scale)."""
    plt = _plt()
    cols = [a for a in axes if any(a in t for t in trials)] + [metric]
    fig, ax = plt.subplots(figsize=(1.8 * len(cols) + 2, 4))

    def scaled(col: str) -> tuple[list[float], float, float]:
        raw = [t.get(col, math.nan) for t in trials]
        vals = [math.log10(v) if col.endswith("lr") and v > 0 else v for v in raw]
        finite = [v for v in vals if not math.isnan(v)] or [0.0]
        lo, hi = min(finite), max(finite)
        return [(v - lo) / (hi - lo) if hi > lo else 0.5 for v in vals], lo, hi

    table = {c: scaled(c) for c in cols}
    scores = [t.get(metric, math.nan) for t in trials]
    finite = [s for s in scores if not math.isnan(s)] or [0.0]
    lo, hi = min(finite), max(finite)
    cmap = plt.get_cmap("viridis")
    for i in range(len(trials)):
        colour = cmap((scores[i] - lo) / (hi - lo) if hi > lo and not math.isnan(scores[i]) else 0.5)
        ax.plot(range(len(cols)), [table[c][0][i] for c in cols], color=colour, marker="o", alpha=0.85)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{c}\n[{table[c][1]:.3g}, {table[c][2]:.3g}]" + (" (log10)" if c.endswith("lr") else "")
                        for c in cols], fontsize=8)
    ax.set_yticks([])
    for x in range(len(cols)):
        ax.axvline(x, color="grey", lw=0.8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_histograms(columns: dict[str, Sequence[float]], path: Path, title: str) -> Path:
    """One histogram per named column of per-image scores, side by side, each with its mean as
    a dashed line: `{"iou": [...], "dice": [...], "hd95": [...]}`. Scores in [0, 1] (all but
    `hd95`, in pixels) share 20 bins over [0, 1].

    Drawn with matplotlib's object API, not pyplot: it holds no global state, so a figure can
    be drawn on a background thread (segtune.overlay_log) while another thread draws.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * max(len(columns), 1) + 0.4, 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(columns), 1), squeeze=False)[0]
    for ax, (name, values) in zip(axes, columns.items(), strict=False):
        vals = np.asarray(values, dtype=float)
        unit = name != "hd95"
        ax.hist(vals, bins=np.linspace(0, 1, 21) if unit else 20, color="tab:blue", alpha=0.8)
        if len(vals):
            ax.axvline(vals.mean(), color="black", ls="--", lw=1, label=f"mean {vals.mean():.3g}")
            ax.legend(fontsize=8)
        ax.set_xlabel(f"{name} (px)" if not unit else name)
        ax.set_ylabel("images")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
