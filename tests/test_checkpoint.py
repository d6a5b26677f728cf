"""Trial checkpoints: round trips to identical logits, the config inside, optimizer state,
strict loading with the mismatched keys named, and weights-only reads throughout segtune/."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from segtune.checkpoint import (
    LEGACY_OPTIMIZER,
    OPTIMIZER,
    STATE,
    WEIGHTS,
    load_model,
    load_optimizer,
    load_weights,
    read_state,
    save_checkpoint,
)
from segtune.config import ExperimentConfig, ModelConfig, apply_params, load_config
from segtune.errors import CheckpointError
from segtune.losses import dice_loss
from segtune.models import MODELS, Segmenter, build_model
from segtune.prompts import PromptBatch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "demo.yaml"
TEXT_FAMILIES = {"clipseg"}  # prompted by text; the others by points
# Every (family, policy) pair: a checkpoint must round-trip under each.
PAIRS = [(f, p) for f in sorted(MODELS)
         for p in build_model(ModelConfig(name=f, variant="tiny")).policies]


def _batch(family: str = "sam") -> tuple[torch.Tensor, torch.Tensor, PromptBatch]:
    """One fixed image (1,1,256,256) with a dark square, its mask, and a prompt for it."""
    img = np.full((1, 1, 256, 256), 140, np.uint8)
    img[..., 80:150, 100:180] = 40
    mask = (img < 100).astype(np.float32)
    if family in TEXT_FAMILIES:
        prompts = PromptBatch(texts=["a dark square"])
    else:
        prompts = PromptBatch(points=torch.tensor([[[140.0, 115.0]]]), labels=torch.ones(1, 1, dtype=torch.int64))
    return torch.from_numpy(img), torch.from_numpy(mask), prompts


def _config(policy: str, family: str = "sam") -> ExperimentConfig:
    return apply_params(load_config(DEMO), {"model.name": family, "model.train": policy})


def _trained(policy: str, family: str = "sam") -> tuple[Segmenter, torch.optim.Optimizer, ExperimentConfig]:
    """A tiny model after two Adam steps, so its weights and optimizer state differ from init."""
    cfg = _config(policy, family)
    model = build_model(cfg.model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, masks, prompts = _batch(family)
    for _ in range(2):
        opt.zero_grad()
        dice_loss(model(images, prompts), masks).backward()
        opt.step()
    return model, opt, cfg


@pytest.fixture(scope="module", params=PAIRS, ids=[f"{f}-{p}" for f, p in PAIRS])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(checkpoint dir, trained model, optimizer, config) for each family and policy."""
    family, policy = request.param
    model, opt, cfg = _trained(policy, family)
    path = save_checkpoint(tmp_path_factory.mktemp(f"ckpt-{family}-{policy}") / "last", model, opt, cfg,
                           {"epoch": 3, "metrics": {"val/dice": np.float32(0.5)}, "best": {"dice": 0.5, "epoch": 3}})
    return path, model, opt, cfg


@pytest.fixture(scope="module")
def decoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mask_decoder checkpoint with optimizer state, for the tests that damage a copy."""
    model, opt, cfg = _trained("mask_decoder")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "last", model, opt, cfg, {"epoch": 1})


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "c"))


def _logits(model: Segmenter, family: str) -> torch.Tensor:
    images, _, prompts = _batch(family)
    model.eval()
    with torch.no_grad():
        return model(images, prompts)


def test_round_trip_gives_identical_logits(saved) -> None:
    path, model, _, cfg = saved
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS, OPTIMIZER, STATE, "manifest.json"])
    loaded, loaded_cfg = load_model(path)
    assert loaded_cfg == cfg
    family = cfg.model.name
    assert torch.equal(_logits(loaded, family), _logits(model, family))
    # ...and training changed the model, so this is not init compared with init.
    assert not torch.equal(_logits(build_model(cfg.model), family), _logits(model, family))


def test_weights_file_holds_exactly_the_trainable_parameters(saved) -> None:
    path, model, _, _ = saved
    weights = load_file(str(path / WEIGHTS))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert weights.keys() == trainable.keys()
    assert all(torch.equal(weights[n], trainable[n].detach()) for n in weights)


def test_state_json_holds_the_config_and_the_state(saved) -> None:
    path, _, _, cfg = saved
    raw = json.loads((path / STATE).read_text())
    assert raw["config"] == json.loads(json.dumps(cfg.model_dump()))
    assert ExperimentConfig.model_validate(raw["config"]) == cfg
    assert raw["epoch"] == 3 and raw["best"] == {"dice": 0.5, "epoch": 3}
    assert raw["metrics"]["val/dice"] == 0.5  # numpy scalars are written as floats
    assert read_state(path) == raw


def test_optimizer_state_reloads(saved) -> None:
    path, _, opt, _ = saved
    loaded, _ = load_model(path)
    fresh = torch.optim.Adam([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
    assert load_optimizer(path, fresh) is True
    want, got = opt.state_dict(), fresh.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert want["state"].keys() == got["state"].keys() and len(got["state"]) > 0
    for i, s in want["state"].items():
        for k, v in s.items():
            assert torch.equal(got["state"][i][k], v), (i, k)


def test_no_optimizer_file_is_reported_not_raised(tmp_path: Path) -> None:
    cfg = _config("mask_decoder")
    model = build_model(cfg.model)
    path = save_checkpoint(tmp_path / "c", model, None, cfg, {"epoch": 1})
    assert not (path / OPTIMIZER).exists()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    assert load_optimizer(path, opt) is False


def test_save_replaces_an_existing_checkpoint_whole(saved, tmp_path: Path) -> None:
    _, model, _, cfg = saved
    path = tmp_path / "c"
    save_checkpoint(path, model, torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]), cfg, {"epoch": 1})
    save_checkpoint(path, model, None, cfg, {"epoch": 2})
    assert read_state(path)["epoch"] == 2
    assert not (path / OPTIMIZER).exists()  # no stale file from the first save
    assert not path.with_name("c.tmp").exists()


def _with_policy(src: Path, dst: Path, policy: str) -> Path:
    """A copy of a checkpoint whose state.json says another training policy."""
    shutil.copytree(src, dst)
    raw = json.loads((dst / STATE).read_text())
    raw["config"]["model"]["train"] = policy
    (dst / STATE).write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("saved_as, loaded_as, word", [
    ("mask_decoder", "full", "missing"),  # the encoder's weights are not in the file
    ("full", "mask_decoder", "unexpected"),  # the file holds more than the decoder
])
def test_checkpoint_of_one_policy_refused_under_another(tmp_path: Path, saved_as: str, loaded_as: str,
                                                         word: str) -> None:
    cfg = _config(saved_as)
    src = save_checkpoint(tmp_path / "src", build_model(cfg.model), None, cfg, {"epoch": 1})
    path = _with_policy(src, tmp_path / "dst", loaded_as)
    with pytest.raises(CheckpointError) as exc:
        load_model(path)
    msg = str(exc.value)
    assert word in msg and str(path / WEIGHTS) in msg


def test_weights_of_another_shape_are_named(decoder_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(decoder_ckpt, tmp_path)
    weights = load_file(str(path / WEIGHTS))
    key = "sam.mask_decoder.iou_token.weight"
    weights[key] = torch.zeros(1, 7)
    save_file(weights, str(path / WEIGHTS))
    with pytest.raises(CheckpointError, match=rf"another shape.*{key}"):
        load_model(path)


def test_folder_without_state_json_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / WEIGHTS).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no state.json") as exc:
        load_model(folder)
    assert str(folder) in str(exc.value)


def test_corrupt_state_json_is_named(decoder_ckpt: Path, tmp_path: Path) -> None:
    path = _copy(decoder_ckpt, tmp_path)
    (path / STATE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint state") as exc:
        read_state(path)
    assert str(path / STATE) in str(exc.value)


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_unreadable_weights_are_named(decoder_ckpt: Path, tmp_path: Path, damage: str) -> None:
    path = _copy(decoder_ckpt, tmp_path)
    if damage == "missing":
        (path / WEIGHTS).unlink()
    else:
        (path / WEIGHTS).write_bytes(b"\x00" * 64)
    model = build_model(_config("mask_decoder").model)
    with pytest.raises(CheckpointError, match="cannot read the checkpoint weights") as exc:
        load_weights(path, model)
    assert str(path / WEIGHTS) in str(exc.value)


class _NotATensor:
    pass


@pytest.mark.parametrize("content", ["garbage", "truncated", "another_model", "legacy_garbage", "legacy_pickled_object"])
def test_unreadable_optimizer_state_is_a_checkpoint_error_naming_the_file(decoder_ckpt: Path, tmp_path: Path,
                                                                          content: str) -> None:
    path = _copy(decoder_ckpt, tmp_path)
    bad = path / OPTIMIZER
    if content == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(256))
    elif content == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif content == "another_model":  # a mask_decoder checkpoint's state given to a full model's optimizer
        pass
    else:  # a checkpoint from before optimizer.safetensors, damaged
        bad.unlink()
        bad = path / LEGACY_OPTIMIZER
        if content == "legacy_garbage":
            bad.write_bytes(np.random.default_rng(0).bytes(256))
        else:
            torch.save({"state": {}, "param_groups": [], "x": _NotATensor()}, bad)
    model, _ = load_model(path)
    params = model.parameters() if content == "another_model" else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params)
    with pytest.raises(CheckpointError) as exc:
        load_optimizer(path, opt)
    assert str(bad) in str(exc.value)


def test_an_older_checkpoints_optimizer_pt_still_restores(decoder_ckpt: Path, tmp_path: Path) -> None:
    """Checkpoints written before optimizer.safetensors hold a torch.save'd state dict."""
    model, opt, _ = _trained("mask_decoder")
    path = _copy(decoder_ckpt, tmp_path)
    (path / OPTIMIZER).unlink()
    torch.save(opt.state_dict(), path / LEGACY_OPTIMIZER)
    fresh = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert load_optimizer(path, fresh) is True
    got = fresh.state_dict()["state"]
    assert all(torch.equal(got[i][k], v) for i, s in opt.state_dict()["state"].items() for k, v in s.items())


def _torch_load_calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "load" and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"]


def test_every_torch_load_is_weights_only() -> None:
    files = sorted((ROOT / "segtune").rglob("*.py")) + sorted((ROOT / "tracking").rglob("*.py"))
    assert files
    calls, unsafe = 0, []
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            # `from torch import load` would hide a call from the check below.
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert all(a.name != "load" for a in node.names), f"{f}:{node.lineno} imports torch.load by name"
        for call in _torch_load_calls(tree):
            calls += 1
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                unsafe.append(f"{f.relative_to(ROOT)}:{call.lineno}")
    assert calls >= 2  # the checker sees the calls we know of (sam.py, checkpoint.py)
    assert not unsafe, f"torch.load without weights_only=True at {', '.join(unsafe)}"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path: Path) -> None:
    from segtune.checkpoint import first_intact, save_checkpoint
    from segtune.config import load_config
    from segtune.models import build_model
    from tests.conftest import DEMO

    cfg: ExperimentConfig = load_config(DEMO)
    model = build_model(cfg.model)
    old = save_checkpoint(tmp_path / "checkpoint_000000", model, None, cfg, {"epoch": 1})
    new = save_checkpoint(tmp_path / "checkpoint_000001", model, None, cfg, {"epoch": 2})
    weights = new / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut short mid-upload
    said: list[str] = []
    assert first_intact([new, old], said.append) == old
    assert "damaged" in said[0] and "model.safetensors" in said[0]
    assert first_intact([new], said.append) is None


def test_the_writer_saves_the_weights_and_optimizer_state_as_they_were_at_start(tmp_path: Path) -> None:
    """The loop validates (and the next epoch may step) while the checkpoint is written."""
    from segtune.checkpoint import CheckpointWriter

    model, opt, cfg = _trained("mask_decoder")
    want_w = {k: v.clone() for k, v in model.trainable_state().items()}
    want_opt = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    writer = CheckpointWriter(tmp_path / "last")
    writer.start(model, opt)
    images, masks, prompts = _batch()
    for _ in range(2):  # steps taken while the writer may still be writing
        opt.zero_grad()
        dice_loss(model(images, prompts), masks).backward()
        opt.step()
    path = writer.finish(cfg, {"epoch": 1})
    got_w = load_file(str(path / WEIGHTS))
    assert got_w.keys() == want_w.keys()
    assert all(torch.equal(got_w[k], want_w[k]) for k in want_w)
    assert any(not torch.equal(v, want_w[k]) for k, v in model.trainable_state().items()), "the steps changed nothing"
    got_opt = {i: {k: v for k, v in load_file(str(path / OPTIMIZER)).items() if k.startswith(f"{i}.")}
               for i in want_opt}
    for i, s in want_opt.items():
        assert {f"{i}.{k}" for k in s} == got_opt[i].keys()
        assert all(torch.equal(got_opt[i][f"{i}.{k}"], v) for k, v in s.items())
    assert not (tmp_path / "last.tmp").exists() and read_state(path)["epoch"] == 1


def test_a_linked_best_copy_survives_the_next_epochs_checkpoint(tmp_path: Path) -> None:
    from segtune.checkpoint import link_copy
    from tracking.artifacts import verify_manifest, write_manifest

    model, opt, cfg = _trained("mask_decoder")
    last, best = tmp_path / "last", tmp_path / "best"
    save_checkpoint(last, model, opt, cfg, {"epoch": 1})
    link_copy(last, best)
    kept = load_file(str(best / WEIGHTS))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    save_checkpoint(last, model, opt, cfg, {"epoch": 2})
    link_copy(best, last / "best")
    write_manifest(last)  # rewriting one copy's manifest must leave the other's valid
    assert read_state(best)["epoch"] == 1
    assert all(torch.equal(v, kept[k]) for k, v in load_file(str(best / WEIGHTS)).items())
    verify_manifest(best)
    verify_manifest(last)


def test_a_checkpoint_carrying_an_earlier_best_epoch_is_intact_and_restores(tiny_config, tmp_path: Path) -> None:
    """When the best epoch is not the latest, each reported checkpoint carries the best one as
    `best/`, under its own manifest: a retried trial must find it intact (not fall back to an
    older checkpoint, or to epoch 1) and test the best epoch's weights."""
    from segtune.checkpoint import CARRIED, first_intact
    from segtune.prepare import prepare_data
    from segtune.train import TrialContext, run_trial
    from tracking.artifacts import write_manifest

    store = prepare_data(tiny_config, log=lambda _: None)[0]
    first = run_trial(apply_params(tiny_config, {"train.epochs": 1}),
                      TrialContext(store=store, workdir=tmp_path / "a", log=lambda _: None))
    start = tmp_path / "a" / "checkpoints" / "last"
    # A best Dice no later epoch can beat, so every later checkpoint has to carry epoch 1.
    state = json.loads((start / STATE).read_text())
    state["best"] = {"dice": 1.0, "epoch": 1}
    (start / STATE).write_text(json.dumps(state))
    write_manifest(start)
    reported: list[Path] = []

    def report(metrics: dict, ckpt: Path) -> None:  # keep each as Tune would (it is replaced next epoch)
        reported.append(Path(shutil.copytree(ckpt, tmp_path / "tune" / f"checkpoint_{metrics['epoch']}")))

    out = run_trial(apply_params(tiny_config, {"train.epochs": 3}),
                    TrialContext(store=store, workdir=tmp_path / "b", report_epoch=report, resume_from=start,
                                 log=lambda _: None))
    assert [read_state(c)["epoch"] for c in reported] == [2, 3]
    for ckpt in reported:
        assert first_intact([ckpt], log=pytest.fail) == ckpt
        assert read_state(ckpt / CARRIED)["epoch"] == 1
        assert not (ckpt / CARRIED / CARRIED).exists()
    # The trial tests epoch 1's weights: the first run's test scores. So does a retry restored
    # from epoch 2's checkpoint on another machine (a fresh workdir), where only `best/` has them.
    assert out["best_epoch"] == 1 and out["test/iou"] == first["test/iou"]
    again = run_trial(apply_params(tiny_config, {"train.epochs": 3}),
                      TrialContext(store=store, workdir=tmp_path / "c", resume_from=reported[0], log=lambda _: None))
    assert again["best_epoch"] == 1 and again["test/iou"] == first["test/iou"]
