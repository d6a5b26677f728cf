"""Every thesis experiment file: loads, holds the thesis's number, has a twin that runs.

The reference values below are the results table of ../shared/DESIGN.md, copied by hand: a
change to a file's `reference:` must be a deliberate change here too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from segtune.config import load_config
from segtune.data import TWINS as DATA_TWINS
from tests.study.conftest import THESIS, TWINS, ZERO_SHOT_TOO

# file name -> (test IoU, epochs or None for zero-shot, train Dice loss or None), per DESIGN.md.
DESIGN_TABLE = {
    "cityscapes_sam_amg": (0.923, None, None),
    "cityscapes_clipseg": (0.962, None, None),
    "fire_sam": (0.630, 20, None),  # the table names no epoch count; the file assumes 20
    "fire_clipseg": (0.682, 20, 0.201),
    "em_sam_e20": (0.254, 20, 0.158),
    "em_sam_e50": (0.271, 50, 0.060),
    "em_clipseg_e20": (0.153, 20, None),
    "em_clipseg_e50": (0.279, 50, 0.267),
    "qata_sam_e20": (0.135, 20, None),
    "qata_sam_e50": (0.168, 50, None),
    "qata_pasam": (0.623, None, None),
    "qata_medsam": (0.851, None, None),
    "qata_clipseg_e20": (0.145, 20, None),
    "qata_clipseg_e50": (0.211, 50, None),
}
# The thesis's setting of each row: model, train prompt, eval prompt, text, eval protocol.
SETTINGS = {
    "cityscapes_sam_amg": ("sam", None, None, None, "amg"),
    "cityscapes_clipseg": ("clipseg", "text", "text", None, "prompted"),
    "fire_sam": ("sam", "random_point", "box", None, "prompted"),
    "fire_clipseg": ("clipseg", "text", "text", "fire", "prompted"),
    "em_sam": ("sam", "random_point", "random_point", None, "prompted"),
    "em_clipseg": ("clipseg", "text", "text", "black shadow", "prompted"),
    "qata_sam": ("sam", "center_point", "center_point", None, "prompted"),
    "qata_pasam": ("pasam", None, "k_points", None, "prompted"),
    "qata_medsam": ("medsam", None, "box", None, "prompted"),
    "qata_clipseg": ("clipseg", "text", "text", "lungs", "prompted"),
}
FILES = sorted(THESIS.glob("*.yaml"))


def test_one_file_per_thesis_experiment_and_a_twin_of_each() -> None:
    assert {p.stem for p in FILES} == set(DESIGN_TABLE)
    assert {p.stem for p in TWINS} == {f"{name}_tiny" for name in DESIGN_TABLE}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_file_holds_the_thesis_setting_and_number(path: Path) -> None:
    cfg = load_config(path)
    iou, epochs, loss = DESIGN_TABLE[path.stem]
    ref = cfg.reference
    assert ref is not None and cfg.name == path.stem
    assert (ref.test_iou, ref.epochs, ref.train_dice_loss) == (iou, epochs, loss)
    model, train_prompt, eval_prompt, text, protocol = SETTINGS[ref.row]
    assert cfg.model.name == model and cfg.eval.protocol == protocol
    assert train_prompt in (None, cfg.prompt.train) and eval_prompt in (None, cfg.prompt.eval)
    assert cfg.prompt.text == text
    if ref.row == "qata_pasam":
        assert cfg.prompt.k == 2  # "two points"
    # The thesis's recipe: Dice loss and Adam, 20 or 50 epochs; real weights, no tiny presets.
    assert (cfg.train.loss, cfg.train.optimizer) == ("dice", "adam")
    assert cfg.train.epochs == (epochs or 20) and cfg.model.variant != "tiny"
    # A real sweep over lr, batch size and epochs.
    assert {"train.lr", "train.batch_size", "train.epochs"} <= set(cfg.search.space)
    assert cfg.dataset.name in DATA_TWINS.values()


@pytest.mark.parametrize("path", TWINS, ids=lambda p: p.stem)
def test_twin_mirrors_its_file_on_synthetic_data(path: Path) -> None:
    twin, real = load_config(path), load_config(THESIS / path.name.replace("_tiny.yaml", ".yaml"))
    assert twin.reference == real.reference
    assert DATA_TWINS[twin.dataset.name] == real.dataset.name
    assert twin.model.name == real.model.name and twin.model.variant == "tiny" and twin.model.checkpoint is None
    assert twin.prompt == real.prompt and twin.eval.protocol == real.eval.protocol
    assert twin.train.epochs <= 2 and twin.search.space.keys() == real.search.space.keys()
    assert (twin.prompt_search is None) == (real.prompt_search is None)


def test_every_twin_ran_and_logged_its_runs(twin_runs) -> None:
    client = MlflowClient(twin_runs.uri)
    exp = client.get_experiment_by_name(twin_runs.experiment)
    for path in TWINS:
        cfg = load_config(path)
        # The twin's own runs: `segtune train` trials and zero-shot scorings, not sweeps or evals
        # other tests add to the same experiment.
        runs = [r for r in client.search_runs([exp.experiment_id], filter_string=(
                    f"params.name = '{cfg.name}' and tags.`segtune.sweep_id` = 'none'"))
                if r.data.tags["segtune.kind"] in ("trial", "zero_shot")]
        kinds = sorted(r.data.tags["segtune.kind"] for r in runs)
        fine_tuned = cfg.reference.epochs is not None
        scored = not fine_tuned or cfg.name in ZERO_SHOT_TOO
        assert kinds == ["trial"] * fine_tuned + ["zero_shot"] * scored, cfg.name
        for r in runs:
            assert r.info.status == "FINISHED", (cfg.name, r.data.tags.get("segtune.error"))
            assert 0.0 <= r.data.metrics["test/iou"] <= 1.0
            assert r.data.params["reference.test_iou"] == str(cfg.reference.test_iou)
        if fine_tuned:
            assert twin_runs.trained[cfg.name]["test/iou"] == pytest.approx(
                next(r for r in runs if r.data.tags["segtune.kind"] == "trial").data.metrics["test/iou"])
