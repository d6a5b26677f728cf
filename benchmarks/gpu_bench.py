"""GPU benchmark (run by gpu.sh on one H100): SAM vit_b images/s in bf16 and share of peak FLOP/s.

Three figures: full fine-tune steps (encoder + decoder trained), decoder-only steps on cached
embeddings held on the GPU, zero-shot evaluation (encoder + decoder, no grad). FLOPs per step
are counted once with torch's FlopCounterMode; the share is achieved FLOP/s over the card's
peak dense bf16 rate (H100 SXM: 989 TFLOP/s; override with PEAK_TFLOPS).

The full fine-tune is gpu.sh's path `sam-full-bf16`: it ends in `PASS sam-full-bf16: <images/s,
share of peak>` or `FAIL sam-full-bf16: <reason>`. The other two figures are supplementary
(gpu_paths.py checks the cached and evaluation paths through segtune's own code): a failure
there is printed on its RESULT line and makes the script exit 1, which gpu.sh reports.

Settings by environment: FULL_BATCH, DECODER_BATCH, EVAL_BATCH, BENCH_SECONDS (per figure),
COMPILE=1. BENCH_DEVICE=cpu SAM_VARIANT=tiny is the dry run `make test` does
(tests/test_gpu_bench_dry_run.py), so the script is known to run before a GPU's minutes are spent.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from segtune.cache import decode_cached
from segtune.losses import LOSSES
from segtune.models.sam import SAM_VARIANTS, SamSegmenter, build_sam_modules
from segtune.prompts import PromptBatch

PEAK = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
DEV = torch.device(os.environ.get("BENCH_DEVICE", "cuda"))
VARIANT = os.environ.get("SAM_VARIANT", "vit_b")
SIZE = SAM_VARIANTS[VARIANT].image_size
SECONDS = float(os.environ.get("BENCH_SECONDS", "40"))
FUSED = {"fused": True} if DEV.type == "cuda" else {}


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def batch(n: int):
    images = torch.randint(0, 255, (n, 3, SIZE, SIZE), dtype=torch.uint8, device=DEV)
    prompts = PromptBatch(points=torch.full((n, 1, 2), SIZE / 2, device=DEV), labels=torch.ones(n, 1, dtype=torch.long, device=DEV))
    mask = torch.zeros(n, 1, SIZE, SIZE, device=DEV)
    mask[..., SIZE * 2 // 5:SIZE * 3 // 5, SIZE * 2 // 5:SIZE * 3 // 5] = 1
    return images, prompts, mask


def measure(name: str, step, n: int, seconds: float = SECONDS) -> tuple[float, float]:
    """Prints the figure's RESULT line; returns (images/s, % of peak bf16 FLOP/s)."""
    for _ in range(3):  # warm-up (cuDNN/cuBLAS autotuning, allocator)
        step()
    sync()
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    sync()
    t, steps = time.perf_counter(), 0
    while time.perf_counter() - t < seconds or steps == 0:
        step()
        steps += 1
    sync()
    dt = (time.perf_counter() - t) / steps
    print(f"RESULT {DEV.type} {VARIANT} {name}: {n / dt:.1f} images/s, {flops / dt / 1e12:.3g} TFLOP/s = "
          f"{100 * flops / dt / PEAK:.1f}% of peak bf16 ({flops / n / 1e9:.3g} GFLOP/image)", flush=True)
    return n / dt, 100 * flops / dt / PEAK


def attempt(name: str, run: Callable[[], None]) -> str | None:
    """Runs one figure; a failure (an out-of-memory, say) is printed and returned, and the next
    figure still runs."""
    try:
        run()
        return None
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
        print(f"RESULT {DEV.type} {VARIANT} {name}: failed: {reason}", flush=True)
        return reason
    finally:
        gc.collect()
        if DEV.type == "cuda":
            torch.cuda.empty_cache()


def main() -> int:
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("FAIL sam-full-bf16: no CUDA device here; BENCH_DEVICE=cpu for the dry run", flush=True)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    loss_fn = LOSSES["dice"]
    model = SamSegmenter(build_sam_modules(SAM_VARIANTS[VARIANT])).to(DEV)
    compile_ = os.environ.get("COMPILE") == "1"

    def full() -> None:
        # Full fine-tune: the memory-bound case; batch 4 of 1024^2 fits an H100 in bf16 autocast.
        model.set_policy("full")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **FUSED)
        fwd = torch.compile(model) if compile_ else model
        images, prompts, mask = batch(int(os.environ.get("FULL_BATCH", "4")))

        def full_step() -> None:
            with torch.autocast(DEV.type, dtype=torch.bfloat16):
                loss = loss_fn(fwd(images, prompts).float(), mask)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ips, share = measure("full fine-tune", full_step, len(images))
        print(f"PASS sam-full-bf16: {ips:.1f} images/s, {share:.1f}% of peak bf16 FLOP/s "
              f"(SAM {VARIANT}, batch {len(images)}, fused AdamW{', compiled' if compile_ else ''}, "
              f"on {DEV.type})", flush=True)

    def decoder() -> None:
        # Decoder-only on cached embeddings held on the GPU (what a cached trial does each step).
        model.set_policy("mask_decoder")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, **FUSED)
        n = int(os.environ.get("DECODER_BATCH", "32"))
        with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16):
            emb = model.encode(batch(1)[0]).expand(n, -1, -1, -1).contiguous()
        images, prompts, mask = batch(n)

        def decoder_step() -> None:
            with torch.autocast(DEV.type, dtype=torch.bfloat16):
                loss = loss_fn(decode_cached(model, emb, images, prompts).float(), mask)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        measure("decoder-only on cached embeddings", decoder_step, n)

    def zero_shot() -> None:
        # Zero-shot evaluation: encoder + decoder, no grad.
        images, prompts, _ = batch(int(os.environ.get("EVAL_BATCH", "16")))
        model.eval()

        @torch.no_grad()
        def eval_step() -> None:
            with torch.autocast(DEV.type, dtype=torch.bfloat16):
                model(images, prompts)

        measure("zero-shot evaluation", eval_step, len(images))

    failed = attempt("full fine-tune", full)
    if failed:
        print(f"FAIL sam-full-bf16: {failed}", flush=True)
    failures = [failed, attempt("decoder-only on cached embeddings", decoder),
                attempt("zero-shot evaluation", zero_shot)]
    return 1 if any(failures) else 0


if __name__ == "__main__":
    sys.exit(main())
