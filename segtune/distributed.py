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
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from segtune.config import ExperimentConfig, apply_params, validate


def run_distributed(cfg: ExperimentConfig, params: dict[str, Any], base: dict, sweep: Any,
                    trial_id: str, log: Callable[[str], None]) -> None:
    """Run one Tune trial as a `TorchTrainer` of `cfg.resources.workers` workers; blocks until it ends."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from segtune.sweep import experiment_dir

    r = cfg.resources
    share = r.per_worker()
    log(f"data-parallel trial: {r.workers} workers, {share['CPU']:g} CPU and {share['GPU']:g} GPU each")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"base": base, "params": params, "sweep": asdict(sweep), "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpu > 0,
            resources_per_worker={k: v for k, v in share.items() if v > 0}),
        torch_config=TorchConfig(backend="nccl" if r.gpu > 0 else "gloo"),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=f"{experiment_dir(cfg, sweep.sweep_id)}/train",
            # Tune retries the whole trial (search.max_failures); one retry layer is enough.
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.search.keep_checkpoints),
            callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def _worker(config: dict[str, Any]) -> None:
    """One data-parallel worker of a trial: `run_trial` with rank-0-only tracking and checkpoints."""
    import ray.train

    from segtune.checkpoint import first_intact
    from segtune.sweep import SweepContext, open_tracker, trial_client_env, trial_log
    from segtune.train import TrialContext, run_trial

    trial_client_env()
    ctx = ray.train.get_context()
    rank, trial_id = ctx.get_world_rank(), config["trial_id"]
    cfg = apply_params(validate(config["base"], "sweep config"), config["params"])
    sweep = SweepContext(**config["sweep"])
    # Each rank writes its own checkpoints (DDP keeps the weights equal on every rank), so each
    # can test the best epoch's weights without fetching rank 0's; only rank 0's are reported.
    workdir = Path(tempfile.gettempdir()) / "segtune-train" / f"{sweep.sweep_id}-{trial_id}-rank{rank}"
    with trial_log(workdir) as log:
        tracker = open_tracker(cfg, sweep, trial_id) if rank == 0 else None
        if tracker is not None:
            tracker.set_tags({"segtune.workers": str(cfg.resources.workers)})
        restored = ray.train.get_checkpoint()
        resume_from = None
        if restored is not None:
            target = workdir / "restored"
            shutil.rmtree(target, ignore_errors=True)  # an earlier attempt's download on this node
            resume_from = first_intact([Path(restored.to_directory(str(target)))], log)

        def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
            ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)

        try:
            run_trial(cfg, TrialContext(store=Path(sweep.store), workdir=workdir, tracker=tracker,
                                        report=report, resume_from=resume_from, log=log))
        except BaseException as err:
            if tracker is not None:
                tracker.fail(err)
            raise
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
    from segtune.checkpoint import WEIGHTS
    from tracking.artifacts import recorded_hashes

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
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        # Groups the driver itself created (Tune's, one per trial) have no creator actor.
        created_by_actor = not ray.ActorID(pg.creator_actor_id).is_nil()
        if (created_by_actor and pg.creator_actor_dead and not pg.is_detached
                and pg.creator_job_id.hex() == job_id and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed
