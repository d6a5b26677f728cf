"""Provenance in MLflow's own terms: the dataset a run read, and what kind of experiment it is in.

segtune's tags say which prepared store a run read (`segtune.data_hash`, `segtune.store`,
`segtune.data_counts`, `segtune.dataset`: see `segtune.trial.run_tags`). Every run tracking/
creates also logs that store as an MLflow dataset input, so the UI's dataset column, its
dataset drawer and run-to-dataset lineage show it: the store's folder as the source, as much of
its content hash as MLflow keeps (36 characters) as the digest, and its split counts and full
hash as the profile. Nothing is loaded: the dataset is metadata only (MLflow's `MetaDataset`).

Experiments segtune creates (and those it logs into without a kind) carry
`mlflow.experimentKind`: the experiment's kind as MLflow 3 records it, which its UI reads to
open an experiment on its runs rather than its GenAI overview. The UI build knows `finetuning`
and `custom_model_development` among its model-training kinds; segtune uses the latter, the one
the UI's own kind selector offers ("Machine learning"). The UI of MLflow 3.17 decides by its
GenAI / Model training switch instead (kept per browser, overridden by `workflowType` in the
URL), which is why every link segtune prints carries that parameter (tracking.urls).
"""

from __future__ import annotations

import json
from typing import Any

from mlflow.data.dataset_source_registry import get_dataset_source_from_json
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, Experiment, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

DATA_HASH = "segtune.data_hash"
STORE = "segtune.store"  # the prepared store's folder
DATA_COUNTS = "segtune.data_counts"  # JSON: samples per split
DATASET = "segtune.dataset"
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
DIGEST_CHARS = 36  # MLflow's limit on a dataset digest (MAX_DATASET_DIGEST_SIZE)


def store_dataset(tags: dict[str, str]) -> Dataset | None:
    """The prepared store a run's tags name, as an MLflow dataset entity (None when the tags
    name no store: a run that read no data, or one whose store was not found)."""
    digest, store = tags.get(DATA_HASH, ""), tags.get(STORE, "")
    if not store or not digest or digest == "unknown":
        return None
    source = get_dataset_source_from_json(json.dumps({"uri": store}), "local")
    meta = MetaDataset(source, name=tags.get(DATASET) or store.rstrip("/").rsplit("/", 1)[-1],
                       digest=digest[:DIGEST_CHARS])
    try:
        counts: Any = json.loads(tags.get(DATA_COUNTS) or "{}")
    except ValueError:
        counts = {}
    profile = {"samples": counts, "hash": digest}
    return Dataset(**meta.to_dict(), profile=json.dumps(profile, sort_keys=True))


def log_store_input(client: MlflowClient, run_id: str, tags: dict[str, str], context: str) -> bool:
    """Log the store a run read as its dataset input (`context`: training or evaluation);
    False when the tags name no store."""
    dataset = store_dataset(tags)
    if dataset is None:
        return False
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])
    return True


def mark_experiment(client: MlflowClient, experiment: Experiment) -> None:
    """Tag an existing experiment as model training when it carries no kind yet (a kind someone
    chose in the UI is left alone)."""
    if EXPERIMENT_KIND not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
