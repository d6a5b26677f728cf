"""`segtune prompt-search FILE`: CLIPSeg's text prompt chosen by a search, not by hand.

The thesis found by trial and error that CLIPSeg segments EM mitochondria better as "black
shadow" and QaTa-COV19 infections as "lungs". Here the candidates (`prompt_search.candidates`,
each put through every `prompt_search.templates` entry such as "a photo of {}") are the
choices of one categorical dimension, `prompt.text`, of an Optuna study run by Ray Tune, as
`segtune sweep` runs its trials. Each trial is a zero-shot scoring run (segtune.evaluate) on
the first `prompt_search.sample` samples of `prompt_search.split` (train by default: the test
split stays unseen until the experiment is scored) and logs a `zero_shot` MLflow run under the
search's parent run (kind `prompt_search`). By default every candidate is scored once
(enqueued into the study); a smaller `num_samples` lets TPE choose which to try.

The best prompt is written to `prompt_search.output` (default `.segtune/prompts/<name>.yaml`),
a small YAML whose `prompt.text` is what the next fine-tuning run should use, and with
`--write FILE` into the `prompt.text` of experiment files, comments kept.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from segtune.config import (
    ExperimentConfig,
    PromptSearchConfig,
    apply_params,
    flatten,
    load_config,
    validate,
)
from segtune.errors import ConfigError
from tracking.redact import redact

Log = Callable[[str], None]
DIM = "prompt.text"


def candidates(ps: PromptSearchConfig) -> list[str]:
    """Every candidate through every template, in order, without repeats."""
    out: list[str] = []
    for c in ps.candidates:
        for t in ps.templates:
            text = t.replace("{}", c.strip())
            if text not in out:
                out.append(text)
    return out


@dataclass
class SearchContext:
    """What every trial of a prompt search shares besides its prompt."""

    store: str
    data_hash: str
    search_id: str
    parent_run_id: str


def _score_trial(params: dict[str, Any], *, base: dict, ctx: SearchContext) -> None:
    """One Tune trial: the file's model scored zero-shot with one candidate prompt."""
    from ray import tune

    from segtune.evaluate import score_and_log
    from segtune.models import build_model
    from tracking.evals import SEARCH, ZERO_SHOT

    cfg = apply_params(validate(base, "prompt search config"), params)
    ps = cfg.prompt_search
    assert ps is not None
    result = score_and_log(cfg, build_model(cfg.model), store=Path(ctx.store), data_hash=ctx.data_hash,
                           kind=ZERO_SHOT, tags={SEARCH: "prompt"}, split=ps.split, sample=ps.sample,
                           parent_run_id=ctx.parent_run_id, sweep_id=ctx.search_id,
                           trial_id=tune.get_context().get_trial_id(), name=f"prompt '{cfg.prompt.text}'",
                           log=lambda _: None)
    tune.report({f"{ps.split}/{ps.metric}": result.metrics[f"{ps.split}/{ps.metric}"]})


def check(cfg: ExperimentConfig) -> PromptSearchConfig:
    """The search section, refusing files the search cannot mean anything for."""
    if cfg.prompt_search is None:
        raise ConfigError("prompt_search: the file has no prompt_search section; add one with "
                          "candidates: [...] (and optionally templates: ['a photo of {}'])")
    if cfg.model.name != "clipseg" or cfg.prompt.eval != "text":
        raise ConfigError("prompt_search: text prompts steer only CLIPSeg; set model.name: clipseg and "
                          f"prompt.eval: text (got {cfg.model.name}, {cfg.prompt.eval})")
    return cfg.prompt_search


def run_search(cfg: ExperimentConfig, ctx: SearchContext, texts: list[str], *, address: str | None,
               log: Log = print) -> None:
    """The Tune study: OptunaSearch over the candidates, FIFO (a trial is one scoring pass)."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from segtune.progress import progress
    from segtune.tune import build_tuner, on_trial_end, ray_session

    ps = cfg.prompt_search
    assert ps is not None
    with ray_session(address):
        num = ps.num_samples or len(texts)
        # Enqueued, every candidate is scored once, in order; TPE proposes any trials beyond.
        enqueue = [{DIM: t} for t in texts[:num]] if ps.num_samples is None else None
        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.train.seed),
                                points_to_evaluate=enqueue)
        trainable = tune.with_resources(tune.with_parameters(_score_trial, base=cfg.model_dump(), ctx=ctx),
                                        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
        with progress("prompt search: scoring candidates", num, unit="prompts", line=log) as bar, \
                on_trial_end(bar.advance) as scored:
            build_tuner(
                cfg, trainable, name=f"{cfg.name}-prompts-{ctx.search_id}", param_space={DIM: tune.choice(texts)},
                tune_config=tune.TuneConfig(metric=f"{ps.split}/{ps.metric}", mode="max", search_alg=searcher,
                                            num_samples=num, max_concurrent_trials=cfg.search.max_concurrent,
                                            # A trial is one short scoring pass: keep the worker (and
                                            # its imported torch) for the next candidate.
                                            reuse_actors=True),
                callbacks=[scored],
            ).fit()


@dataclass
class SearchOutcome:
    search_id: str
    parent_run_id: str
    metric: str
    scores: dict[str, float]  # every candidate scored, as logged to MLflow
    best: str
    output: Path


def prompt_search(cfg: ExperimentConfig, *, address: str | None = None, write: list[Path] | None = None,
                  log: Log = print) -> SearchOutcome:
    """Run the search, log it, write the best prompt (and into `write` files); see the module doc."""
    from segtune.prepare import check_experiment, prepare_data
    from segtune.provenance import git_sha
    from segtune.trial import run_tags
    from tracking.evals import PROMPT_SEARCH, SEARCH, child_runs, end_run, open_run
    from tracking.runs import quiet_mlflow
    from tracking.server import check_server

    ps = check(cfg)
    quiet_mlflow()
    check_experiment(cfg)
    check_server(cfg.tracking.uri)
    texts = candidates(ps)
    store, data_hash = prepare_data(cfg, log)
    search_id = uuid.uuid4().hex[:8]
    metric = f"{ps.split}/{ps.metric}"
    parent = open_run(cfg.tracking.uri, cfg.tracking.experiment, kind=PROMPT_SEARCH, sweep_id=search_id,
                      run_name=f"prompt search {cfg.model.key} {cfg.dataset.name} ({len(texts)} prompts)",
                      params={**flatten(cfg), "prompt_search.texts": texts},
                      tags={**run_tags(cfg, git_sha=git_sha(), data_hash=data_hash, store=store),
                            "segtune.name": cfg.name, SEARCH: "prompt",
                            # The run's description in the MLflow UI.
                            "mlflow.note.content": f"Prompt search for {cfg.name}: {len(texts)} text prompts "
                                                   f"scored zero-shot by {metric} on {ps.sample} samples; "
                                                   "one child run per prompt."})
    log(f"prompt search {search_id}: {len(texts)} prompts for {cfg.model.key} on {cfg.dataset.name}, "
        f"{metric} on {ps.sample} samples; parent run {parent.run_id}")
    status = "FAILED"
    try:
        run_search(cfg, SearchContext(str(store), data_hash, search_id, parent.run_id), texts, address=address, log=log)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        runs = child_runs(cfg.tracking.uri, cfg.tracking.experiment, search_id)
        scores = {r.data.params.get(DIM, "?"): r.data.metrics[metric] for r in runs
                  if r.info.status == "FINISHED" and metric in r.data.metrics}
        # Ties go to the earlier candidate: the list's order is the user's preference.
        best = max(texts, key=lambda t: (scores.get(t, float("-inf")), -texts.index(t))) if scores else None
        end_run(cfg.tracking.uri, parent.run_id, {"segtune.best.prompt": best, "segtune.best.value":
                                                  scores.get(best) if best else None}, status)
    if best is None:
        raise ConfigError(f"prompt search {search_id}: no candidate was scored; see the trial errors under "
                          f"{cfg.search.storage_path}")
    for text in texts:
        mark = "  <- best" if text == best else ""
        log(f"  {scores.get(text, float('nan')):.4f}  {text!r}{mark}")
    out = Path(ps.output or os.path.join(".segtune", "prompts", f"{cfg.name}.yaml"))
    outcome = SearchOutcome(search_id, parent.run_id, metric, scores, best, out)
    write_best(outcome, cfg)
    log(f"best prompt {best!r} ({metric}={scores[best]:.4f}) written to {out}; use it with "
        f"--set prompt.text={json.dumps(best)} or `segtune prompt-search FILE --write FILE`")
    for f in write or []:
        set_prompt_text(Path(f), best)
        log(f"prompt.text of {f} set to {best!r}")
    return outcome


def write_best(outcome: SearchOutcome, cfg: ExperimentConfig) -> Path:
    """The small YAML the next experiment reads its prompt from (a partial experiment file)."""
    ps = cfg.prompt_search
    assert ps is not None
    body = {"prompt": {"text": outcome.best}, "metric": outcome.metric, "score": outcome.scores[outcome.best],
            "samples": ps.sample, "scores": dict(sorted(outcome.scores.items(), key=lambda kv: -kv[1])),
            "search_id": outcome.search_id, "parent_run_id": outcome.parent_run_id,
            "tracking_uri": redact(cfg.tracking.uri)}
    outcome.output.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# The best text prompt for experiment {cfg.name}, found by `segtune prompt-search`.\n"
              f"# Fine-tune with it: segtune train FILE --set prompt.text={json.dumps(outcome.best)}\n")
    outcome.output.write_text(header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    return outcome.output


_BLOCK = re.compile(r"^prompt:\s*(#.*)?$")
_FLOW = re.compile(r"^prompt:\s*\{.*\}\s*(#.*)?$")
_TEXT = re.compile(r"^(\s+)text:[^#\n]*?(\s*#.*)?$")


def set_prompt_text(path: Path, text: str) -> None:
    """Set `prompt.text` in an experiment file, editing only that line (comments stay)."""
    lines = Path(path).read_text().splitlines(keepends=True)
    value = json.dumps(text)  # a double-quoted YAML scalar: safe for any text
    start = next((i for i, line in enumerate(lines) if _BLOCK.match(line) or _FLOW.match(line)), None)
    if start is None:
        lines.append(f"prompt:\n  text: {value}\n")
    elif _FLOW.match(lines[start]):
        section = yaml.safe_load(lines[start])["prompt"]
        section["text"] = text
        lines[start] = "prompt: " + yaml.safe_dump(section, default_flow_style=True, width=1000).strip() + "\n"
    else:
        end = start + 1
        while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
            end += 1
        hit = next((i for i in range(start + 1, end) if _TEXT.match(lines[i].rstrip("\n"))), None)
        if hit is not None:
            m = _TEXT.match(lines[hit].rstrip("\n"))
            assert m is not None
            lines[hit] = f"{m.group(1)}text: {value}{m.group(2) or ''}\n"
        else:
            indent = next((re.match(r"\s+", lines[i]).group(0) for i in range(start + 1, end)  # type: ignore[union-attr]
                           if lines[i].strip() and not lines[i].lstrip().startswith("#")), "  ")
            lines.insert(start + 1, f"{indent}text: {value}\n")
    Path(path).write_text("".join(lines))
    if load_config(Path(path)).prompt.text != text:  # the edit must read back as intended
        raise ConfigError(f"{path}: could not set prompt.text; edit it by hand to {value}")
