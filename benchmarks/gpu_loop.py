"""GPU check of segtune's own trial loop (gpu.sh runs it after gpu_bench): `run_trial` over the
synthetic EM store with the tiny SAM, bf16 through Accelerate, once eager and once with
`train.compile` (inductor by default), then the last checkpoint (packed from device tensors)
read back: weights into a fresh model, optimizer state into a fresh optimizer.

Prints one line per run (val/dice, test/iou, seconds) and `CHECK ... ok`, then gpu.sh's path
line: `PASS train-compile: <seconds eager and compiled>` or `FAIL train-compile: <reason>`
(exit status 1).
Settings by environment: BENCH_DEVICE (cuda; cpu for the dry run in `make test`),
COMPILE_BACKEND (inductor; the dry run uses eager, which only traces), EPOCHS (2).
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import torch

from benchmarks.common import config, store, workdir
from segtune.checkpoint import load_model, load_optimizer, read_state
from segtune.train import TrialContext, build_optimizer, run_trial

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")
BACKEND = os.environ.get("COMPILE_BACKEND", "inductor")
EPOCHS = int(os.environ.get("EPOCHS", "2"))


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("FAIL train-compile: no CUDA device here; BENCH_DEVICE=cpu for the dry run", flush=True)
        return 1
    try:
        seconds = check()
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        reason = (str(err).splitlines() or [""])[0][:300]
        print(f"FAIL train-compile: {type(err).__name__}: {reason}", flush=True)
        return 1
    print(f"PASS train-compile: run_trial on {DEVICE} in bf16, eager {seconds['no']:.1f}s, "
          f"train.compile={BACKEND} {seconds[BACKEND]:.1f}s (compilation included), "
          f"checkpoints read back", flush=True)
    return 0


def check() -> dict[str, float]:
    """Both runs and the checkpoint checks; the wall seconds of each run by compile mode."""
    root = workdir("gpu-loop")
    sets = ["dataset.max_train=16", "dataset.max_eval=8", f"train.epochs={EPOCHS}", "train.batch_size=4",
            "model.train=full", "train.precision=bf16"]
    path = store(config(root, *sets))
    results, seconds = {}, {}
    for mode in ("no", BACKEND):
        cfg = config(root, *sets, f"train.compile={mode}")
        work = root / f"trial-{mode}"
        t = time.perf_counter()
        out = run_trial(cfg, TrialContext(store=path, workdir=work, log=lambda _: None))
        results[mode], seconds[mode] = out, time.perf_counter() - t
        print(f"RUN {DEVICE} compile={mode}: val/dice_best {out['val/dice_best']:.4f} "
              f"test/iou {out['test/iou']:.4f} in {seconds[mode]:.1f}s", flush=True)
        last = work / "checkpoints" / "last"
        model, _ = load_model(last)  # strict: every trainable weight present, right shapes
        assert read_state(last)["epoch"] == EPOCHS
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert load_optimizer(last, build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad]))
    for out in results.values():
        assert 0.0 <= out["test/iou"] <= 1.0 and 0.0 <= out["val/dice_best"] <= 1.0
    print(f"CHECK {DEVICE} bf16 loop, compile={BACKEND}, checkpoints read back: ok", flush=True)
    return seconds


if __name__ == "__main__":
    sys.exit(main())
