"""The prompt-robustness matrix of one model: its IoU under every prompt kind it takes, and
after corrective clicks, and the promotion gate that holds it to floors.

The columns (`columns`): each eval prompt kind the model's family takes (segtune.models
PROMPT_KINDS) in the order random point, centre point, k points (k=3), box, jittered box (the
training-time jitter of `box`, seeded like every eval prompt), text; then, for families that
take points, `clicks_0` (the centre point alone) and `clicks_1`, `clicks_3`, `clicks_5`
(segtune.clicks). Every column is scored on the same samples: the split's samples with
foreground (capped at `sample`; text-only models keep empty masks), prompts drawn as a trial's
validation loader draws them (seed `train.seed`). The split is validation by default: the
matrix gates promotion, and promotion never looks at the test split.

`score_matrix` scores; `record` logs the scores on a run (tracking.robust_figures);
`floor_gate` is `promote --min-prompt-iou`'s gate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from segtune.clicks import CLICKS, click_scores
from segtune.config import ExperimentConfig
from segtune.data import carries_text, dataset_options
from segtune.errors import ConfigError
from segtune.loaders import eval_loader, eval_split
from segtune.models import PROMPT_KINDS
from segtune.progress import progress
from segtune.prompts import needs_foreground
from segtune.scoring import score_loader
from tracking.registry import Gate
from tracking.robust_figures import SAMPLES, SPLIT, Row, log_scores, read_scores

ORDER = ("random_point", "center_point", "k_points", "box", "jittered_box", "text")
CLICK_COLUMNS = tuple(f"clicks_{n}" for n in CLICKS)
K = 3  # the k of `k_points` in the matrix, whatever the trial trained with
OPTION = "--min-prompt-iou"


@dataclass
class Matrix:
    """One model's scores: mean IoU (and Dice, for prompt kinds) per column."""

    split: str
    samples: int
    iou: dict[str, float]
    dice: dict[str, float]


def eval_kinds(cfg: ExperimentConfig) -> list[str]:
    """The prompt kinds the model's family takes, in `ORDER` (text only where there is text)."""
    takes = PROMPT_KINDS.get(cfg.model.name, ())
    kinds = [k for k in ORDER if k in takes or (k == "jittered_box" and "box" in takes)]
    if "text" in kinds and not cfg.prompt.text and not carries_text(cfg.dataset.name, dataset_options(cfg.dataset)):
        kinds.remove("text")
    return kinds


def takes_clicks(cfg: ExperimentConfig) -> bool:
    """Whether the family takes point prompts, and so corrective clicks."""
    return "random_point" in PROMPT_KINDS.get(cfg.model.name, ())


def columns(cfg: ExperimentConfig) -> list[str]:
    return eval_kinds(cfg) + (list(CLICK_COLUMNS) if takes_clicks(cfg) else [])


def _as_eval(cfg: ExperimentConfig, kind: str) -> ExperimentConfig:
    """A copy of `cfg` that scores with eval prompt `kind` (k=3 for k_points)."""
    return cfg.model_copy(update={"prompt": cfg.prompt.model_copy(update={"eval": kind, "k": K}),
                                  "eval": cfg.eval.model_copy(update={"protocol": "prompted"})})


def score_matrix(model: nn.Module, cfg: ExperimentConfig, store: Path, *, split: str = "val",
                 sample: int | None = None, line: Callable[[str], None] | None = None) -> Matrix:
    """Score `model` (on its device) under every column of `columns(cfg)` on `split` of `store`."""
    kinds = eval_kinds(cfg)
    if not kinds:
        raise ConfigError(f"model {cfg.model.name} takes none of the prompt kinds the robustness matrix scores "
                          f"({', '.join(ORDER)}).")
    clicks = takes_clicks(cfg)
    # One sample set for every column: with foreground when any column reads the mask.
    reads_mask = [k for k in kinds if needs_foreground(k)]
    base = _as_eval(cfg, reads_mask[0] if reads_mask else kinds[0])
    ds = eval_split(base, store, split, sample)
    iou: dict[str, float] = {}
    dice: dict[str, float] = {}
    label = f"robustness of {cfg.model.key} on {cfg.dataset.name} {split}"
    with progress(label, len(ds) * (len(kinds) + clicks), unit="images", line=line) as bar:
        for kind in kinds:
            scores, _ = score_loader(model, eval_loader(_as_eval(cfg, kind), ds))
            iou[kind], dice[kind] = scores["iou"], scores["dice"]
            bar.advance(len(ds))
        if clicks:
            for n, value in click_scores(model, eval_loader(base, ds), CLICKS, bar.advance).items():
                iou[f"clicks_{n}"] = value
    return Matrix(split, len(ds), iou, dice)


def rows(matrix: Matrix, cfg: ExperimentConfig, run_id: str, trial_id: str = "") -> list[Row]:
    """The matrix as table rows for one trained checkpoint."""
    return [Row(run_id, trial_id, cfg.prompt.train, col, value, matrix.dice.get(col), matrix.samples, matrix.split)
            for col, value in matrix.iou.items()]


def record(uri: str, run_id: str, matrix: Matrix, cfg: ExperimentConfig, trial_id: str = "") -> list[Row]:
    """Log the matrix on run `run_id` (metrics, tags, CSV, heatmap); returns its rows."""
    table = rows(matrix, cfg, run_id, trial_id)
    log_scores(uri, run_id, table, f"{cfg.model.key} on {cfg.dataset.name} {matrix.split}: IoU by eval prompt "
                                   f"({matrix.samples} samples)")
    return table


def parse_floors(text: str | None) -> dict[str, float]:
    """`box=0.6,random_point=0.4` -> {'box': 0.6, 'random_point': 0.4}; a ConfigError naming
    the option for anything else."""
    if text is None:
        return {}
    known = (*ORDER, *CLICK_COLUMNS)
    floors: dict[str, float] = {}
    for item in text.split(","):
        kind, sep, value = (part.strip() for part in item.partition("="))
        try:
            floor = float(value)
        except ValueError:
            floor = math.nan
        problem = (f"{item.strip()!r} is not KIND=IOU" if not sep or not kind else
                   f"unknown prompt kind {kind!r}" if kind not in known else
                   f"{value!r} is not a number" if not math.isfinite(floor) else
                   f"{kind} is given twice" if kind in floors else None)
        if problem:
            raise ConfigError(f"{OPTION} {text!r}: {problem}; expected comma-separated KIND=IOU pairs such as "
                              f"box=0.6,random_point=0.4, KIND one of {', '.join(known)}.")
        floors[kind] = floor
    return floors


def floor_gate(uri: str, run: Any, model: nn.Module, cfg: ExperimentConfig, floors: dict[str, float], *,
               store: Callable[[], Path], line: Callable[[str], None] | None = None) -> tuple[Gate, dict[str, str]]:
    """The `prompt_iou` gate: every floored column's validation IoU at or above its floor.

    The scores are read from the run's `robust/<kind>/iou` metrics when it has them all on the
    validation split; else the model is scored now (`store()` gives the prepared data) and
    they are recorded on the run. Returns the gate and the scores as version tags.
    """
    rid = run.info.run_id
    wanted = [k for k in floors if k in columns(cfg)]
    scores = read_scores(run.data.metrics) if run.data.tags.get(SPLIT) == "val" else {}
    samples = run.data.tags.get(SAMPLES, "?")
    how = "read from the run"
    if any(k not in scores for k in wanted):
        matrix = score_matrix(model, cfg, store(), split="val", sample=cfg.dataset.max_eval, line=line)
        record(uri, rid, matrix, cfg, run.data.tags.get("segtune.trial_id", ""))
        scores, samples, how = matrix.iou, str(matrix.samples), "scored now and logged on the run"
    parts, passed = [], True
    for kind, floor in floors.items():
        if kind not in scores:
            passed = False
            parts.append(f"{kind}: no score, model {cfg.model.name} takes no such prompt")
            continue
        ok = scores[kind] >= floor
        passed &= ok
        parts.append(f"{kind} {scores[kind]:.4f} {'>=' if ok else '<'} {floor:g}" + ("" if ok else " (below its floor)"))
    detail = f"validation IoU by prompt on {samples} samples ({how}): " + "; ".join(parts)
    return Gate("prompt_iou", passed, detail), {f"segtune.robust.{k}": f"{scores[k]:.6f}" for k in floors
                                                if k in scores}
