"""Scoring without training: zero-shot protocols, trained checkpoints, and their mask overlays.

`zero_shot(cfg)` scores the model the file names as built (official weights, or the random
tiny presets) on `eval.split`; `evaluate_checkpoint(cfg, ...)` scores a trained checkpoint
(a folder, a run's `checkpoints/best`, or a registered `models:/NAME@ALIAS`) on the file's
data with the file's `prompt.eval`. Each logs one MLflow run (`segtune.kind` `zero_shot` or
`eval`, see tracking.evals) with `<split>/iou` and `<split>/dice`, plus both AMG protocols
when `eval.protocol` is `amg` (segtune.amg), and overlay PNGs of the first few samples. A
prompted run also logs the boundary metrics of `eval.metrics` and where the model fails, as a
trial does on its test split: the per-image table and histogram (`per_image/<split>.*`) and
overlays of the `eval.worst_k` worst samples (`per_image/<split>_worst/`; segtune.overlay_log).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from segtune.config import ExperimentConfig, flatten
from segtune.data import SegDataset
from segtune.loaders import eval_loader, eval_split
from segtune.models import Segmenter
from segtune.overlay_log import OverlayLog, write_overlays
from segtune.prepare import Log, check_experiment, check_fit, prepare_data
from segtune.progress import track
from segtune.provenance import git_sha
from segtune.scoring import Example, ImageScore, hwc, score_loader
from segtune.trial import run_tags, tracked


@dataclass
class EvalResult:
    metrics: dict[str, float]
    run_id: str | None
    overlays: list[Path] = field(default_factory=list)


def score_amg(model: Segmenter, ds: SegDataset, cfg: ExperimentConfig, keep: int = 0,
              log: Log = print) -> tuple[dict[str, float], list[Example]]:
    """Both AMG protocols (segtune.amg), averaged per image, and overlay examples of the union."""
    from segtune.amg import amg_scores, build_generator, generate

    model.eval()
    generator = build_generator(model, cfg.eval.amg)
    totals: dict[str, float] = {}
    examples = []
    last: tuple[bytes, list[np.ndarray]] = (b"", [])
    for n in track(range(len(ds)), "AMG: generating masks", unit="images", line=log):
        item = ds[n]
        gt = item["mask"][0].numpy() > 0.5
        # The samples of one image (a Cityscapes scene, one per class) are stored one after
        # another: generate its masks once, not once per class.
        key = hashlib.sha1(item["image"].numpy().tobytes()).digest()
        if key != last[0]:
            last = (key, generate(generator, item["image"]))
        masks = last[1]
        scores, union = amg_scores(masks, gt, cfg.eval.amg.inside_threshold)
        for k, v in scores.items():
            totals[k] = totals.get(k, 0.0) + v
        if len(examples) < keep:
            examples.append(Example(hwc(item["image"]), gt, union, caption=(
                f"AMG {int(scores['masks'])} masks, {int(scores['masks_inside'])} inside; IoU {scores['iou']:.2f}")))
    return {k: v / len(ds) for k, v in totals.items()}, examples


def score(model: Segmenter, cfg: ExperimentConfig, store: Path, *, split: str | None = None,
          sample: int | None = None, keep: int = 0, per_image: list[ImageScore] | None = None,
          log: Log = print) -> tuple[dict[str, float], list[Example]]:
    """Score `model` on the store with the file's eval protocol; metrics are `<split>/<name>`.

    With a `per_image` list, a prompted protocol appends every sample's scores to it (the AMG
    protocol scores no per-image table)."""
    split = split or cfg.eval.split
    ds = eval_split(cfg, store, split, sample if sample is not None else cfg.eval.sample)
    return score_split(model, cfg, ds, split, keep=keep, per_image=per_image, log=log)


def score_split(model: Segmenter, cfg: ExperimentConfig, ds: SegDataset, split: str, *, keep: int = 0,
                per_image: list[ImageScore] | None = None, log: Log = print) -> tuple[dict[str, float], list[Example]]:
    """`score` on the samples `eval_split` chose."""
    if cfg.eval.protocol == "amg":
        metrics, examples = score_amg(model, ds, cfg, keep, log)
    else:
        metrics, examples = score_loader(model, eval_loader(cfg, ds), keep=keep, line=log,
                                         label=f"scoring {cfg.model.key} on {cfg.dataset.name} {split}",
                                         metrics=cfg.eval.metrics, per_image=per_image)
    out = {f"{split}/{k}": float(v) for k, v in metrics.items()}
    out[f"{split}/samples"] = float(len(ds))
    return out, examples


def run_name(kind: str, cfg: ExperimentConfig, split: str) -> str:
    """What the MLflow UI lists: kind, model, dataset and the prompt or AMG setting."""
    if cfg.eval.protocol == "amg":
        how = f"amg pps={cfg.eval.amg.points_per_side} iou>{cfg.eval.amg.pred_iou_thresh}"
    else:
        how = cfg.prompt.eval + (f" '{cfg.prompt.text}'" if cfg.prompt.text else "")
    return f"{kind} {cfg.model.key} {cfg.dataset.name} {how} [{split}]"


def score_and_log(cfg: ExperimentConfig, model: Segmenter, *, store: Path, data_hash: str, kind: str,
                  tags: dict[str, str] | None = None, split: str | None = None, sample: int | None = None,
                  parent_run_id: str | None = None, sweep_id: str = "none", trial_id: str | None = None,
                  name: str | None = None, log: Log = print) -> EvalResult:
    """Score, then log one run of `kind`: flattened config, metrics, overlays, the per-image
    table and worst samples (prompted protocol), final status."""
    from tracking.evals import log_folder, open_run

    split = split or cfg.eval.split
    run = open_run(cfg.tracking.uri, cfg.tracking.experiment, kind=kind, params=flatten(cfg),
                   run_name=name or run_name(kind.replace("_", "-"), cfg, split),
                   tags={**run_tags(cfg, git_sha=git_sha(), data_hash=data_hash, store=store),
                         "segtune.name": cfg.name, "segtune.protocol": cfg.eval.protocol,
                         "segtune.split": split, **(tags or {})},
                   parent_run_id=parent_run_id, sweep_id=sweep_id, trial_id=trial_id)
    with tracked(run):
        ds = eval_split(cfg, store, split, sample if sample is not None else cfg.eval.sample)
        records: list[ImageScore] = []
        metrics, examples = score_split(model, cfg, ds, split, keep=cfg.eval.overlays, per_image=records, log=log)
        run.log_metrics(metrics, step=0)
        run.flush()
        with tempfile.TemporaryDirectory(prefix="segtune-overlays-") as tmp:
            paths = write_overlays(examples, Path(tmp))
            log_folder(run, Path(tmp), "overlays")
        with OverlayLog(run, 0) as figures:  # the same per-image files as a trial's test split
            figures.log_per_image(model, eval_loader(cfg, ds), records, store=store, split=split,
                                  worst_k=cfg.eval.worst_k)
        run.finish("FINISHED")
    return EvalResult(metrics, run.run_id, [Path(p.name) for p in paths])


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def zero_shot(cfg: ExperimentConfig, *, log: Log = print) -> EvalResult:
    """`segtune eval FILE --zero-shot`: the model as built, scored and logged (kind zero_shot)."""
    from segtune.models import build_model
    from tracking.evals import ZERO_SHOT
    from tracking.server import check_server

    check_experiment(cfg)
    check_server(cfg.tracking.uri)
    store, data_hash = prepare_data(cfg, log)
    model = build_model(cfg.model).to(_device())
    result = score_and_log(cfg, model, store=store, data_hash=data_hash, kind=ZERO_SHOT, log=log)
    log(_summary("zero-shot", cfg, result))
    return result


def evaluate_checkpoint(cfg: ExperimentConfig, *, checkpoint: Path | None = None, run_id: str | None = None,
                        model_uri: str | None = None, log: Log = print) -> EvalResult:
    """`segtune eval FILE --checkpoint PATH | --run ID | --model models:/NAME@ALIAS`: a trained
    model on the file's data, eval prompt and protocol, logged as a run of kind `eval`."""
    from segtune.checkpoint import load_model
    from segtune.sources import fetch_checkpoint
    from tracking.evals import EVAL, SOURCE
    from tracking.server import check_server

    check_experiment(cfg)
    check_server(cfg.tracking.uri)
    with tempfile.TemporaryDirectory(prefix="segtune-eval-") as tmp:
        path, source, source_run = fetch_checkpoint(cfg.tracking.uri, checkpoint=checkpoint, run_id=run_id,
                                                    model_uri=model_uri, tmp=Path(tmp))
        model, trained = load_model(path)
    # The model is the checkpoint's; the data, prompts and protocol are the file's.
    cfg = cfg.model_copy(update={"model": trained.model})
    check_fit(cfg)  # the checkpoint's model with the file's prompts, before the data
    store, data_hash = prepare_data(cfg, log)
    tags = {SOURCE: source, "segtune.source_run": source_run or "", "segtune.trained_on": trained.dataset.name}
    result = score_and_log(cfg, model.to(_device()), store=store, data_hash=data_hash, kind=EVAL, tags=tags,
                           name=f"eval {cfg.model.key} {cfg.dataset.name} from {source} [{cfg.eval.split}]", log=log)
    log(_summary(f"checkpoint {source}", cfg, result))
    return result


def _summary(what: str, cfg: ExperimentConfig, result: EvalResult) -> str:
    split = cfg.eval.split
    m = result.metrics
    line = (f"{what}: {cfg.model.key} on {cfg.dataset.name} [{split}, {int(m[f'{split}/samples'])} samples]: "
            f"{split}/iou={m[f'{split}/iou']:.4f} {split}/dice={m[f'{split}/dice']:.4f}")
    if f"{split}/iou_best_mask" in m:
        line += f" (best single mask: iou={m[f'{split}/iou_best_mask']:.4f})"
    return line + f"; run {result.run_id}"
