"""Multi-worker trials: a Ray Train `TorchTrainer` inside a Tune trial, running the same loop.

A trial whose `resources.workers` is above 1 runs data-parallel. The Tune trial becomes a
small driver that starts a `TorchTrainer` with that many workers (each with `resources.cpu`
and `resources.gpu` divided by `workers`); every worker runs `train.run_trial`, whose
Accelerator finds the process group Ray Train set up (gloo on CPU, NCCL on GPUs) and shards
the loaders. Only rank 0 opens the MLflow run, logs, and hands its checkpoint to `report`;
every rank reports (Ray Train waits for all of them), and `TuneReportCallback` passes rank 0's
metrics on to Tune, so ASHA and the search see a multi-worker trial like any other.

Checkpoints go to Ray Train's storage under the sweep's folder (`<sweep>/train/<trial id>`),
on the same shared storage as Tune's. A trial that Tune retries, or a sweep that is resumed,
starts a trainer with the same name there, and Ray Train hands each worker the latest
checkpoint again (`ray.train.get_checkpoint`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from segtune.checkpoint import WEIGHTS, first_intact
from segtune.cluster import experiment_dir
from segtune.config import ExperimentConfig, apply_params, validate
from segtune.ray_compat import placement_groups, remove_placement_group
from segtune.train import TrialContext, run_trial
from segtune.trial import SweepContext, open_sweep_trial, tracked, trial_client_env, trial_log
from tracking.artifacts import recorded_hashes


def run_distributed(cfg: ExperimentConfig, params: dict[str, Any], base: dict, shared: SweepContext,
                    trial_id: str, log: Callable[[str], None]) -> None:
    """Run one Tune trial as a `TorchTrainer` of `cfg.resources.workers` workers; blocks until it ends."""
    r = cfg.resources
    share = r.per_worker()
    log(f"data-parallel trial: {r.workers} workers, {share['CPU']:g} CPU and {share['GPU']:g} GPU each")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"base": base, "params": params, "shared": asdict(shared), "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpu > 0,
            resources_per_worker={k: v for k, v in share.items() if v > 0}),
        torch_config=TorchConfig(backend="nccl" if r.gpu > 0 else "gloo"),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=f"{experiment_dir(cfg, shared.sweep_id)}/train",
            # Tune retries the whole trial (search.max_failures); one retry layer is enough.
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.search.keep_checkpoints),
            callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def _worker(config: dict[str, Any]) -> None:
    """One data-parallel worker of a trial: `run_trial` with rank-0-only tracking and checkpoints."""
    trial_client_env()
    ctx = ray.train.get_context()
    rank, trial_id = ctx.get_world_rank(), config["trial_id"]
    cfg = apply_params(validate(config["base"], "sweep config"), config["params"])
    shared = SweepContext(**config["shared"])
    # Each rank writes its own checkpoints (DDP keeps the weights equal on every rank), so each
    # can test the best epoch's weights without fetching rank 0's; only rank 0's are reported.
    workdir = Path(tempfile.gettempdir()) / "segtune-train" / f"{shared.sweep_id}-{trial_id}-rank{rank}"
    with trial_log(workdir) as log:
        trial = TrialContext(store=Path(shared.store), workdir=workdir, log=log)  # ranks > 0: untracked
        if rank == 0:
            trial.tracker = open_sweep_trial(cfg, shared, trial_id, node_id=ray.get_runtime_context().get_node_id())
            trial.tracker.set_tags({"segtune.workers": str(cfg.resources.workers)})
        restored = ray.train.get_checkpoint()
        if restored is not None:
            target = workdir / "restored"
            shutil.rmtree(target, ignore_errors=True)  # an earlier attempt's download on this node
            trial.resume_from = first_intact([Path(restored.to_directory(str(target)))], log)

        def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
            ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)

        trial.report_epoch = report
        try:
            with tracked(trial.tracker):
                run_trial(cfg, trial)
        finally:
            _drop_working_copies(workdir, log)


def _drop_working_copies(workdir: Path, log: Callable[[str], None]) -> None:
    """Remove a rank's local checkpoints once its loop has ended; keep its trial.log.

    They are working copies: rank 0's were copied to Ray Train's storage as each was reported,
    the other ranks' are never used after the run. Left in the node's temp folder they would
    take two checkpoints' worth of disk per rank and trial. The log gets the final weights'
    sha256 first (from the checkpoint's manifest): every rank of a healthy data-parallel trial
    prints the same one.
    """
    try:
        log(f"final weights sha256 {recorded_hashes(workdir / 'checkpoints' / 'last')[WEIGHTS]}")
    except (OSError, KeyError, ValueError):
        pass  # stopped or failed before its first checkpoint
    for folder in ("checkpoints", "restored"):
        shutil.rmtree(workdir / folder, ignore_errors=True)


def release_orphaned_groups(job_id: str) -> int:
    """Remove this job's placement groups whose creating actor has died; returns how many.

    When Tune stops a multi-worker trial (ASHA prunes it, or it reaches `max_t`) it ends the
    trial's process, and with it Ray Train's controller; the workers go too, but their
    placement group does not: Ray keeps a group until both its creator actor and its job are
    gone, and the job (this sweep's driver) lives on. Ray Train's own cleaner asks the Ray
    dashboard whether the controller lives and so does nothing where the dashboard is off, as
    segtune's local Ray runs it. The next trial would then wait forever for the CPUs and GPUs
    the dead trial still holds. The sweep driver calls this between Tune's steps.
    """
    removed = 0
    for pg in placement_groups():
        # Groups the driver itself created (Tune's, one per trial) have no creator actor.
        if (pg.created_by_actor and pg.creator_actor_dead and not pg.detached
                and pg.job_id == job_id and not pg.removed):
            remove_placement_group(pg.group_id)
            removed += 1
    return removed
