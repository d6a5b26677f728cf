"""Zero-shot runs on the tracking server: kind, tags, params, metrics, overlays.

The twins (tests/study/conftest.py) score SAM's automatic mask generator, CLIPSeg with class
names, PA-SAM with two points and MedSAM with boxes, untrained, through `segtune eval --zero-shot`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from segtune.amg import amg_scores, build_generator, generate
from segtune.loaders import eval_split
from segtune.models import build_model
from segtune.prepare import prepare_data
from tests.study.conftest import THESIS, twin_config


def _run(twin_runs, name: str):
    return MlflowClient(twin_runs.uri).get_run(twin_runs.zero_shot[name].run_id)


@pytest.mark.parametrize("name, protocol, prompt, samples", [
    ("cityscapes_sam_amg_tiny", "amg", "random_point", 2),  # eval.sample: 2
    ("cityscapes_clipseg_tiny", "prompted", "text", 4),  # eval.sample: 4
    ("qata_pasam_tiny", "prompted", "k_points", 3),  # the synthetic QaTa test split has 3 X-rays
    ("qata_medsam_tiny", "prompted", "box", 3),
])
def test_zero_shot_run_is_logged_with_its_kind_and_setting(twin_runs, name: str, protocol: str, prompt: str,
                                                           samples: int) -> None:
    run = _run(twin_runs, name)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["segtune.kind"] == "zero_shot" and tags["segtune.protocol"] == protocol
    assert tags["segtune.split"] == "test" and tags["segtune.sweep_id"] == "none"
    for tag in ("segtune.model", "segtune.dataset", "segtune.git_sha", "segtune.data_hash"):
        assert tags[tag]
    assert tags["segtune.model"].endswith("_tiny") and tags["mlflow.runName"].startswith("zero-shot")
    # Params are the flattened config, so the run says exactly what was scored.
    assert params["name"] == name and params["prompt.eval"] == prompt and params["eval.protocol"] == protocol
    assert 0.0 <= metrics["test/iou"] <= metrics["test/dice"] <= 1.0
    assert metrics["test/samples"] == samples


def test_amg_run_logs_both_protocols_and_they_match_a_recomputation(twin_runs) -> None:
    m = _run(twin_runs, "cityscapes_sam_amg_tiny").data.metrics
    for key in ("test/iou", "test/dice", "test/iou_best_mask", "test/dice_best_mask", "test/masks",
                "test/masks_inside"):
        assert key in m
    # The same generator over the same two images, scored by the protocol functions directly.
    cfg = twin_config(THESIS / "tiny" / "cityscapes_sam_amg_tiny.yaml", twin_runs.root, twin_runs.uri)
    store, _ = prepare_data(cfg, log=lambda _: None)
    gen = build_generator(build_model(cfg.model).eval(), cfg.eval.amg)
    ds = eval_split(cfg, store, "test", cfg.eval.sample)
    scores = [amg_scores(generate(gen, ds[i]["image"]), ds[i]["mask"][0].numpy() > 0.5,
                         cfg.eval.amg.inside_threshold)[0] for i in range(len(ds))]
    assert m["test/iou"] == pytest.approx(np.mean([s["iou"] for s in scores]))
    assert m["test/iou_best_mask"] == pytest.approx(np.mean([s["iou_best_mask"] for s in scores]))
    assert m["test/iou_best_mask"] >= 0.0 and m["test/masks"] >= m["test/masks_inside"]
    # Long work shows its progress: counted per image, ending with the total.
    lines = twin_runs.logs["cityscapes_sam_amg_tiny"]
    assert f"AMG: generating masks: done, {len(ds)} images in 0:00:" in "\n".join(lines)
    assert any(line.startswith(f"AMG: generating masks: 1/{len(ds)} images") for line in lines)


def test_zero_shot_scoring_shows_progress_per_image(twin_runs) -> None:
    prompted = [name for name, result in twin_runs.zero_shot.items()
                if "AMG" not in "\n".join(twin_runs.logs[name])]
    assert prompted
    for name in prompted:
        text = "\n".join(twin_runs.logs[name])
        assert "scoring " in text and ": done, " in text and " images in " in text, name


def test_overlays_are_logged_as_pngs_of_three_patch_wide_panels(twin_runs, tmp_path: Path) -> None:
    client = MlflowClient(twin_runs.uri)
    for name in ("cityscapes_clipseg_tiny", "qata_medsam_tiny"):
        run_id = twin_runs.zero_shot[name].run_id
        names = sorted(a.path for a in client.list_artifacts(run_id, "overlays"))
        assert names == ["overlays/overlay_00.png", "overlays/overlay_01.png"]  # eval.overlays: 2
        local = Path(client.download_artifacts(run_id, "overlays", str(tmp_path / name)))
        for png in local.glob("*.png"):
            with Image.open(png) as img:
                assert img.size == (3 * 256, 256) and img.mode == "RGB"


def test_fine_tuned_trials_log_overlays_too(twin_runs, tmp_path: Path) -> None:
    client = MlflowClient(twin_runs.uri)
    exp = client.get_experiment_by_name(twin_runs.experiment)
    trial = client.search_runs([exp.experiment_id], filter_string=(
        "params.name = 'fire_sam_tiny' and tags.`segtune.kind` = 'trial'"))[0]
    local = Path(client.download_artifacts(trial.info.run_id, "overlays", str(tmp_path)))
    pngs = sorted(local.glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as img:
        assert img.size == (768, 256)
        # The box prompt of fire_sam (tested with boxes) is drawn in the first panel.
        first = np.asarray(img)[:, :256]
        assert (np.all(first == (255, 220, 0), axis=-1)).any()
