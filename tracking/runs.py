"""Sweep parent runs and trial child runs on an MLflow tracking server.

One MLflow experiment per experiment name; one parent run per sweep (`segtune.kind=sweep`);
one child run per trial, found again by its `segtune.trial_id` tag, so a retried or resumed
trial reattaches to its run instead of opening a second one. A sweep with repeats gives each
trial run K member runs as its children (`segtune.kind=member`, `segtune.member=i`, the
trial's `segtune.trial_id`), found again the same way. Metrics are buffered and sent
with `log_batch` at epoch end: one request per epoch, not one per value.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from tracking.artifacts import write_manifest
from tracking.lineage import EXPERIMENT_KIND, MODEL_TRAINING, log_store_input, mark_experiment
from tracking.redact import redact, secret_values
from tracking.spool import append, deliver, logged_steps

SWEEP_ID = "segtune.sweep_id"
TRIAL_ID = "segtune.trial_id"
KIND = "segtune.kind"
MEMBER = "segtune.member"
PRUNED = "segtune.pruned"
# What a request to a server that is down or restarting raises (MLflow wraps connection errors).
UNREACHABLE = (MlflowException, requests.exceptions.RequestException, OSError)
# MLflow's limits per log_batch request.
_MAX_PARAMS, _MAX_METRICS = 100, 1000


def quiet_mlflow() -> None:
    """segtune prints its own summary lines; MLflow's run links, info logs and progress bars repeat them."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if it does not exist; either way marked as a
    model-training experiment (tracking.lineage), so MLflow's UI opens it on its runs."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        mark_experiment(client, exp)
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND: MODEL_TRAINING})
    except MlflowException as err:
        # Trials starting at once race to create it: the losers read the winner's id.
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _params(params: dict[str, Any]) -> list[Param]:
    secrets = secret_values()
    return [Param(k, redact(str(v), secrets)[:6000]) for k, v in params.items()]


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    secrets = secret_values()
    return {k: redact(str(v), secrets) for k, v in tags.items()}


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches of MLflow's maximum size."""
    items = _params(params)
    for i in range(0, len(items), _MAX_PARAMS):
        client.log_batch(run_id, params=items[i : i + _MAX_PARAMS])


def create_run(client: MlflowClient, experiment_id_: str, tags: dict[str, Any], run_name: str | None = None) -> str:
    """Create a run with `tags` (redacted) and log the prepared store they name as its dataset
    input (tracking.lineage); every run segtune opens is created here. Returns its id."""
    tags = _tags(tags)
    run_id = client.create_run(experiment_id_, run_name=run_name, tags=tags).info.run_id
    training = tags.get(KIND) in ("sweep", "trial", "member")
    log_store_input(client, run_id, tags, "training" if training else "evaluation")
    return run_id


NOTE = "mlflow.note.content"  # the run description the MLflow UI shows and edits


def start_sweep_run(uri: str, experiment: str, sweep_id: str, params: dict[str, Any],
                    tags: dict[str, str], name: str | None = None, description: str = "") -> str:
    """Open the sweep's parent run (with a name and a description for the UI); return its id."""
    client = MlflowClient(uri)
    run_id = create_run(client, experiment_id(client, experiment), run_name=name or f"sweep-{sweep_id}",
                        tags={**tags, KIND: "sweep", SWEEP_ID: sweep_id, NOTE: description})
    log_params(client, run_id, params)
    return run_id


def find_trial_run(client: MlflowClient, experiment_id_: str, sweep_id: str, trial_id: str,
                   member: int | None = None) -> str | None:
    """The run already opened for this trial of this sweep (or for its member `member`), if any."""
    query = f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{TRIAL_ID}` = '{trial_id}'"
    query += f" and tags.`{KIND}` = 'trial'" if member is None else f" and tags.`{MEMBER}` = '{member}'"
    runs = client.search_runs([experiment_id_], filter_string=query, max_results=2)
    return runs[0].info.run_id if runs else None


class TrialRun:
    """A trial's child run: buffered metrics, checkpoint artifacts, a final status.

    With a `spool_dir`, nothing is lost while the server is unreachable: what could not be sent
    is kept there (tracking.spool) and sent first at the next flush that gets through. Metric
    points the run already holds (same key and step, e.g. an epoch redone after a restore) are
    not sent again.
    """

    def __init__(self, client: MlflowClient, run_id: str, spool_dir: Path | None = None,
                 logged: set[tuple[str, int]] | None = None, metrics: dict[str, float] | None = None):
        self.client, self.run_id, self.spool_dir = client, run_id, spool_dir
        self._pending: list[Metric] = []
        self._logged: set[tuple[str, int]] = logged or set()
        self.offline = False  # true while something waits in the spool
        # The run's latest metric values when this attempt reattached (empty for a new run):
        # what an earlier attempt spent, which a retried or resumed trial's cost adds to.
        self.metrics_at_open: dict[str, float] = dict(metrics or {})

    @classmethod
    def open(cls, uri: str, experiment: str, *, sweep_id: str, trial_id: str, parent_run_id: str | None,
             params: dict[str, Any], tags: dict[str, str], spool_dir: Path | None = None,
             name: str | None = None, member: int | None = None) -> TrialRun:
        """Open the trial's run, or reattach to the one it already has (a retry or resume).

        With `member`, the run of that member of the trial (`parent_run_id`: the trial's run).
        """
        client = MlflowClient(uri)
        exp_id = experiment_id(client, experiment)
        run_id = find_trial_run(client, exp_id, sweep_id, trial_id, member)
        all_tags = {**tags, KIND: "trial" if member is None else "member", SWEEP_ID: sweep_id, TRIAL_ID: trial_id,
                    MLFLOW_RUN_NAME: name or trial_id}
        if member is not None:
            all_tags[MEMBER] = str(member)
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if run_id is None:
            run_id = create_run(client, exp_id, all_tags)
            log_params(client, run_id, params)
            return cls(client, run_id, spool_dir)
        if spool_dir is not None:
            deliver(client, spool_dir, run_id)  # what an earlier attempt could not send
        client.update_run(run_id, status="RUNNING")
        metrics = client.get_run(run_id).data.metrics
        return cls(client, run_id, spool_dir, logged_steps(client, run_id, set(metrics)), metrics)

    def next_step(self, key: str) -> int:
        """One past the highest step of `key` this run holds: a cumulative metric (cost) logged
        again by a later attempt must not reuse a step, which would be skipped as already sent."""
        return 1 + max((step for k, step in self._logged if k == key), default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if (k, step) not in self._logged]

    def _send(self, entry: dict[str, Any], send: Callable[[], None]) -> None:
        """Send now (after anything spooled before), or spool when the server does not answer."""
        try:
            if self.offline and self.spool_dir is not None:
                deliver(self.client, self.spool_dir, self.run_id)
                self.offline = False
            if not self.offline:
                send()
                return
        except UNREACHABLE:
            if self.spool_dir is None:
                raise
            self.offline = True
        append(self.spool_dir, self.run_id, entry)

    def flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        self._logged |= {(m.key, m.step) for m in batch}

        def send() -> None:
            for i in range(0, len(batch), _MAX_METRICS):
                self.client.log_batch(self.run_id, metrics=batch[i : i + _MAX_METRICS])

        entry = {"type": "metrics", "metrics": [{"key": m.key, "value": m.value, "timestamp": m.timestamp,
                                                 "step": m.step} for m in batch]}
        self._send(entry, send)

    def set_tags(self, tags: dict[str, str]) -> None:
        tags = _tags(tags)
        self._send({"type": "tags", "tags": tags},
                   lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]))

    def log_checkpoint(self, path: Path, artifact_path: str = "checkpoints/best") -> None:
        """Upload a checkpoint directory with a sha256 manifest of its files."""
        write_manifest(Path(path))
        self._send({"type": "artifacts", "local_dir": str(path), "artifact_path": artifact_path},
                   lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))

    def upload(self, local_dir: Path, artifact_path: str) -> None:
        """Upload a folder's files now, straight to the server and never spooled (figures: a
        server that is away or refuses raises, and the caller decides what that costs)."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def fail(self, err: BaseException) -> None:
        """End the run because of `err`: the reason as tag `segtune.error`, status KILLED for
        Ctrl-C, else FAILED."""
        self.set_tags({"segtune.error": f"{err.__class__.__name__}: {err}"[:5000]})
        self.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self._send({"type": "terminate", "status": status}, lambda: self.client.set_terminated(self.run_id, status))


def close_open_trials(uri: str, experiment: str, sweep_id: str, statuses: dict[str, str] | None) -> dict[str, str]:
    """After a sweep: end every trial run (and member run) still RUNNING, so none is left open.

    `statuses` is Tune's final status per trial id; a member run shares its trial's. A TERMINATED trial whose run is still open
    was stopped early by the scheduler: FINISHED with `segtune.pruned=true`. ERROR: FAILED. Any
    other status (the sweep was interrupted): KILLED, and `--resume` reopens it. A run whose trial
    Tune no longer knows (its driver was killed before Tune saved that trial) is deleted (MLflow
    keeps deleted runs restorable): the resumed sweep runs that trial again under a new id.
    With `statuses=None` (the driver itself is going down) every open run becomes KILLED.
    Returns run id -> what was done.
    """
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    closed = {}
    runs = [run for kind in ("trial", "member") for run in client.search_runs([exp.experiment_id], filter_string=(
            f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{KIND}` = '{kind}'"), max_results=5000)]
    for run in runs:
        trial_id, rid = run.data.tags.get(TRIAL_ID, ""), run.info.run_id
        if statuses is not None and trial_id not in statuses:
            client.delete_run(rid)
            closed[rid] = "deleted"
            continue
        if run.info.status != "RUNNING":
            continue
        tune_status = None if statuses is None else statuses[trial_id]
        if tune_status == "TERMINATED":
            client.set_tag(rid, PRUNED, "true")
            status = "FINISHED"
        else:
            status = "FAILED" if tune_status == "ERROR" else "KILLED"
        client.set_terminated(rid, status)
        closed[rid] = status
    return closed


def find_sweep(uri: str, experiment: str, name: str, sweep_id: str | None = None) -> Any | None:
    """The parent run of sweep `sweep_id`, or of the latest unfinished sweep of experiment file `name`."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`{KIND}` = 'sweep' and tags.`segtune.name` = '{name}'"
    if sweep_id is not None:
        query += f" and tags.`{SWEEP_ID}` = '{sweep_id}'"
    else:
        query += " and attributes.status != 'FINISHED'"
    runs = client.search_runs([exp.experiment_id], filter_string=query,
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def reopen_run(uri: str, run_id: str) -> None:
    MlflowClient(uri).update_run(run_id, status="RUNNING")


def trial_runs(uri: str, experiment: str, sweep_id: str | None = None) -> list[Any]:
    """Trial runs of a sweep (the latest sweep of the experiment when `sweep_id` is None)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    if sweep_id is None:
        sweeps = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND}` = 'sweep'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
        if not sweeps:
            return []
        sweep_id = sweeps[0].data.tags[SWEEP_ID]
    return client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{KIND}` = 'trial'"),
        order_by=["attributes.start_time ASC"], max_results=1000)


def member_runs(uri: str, trial_run: Any) -> list[Any]:
    """The member runs of a trial run (a sweep with repeats), by member number; [] without."""
    client = MlflowClient(uri)
    tags = trial_run.data.tags
    runs = client.search_runs([trial_run.info.experiment_id], filter_string=(
        f"tags.`{SWEEP_ID}` = '{tags.get(SWEEP_ID, '')}' and tags.`{TRIAL_ID}` = '{tags.get(TRIAL_ID, '')}' "
        f"and tags.`{KIND}` = 'member'"), max_results=1000)
    return sorted(runs, key=lambda r: int(r.data.tags.get(MEMBER, "0")))


def end_sweep_run(uri: str, run_id: str, summary: dict[str, Any], status: str = "FINISHED") -> None:
    """Record the best trial on the parent run (tags and its description) and close it."""
    client = MlflowClient(uri)
    tags = [RunTag(f"segtune.best.{k}", str(v)) for k, v in summary.items() if v is not None]
    if summary.get("trial_id"):
        note = client.get_run(run_id).data.tags.get(NOTE, "").split("\n\n**Best trial**")[0]
        best = (f"\n\n**Best trial** {summary['trial_id']} (run {summary.get('run_id')}): val/dice_best "
                f"{summary.get('val_dice_best', float('nan')):.4f}, test/iou {summary.get('test_iou') or float('nan'):.4f}")
        tags.append(RunTag(NOTE, note + best))
    if tags:
        client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, status)


COSTS = ("cost/gpu_hours", "cost/cpu_hours")


def sweep_costs(uri: str, experiment: str, sweep_id: str) -> dict[str, float]:
    """The sums of the sweep's trial runs' cost metrics (members are inside their trial's cost)."""
    runs = trial_runs(uri, experiment, sweep_id)
    return {key: sum(r.data.metrics.get(key, 0.0) for r in runs) for key in COSTS}


def log_run_values(uri: str, run_id: str, metrics: dict[str, float] | None = None,
                   tags: dict[str, str] | None = None) -> None:
    """Metrics (step 0) and tags on a run in one request, whatever its status."""
    now = int(time.time() * 1000)
    MlflowClient(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                                tags=[RunTag(k, v) for k, v in _tags(tags or {}).items()])


def log_trial_values(uri: str, experiment: str, sweep_id: str, trial_id: str, metrics: dict[str, float]) -> bool:
    """Metrics (step 0) on the run of a sweep's trial found by its tags; False when it has none."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    run_id = find_trial_run(client, exp.experiment_id, sweep_id, trial_id) if exp is not None else None
    if run_id is not None:
        log_run_values(uri, run_id, metrics)
    return run_id is not None


def log_run_json(uri: str, run_id: str, data: Any, artifact_file: str) -> None:
    """A JSON artifact on a run (e.g. the list of runs that seeded a sweep)."""
    MlflowClient(uri).log_dict(run_id, data, artifact_file)


def finished_trial_runs(uri: str, experiment: str, tags: dict[str, str], params: dict[str, str]) -> list[Any] | None:
    """FINISHED trial runs of any sweep in `experiment` with these tag and param values (a
    sweep's history for warm starts), oldest first; None when the experiment does not exist."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = " and ".join([f"tags.`{KIND}` = 'trial'", "attributes.status = 'FINISHED'",
                          *(f"tags.`{k}` = '{v}'" for k, v in tags.items()),
                          *(f"params.`{k}` = '{v}'" for k, v in params.items())])
    return client.search_runs([exp.experiment_id], filter_string=query,
                              order_by=["attributes.start_time ASC"], max_results=5000)
