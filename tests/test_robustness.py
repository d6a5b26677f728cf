"""The prompt-robustness matrix: click placement on hand-made masks, the click loop on a real
tiny SAM, the eval kinds per family, `--min-prompt-iou` parsing, and `segtune robustness` on a
trained run (metrics, CSV, heatmap). Finalists after a sweep and the promotion gate are tested
in tests/test_sweep.py, on its sweep."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from segtune.clicks import PAD, Click, add_clicks, click_scores, next_click, start_points
from segtune.errors import ConfigError
from segtune.prompt_matrix import columns, eval_kinds, parse_floors
from segtune.prompts import PROMPTS, PromptOptions, box

H = W = 40


def _square(y0: int, x0: int, size: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


def test_a_missed_region_gets_a_positive_click_at_its_centre() -> None:
    gt = _square(5, 20, 11)  # rows 5..15, cols 20..30: centre (x=25, y=10)
    assert next_click(gt, np.zeros_like(gt)) == Click(25, 10, 1, 121)


def test_a_false_region_gets_a_negative_click_at_its_centre() -> None:
    gt = _square(2, 2, 3)
    pred = gt | _square(21, 11, 9)  # a false square, rows 21..29, cols 11..19: centre (15, 25)
    assert next_click(gt, pred) == Click(15, 25, 0, 81)


def test_the_largest_error_region_is_clicked_first() -> None:
    gt = _square(0, 0, 20)
    pred = gt.copy()
    pred[0:5, 0:5] = False  # missed: 25 px in the corner
    pred |= _square(25, 25, 7)  # false: 49 px
    assert next_click(gt, pred).label == 0
    pred |= gt
    pred[0:9, 0:9] = False  # missed now 81 px, false 49 px
    click = next_click(gt, pred)
    assert click.label == 1 and gt[click.y, click.x] and not pred[click.y, click.x]
    # Only the largest connected piece counts, not all missed pixels together.
    two = _square(0, 0, 5) | _square(20, 20, 6)
    assert next_click(two, np.zeros_like(two)) == Click(22, 22, 1, 36)


def test_equal_regions_click_positive_and_a_perfect_mask_gets_none() -> None:
    gt = _square(0, 0, 5)
    pred = _square(30, 30, 5)
    assert next_click(gt, pred).label == 1
    assert next_click(gt, gt) is None


def test_a_region_on_the_image_border_is_clicked_inside_not_on_the_edge() -> None:
    gt = np.zeros((H, W), bool)
    gt[:, :9] = True  # a band 9 px wide along the left edge: the border is boundary too
    click = next_click(gt, np.zeros_like(gt))
    assert click.x == 4 and 4 <= click.y <= H - 5


def test_clicks_are_appended_with_padding_for_images_without_error() -> None:
    points, labels = start_points(np.stack([_square(5, 20, 11), _square(0, 0, 3)]).astype(np.uint8))
    assert points.tolist() == [[[25, 10]], [[1, 1]]] and labels.tolist() == [[1], [1]]
    points, labels = add_clicks(points, labels, [Click(3, 4, 0, 9), None])
    assert points.shape == (2, 2, 2) and points.dtype == np.float32 and labels.dtype == np.int64
    assert points[:, 1].tolist() == [[3, 4], [0, 0]] and labels.tolist() == [[1, 0], [1, PAD]]


def test_jittered_box_is_the_training_jitter_drawn_at_eval() -> None:
    mask = _square(10, 10, 12).astype(np.uint8)
    opts = PromptOptions(train=False, box_jitter=5)
    tight = box(mask, np.random.default_rng(0), opts).box
    drawn = [PROMPTS["jittered_box"](mask, np.random.default_rng(s), opts).box for s in range(20)]
    for s, b in enumerate(drawn):
        assert np.array_equal(b, box(mask, np.random.default_rng(s), PromptOptions(train=True, box_jitter=5)).box)
        grow = (b - tight) * np.array([-1, -1, 1, 1])
        assert (grow >= 0).all() and (grow <= 5).all()
    assert len({tuple(b) for b in drawn}) > 1
    assert np.array_equal(PROMPTS["jittered_box"](mask, np.random.default_rng(3), opts).box, drawn[3])  # seeded


def test_eval_kinds_follow_the_family() -> None:
    from segtune.config import load_config
    from tests.conftest import DEMO

    sam = load_config(DEMO, [])
    assert eval_kinds(sam) == ["random_point", "center_point", "k_points", "box", "jittered_box"]
    assert columns(sam)[-4:] == ["clicks_0", "clicks_1", "clicks_3", "clicks_5"]
    medsam = sam.model_copy(update={"model": sam.model.model_copy(update={"name": "medsam"})})
    assert columns(medsam) == ["box", "jittered_box"]  # boxes only: no clicks
    clipseg = sam.model_copy(update={"model": sam.model.model_copy(update={"name": "clipseg"}),
                                     "prompt": sam.prompt.model_copy(update={"text": "mitochondria"})})
    assert columns(clipseg) == ["text"]


def test_floors_parse_and_malformed_values_name_the_option() -> None:
    assert parse_floors("box=0.6, random_point=0.4,clicks_3=1.01") == {"box": 0.6, "random_point": 0.4,
                                                                         "clicks_3": 1.01}
    assert parse_floors(None) == {}
    for bad, why in [("box", "not KIND=IOU"), ("box=high", "not a number"), ("boxes=0.5", "unknown prompt kind"),
                     ("box=0.5,box=0.6", "given twice"), ("=0.5", "not KIND=IOU"), ("box=nan", "not a number")]:
        with pytest.raises(ConfigError, match=why) as err:
            parse_floors(bad)
        assert str(err.value).startswith("--min-prompt-iou") and "\n" not in str(err.value)


def test_promote_with_a_malformed_floor_is_one_line_and_exit_1(monkeypatch, capsys) -> None:
    from segtune.cli import main

    # In this process (the CLI's own entry point, argv as a shell gives it): no server is asked.
    monkeypatch.setattr(sys, "argv", ["segtune", "promote", "nowhere", "--tracking-uri", "http://127.0.0.1:9",
                                      "--min-prompt-iou", "box=0.6,random_point"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --min-prompt-iou 'box=0.6,random_point'"), err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, em_data, mlflow_server):
    """One short `segtune train` run of the tiny SAM: (config, run id)."""
    from segtune.commands import train_one
    from segtune.config import load_config
    from tests.conftest import DEMO

    tmp = tmp_path_factory.mktemp("robust")
    cfg = load_config(DEMO, [
        f"dataset.root={em_data}", f"dataset.cache_dir={em_data / 'cache'}",
        "dataset.max_train=4", "dataset.max_eval=4", "train.epochs=1", "train.batch_size=4",
        f"tracking.uri={mlflow_server.uri}", "tracking.experiment=robustness-test",
    ])
    train_one(cfg, tmp / "train", log=lambda _: None)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("robustness-test")
    (run,) = client.search_runs([exp.experiment_id])
    return cfg, run.info.run_id


class Recording(torch.nn.Module):
    """The real model, noting the prompts and thresholded masks of every decode (to check the
    loop's bookkeeping against what the model answered)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.calls = model, []

    def encode(self, images):
        return self.model.encode(images)

    def forward(self, images, prompts, embeddings=None):
        logits = self.model(images, prompts, embeddings=embeddings)
        self.calls.append((prompts.points.cpu().numpy().copy(), prompts.labels.cpu().numpy().copy(),
                           (logits > 0)[:, 0].cpu().numpy()))
        return logits


def test_the_click_loop_on_a_real_tiny_sam_clicks_where_the_last_mask_was_wrong(trained, tmp_path) -> None:
    from segtune.checkpoint import load_model
    from segtune.loaders import eval_loader, eval_split
    from segtune.prepare import prepare_data
    from segtune.sources import from_run

    cfg, run_id = trained
    model, trained_cfg = load_model(from_run(cfg.tracking.uri, run_id, tmp_path))
    store, _ = prepare_data(trained_cfg, log=lambda _: None)
    batch = next(iter(eval_loader(trained_cfg, eval_split(trained_cfg, store, "val", 3))))
    gt = batch["mask"][:, 0].numpy() > 0.5
    recording = Recording(model)
    scores = click_scores(recording, [batch], counts=(0, 1, 3))
    assert set(scores) == {0, 1, 3} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert [c[0].shape for c in recording.calls] == [(len(gt), n, 2) for n in (1, 2, 3, 4)]  # one encode, 4 decodes
    points, labels, kept = recording.calls[0]
    assert points.tolist() == start_points(gt.astype(np.uint8))[0].tolist() and (labels == 1).all()
    kept = kept.copy()
    for points, labels, fresh in recording.calls[1:]:
        for i in range(len(gt)):
            click = next_click(gt[i], kept[i])  # from the mask the loop held after the last step
            if click is None:
                assert labels[i, -1] == PAD
                continue
            assert points[i, -1].tolist() == [click.x, click.y] and labels[i, -1] == click.label
            assert gt[i, click.y, click.x] == bool(click.label) != kept[i, click.y, click.x]
            kept[i] = fresh[i]
    from segtune.metrics import iou

    final = iou(torch.from_numpy(kept)[:, None], torch.from_numpy(gt)[:, None]).mean().item()
    assert scores[3] == pytest.approx(final)


def test_promote_below_a_prompt_floor_fails_its_gate_and_is_refused_champion(trained, monkeypatch, capsys) -> None:
    from segtune.cli import main

    cfg, run_id = trained
    client = MlflowClient(cfg.tracking.uri)
    unscored = not any(k.startswith("robust/") for k in client.get_run(run_id).data.metrics)
    monkeypatch.setattr(sys, "argv", ["segtune", "promote", "robustness-test", "--tracking-uri", cfg.tracking.uri,
                                      "--run", run_id, "--name", "segtune-robust-test", "--approve", "--reason", "x",
                                      "--min-prompt-iou", "box=1.01,random_point=0"])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    assert exit_.value.code == 1 and "failed its gates (prompt_iou)" in out.err, out.err
    assert "gate prompt_iou: FAILED" in out.out
    (version,) = client.search_model_versions("name = 'segtune-robust-test'")
    version = client.get_model_version("segtune-robust-test", version.version)
    assert version.tags["segtune.gate.prompt_iou"] == "failed" and version.tags["segtune.gates"] == "failed"
    for gate in ("checkpoint", "data", "rescore", "margin"):
        assert version.tags[f"segtune.gate.{gate}"] == "passed"
    box_iou = client.get_run(run_id).data.metrics["robust/box/iou"]  # scored for the gate if it was missing
    assert float(version.tags["segtune.robust.box"]) == pytest.approx(box_iou, abs=1e-6)
    row = next(line for line in version.description.splitlines() if line.startswith("| prompt_iou |"))
    assert f"box {box_iou:.4f} < 1.01 (below its floor)" in row and "random_point" in row and "4 samples" in row
    assert ("scored now and logged on the run" if unscored else "read from the run") in row
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias("segtune-robust-test", "champion")


def test_robustness_logs_metrics_csv_and_heatmap_on_the_run(trained, tmp_path) -> None:
    from segtune.robustness import robustness

    cfg, run_id = trained
    lines: list[str] = []
    result = robustness(cfg.tracking.uri, run_id, log=lines.append)
    assert result.run_id == run_id
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(run_id)
    expected = ["random_point", "center_point", "k_points", "box", "jittered_box",
                "clicks_0", "clicks_1", "clicks_3", "clicks_5"]
    for col in expected:
        assert 0.0 <= run.data.metrics[f"robust/{col}/iou"] <= 1.0, col
        assert run.data.metrics[f"robust/{col}/iou"] == pytest.approx(result.matrix.iou[col])
    assert run.data.tags["segtune.robust.split"] == "val"
    assert run.data.tags["segtune.robust.samples"] == str(result.matrix.samples) == "4"
    # The start of the click loop is the centre point prompt: the same masks, the same score.
    assert result.matrix.iou["clicks_0"] == pytest.approx(result.matrix.iou["center_point"], abs=1e-6)
    local = Path(client.download_artifacts(run_id, "robustness", str(tmp_path)))
    with (local / "robustness.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["eval_prompt"] for r in table] == expected
    assert {r["run_id"] for r in table} == {run_id} and {r["train_prompt"] for r in table} == {"random_point"}
    assert all(r["split"] == "val" and r["samples"] == "4" for r in table)
    assert Image.open(local / "robustness.png").size[0] > 300
    assert any("clicks_5" in line for line in lines)
