"""GPU paths beyond gpu_bench and gpu_loop (gpu.sh runs it third): one function per path, each
printing `PASS <path>: <figure>` or `FAIL <path>: <reason>`; a failing path does not stop the rest,
and the script exits 1 if any failed. Random weights throughout (nothing is downloaded).

- sam-mask_decoder-cache: SAM `mask_decoder` policy with the embedding cache built on the device
  (`segtune.cache.build_or_open` under bf16 autocast, as `run_trial` builds it): cache build
  images/s, then training steps through segtune's loaders on the cached rows, images/s. Checks
  the rows are finite and that the image encoder ran on the device (a forward hook).
- clipseg-decoder-352: CLIPSeg rd64's architecture at the processor's 352 px, `decoder` policy,
  train steps in bf16 (encoder pass included, as with `train.cache=off`), images/s. Checks the
  encoder's token grid is 22x22 (352/16) and the tokenizer's ids fit the text tower's vocabulary.
- medsam-box-eval: MedSAM vit_b evaluation with box prompts in bf16, images/s; logits finite and
  at the (non-square) input size.
- amg-zero-shot: SAM's automatic mask generator (segtune.amg) on one store image, seconds per
  image and the masks' count (random weights may leave 0 masks after its quality filters: it
  passes when it runs).
- sweep-2-trials-shared-gpu: a 2-trial Ray Tune sweep (`segtune.commands.run_sweep`, local MLflow
  server, tiny SAM) with `resources.gpu=0.5`: passes when both trials finished, their MLflow
  runs overlapped in time, and the GPU showed two more processes (or, where nvidia-smi lists
  none, at least 256 MiB more memory used) while the sweep ran.

Settings by environment: BENCH_DEVICE (cuda), SAM_VARIANT and MEDSAM_VARIANT (vit_b), CLIPSEG
(rd64; `tiny` is segtune's tiny config, still at 352 px), PATH_SECONDS (10, per figure),
CACHE_BATCH (16), TRAIN_BATCH (8), CLIPSEG_BATCH (16), MEDSAM_BATCH (8), AMG_POINTS (32),
SWEEP_EPOCHS (2), PATHS (comma-separated names; all by default). On the CPU (`BENCH_DEVICE=cpu`,
the dry run in tests/test_gpu_bench_dry_run.py) "ran on cuda" reads "ran on the requested
device" and the sweep asks `resources.gpu=0`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import config, store, workdir

DEV = torch.device(os.environ.get("BENCH_DEVICE", "cuda"))
SAM_VARIANT = os.environ.get("SAM_VARIANT", "vit_b")
MEDSAM_VARIANT = os.environ.get("MEDSAM_VARIANT", "vit_b")
CLIPSEG = os.environ.get("CLIPSEG", "rd64")
SECONDS = float(os.environ.get("PATH_SECONDS", "10"))
FUSED = {"fused": True} if DEV.type == "cuda" else {}
BF16 = torch.bfloat16

_STORE: list[tuple[Path, Path]] = []


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def fmt(x: float) -> str:
    """A rate with a tenth's precision, or three significant digits when below 10."""
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def rate(step: Callable[[], int], seconds: float = SECONDS) -> float:
    """Images/s of `step` (which returns how many images it took) after two warm-up calls."""
    for _ in range(2):  # cuDNN/cuBLAS autotuning, the allocator
        step()
    sync()
    t, images, calls = time.perf_counter(), 0, 0
    while time.perf_counter() - t < seconds or calls < 2:
        images += step()
        calls += 1
    sync()
    return images / (time.perf_counter() - t)


def shared_store() -> tuple[Path, Path]:
    """(root, store): the synthetic EM store (96 patches of 256x256), prepared once for the
    paths that read one; `config(root, ...)` describes it."""
    if not _STORE:
        root = workdir("gpu-paths")
        _STORE.append((root, store(config(root))))
    return _STORE[0]


def record_devices(module: torch.nn.Module) -> tuple[set[str], Callable[[], None]]:
    """The device types `module`'s forward saw its first input on, and the hook's remover."""
    seen: set[str] = set()
    handle = module.register_forward_hook(lambda _m, args, _out: seen.add(args[0].device.type))
    return seen, handle.remove


def on_device(seen: set[str], what: str) -> None:
    if seen != {DEV.type}:
        raise AssertionError(f"{what} ran on {sorted(seen) or 'nothing'}, not {DEV.type}")


def square_mask(n: int, h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(n, 1, h, w, device=DEV)
    mask[..., h * 2 // 5 : h * 3 // 5, w * 2 // 5 : w * 3 // 5] = 1
    return mask


def path_sam_cache() -> str:
    from segtune.cache import build_or_open
    from segtune.loaders import make_loaders
    from segtune.losses import LOSSES
    from segtune.models.sam import SAM_VARIANTS, SamSegmenter, build_sam_modules
    from segtune.scoring import forward_batch

    root, path = shared_store()
    batch = env_int("CACHE_BATCH", 16)
    model = SamSegmenter(build_sam_modules(SAM_VARIANTS[SAM_VARIANT])).to(DEV)
    model.set_policy("mask_decoder")
    seen, unhook = record_devices(model.sam.image_encoder)
    with torch.no_grad(), torch.autocast(DEV.type, dtype=BF16):  # warm-up, so the rate is a rate
        model.encode(torch.zeros(1, 1, 256, 256, device=DEV))
    logs: list[str] = []
    t = time.perf_counter()
    cache = build_or_open(model, path, dtype="float16", batch_size=batch, precision="bf16",
                          log=logs.append)
    wall = time.perf_counter() - t
    unhook()
    assert cache.built, "the cache was reused, not built"
    on_device(seen, "the image encoder")
    rows = np.load(cache.file, mmap_mode="r")
    assert np.isfinite(rows).all(), "non-finite embedding rows"
    encode_s = float(json.loads((cache.path / "meta.json").read_text())["seconds"])
    built = (f"cache of {len(rows)} rows {tuple(rows.shape[1:])} built "
             f"{fmt(len(rows) / encode_s)} images/s")

    cfg = config(root, "model.train=mask_decoder", "train.precision=bf16",
                 f"train.batch_size={env_int('TRAIN_BATCH', 8)}")
    train_dl, *_ = make_loaders(cfg, path, lambda _: None, cache)
    loss_fn = LOSSES[cfg.train.loss]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, **FUSED)
    model.train()
    batches = iter(())

    def step() -> int:
        nonlocal batches
        b = next(batches, None)
        if b is None:
            batches = iter(train_dl)
            b = next(batches)
        assert "embedding" in b, "the loader gave no cached rows"
        with torch.autocast(DEV.type, dtype=BF16):
            loss = loss_fn(forward_batch(model, b, DEV).float(), b["mask"].to(DEV))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return len(b["mask"])

    seen, unhook = record_devices(model.sam.image_encoder)
    ips = rate(step)
    unhook()
    assert not seen, "the image encoder ran during cached training steps"
    assert all(torch.isfinite(p).all() for p in model.sam.mask_decoder.parameters())
    return (f"{built} on {DEV.type} (bf16; {wall:.1f}s with key hashing), rows finite; "
            f"cached training steps {fmt(ips)} images/s "
            f"(SAM {SAM_VARIANT}, batch {cfg.train.batch_size})")


def path_clipseg() -> str:
    from transformers import CLIPSegForImageSegmentation

    from segtune.losses import LOSSES
    from segtune.models.clipseg import (
        PROCESSOR_SIZE,
        TINY_TOKENIZER,
        ClipSegSegmenter,
        _tokenizer,
        released_config,
        tiny_config,
    )
    from segtune.prompts import PromptBatch

    conf = tiny_config() if CLIPSEG == "tiny" else released_config(CLIPSEG)
    model = ClipSegSegmenter(CLIPSegForImageSegmentation(conf), _tokenizer(TINY_TOKENIZER),
                             PROCESSOR_SIZE).to(DEV)
    trainable = model.set_policy("decoder")
    n, size = env_int("CLIPSEG_BATCH", 16), PROCESSOR_SIZE
    texts = ["a mitochondrion", "a cell", "the background", "a membrane"]
    ids = model.tokenizer(texts)["input_ids"]
    vocab = conf.text_config.vocab_size
    assert max(max(row) for row in ids) < vocab, "tokenizer ids beyond the text tower's vocabulary"
    images = torch.randint(0, 255, (n, 3, size, size), dtype=torch.uint8, device=DEV)
    prompts = PromptBatch(texts=[texts[i % len(texts)] for i in range(n)])
    mask = square_mask(n, size, size)
    with torch.no_grad(), torch.autocast(DEV.type, dtype=BF16):
        emb = model.encode(images[:1])
    patch = conf.vision_config.patch_size
    grid = math.isqrt(emb.shape[2] - 1)
    assert grid * grid + 1 == emb.shape[2] and grid == size // patch, (
        f"token grid {emb.shape[2] - 1} tokens, expected {size // patch}x{size // patch}")
    loss_fn = LOSSES["dice"]
    opt = torch.optim.AdamW(trainable, lr=1e-4, **FUSED)
    model.train()

    def step() -> int:
        with torch.autocast(DEV.type, dtype=BF16):
            out = model(images, prompts)
            loss = loss_fn(out.float(), mask)
        assert out.shape == (n, 1, size, size), tuple(out.shape)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return n

    ips = rate(step)
    assert all(torch.isfinite(p).all() for p in trainable)
    name = "tiny config" if CLIPSEG == "tiny" else f"{CLIPSEG} architecture"
    return (f"{fmt(ips)} images/s (CLIPSeg {name}, decoder policy, bf16, batch {n} at {size}px on "
            f"{DEV.type}); encoder token grid {grid}x{grid}; tokenizer ids < {vocab}")


def path_medsam() -> str:
    from segtune.models.sam import SAM_VARIANTS, MedSamSegmenter, build_sam_modules
    from segtune.prompts import PromptBatch

    model = MedSamSegmenter(build_sam_modules(SAM_VARIANTS[MEDSAM_VARIANT])).to(DEV).eval()
    n, h, w = env_int("MEDSAM_BATCH", 8), 320, 480  # not square: MedSAM squashes, then restores
    images = torch.randint(0, 255, (n, 3, h, w), dtype=torch.uint8, device=DEV)
    boxes = torch.tensor([[w * 0.3, h * 0.3, w * 0.7, h * 0.7]], device=DEV).repeat(n, 1)
    prompts = PromptBatch(boxes=boxes)
    seen, unhook = record_devices(model.sam.image_encoder)
    last: list[torch.Tensor] = []

    @torch.no_grad()
    def step() -> int:
        with torch.autocast(DEV.type, dtype=BF16):
            last[:] = [model(images, prompts)]
        return n

    ips = rate(step)
    unhook()
    on_device(seen, "the image encoder")
    out = last[0]
    assert out.shape == (n, 1, h, w), f"logits {tuple(out.shape)}, input {(n, 1, h, w)}"
    assert torch.isfinite(out).all(), "non-finite logits"
    return (f"{fmt(ips)} images/s (MedSAM {MEDSAM_VARIANT}, boxes, bf16, batch {n} on {DEV.type}); "
            f"logits finite at the input size {h}x{w}")


def path_amg() -> str:
    from segtune.amg import build_generator, generate
    from segtune.config import AmgConfig
    from segtune.models.sam import SAM_VARIANTS, SamSegmenter, build_sam_modules

    rows = np.load(shared_store()[1] / "images.npy", mmap_mode="r")
    model = SamSegmenter(build_sam_modules(SAM_VARIANTS[SAM_VARIANT])).to(DEV).eval()
    points = env_int("AMG_POINTS", 32)
    generator = build_generator(model, AmgConfig(points_per_side=points))
    seen, unhook = record_devices(model.sam.image_encoder)
    def image(i: int) -> torch.Tensor:  # (C,H,W) uint8, as score_amg hands the generator
        return torch.from_numpy(np.array(rows[i])).permute(2, 0, 1)

    generate(generator, image(0))  # warm-up
    sync()
    t, counts = time.perf_counter(), []
    for i in range(1, len(rows)):
        counts.append(len(generate(generator, image(i))))
        if time.perf_counter() - t > SECONDS / 2:
            break
    sync()
    per_image = (time.perf_counter() - t) / len(counts)
    unhook()
    on_device(seen, "the image encoder")
    note = "; 0 masks: random weights' masks fail the quality filters, the generator still ran" \
        if not any(counts) else ""
    return (f"{per_image:.2f} s/image over {len(counts)} image(s) (SAM {SAM_VARIANT}, "
            f"{points}x{points} points, fp32 on {DEV.type}); masks per image {counts}{note}")


class GpuWatch:
    """Samples, beside a block, how many processes hold the GPU (nvidia-smi) and the memory used."""

    def __init__(self, every: float = 0.25):
        self.every, self.apps, self.used = every, [], []
        self._stop = threading.Event()
        self.smi = shutil.which("nvidia-smi")

    def sample(self) -> tuple[int | None, int]:
        apps = None
        if self.smi:
            try:
                query = [self.smi, "--query-compute-apps=pid", "--format=csv,noheader"]
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                apps = len({line.strip() for line in out.splitlines() if line.strip()})
            except (OSError, subprocess.SubprocessError):
                pass
        free, total = torch.cuda.mem_get_info(DEV)
        return apps, total - free

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            apps, used = self.sample()
            self.apps.append(apps)
            self.used.append(used)

    def __enter__(self) -> GpuWatch:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.mem_get_info(DEV)  # this process's context exists before the baseline counts it
        self.base_apps, self.base_used = self.sample()  # this process holds a context already
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def verdict(self) -> tuple[bool, str]:
        seen = [a for a in self.apps if a is not None]
        rise = (max(self.used, default=self.base_used) - self.base_used) / 2**20
        if seen and self.base_apps is not None and max(seen) > self.base_apps:
            more = max(seen) - self.base_apps
            return more >= 2, f"GPU held by up to {more} trial processes at once, +{rise:.0f} MiB"
        return rise >= 256, (f"nvidia-smi listed no trial processes; GPU memory +{rise:.0f} MiB "
                             "while it ran")


def path_sweep() -> str:
    from segtune.commands import run_sweep
    from tracking.runs import trial_runs
    from tracking.server import LocalServer, free_port

    gpu = 0.5 if DEV.type == "cuda" else 0
    root = workdir("gpu-paths-sweep")
    lines: list[str] = []
    with LocalServer(root / "mlflow", port=free_port(0)) as info:
        cfg = config(root, "dataset.max_train=16", "dataset.max_eval=8",
                     f"train.epochs={env_int('SWEEP_EPOCHS', 2)}",
                     "search.space={train.lr: {loguniform: [3.0e-4, 1.0e-2]}}",
                     "search.num_samples=2", "search.max_concurrent=2", "search.scheduler=fifo",
                     f"resources.gpu={gpu}", "resources.cpu=1", f"tracking.uri={info.uri}",
                     "tracking.experiment=gpu-paths", f"tracking.spool_dir={root / 'spool'}")
        store(cfg)
        watch = GpuWatch() if DEV.type == "cuda" else None
        t = time.perf_counter()
        with watch or nullcontext():
            outcome = run_sweep(cfg, log=lines.append)
        wall = time.perf_counter() - t
        runs = trial_runs(info.uri, cfg.tracking.experiment, outcome.sweep_id)
    statuses = sorted(r.info.status for r in runs)
    if outcome.interrupted or statuses != ["FINISHED", "FINISHED"]:
        raise AssertionError(f"trial runs {statuses}, wanted two FINISHED; "
                             f"sweep log tail: {lines[-5:]}")
    overlap = (min(r.info.end_time for r in runs) - max(r.info.start_time for r in runs)) / 1000
    spans = ", ".join(f"{(r.info.end_time - r.info.start_time) / 1000:.1f}s" for r in runs)
    if overlap <= 0:
        raise AssertionError(f"the trials ran one after the other "
                             f"(gap {-overlap:.1f}s; runs {spans})")
    where = f"resources.gpu=0 on {DEV.type}"
    if watch is not None:
        ok, where = watch.verdict()
        if not ok:
            raise AssertionError(f"not seen on the GPU: {where}")
        where = f"resources.gpu=0.5; {where}"
    return (f"2 trials FINISHED, their MLflow runs ({spans}) overlapped {overlap:.1f}s; {where}; "
            f"sweep wall {wall:.1f}s (tiny SAM, {cfg.train.epochs} epochs)")


PATHS: dict[str, Callable[[], str]] = {
    "sam-mask_decoder-cache": path_sam_cache,
    "clipseg-decoder-352": path_clipseg,
    "medsam-box-eval": path_medsam,
    "amg-zero-shot": path_amg,
    "sweep-2-trials-shared-gpu": path_sweep,  # last: the slowest to start, the likeliest to hang
}


def main() -> int:
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("FAIL gpu_paths: no CUDA device here; BENCH_DEVICE=cpu for the dry run", flush=True)
        return 1
    if DEV.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    chosen = [p.strip() for p in os.environ.get("PATHS", ",".join(PATHS)).split(",") if p.strip()]
    failed = 0
    for name in chosen:
        t = time.perf_counter()
        try:
            figure = PATHS[name]()
            print(f"PASS {name}: {figure} [{time.perf_counter() - t:.0f}s]", flush=True)
        except Exception as err:  # one path's failure must not stop the others
            failed += 1
            traceback.print_exc(file=sys.stderr)
            reason = (str(err).splitlines() or [""])[0][:400]
            took = time.perf_counter() - t
            print(f"FAIL {name}: {type(err).__name__}: {reason} [{took:.0f}s]", flush=True)
        finally:
            gc.collect()
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
