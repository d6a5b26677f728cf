"""Overlay figures: what they cost the training loop's thread, drawn inline vs by OverlayLog.

Inline is what run_trial did before segtune.overlay_log: predict, draw the PNG strips and
upload them, all on the loop's thread. OverlayLog predicts there and leaves drawing and the
upload to its own thread while training goes on. Both sides log the same 4 overlays of the
bench_loop setup (tiny SAM) to a real local MLflow server, taken in turn; medians of 8 rounds
after a warm-up. Part of benchmark 1 (MLflow on); not in `make bench`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_loop import SETS
from benchmarks.common import config, store, workdir


def main(rounds: int = 8) -> None:
    from segtune.loaders import make_loaders
    from segtune.models import build_model
    from segtune.overlay_log import OverlayLog, write_overlays
    from segtune.scoring import first_batches, score_loader
    from tracking.evals import log_folder
    from tracking.runs import TrialRun
    from tracking.server import LocalServer, free_port

    root = workdir("overlays")
    cfg = config(root, *SETS)
    model = build_model(cfg.model)
    _, val, _, _ = make_loaders(cfg, store(cfg), lambda _: None)
    count = cfg.eval.overlays
    inline, on_loop, off_loop = [], [], []
    with LocalServer(root / "mlflow", port=free_port(0)) as info:
        run = TrialRun.open(info.uri, "bench", sweep_id="bench", trial_id="overlays", parent_run_id=None,
                            params={}, tags={})
        for i in range(rounds + 1):  # round 0 warms up
            t = time.perf_counter()
            _, examples = score_loader(model, first_batches(val, count), keep=count)
            with tempfile.TemporaryDirectory() as tmp:
                write_overlays(examples, Path(tmp))
                log_folder(run, Path(tmp), f"inline/{i}")
            inline.append(time.perf_counter() - t)
            with OverlayLog(run, count) as overlays:
                t = time.perf_counter()
                overlays.log(model, val, f"background/{i}")
                on_loop.append(time.perf_counter() - t)
                t = time.perf_counter()
            off_loop.append(time.perf_counter() - t)  # leaving the block waits for the upload
    ms = {name: statistics.median(xs[1:]) * 1000 for name, xs in
          (("inline", inline), ("on_loop", on_loop), ("off_loop", off_loop))}
    print(f"{count} overlays, median of {rounds}: inline {ms['inline']:.1f} ms on the loop's thread; "
          f"OverlayLog {ms['on_loop']:.1f} ms on it, then {ms['off_loop']:.1f} ms drawing and uploading beside it")
    print(f"RESULT overlays, loop-thread time OverlayLog vs inline: {ms['on_loop'] / ms['inline']:.3f}x", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    torch.set_num_threads(1)
    main(parser.parse_args().rounds)
