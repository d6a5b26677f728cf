"""What mattered in a sweep (segtune.insight) on real MLflow runs: trial runs written to the test
server as a sweep writes them (params flattened, `val/dice` by epoch, `val/dice_best`, the pruned
tag), then read back, ranked, and logged on the sweep's parent run."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from segtune.config import SearchDim, load_config
from segtune.insight import narrow, param_value, what_mattered
from tests.conftest import DEMO
from tracking.insight_figures import EVALUATOR, SKIPPED

# The demo's space: train.lr loguniform [3e-4, 1e-2], train.batch_size choice [2, 4, 8],
# train.epochs randint [3, 8]. lr decides the score (best near 2e-3); batch size and epochs vary
# alike among good and bad trials.
TRIALS = [  # (lr, batch_size, epochs, val/dice_best)
    (2.0e-3, 2, 3, 0.90), (2.4e-3, 8, 8, 0.88), (1.6e-3, 2, 5, 0.85), (5.0e-4, 8, 4, 0.50),
    (9.0e-3, 2, 6, 0.45), (3.5e-4, 4, 7, 0.40), (7.0e-3, 8, 3, 0.42), (4.0e-4, 2, 8, 0.38),
]


def _sweep(uri: str, trials: list[tuple], *, extra: bool = True) -> tuple[str, str, str]:
    """A parent run and its trial runs; with `extra`, a pruned trial (no val/dice_best, its best
    val/dice 0.6 at epoch 2) and a failed one (left out). Returns (experiment, sweep id, parent)."""
    client = MlflowClient(uri)
    experiment, sweep_id = f"insight-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    exp = client.create_experiment(experiment)
    tags = {"segtune.sweep_id": sweep_id}
    parent = client.create_run(exp, tags={**tags, "segtune.kind": "sweep"}).info.run_id
    rows = [(*t, "FINISHED", False) for t in trials]
    if extra:
        rows += [(6.0e-4, 4, 6, None, "FINISHED", True), (2.0e-3, 8, 5, 0.99, "FAILED", False)]
    for i, (lr, bs, epochs, best, status, pruned) in enumerate(rows):
        run = client.create_run(exp, tags={**tags, "segtune.kind": "trial", "segtune.trial_id": f"t{i}",
                                           "mlflow.parentRunId": parent}).info.run_id
        for key, value in {"train.lr": lr, "train.batch_size": bs, "train.epochs": epochs, "train.seed": 0}.items():
            client.log_param(run, key, value)
        for step, dice in enumerate((0.3, 0.6, 0.5) if best is None else (best / 2, best), start=1):
            client.log_metric(run, "val/dice", dice, step=step)
        if best is not None:
            client.log_metric(run, "val/dice_best", best)
        if pruned:
            client.set_tag(run, "segtune.pruned", "true")
        client.set_terminated(run, status)
    client.set_terminated(parent, "FINISHED")
    return experiment, sweep_id, parent


def _cfg(uri: str, experiment: str, space: dict | None = None):
    cfg = load_config(DEMO, [f"tracking.uri={uri}", f"tracking.experiment={experiment}"])
    if space is not None:
        cfg = cfg.model_copy(update={"search": cfg.search.model_copy(update={"space": space})})
    return cfg


def _files(client: MlflowClient, run_id: str) -> set[str]:
    return {Path(f.path).name for f in client.list_artifacts(run_id, "insight")}


def test_importance_figures_and_a_narrowed_space_land_on_the_sweep_run(mlflow_server, tmp_path) -> None:
    uri = mlflow_server.uri
    experiment, sweep_id, parent = _sweep(uri, TRIALS)
    cfg = _cfg(uri, experiment)
    lines: list[str] = []
    got = what_mattered(cfg, sweep_id, parent, log=lines.append)
    assert got.trials == 9 and not got.skipped  # 8 + the pruned one; the failed one is left out
    assert "1 left out" in lines[0] and "importance train.lr" in lines[0]

    client = MlflowClient(uri)
    run = client.get_run(parent)
    importance = {k.removeprefix("importance/"): v for k, v in run.data.metrics.items() if k.startswith("importance/")}
    assert set(importance) == set(cfg.search.space)
    # get_param_importances normalises PED-ANOVA's divergences: they sum to 1.
    assert math.fsum(importance.values()) == pytest.approx(1.0)
    assert max(importance, key=importance.get) == "train.lr"
    assert SKIPPED not in run.data.tags and run.data.tags[EVALUATOR].endswith("PedAnovaImportanceEvaluator")
    assert _files(client, parent) == {"importance.png", "parallel_coordinates.png", "suggested_space.yaml"}
    for png in ("importance.png", "parallel_coordinates.png"):
        assert Path(client.download_artifacts(parent, f"insight/{png}", str(tmp_path))).read_bytes()[:4] == b"\x89PNG"

    text = Path(client.download_artifacts(parent, "insight/suggested_space.yaml", str(tmp_path))).read_text()
    assert text.startswith("# Suggested search.space") and "# Rule: the top quartile" in text
    space = {k: SearchDim(**v) for k, v in yaml.safe_load(text)["search"]["space"].items()}
    assert set(space) == set(cfg.search.space)
    best_lr, best_bs, best_epochs, _ = TRIALS[0]
    assert best_bs in space["train.batch_size"].choice
    lr = space["train.lr"]
    assert lr.kind == "loguniform" and 3.0e-4 <= lr.args[0] <= best_lr <= lr.args[1] <= 1.0e-2
    assert lr.args[1] / lr.args[0] < 1.0e-2 / 3.0e-4  # narrowed: the top three sit near 2e-3
    assert space["train.batch_size"].choice == [2, 8]  # what the top three used, in the original order
    epochs = space["train.epochs"]
    assert epochs.kind == "randint" and 3 <= epochs.args[0] <= best_epochs <= epochs.args[1] <= 8


def test_two_trials_draw_what_they_can_and_say_why_not_the_rest(mlflow_server) -> None:
    uri = mlflow_server.uri
    experiment, sweep_id, parent = _sweep(uri, TRIALS[:2], extra=False)
    lines: list[str] = []
    got = what_mattered(_cfg(uri, experiment), sweep_id, parent, log=lines.append)
    assert got.trials == 2 and not got.importance and not got.suggested
    client = MlflowClient(uri)
    run = client.get_run(parent)
    assert "2 finished trials, 3 needed" in run.data.tags[SKIPPED] and "3 needed" in lines[0]
    assert not [k for k in run.data.metrics if k.startswith("importance/")]
    assert _files(client, parent) == {"parallel_coordinates.png"}


def test_one_dimension_gets_a_narrowed_space_but_no_importance(mlflow_server) -> None:
    uri = mlflow_server.uri
    experiment, sweep_id, parent = _sweep(uri, TRIALS[:4], extra=False)
    cfg = _cfg(uri, experiment, space={"train.lr": SearchDim(loguniform=(3.0e-4, 1.0e-2))})
    lines: list[str] = []
    got = what_mattered(cfg, sweep_id, parent, log=lines.append)
    assert not got.importance and list(got.suggested) == ["train.lr"]
    client = MlflowClient(uri)
    assert "one dimension (train.lr)" in client.get_run(parent).data.tags[SKIPPED]
    assert _files(client, parent) == {"parallel_coordinates.png", "suggested_space.yaml"}


def test_a_sweep_with_no_trials_logs_nothing_and_says_so(mlflow_server) -> None:
    uri = mlflow_server.uri
    experiment, sweep_id, parent = _sweep(uri, [], extra=False)
    lines: list[str] = []
    got = what_mattered(_cfg(uri, experiment), sweep_id, parent, log=lines.append)
    assert got.trials == 0 and not got.files and "no finished trial with val/dice" in lines[0]


@pytest.mark.parametrize(("dim", "top", "expected"), [
    (SearchDim(uniform=(0.0, 1.0)), [0.5, 0.5], (0.4, 0.6)),
    (SearchDim(uniform=(0.0, 1.0)), [0.0, 0.95], (0.0, 1.0)),  # widened past the bounds: clipped
    (SearchDim(randint=(1, 2)), [1, 1], (1, 2)),  # still a range
    (SearchDim(randint=(0, 100)), [40, 50], (30, 60)),
    (SearchDim(loguniform=(1e-4, 1e-2)), [1e-3, 1e-3], (6.3e-4, 1.59e-3)),  # +-0.2 decades, 3 digits outward
])
def test_narrowing_contains_the_top_and_stays_in_bounds(dim, top, expected) -> None:
    got = narrow(dim, top)
    assert got.kind == dim.kind and got.args == pytest.approx(expected)


def test_params_read_back_as_values_of_their_dimension() -> None:
    assert param_value(SearchDim(choice=[2, 4, 8]), "4") == 4
    assert param_value(SearchDim(choice=[1, 2]), "2.0") == 2  # a float field logs the choice as 2.0
    assert param_value(SearchDim(choice=["box", "points"]), "box") == "box"
    assert param_value(SearchDim(randint=(3, 8)), "5") == 5
    assert param_value(SearchDim(loguniform=(1e-4, 1e-2)), "0.001") == 1e-3
    assert param_value(SearchDim(loguniform=(1e-4, 1e-2)), "0.5") is None  # outside: not comparable
    assert param_value(SearchDim(uniform=(0.0, 1.0)), "") is None


def test_a_sweep_minimising_its_metric_narrows_around_its_lowest_trials() -> None:
    from segtune.insight import importance, suggest

    space = load_config(DEMO).search.space
    points = [({"train.lr": lr, "train.batch_size": bs, "train.epochs": ep}, 1.0 - v) for lr, bs, ep, v in TRIALS]
    found = importance(space, points, "min")
    assert math.fsum(found.values()) == pytest.approx(1.0) and max(found, key=found.get) == "train.lr"
    lr = suggest(space, points, "min")["train.lr"]
    assert lr.args[0] <= min(t[0] for t in TRIALS[:3]) and max(t[0] for t in TRIALS[:3]) <= lr.args[1] < 5.0e-3
