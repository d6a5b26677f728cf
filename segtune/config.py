"""Experiment files: pydantic models, loading, and `--set` overrides.

An experiment file is YAML with the sections below. Every section rejects unknown keys, so a
typo fails before anything starts, with the file and the field path in the message.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from segtune.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DatasetConfig(_Section):
    name: str
    root: str
    patch_size: int = Field(256, gt=0)
    drop_empty: bool = True
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    cache_dir: str = ".segtune/cache"
    # Caps on samples per split, for quick runs; None keeps every sample.
    max_train: int | None = Field(None, gt=0)
    max_eval: int | None = Field(None, gt=0)
    # How images reach patch_size: non-overlapping tiles or one resized square; None keeps
    # the dataset's default (see docs/datasets.md).
    fit: Literal["tile", "resize"] | None = None
    # Dataset options, None for the dataset's default; a dataset refuses those it lacks.
    classes: list[str] | None = None  # cityscapes: label names, each a binary target
    description_file: str | list[str] | None = None  # qata_cov19: LViT .xlsx text sheets
    test_fraction: float | None = Field(None, gt=0.0, lt=1.0)  # corsican_fire, folder
    split_seed: int | None = None  # corsican_fire, folder: which images are test
    # Every dataset that reads images (docs/datasets.md, "Intensities and masks"): how values
    # reach 8 bit, which channel or page of a multi-channel file, what a mask's values mean.
    intensity: str | dict[str, list[float]] = "auto"  # auto, minmax, {percentile|window: [lo, hi]}
    channel: int | None = Field(None, ge=0)
    masks: str | dict[str, list[int]] = "binary"  # binary, instances, {labels: [v, ...]}

    @field_validator("intensity", mode="before")
    @classmethod
    def _intensity(cls, v: Any) -> Any:
        from segtune.intensity import parse_intensity  # the one rule, shared with the readers

        try:
            parsed = parse_intensity(v)
        except ConfigError:
            parsed = None
        if isinstance(parsed, str):
            return parsed
        if parsed is not None:
            kind, low, high = parsed
            return {kind: [low, high]}
        raise ValueError(f"{v!r} is not an intensity setting; expected auto (8-bit images as they "
                         "are), minmax (per image), {percentile: [low, high]} (per image, e.g. "
                         "[1, 99.8]; 0 <= low < high <= 100) or {window: [low, high]} (fixed, "
                         "low < high)")

    @field_validator("masks", mode="before")
    @classmethod
    def _masks(cls, v: Any) -> Any:
        if v in ("binary", "instances"):
            return v
        if isinstance(v, dict) and list(v) == ["labels"] and isinstance(v["labels"], list | tuple):
            values = list(v["labels"])
            if values and len(set(values)) == len(values) and all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in values):
                return {"labels": sorted(values)}
        raise ValueError(f"{v!r} is not a mask setting; expected binary (0/255 or 0/1), instances "
                         "(an instance label map: 0 background, one value per object) or "
                         "{labels: [v, ...]} (a label map whose listed values, distinct integers "
                         ">= 0, are foreground)")


class ModelConfig(_Section):
    name: str
    variant: str
    checkpoint: str | None = None
    # PA-SAM: the released PA-SAM decoder checkpoint, loaded strictly over `checkpoint`'s SAM weights.
    adapter_checkpoint: str | None = None
    # The YAML key is `train` (kept for existing files and logged params); the code calls it
    # what it is, a freeze policy: which parameters train (`full`, `mask_decoder`, ...).
    train: str = "full"

    @property
    def freeze_policy(self) -> str:
        """Which parameters train: `full`, `mask_decoder`, `adapter` or `decoder` (YAML `model.train`)."""
        return self.train

    @property
    def key(self) -> str:
        """The model's name in registered-model names and tags, e.g. `sam_tiny`."""
        return f"{self.name}_{self.variant}"


class PromptConfig(_Section):
    train: str = "random_point"
    eval: str = "random_point"
    text: str | None = None  # a fixed text prompt; else each sample's own text
    k: int = Field(3, gt=0)  # points for k_points
    box_jitter: int = Field(20, ge=0)  # max outward shift (px) of box sides at train time


class TrainConfig(_Section):
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(4, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    loss: str = "dice"
    precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    # "auto": decode from cached image embeddings when the policy freezes the encoder (segtune.cache).
    cache: Literal["auto", "off"] = "auto"
    # torch.compile through Accelerate's dynamo backend: "inductor" generates fused kernels (worth
    # it on GPUs for long trials; the first steps pay the compile), "eager" only traces.
    compile: Literal["no", "inductor", "eager", "aot_eager"] = "no"

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # and a bare `no` too


class SearchDim(_Section):
    """One dimension of a search space: exactly one of the four distributions."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    choice: list[Any] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDim:
        given = [k for k in ("loguniform", "uniform", "choice", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform: [low, high], uniform: [low, high], "
                             f"choice: [...], randint: [low, high] (got {given or 'none'})")
        lo_hi = self.loguniform or self.uniform or self.randint
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"low must be below high (got {list(lo_hi)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "choice", "randint") if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)


class RepeatsConfig(_Section):
    """K members per configuration (`search.repeats`): exactly one of `seeds` (members train
    with train.seed + i on the same split) or `folds` (K-fold over the training images, grouped
    by source image; segtune.data.folds). Tune sees one trial; its metrics are the members'
    mean, std and lower confidence bound (segtune.repeats)."""

    seeds: int | None = Field(None, ge=2)
    folds: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _exactly_one(self) -> RepeatsConfig:
        if (self.seeds is None) == (self.folds is None):
            raise ValueError("give exactly one of seeds: K or folds: K (K >= 2), e.g. repeats: {seeds: 3}")
        return self

    @property
    def kind(self) -> str:
        """`seeds` or `folds`."""
        return "seeds" if self.seeds is not None else "folds"

    @property
    def k(self) -> int:
        """How many members each configuration runs."""
        return int(self.seeds if self.seeds is not None else self.folds)  # type: ignore[arg-type]


#: What a sweep with repeats may rank trials on besides the loop's own metrics.
REPEAT_METRICS = ("val/dice_mean", "val/dice_std", "val/dice_lcb")


class SearchConfig(_Section):
    space: dict[str, SearchDim] = Field(default_factory=dict)
    num_samples: int = Field(8, gt=0)
    scheduler: Literal["asha", "fifo"] = "asha"
    searcher: Literal["optuna", "random"] = "optuna"
    metric: str = "val/dice"
    mode: Literal["max", "min"] = "max"
    max_concurrent: int = Field(2, gt=0)
    grace_period: int = Field(1, gt=0)
    reduction_factor: int = Field(2, gt=1)
    max_failures: int = Field(1, ge=0)
    keep_checkpoints: int = Field(2, gt=0)
    storage_path: str = ".segtune/ray_results"
    repeats: RepeatsConfig | None = None
    # The lower confidence bound over repeats: mean - lcb_z * std / sqrt(K).
    lcb_z: float = Field(1.0, ge=0.0)
    # The best trials by val/dice_best scored under every prompt kind after the sweep
    # (segtune.robustness); 0 turns it off.
    finalists: int = Field(3, ge=0)
    # Stop launching new trials once the sweep's trials have spent this much (finished trials'
    # GPUs x wall time plus running trials' so far; CPU-hours for a sweep without GPUs). Running
    # trials finish (segtune.budget).
    budget_gpu_hours: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _repeat_metric(self) -> SearchConfig:
        if self.metric in REPEAT_METRICS and self.repeats is None:
            raise ValueError(f"metric {self.metric} exists only with repeats: set search.repeats "
                             "(e.g. {seeds: 3}) or use metric val/dice")
        return self


class ResourcesConfig(_Section):
    """What one trial asks of the cluster. With `workers` > 1, `cpu` and `gpu` are the trial's
    totals, split evenly over its data-parallel workers (segtune.distributed)."""

    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)
    workers: int = Field(1, ge=1)
    # DataLoader worker processes per trial worker; 0 loads batches in the training process
    # (the store is memory-mapped, so there is nothing to decode), None picks from `cpu`.
    loader_workers: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _per_worker(self) -> ResourcesConfig:
        if self.workers > 1 and self.gpu and (self.gpu / self.workers) > 1 and self.gpu % self.workers:
            raise ValueError(f"gpu={self.gpu:g} does not split evenly over workers={self.workers}")
        return self

    def per_worker(self) -> dict[str, float]:
        """One worker's share: {'CPU': ..., 'GPU': ...}."""
        return {"CPU": self.cpu / self.workers, "GPU": self.gpu / self.workers}


class TrackingConfig(_Section):
    uri: str = "http://127.0.0.1:5000"
    experiment: str = "segtune"
    # Where trials keep what they could not send while the server was down (`segtune sync`).
    spool_dir: str = ".segtune/spool"


class AmgConfig(_Section):
    """segment-anything's `SamAutomaticMaskGenerator` arguments, and how its masks are scored."""

    points_per_side: int = Field(32, gt=0)
    points_per_batch: int = Field(64, gt=0)
    pred_iou_thresh: float = Field(0.88, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0)
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)
    crop_n_layers: int = Field(0, ge=0)
    min_mask_region_area: int = Field(0, ge=0)  # > 0 needs opencv (segment-anything's choice)
    # A generated mask joins the union when at least this fraction of its area lies inside the
    # ground truth (docs/study.md: the AMG protocol).
    inside_threshold: float = Field(0.5, gt=0.0, le=1.0)


class EvalConfig(_Section):
    """`segtune eval`: which protocol, on which split, and how much of it."""

    protocol: Literal["prompted", "amg"] = "prompted"  # amg: SAM's automatic mask generator
    split: Literal["train", "val", "test"] = "test"
    sample: int | None = Field(None, gt=0)  # score only the first N samples of the split
    overlays: int = Field(4, ge=0)  # overlay PNGs logged per run (the first N samples)
    # Trials also draw the first validation samples every N epochs (overlays/epoch_NNN); 0: never.
    overlay_every: int = Field(5, ge=0)
    # Overlays of the k lowest-IoU samples of the scored split, beside its per-image table
    # (per_image/<split>_worst/, per_image/<split>.csv); 0: none.
    worst_k: int = Field(4, ge=0)
    # Boundary metrics scored beside IoU and Dice (`<split>/hd95`, `<split>/boundary_f1`); none
    # by default: they cost a distance transform per image on the CPU (segtune.metrics).
    # The names are segtune.metrics.BOUNDARY_METRICS' keys (written out here: no torch at load).
    metrics: list[Literal["hd95", "boundary_f1"]] = Field(default_factory=list)
    amg: AmgConfig = Field(default_factory=AmgConfig)

    @field_validator("metrics")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) < len(v):
            raise ValueError(f"{v!r} names a metric twice")
        return v


class PromptSearchConfig(_Section):
    """`segtune prompt-search`: text prompts scored zero-shot on a sample of a split."""

    candidates: list[str] = Field(min_length=1)
    templates: list[str] = Field(default_factory=lambda: ["{}"])  # each with one "{}"
    split: Literal["train", "val", "test"] = "train"
    sample: int = Field(32, gt=0)
    metric: Literal["iou", "dice"] = "iou"
    # Trials; None scores every candidate once (enqueued), fewer lets Optuna's TPE choose.
    num_samples: int | None = Field(None, gt=0)
    output: str | None = None  # where the best prompt is written; default .segtune/prompts/<name>.yaml

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t.count("{}") != 1]
        if bad or not v:
            raise ValueError(f"each template needs exactly one {{}} for the candidate (got {bad or v})")
        return v


class ReferenceConfig(_Section):
    """The thesis's published result this file reproduces (DESIGN.md), shown by `segtune report`."""

    row: str  # the thesis table row; the 20- and 50-epoch files of one row share it
    dataset: str  # as the thesis names it, e.g. "EPFL EM (mitochondria)"
    setting: str  # e.g. "SAM, one random point"
    test_iou: float = Field(ge=0.0, le=1.0)
    epochs: int | None = Field(None, gt=0)  # None: zero-shot, no training
    train_dice_loss: float | None = None
    note: str | None = None


class ExperimentConfig(_Section):
    name: str
    dataset: DatasetConfig
    model: ModelConfig
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    prompt_search: PromptSearchConfig | None = None
    reference: ReferenceConfig | None = None

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ "):
            raise ValueError("use a short name without spaces or slashes")
        return v


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{path or '(top level)'}: {msg}")
    return f"{source}: invalid experiment file — " + "; ".join(lines) + "."


def set_path(raw: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict; search-space keys like `search.space.train.lr` keep their dots."""
    parts = dotted.split(".")
    if parts[:2] == ["search", "space"] and len(parts) > 2:
        raw.setdefault("search", {}).setdefault("space", {})[".".join(parts[2:])] = value
        return
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"--set {dotted}: `{p}` is not a section")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.field=value, e.g. --set train.epochs=5")
    key, value = text.split("=", 1)
    parsed = yaml.safe_load(value) if value else None
    # YAML reads 3e-4 as a string (it wants 3.0e-4); users write it the Python way.
    if isinstance(parsed, str) and _NUMBER.fullmatch(parsed):
        parsed = float(parsed)
    return key.strip(), parsed


def validate(raw: dict, source: str = "<config>") -> ExperimentConfig:
    """Validate a raw dict, raising ConfigError naming `source` and the field path."""
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    for key in cfg.search.space:
        probe = cfg.model_dump()
        try:
            set_path(probe, key, _any_value(cfg.search.space[key]))
            ExperimentConfig.model_validate(probe)
        except (ValidationError, ConfigError) as err:
            raise ConfigError(f"{source}: search.space.{key}: does not name a valid field of the "
                              f"experiment ({err.__class__.__name__}: "
                              f"{_format_errors(err, 'value') if isinstance(err, ValidationError) else err})") from None
    return cfg


def _any_value(dim: SearchDim) -> Any:
    return dim.choice[0] if dim.choice is not None else dim.args[0]


def load_raw(path: Path) -> dict:
    """Read an experiment file as a dict, with clear errors for missing or malformed YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such experiment file.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections dataset, model, train, ...")
    return raw


def load_config(path: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load and validate an experiment file, applying `--set section.field=value` overrides."""
    raw = load_raw(path)
    for text in overrides or []:
        key, value = parse_override(text)
        set_path(raw, key, value)
    return validate(raw, str(path))


def apply_params(cfg: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """A copy of `cfg` with dotted-path parameters (a trial's sampled values) applied."""
    raw = copy.deepcopy(cfg.model_dump())
    for key, value in params.items():
        set_path(raw, key, value)
    return validate(raw, "trial parameters")


def flatten(cfg: ExperimentConfig) -> dict[str, Any]:
    """Flat `section.field` -> value dict, as logged to MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", cfg.model_dump(exclude={"search"}))
    return out
