"""Where `segtune eval` finds a trained checkpoint: a folder, a run, or a registered model.

- `--checkpoint PATH`: a segtune checkpoint folder (`model.safetensors`, `state.json`), such
  as `.segtune/train/checkpoints/best` after `segtune train`;
- `--run RUN_ID`: the run's `checkpoints/best` artifact (what trials upload), verified against
  its sha256 manifest;
- `--model models:/NAME@ALIAS` (or `models:/NAME/VERSION`): the registered pyfunc model's
  `model` artifact (a full checkpoint: every weight, segtune.checkpoint.write_full; versions
  registered before it carry a `checkpoint` artifact instead), found through the model's
  MLmodel file, verified the same way.

MLflow only: the caller rebuilds the model with `segtune.checkpoint.load_model`.
"""

from __future__ import annotations

from pathlib import Path

from segtune.errors import CheckpointError

CHECKPOINT_ARTIFACT = "checkpoints/best"  # as tracking.registry and train.run_trial write it


def _verified(path: Path, what: str) -> Path:
    from tracking.artifacts import MANIFEST, verify_manifest

    if (path / MANIFEST).is_file():
        verify_manifest(path)  # raises TrackingError naming the altered file
    elif not (path / "state.json").is_file():
        raise CheckpointError(f"{what}: {path} holds no segtune checkpoint (no state.json).")
    return path


def from_run(uri: str, run_id: str, tmp: Path) -> Path:
    """Download and verify a run's best checkpoint."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
        names = {Path(a.path).name for a in client.list_artifacts(run_id, CHECKPOINT_ARTIFACT)}
    except MlflowException as err:
        raise CheckpointError(f"--run {run_id}: no such run at {uri} ({err.message.splitlines()[0][:200]}).") from None
    if "state.json" not in names:
        raise CheckpointError(f"--run {run_id}: the run has no {CHECKPOINT_ARTIFACT} artifact; only runs of "
                              "trials that finished their epochs have one.")
    local = Path(client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(tmp)))
    return _verified(local, f"--run {run_id}")


def from_model(uri: str, model_uri: str, tmp: Path) -> Path:
    """Download a registered pyfunc model and return its verified `checkpoint` artifact."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    if not model_uri.startswith("models:/"):
        raise CheckpointError(f"--model {model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION.")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp),
                                                         tracking_uri=uri, registry_uri=uri))
    except MlflowException as err:
        raise CheckpointError(f"--model {model_uri}: not found at {uri} ({err.message.splitlines()[0][:200]}).") from None
    pyfunc = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    artifacts = pyfunc.get("artifacts", {})
    artifact = artifacts.get("model") or artifacts.get("checkpoint")
    if artifact is None:
        raise CheckpointError(f"--model {model_uri}: the model has no `model` (or `checkpoint`) artifact; "
                              "it was not registered by `segtune promote`.")
    return _verified(local / artifact["path"], f"--model {model_uri}")


def fetch_checkpoint(uri: str, *, checkpoint: Path | None, run_id: str | None, model_uri: str | None,
                     tmp: Path) -> tuple[Path, str, str | None]:
    """Exactly one source -> (local checkpoint folder, source label, source run id or None)."""
    given = [x for x in (checkpoint, run_id, model_uri) if x is not None]
    if len(given) != 1:
        raise CheckpointError("segtune eval: give exactly one of --checkpoint PATH, --run RUN_ID, "
                              "--model models:/NAME@ALIAS (or --zero-shot).")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_dir():
            raise CheckpointError(f"--checkpoint {path}: no such folder; expected a segtune checkpoint folder "
                                  "such as .segtune/train/checkpoints/best.")
        return _verified(path, f"--checkpoint {path}"), str(path), None
    if run_id is not None:
        return from_run(uri, run_id, tmp), f"runs:/{run_id}", run_id
    assert model_uri is not None
    path = from_model(uri, model_uri, tmp)
    return path, model_uri, _registered_run(uri, model_uri)


def _registered_run(uri: str, model_uri: str) -> str | None:
    """The trial run a promoted version came from (`segtune.run_id` on the version), if known."""
    from mlflow.tracking import MlflowClient

    ref = model_uri.removeprefix("models:/")
    client = MlflowClient(uri, registry_uri=uri)
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias.split("/")[0])
        else:
            name, number = ref.split("/")[:2]
            version = client.get_model_version(name, number)
    except Exception:  # a stage name, a missing tag: the source run is a nicety
        return None
    return version.tags.get("segtune.run_id") or version.run_id
