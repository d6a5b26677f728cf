"""The embedding cache: cached decoding agrees with the full forward, is built once, keyed right.

Real tiny models on a real prepared synthetic store; nothing mocked.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from segtune.cache import build_or_open, decode_cached, encoder_frozen, for_trial
from segtune.config import ExperimentConfig, load_config
from segtune.loaders import make_loaders
from segtune.losses import LOSSES
from segtune.models import build_model
from segtune.prepare import prepare_data

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"

# (model, policy that freezes the encoder, prompt) for each cacheable family.
FAMILIES = {
    "sam": ("sam", "mask_decoder", "random_point"),
    "medsam": ("medsam", "mask_decoder", "box"),
    "pasam": ("pasam", "adapter", "random_point"),
    "clipseg": ("clipseg", "decoder", "text"),
}


def _config(root: Path, family: str, *extra: str) -> ExperimentConfig:
    name, policy, prompt = FAMILIES[family]
    sets = [f"dataset.root={root}", f"dataset.cache_dir={root / 'cache'}", "dataset.max_train=4",
            "dataset.max_eval=4", "train.batch_size=4", f"model.name={name}", f"model.train={policy}",
            f"prompt.train={prompt}", f"prompt.eval={prompt}"]
    if prompt == "text":
        sets.append("prompt.text=mitochondria")
    return load_config(DEMO, sets + list(extra))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A prepared synthetic EM store of its own (the cache writes beside it)."""
    root = tmp_path_factory.mktemp("cache_em")
    path, _ = prepare_data(_config(root, "sam"), log=lambda _: None)
    return root, path


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_loss_matches_the_full_forward(store, family: str, dtype: str, tol: float) -> None:
    root, path = store
    cfg = _config(root, family)
    model = build_model(cfg.model)
    assert encoder_frozen(model)
    cache = build_or_open(model, path, dtype=dtype, log=lambda _: None)
    train, _, _, _ = make_loaders(cfg, path, lambda _: None, cache)
    batch = next(iter(train))
    loss_fn = LOSSES["dice"]
    model.train()
    full = loss_fn(model(batch["image"], batch["prompts"]), batch["mask"])
    cached = loss_fn(decode_cached(model, batch["embedding"], batch["image"], batch["prompts"]), batch["mask"])
    assert cached.item() == pytest.approx(full.item(), abs=tol)
    # The gradient reaches the trainable part through the cached path too.
    cached.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_not_rebuilt_when_nothing_changed_and_rebuilt_on_change(store) -> None:
    root, path = store
    lines: list[str] = []
    cfg = _config(root, "sam")
    first = for_trial(cfg, build_model(cfg.model), path, lines.append)
    assert first is not None
    meta = first.path / "meta.json"
    stamp = meta.stat().st_mtime_ns
    # A fresh model (another trial, another process) with the same weights reuses it.
    again = for_trial(cfg, build_model(cfg.model), path, lines.append)
    assert again is not None and not again.built and again.key == first.key
    assert meta.stat().st_mtime_ns == stamp
    assert any(line.startswith("embedding cache: on (key") and "reused" in line for line in lines)

    # Other encoder weights: another key, built anew; the first stays as it was.
    model = build_model(cfg.model)
    with torch.no_grad():
        model.sam.image_encoder.patch_embed.proj.bias.add_(0.1)
    changed = build_or_open(model, path, log=lambda _: None)
    assert changed.built and changed.key != first.key
    # Other preprocessing (MedSAM's square resize and min-max scaling): another key too.
    medsam = _config(root, "medsam")
    other = build_or_open(build_model(medsam.model), path, log=lambda _: None)
    assert other.key not in (first.key, changed.key)
    assert meta.stat().st_mtime_ns == stamp
    rows = np.load(first.file, mmap_mode="r")
    assert rows.dtype == np.float16 and len(rows) == len(np.load(path / "images.npy", mmap_mode="r"))


def test_policies_that_train_the_encoder_turn_it_off(store) -> None:
    root, path = store
    for sets in (["model.train=full"], ["model.train=adapter"], ["train.cache=off"]):
        cfg = _config(root, "sam", *sets)
        lines: list[str] = []
        assert for_trial(cfg, build_model(cfg.model), path, lines.append) is None
        assert lines and lines[0].startswith("embedding cache: off")
        train, _, _, _ = make_loaders(cfg, path, lambda _: None, None)
        assert "embedding" not in next(iter(train))


def test_racing_builders_build_once(store) -> None:
    root, path = store
    cfg = _config(root, "pasam")
    models = [build_model(cfg.model) for _ in range(3)]
    for m in models:  # a key no other test built: three fresh identical encoders
        m.sam.pixel_mean.add_(1.0)
    results: list = []
    barrier = threading.Barrier(len(models))

    def build(m) -> None:
        barrier.wait()  # start together: they race for the lock
        results.append(build_or_open(m, path, log=lambda _: None))

    threads = [threading.Thread(target=build, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and sum(r.built for r in results) == 1
    assert len({r.key for r in results}) == 1
    leftovers = [p.name for p in (path / "embeddings").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_trial_encodes_its_cache_on_its_accelerators_device_under_its_precision(store, tmp_path: Path) -> None:
    """The cache is built inside run_trial where the Accelerator put the model (a GPU in a real
    trial), under the trial's autocast: bf16 here, on the CPU."""
    from accelerate import Accelerator
    from segment_anything.modeling import ImageEncoderViT

    from segtune.train import TrialContext, run_trial

    root, _ = store
    cfg = _config(root, "sam", "train.epochs=1", "train.precision=bf16", f"dataset.cache_dir={tmp_path}")
    store_path, _ = prepare_data(cfg, log=lambda _: None)  # a store of its own: the cache is built here
    seen: list[tuple[torch.device, torch.dtype | None]] = []

    def record(module, args, output) -> None:
        if isinstance(module, ImageEncoderViT):
            kind = output.device.type
            seen.append((output.device, torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run_trial(cfg, TrialContext(store=store_path, workdir=tmp_path / "trial", log=lambda _: None))
    finally:
        hook.remove()
    assert seen, "the encoder never ran"
    expected = Accelerator(cpu=not torch.cuda.is_available()).device
    assert {d.type for d, _ in seen} == {expected.type}
    assert {t for _, t in seen} == {torch.bfloat16}
    assert any((store_path / "embeddings").glob("*/meta.json"))
