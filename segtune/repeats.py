"""Repeats: one sweep trial as K members, whose mean and lower confidence bound Tune sees.

With `search.repeats: {seeds: K}` each configuration trains K members with train.seed + i on
the same split; with `{folds: K}`, K members on the K grouped folds of the training pool
(segtune.data.folds; the test split never moves). Each member is a `train.run_trial` of its
own, with its own MLflow run (a child of the trial's run: sweep -> trial -> member), curves,
checkpoints and folder (`<trial dir>/member_<i>`). `run_repeats` runs them and, once every
member has reported epoch e, logs on the trial's run

    val/dice_mean, val/dice_std, val/dice_lcb = mean - lcb_z * std / sqrt(K)   (std: ddof 1)
    val/dice, val/iou, train/dice_loss = the members' means

and hands the same to `report` (Tune: ASHA and the searcher see one trial) with one
checkpoint folder holding `member_<i>/` copies of each member's; after the last epoch, the
means of the members' final metrics (`val/dice_best`, `test/iou`, ...), `test/iou_mean`,
`test/iou_std`, and tag `segtune.best_member` (the highest val/dice_best).

Members take turns, one epoch each, in threads: Accelerate keeps its precision and gradient
state process-wide (train._accelerator resets it for each new Accelerator), so two loops
running at once in one process would share it. In turns, a member's Accelerator state is
rebuilt identically by the next member's start, and no two loops touch it at once; each
member's global RNG state is kept across its turns, so a member computes what it would alone.
When `report` raises (Tune stopped the trial: ASHA pruned it, or the sweep is interrupted),
every member stops at its own report and leaves its run open for the driver to close.
"""

from __future__ import annotations

import math
import queue
import random
import shutil
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segtune.checkpoint import link_copy
from segtune.config import ExperimentConfig
from segtune.data.folds import fold_view
from segtune.errors import TrainingError
from segtune.train import Tracker, TrialContext, run_trial
from segtune.trial import SweepContext, open_member_run, tracked, trial_log

MEMBER_DIR = "member_{}"
#: What the trial's run logs at every epoch.
EPOCH_KEYS = ("train/dice_loss", "val/dice", "val/iou", "val/dice_mean", "val/dice_std", "val/dice_lcb")


def lcb(values: list[float], z: float) -> tuple[float, float, float]:
    """(mean, sample std, mean - z * std / sqrt(K)) of the members' values."""
    v = np.asarray(values, dtype=np.float64)
    mean, std = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return mean, std, mean - z * std / math.sqrt(len(v))


def aggregate(results: list[dict[str, Any]], z: float) -> dict[str, Any]:
    """One epoch's report from the members' reports: the mean of every number they all
    report, val/dice's mean/std/LCB, and after the last epoch test/iou's mean and std."""
    keys = [k for k, v in results[0].items() if k != "epoch" and isinstance(v, int | float)
            and all(isinstance(r.get(k), int | float) for r in results)]
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in results])) for k in keys}
    out["epoch"] = results[0]["epoch"]
    out["val/dice_mean"], out["val/dice_std"], out["val/dice_lcb"] = lcb([r["val/dice"] for r in results], z)
    if all("test/iou" in r for r in results):
        out["test/iou_mean"], out["test/iou_std"], _ = lcb([r["test/iou"] for r in results], z)
    return out


def member_setups(cfg: ExperimentConfig, store: Path) -> list[tuple[ExperimentConfig, Path, dict[str, str]]]:
    """Each member's (config, store, tags): seeds change train.seed, folds the store's split."""
    rep = cfg.search.repeats
    assert rep is not None
    out = []
    for i in range(rep.k):
        tags = {"segtune.repeats": f"{rep.kind}:{rep.k}", "segtune.data_seed": str(cfg.train.seed)}
        if rep.kind == "seeds":
            seed = cfg.train.seed + i
            member = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
            out.append((member, store, {**tags, "segtune.repeat": f"seed={seed}"}))
        else:
            out.append((cfg, fold_view(store, rep.k, i), {**tags, "segtune.repeat": f"fold={i}/{rep.k}",
                                                         "segtune.fold": f"{i}/{rep.k}"}))
    return out


def _rng_state() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def _set_rng_state(state: tuple[Any, ...]) -> None:
    cpu, cuda, np_state, py_state = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(np_state)
    random.setstate(py_state)


class _Member:
    """One member's loop on a thread that runs only while it holds the turn (`turn`)."""

    def __init__(self, index: int, cfg: ExperimentConfig, ctx: TrialContext):
        self.index, self.cfg, self.ctx = index, cfg, ctx
        self.stop = False
        self._go = threading.Semaphore(0)
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._rng: tuple[Any, ...] | None = None
        ctx.report_epoch = self._report
        self.thread = threading.Thread(target=self._main, name=f"segtune-member-{index}", daemon=True)
        self.thread.start()

    def turn(self) -> tuple[str, Any, Path | None]:
        """Let the member run to its next report (or its end): ("epoch", metrics, checkpoint
        dir), ("end", final metrics, None) or ("error", exception, None)."""
        self._go.release()
        return self._out.get()

    def halt(self) -> None:
        """Stop the member at its next report (where it waits now) and wait for its thread."""
        self.stop = True
        self._go.release()
        self.thread.join()

    def _main(self) -> None:
        self._go.acquire()
        try:
            if self.stop:
                raise SystemExit
            with tracked(self.ctx.tracker, passes=(SystemExit,)):
                self._out.put(("end", run_trial(self.cfg, self.ctx), None))
        except SystemExit:
            self._out.put(("stopped", None, None))
        except BaseException as err:  # handed to the trial's thread, which raises it
            self._out.put(("error", err, None))

    def _report(self, metrics: dict[str, Any], ckpt_dir: Path) -> None:
        self._rng = _rng_state()
        self._out.put(("epoch", metrics, ckpt_dir))
        self._go.acquire()
        if self.stop:
            raise SystemExit  # as Tune's report stops a trial: the run stays open for the driver
        _set_rng_state(self._rng)


def run_repeats(cfg: ExperimentConfig, shared: SweepContext, trial_id: str, tracker: Tracker, workdir: Path,
                report: Callable[[dict[str, Any], Path], None], *, resume_from: Path | None, node_id: str,
                log: Callable[[str], None]) -> dict[str, Any]:
    """Run the trial's K members in turns, one epoch each; log and `report` their aggregates
    per epoch (see the module's docstring). Returns the final aggregates."""
    rep, z = cfg.search.repeats, cfg.search.lcb_z
    assert rep is not None
    run_id = getattr(tracker, "run_id", None)
    tracker.set_tags({"segtune.repeats": f"{rep.kind}:{rep.k}", "segtune.lcb_z": f"{z:g}"})
    log(f"{rep.k} members ({rep.kind}) per configuration, in turns; LCB z={z:g}")
    with ExitStack() as stack:
        members = []
        for i, (mcfg, store, tags) in enumerate(member_setups(cfg, Path(shared.store))):
            mdir = workdir / MEMBER_DIR.format(i)
            mlog = stack.enter_context(trial_log(mdir))
            mrun = open_member_run(mcfg, shared, trial_id, i, trial_run_id=run_id, node_id=node_id, tags=tags)
            resume = resume_from / MEMBER_DIR.format(i) if resume_from is not None else None
            members.append(_Member(i, mcfg, TrialContext(store=store, workdir=mdir, tracker=mrun,
                                                         resume_from=resume, log=mlog)))
        try:
            return _rounds(members, tracker, workdir / "repeats_checkpoint", report, z, log)
        finally:
            for m in members:
                if m.thread.is_alive():
                    m.halt()


def _rounds(members: list[_Member], tracker: Tracker, folder: Path, report: Callable[[dict[str, Any], Path], None],
            z: float, log: Callable[[str], None]) -> dict[str, Any]:
    final: dict[str, Any] = {}
    while True:
        outs = []
        for m in members:
            out = m.turn()
            if out[0] == "error":
                raise out[1]
            outs.append(out)
        if all(o[0] == "end" for o in outs):
            return final
        epochs = {o[1].get("epoch") if o[0] == "epoch" else o[0] for o in outs}
        if len(epochs) != 1:
            raise TrainingError(f"the members of this trial fell out of step ({sorted(map(str, epochs))}); "
                                "each must report the same epoch")
        results = [o[1] for o in outs]
        agg = aggregate(results, z)
        epoch = int(agg["epoch"])
        tracker.log_metrics({k: agg[k] for k in EPOCH_KEYS if k in agg}, step=epoch)
        log(f"epoch {epoch}: val/dice mean {agg['val/dice_mean']:.4f} std {agg['val/dice_std']:.4f} "
            f"lcb {agg['val/dice_lcb']:.4f} over {len(results)} members")
        if "test/iou_mean" in agg:  # the members' last epoch: scored on test, their runs finished
            final = {k: v for k, v in agg.items() if k not in ("epoch", "best_epoch")}
            best = max(range(len(results)), key=lambda i: results[i].get("val/dice_best", -math.inf))
            tracker.log_metrics({k: v for k, v in final.items() if k not in EPOCH_KEYS}, step=epoch)
            tracker.set_tags({"segtune.best_member": str(best)})
            tracker.flush()
            tracker.finish("FINISHED")  # before the last report: the scheduler may stop the trial there
        else:
            tracker.flush()
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for m, (_, _, ckpt) in zip(members, outs, strict=True):
            link_copy(ckpt, folder / MEMBER_DIR.format(m.index))
        report(agg, folder)
