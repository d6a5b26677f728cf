"""`segtune promote` and `segtune approve`: a self-contained model version, its gates, its approval.

A promotion picks the best finished trial (tracking.registry.select_run), verifies its
checkpoint against the sha256 manifest, and registers an MLflow pyfunc (segtune/serving.py,
"models from code") that carries everything it needs to predict:

- the full weights as safetensors, base and trained parts merged, with the experiment config
  and, for CLIPSeg, its HF config and tokenizer files (a full checkpoint,
  segtune.checkpoint.write_full): it never reads `model.checkpoint`'s base file;
- segtune's own code (`code_paths`: the segtune and tracking packages);
- pinned requirements: the exact versions installed where it was promoted (`REQUIREMENTS`);
- a signature (image as an array; optional points, labels, box, text; a mask out) and an
  input example, so the MLflow UI shows the schema and `mlflow models serve` has a request.

The new version takes alias `challenger` and is judged by its gates (`evaluate_gates`):
checkpoint sha256, the data hash, a re-score of the registered model on the validation split
that must reproduce the trial's `val/dice_best` within `RESCORE_TOLERANCE`, and its margin over
the current champion; the report also names the prompt kinds it answers. Only a version whose
gates passed takes `champion` (`approve`; `force` overrides and is recorded).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import tempfile
from pathlib import Path
from typing import Any

from segtune.config import ExperimentConfig
from segtune.models import PROMPT_KINDS, Segmenter
from segtune.prepare import Log
from tracking.registry import CHALLENGER, CHAMPION, Gate, Promotion

SERVING_CODE = Path(__file__).with_name("serving.py")
#: The packages a registered model imports where it is loaded, pinned to the versions installed
#: where it was promoted (segtune itself travels as code). MLflow is needed to load and serve it.
REQUIREMENTS = ("torch", "torchvision", "numpy", "segment-anything", "transformers", "tokenizers",
                "huggingface-hub", "safetensors", "pydantic", "pyyaml", "scipy", "pillow", "mlflow")
#: How far the registered model's re-scored validation Dice may lie from the trial's
#: val/dice_best: the trial may have scored from the fp16 embedding cache or under bf16/fp16
#: autocast, the re-score runs the encoder in fp32.
RESCORE_TOLERANCE = 0.01


def pinned_requirements() -> list[str]:
    """`REQUIREMENTS` as `name==version`, as installed here (local labels such as +cu130 left
    out: they name a build, and pip resolves the plain version to this platform's)."""
    pins = []
    for dist in REQUIREMENTS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins.append(f"{dist}=={version.split('+')[0]}")
    return pins


def _code_paths(folder: Path) -> list[str]:
    """Copies of the segtune and tracking packages (no caches) for the model's `code_paths`."""
    import segtune
    import tracking

    out = []
    for package in (segtune, tracking):
        src = Path(package.__file__).parent
        dst = folder / src.name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out.append(str(dst))
    return out


def model_signature():
    """What the registered model takes and gives, for the MLflow UI and request checks."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

    # `Any` where JSON callers send ints or floats alike (pixel coordinates) and where the image
    # may be (H,W) or (H,W,C); MLflow checks the nesting, serving.py the rest.
    inputs = Schema([
        ColSpec(Array(Array(AnyType())), "image"),
        ColSpec(Array(Array(AnyType())), "points", required=False),
        ColSpec(Array(DataType.long), "labels", required=False),
        ColSpec(Array(AnyType()), "box", required=False),
        ColSpec(DataType.string, "text", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(Array(Array(DataType.long)), "mask")]))


def answered_kinds(cfg: ExperimentConfig) -> list[str]:
    """The request prompts the model answers (points, box, text), from PROMPT_KINDS."""
    from segtune.serving import request_kinds

    return [k for k in ("points", "box", "text") if k in request_kinds(PROMPT_KINDS.get(cfg.model.name, ()))]


def input_example(cfg: ExperimentConfig, kind: str | None = None, size: int = 32) -> dict[str, Any]:
    """A small request the model answers: a dark disc on a light square, with a prompt on it."""
    import numpy as np

    kind = kind or answered_kinds(cfg)[0]
    yy, xx = np.mgrid[:size, :size]
    image = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2, 40, 170)
    example: dict[str, Any] = {"image": image.astype(int).tolist()}
    c = size // 2
    if kind == "text":
        example["text"] = cfg.prompt.text or "object"
    elif kind == "box":
        example["box"] = [c - size // 4, c - size // 4, c + size // 4, c + size // 4]
    else:
        example["points"], example["labels"] = [[c, c]], [1]
    return example


def rescore(model: Segmenter, cfg: ExperimentConfig, log: Log = print, *, repeat: dict[str, str] | None = None,
            split: str = "val", metric: str = "dice") -> tuple[float, int, str]:
    """The model's mean validation Dice on the trial's data, prompts and samples, as the trial
    scored it: (dice, samples, data hash). A member of a trial with repeats (`repeat`: its run's
    tags) scored on the sweep's store (`segtune.data_seed`: the split's seed, not its train.seed)
    and, with `segtune.fold`, on its fold's validation samples (segtune.data.folds). `split` and
    `metric` score another split (an ensemble's test IoU)."""
    import torch

    from segtune.loaders import eval_loader, eval_split
    from segtune.prepare import prepare_run_data
    from segtune.scoring import score_loader

    store, data_hash = prepare_run_data(cfg, repeat or {}, split, log)
    # As the trial's validation loader: foreground-only where prompts need it, capped at max_eval.
    prompted = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"protocol": "prompted"})})
    ds = eval_split(prompted, store, split, cfg.dataset.max_eval)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics, _ = score_loader(model.to(device), eval_loader(prompted, ds), line=log,
                              label=f"re-scoring the checkpoint on {split}")
    return metrics[metric], len(ds), data_hash


def evaluate_gates(*, run, model: Segmenter, cfg: ExperimentConfig, metric: str, mode: str,
                   sha256: str, champion: Any, tolerance: float = RESCORE_TOLERANCE,
                   min_margin: float = 0.0, uri: str | None = None, min_prompt_iou: dict[str, float] | None = None,
                   value: float | None = None, repeat: dict[str, str] | None = None,
                   members: list[tuple[Any, ExperimentConfig]] | None = None,
                   log: Log = print) -> tuple[list[Gate], dict[str, Any]]:
    """Judge a registered version: (gates, tags with the measured values). `value`: its
    selection metric's (a member's is its trial's); `repeat`: a member's run tags (see
    `rescore`); `members`: an ensemble's (member run, config) pairs in `model.members`' order,
    each of which must reproduce its own run's val/dice_best (`run` is their trial). With `min_prompt_iou`
    (and the server's `uri`), also its validation IoU per prompt kind against those floors
    (segtune.prompt_matrix.floor_gate: read off the run, or scored now and logged there)."""
    import math

    import numpy as np

    from segtune.errors import SegtuneError
    from tracking.errors import TrackingError

    value = run.data.metrics[metric] if value is None else value
    gates = [Gate("checkpoint", True, f"sha256 `{sha256}` matches the trial's manifest")]
    tags: dict[str, Any] = {"segtune.data_hash": run.data.tags.get("segtune.data_hash", "")}
    trial_dice = run.data.metrics.get("val/dice_best")
    trial_hash = run.data.tags.get("segtune.data_hash")
    try:
        if members:
            scored = [rescore(sub, mcfg, log, repeat=mrun.data.tags) for sub, (mrun, mcfg) in
                      zip(model.members, members, strict=True)]
            dice, samples, data_hash = float(np.mean([d for d, _, _ in scored])), scored[0][1], scored[0][2]
        else:
            dice, samples, data_hash = rescore(model, cfg, log, repeat=repeat)
    except (SegtuneError, TrackingError, OSError) as err:
        reason = f"could not re-score on the validation split: {err}"
        gates += [Gate("data", False, reason), Gate("rescore", False, reason)]
    else:
        tags.update({"segtune.rescore_dice": f"{dice:.6f}", "segtune.rescore_samples": samples})
        gates.append(Gate("data", data_hash == trial_hash,
                          f"data hash `{data_hash}` " + ("equals" if data_hash == trial_hash else "differs from")
                          + f" the trial's `{trial_hash}`"))
        if trial_dice is None:
            gates.append(Gate("rescore", False, "the trial logged no val/dice_best to compare with"))
        elif members:
            gaps = [abs(d - mrun.data.metrics.get("val/dice_best", math.nan)) for (d, _, _), (mrun, _) in
                    zip(scored, members, strict=True)]
            passed = all(g <= tolerance for g in gaps)  # NaN (no val/dice_best) fails
            gates.append(Gate("rescore", passed, "each member inside the registered ensemble vs its run's val/dice_best "
                              "on its own validation samples: |difference| " + ", ".join(f"{g:.4f}" for g in gaps)
                              + f" {'<=' if passed else 'not all <='} {tolerance:g}"))
        else:
            gap = abs(dice - trial_dice)
            gates.append(Gate("rescore", gap <= tolerance,
                              f"val dice {dice:.4f} of the registered model on {samples} validation samples vs the "
                              f"trial's val/dice_best {trial_dice:.4f}: |difference| {gap:.4f} "
                              f"{'<=' if gap <= tolerance else '>'} {tolerance:g}"))
    if champion is None:
        gates.append(Gate("margin", True, "no champion yet"))
    elif champion.tags.get("segtune.run_id") == run.info.run_id:
        gates.append(Gate("margin", True, f"the champion (v{champion.version}) is this same trial"))
    elif champion.tags.get("segtune.metric") != metric or "segtune.metric_value" not in champion.tags:
        gates.append(Gate("margin", True, f"the champion (v{champion.version}) was selected on another metric; "
                                          "not comparable"))
    else:
        theirs = float(champion.tags["segtune.metric_value"])
        margin = value - theirs if mode == "max" else theirs - value
        tags["segtune.champion_margin"] = f"{margin:.6f}"
        gates.append(Gate("margin", margin >= min_margin,
                          f"{metric} {value:.4f} vs champion v{champion.version}'s {theirs:.4f}: "
                          f"{margin:+.4f} ({'>=' if margin >= min_margin else '<'} {min_margin:g})"))
    if min_prompt_iou and uri:
        from segtune.prepare import prepare_run_data
        from segtune.prompt_matrix import floor_gate

        try:  # a member of a trial with repeats: scored on the sweep's split, as it trained
            gate, robust = floor_gate(uri, run, model, cfg, min_prompt_iou,
                                      store=lambda: prepare_run_data(cfg, run.data.tags, "val", log)[0], line=log)
        except (SegtuneError, TrackingError, OSError) as err:
            gate, robust = Gate("prompt_iou", False, f"could not score the prompt kinds: {err}"), {}
        gates.append(gate)
        tags.update(robust)
    return gates, tags


def gate_report(p: Promotion, run, cfg: ExperimentConfig, gates: list[Gate]) -> str:
    """The Markdown report recorded on the version (description) and the trial's run."""
    verdict = "passed" if all(g.passed for g in gates) else "FAILED"
    rows = "\n".join(f"| {g.name} | {'passed' if g.passed else '**failed**'} | {g.detail} |" for g in gates)
    kinds = ", ".join(answered_kinds(cfg))
    tags = run.data.tags
    nxt = (f"Approve it: `segtune approve {p.name} --version {p.version} --reason \"...\"`."
           if verdict == "passed" else
           f"It cannot take `{CHAMPION}`; `segtune approve {p.name} --version {p.version} --force --reason "
           "\"...\"` overrides, recorded on the version.")
    return (f"## Gates of {p.name} v{p.version}: {verdict}\n\n"
            f"Trial run `{p.run_id}` (trial `{tags.get('segtune.trial_id', '')}`, sweep "
            f"`{tags.get('segtune.sweep_id', '')}`), `{cfg.model.key}` trained `{cfg.model.freeze_policy}` on "
            f"`{cfg.dataset.name}`; {p.metric} = {p.value:.4f}.\n\n"
            f"| gate | result | detail |\n|---|---|---|\n{rows}\n\n"
            f"**Prompts it answers:** {kinds} (model family `{cfg.model.name}`: "
            f"{', '.join(PROMPT_KINDS.get(cfg.model.name, ()))}).\n\n{nxt}\n")


def _ensemble_folder(folder: Path, members: list[Path]) -> Path:
    """`folder` (holding the members' full checkpoints) as one registered model: ENSEMBLE names
    them, one manifest covers every file."""
    import json

    from segtune.serving import ENSEMBLE
    from tracking.artifacts import write_manifest

    (folder / ENSEMBLE).write_text(json.dumps({"members": [m.name for m in members]}))
    write_manifest(folder)
    return folder


def promote(uri: str, experiment: str, *, metric: str | None = None, mode: str = "max",
            alias: str = CHALLENGER, sweep_id: str | None = None, run_id: str | None = None,
            name: str | None = None, approve: bool = False, reason: str | None = None, force: bool = False,
            tolerance: float = RESCORE_TOLERANCE, min_margin: float = 0.0,
            min_prompt_iou: dict[str, float] | None = None, ensemble: bool = False,
            log: Log = print) -> Promotion:
    """Register the best (or the given) trial as a self-contained version under `alias`, record
    its gates, and with `approve` move `champion` to it when they passed (or `force`).

    `metric` None: `val/dice_lcb` for a sweep with repeats, else `val/dice_best`. A trial with
    members registers its best member's checkpoint (highest val/dice_best), or with `ensemble`
    all of its members as one model averaging their logits, its test IoU recorded on the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from segtune.checkpoint import read_state, write_full
    from segtune.config import validate
    from segtune.errors import CheckpointError
    from segtune.serving import load_registered
    from tracking import registry
    from tracking.artifacts import verify_manifest
    from tracking.errors import TrackingError
    from tracking.redact import redact
    from tracking.runs import member_runs, quiet_mlflow
    from tracking.server import check_server

    registry.check_alias(alias)
    check_server(uri)
    quiet_mlflow()
    metric = metric or registry.selection_metric(uri, experiment, sweep_id=sweep_id, run_id=run_id)
    run = registry.select_run(uri, experiment, metric=metric, mode=mode, sweep_id=sweep_id, run_id=run_id)
    rid, value, trial = run.info.run_id, run.data.metrics[metric], run
    member = registry.best_member(uri, trial)  # None: a trial without repeats
    sources = [member] if member is not None else [run]
    if ensemble:
        if member is None:
            raise TrackingError(f"--ensemble: run {rid} has no members; only trials of a sweep with "
                                "search.repeats can be promoted as an ensemble.")
        sources = [m for m in member_runs(uri, trial) if m.info.status == "FINISHED"]
    elif member is not None:
        run, rid = member, member.info.run_id
        log(f"trial {trial.info.run_id} ({metric}={value:.4f}): registering its best member, "
            f"{member.data.tags.get('segtune.member')} (val/dice_best {member.data.metrics['val/dice_best']:.4f})")
    name = name or registry.registered_name(run)
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory(prefix="segtune-promote-") as tmp:
        fulls, shas = [], []
        for i, src in enumerate(sources):
            src_id = src.info.run_id
            ckpt, sha = registry.fetch_checkpoint(uri, src_id, Path(tmp) / f"trial_{i}")
            log(f"checkpoint of run {src_id} verified (sha256 {sha[:12]}…)")
            dst = Path(tmp) / "model" / f"member_{i}" if ensemble else Path(tmp) / "model"
            try:
                fulls.append(write_full(ckpt, dst, extra={"source": {"run_id": src_id, "sha256": sha}}))
            except CheckpointError as err:
                raise CheckpointError(f"{err} Promotion merges the trial's weights with its base model, so "
                                      "it runs where model.checkpoint's file is.") from None
            shas.append(sha)
        full, sha = fulls[0], shas[0]
        if ensemble:
            full = _ensemble_folder(Path(tmp) / "model", fulls)
            sha = hashlib.sha256(",".join(shas).encode()).hexdigest()
        member_cfgs = [validate(read_state(f)["config"], f"{f}/state.json") for f in fulls]
        cfg = member_cfgs[0]
        tags = {"segtune.run_id": rid, "segtune.metric": metric, "segtune.metric_value": value,
                "segtune.sha256": sha, "segtune.trial_id": run.data.tags.get("segtune.trial_id", ""),
                "segtune.sweep_id": run.data.tags.get("segtune.sweep_id", ""),
                "segtune.prompt_kinds": ",".join(answered_kinds(cfg))}
        if member is not None:
            tags.update({"segtune.trial_run_id": trial.info.run_id,
                         "segtune.member": "ensemble" if ensemble else member.data.tags.get("segtune.member", ""),
                         "segtune.members": ",".join(m.info.run_id for m in sources)})
        version = registry.register(
            uri, run, name, code_path=SERVING_CODE, artifacts={"model": str(full)},
            code_paths=_code_paths(Path(tmp) / "code"), pip_requirements=pinned_requirements(),
            signature=model_signature(), input_example=input_example(cfg),
            metadata={"segtune.sha256": sha, "segtune.run_id": rid}, tags=tags)
    from tracking.urls import model_version_url

    page = model_version_url(uri, name, version)
    log(f"registered {name} version {version} (run {rid}, {metric}={value:.4f})" + (f": {page}" if page else ""))
    p = Promotion(name, version, alias, rid, metric, value, sha, f"models:/{name}@{alias}")

    # The gates judge what was registered: its weights are downloaded back from the server and
    # loaded as serving.py loads them (not through MLflow's loader, which one process cannot run
    # for two models at once: racing promotions would share its module-level model).
    with tempfile.TemporaryDirectory(prefix="segtune-rescore-") as tmp:
        source = client.get_model_version_download_uri(name, version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/artifacts/model", dst_path=tmp,
                                                         tracking_uri=uri))
        verify_manifest(local)
        registered, _ = load_registered(local)
    champion = registry.champion_of(client, name)
    p.gates, measured = evaluate_gates(run=run, model=registered, cfg=cfg, metric=metric,
                                       mode=mode, sha256=sha, champion=champion, tolerance=tolerance,
                                       min_margin=min_margin, uri=uri, min_prompt_iou=min_prompt_iou,
                                       value=value, repeat=None if ensemble else run.data.tags,
                                       members=list(zip(sources, member_cfgs, strict=True)) if ensemble else None,
                                       log=log)
    if ensemble:  # what averaging bought, on the split no selection looked at
        iou, samples, _ = rescore(registered, cfg, log, split="test", metric="iou")
        measured.update({"segtune.ensemble_test_iou": f"{iou:.6f}", "segtune.ensemble_test_samples": samples,
                         "segtune.members_test_iou_mean": trial.data.metrics.get("test/iou_mean", "")})
        log(f"ensemble of {len(sources)} members: test IoU {iou:.4f} on {samples} samples (members' mean "
            f"{trial.data.metrics.get('test/iou_mean', float('nan')):.4f})")
    registry.record_gates(uri, name, version, rid, p.gates, gate_report(p, run, cfg, p.gates), measured)
    for g in p.gates:
        log(f"  gate {g.name}: {'passed' if g.passed else 'FAILED'} — {redact(g.detail)}")
    sweep = tags["segtune.sweep_id"]
    holder = registry.point_alias_at_best(client, name, alias, metric, mode, sweep)
    if holder != version:
        log(f"version {version} is registered; '{alias}' stays on v{holder}, which scores better on {metric}")
    else:
        log(f"alias '{alias}' -> v{version}")
    if approve:
        p.approved = approve_promotion(uri, p, sweep, mode, reason=reason or f"segtune promote --approve ({metric})",
                                       force=force, log=log)
    return p


def approve_promotion(uri: str, p: Promotion, sweep_id: str, mode: str, *, reason: str, force: bool,
                      log: Log) -> bool:
    """`promote --approve`: `champion` to the sweep's best version whose gates passed (recomputed,
    so racing promotions agree), approved with `reason`; a failed version only with `force`.
    Returns whether `champion` is this promotion's version."""
    from mlflow.tracking import MlflowClient

    from segtune.errors import GateError
    from tracking import registry

    if not p.passed and not force:
        failed = ", ".join(g.name for g in p.gates if not g.passed)
        raise GateError(f"{p.name} v{p.version} failed its gates ({failed}) and does not take "
                        f"'{CHAMPION}'; the report is the version's description in the MLflow registry. "
                        f"Approve it anyway with `segtune approve {p.name} --version {p.version} --force "
                        "--reason TEXT`, or promote another trial.")
    target = p.version
    if p.passed:
        target = registry.best_version(MlflowClient(uri), p.name, p.metric, mode, sweep_id, passed_only=True) or p.version
        current = registry.champion_of(MlflowClient(uri), p.name)
        if current is not None and current.version == target and target != p.version:
            log(f"'{CHAMPION}' stays on v{target}, the sweep's best version whose gates passed")
            return False
    registry.approve(uri, p.name, target, reason=reason, force=force, log=log)
    log(f"'{CHAMPION}' -> v{target}" + ("" if target == p.version else " (the sweep's best version whose gates passed)"))
    return target == p.version


def approve(uri: str, name: str, version: str, *, reason: str, force: bool = False, log: Log = print):
    """`segtune approve NAME --version N --reason TEXT [--force]`."""
    from tracking import registry
    from tracking.server import check_server

    check_server(uri)
    mv = registry.approve(uri, name, version, reason=reason, force=force, log=log)
    log(f"'{CHAMPION}' of {name} -> v{mv.version}, approved by {mv.tags['segtune.approved_by']} at "
        f"{mv.tags['segtune.approved_at']}" + (" (forced over failed gates)"
                                               if mv.tags.get("segtune.approval_forced") == "true" else ""))
    return mv
