"""The cluster templates in infra/ parse, keep token auth on, and run `segtune sweep` with the MLflow URI.

No cloud cluster starts here: the local script and the MLflow script run for real in the other
tests of this folder; these templates are checked for what a reader would otherwise find out
only on `ray up` or `kubectl apply`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import REPO

INFRA = REPO / "infra"
SCRIPTS = sorted([*INFRA.rglob("*.sh"), *INFRA.rglob("*.sbatch")])


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses(path: Path) -> None:
    assert docs(path), f"{path} holds no YAML document"


def test_cluster_launcher_starts_every_node_with_token_auth() -> None:
    cfg = docs(INFRA / "ray" / "cluster-launcher.yaml")[0]
    assert cfg["head_node_type"] in cfg["available_node_types"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    # The same token file reaches every node.
    assert any(dest.endswith(".ray/auth_token") for dest in cfg["file_mounts"])


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_cluster_and_job_use_token_auth() -> None:
    [cluster, pvc] = docs(INFRA / "ray" / "kuberay-raycluster.yaml")
    [job] = docs(INFRA / "ray" / "kuberay-rayjob.yaml")
    assert (cluster["kind"], job["kind"], pvc["kind"]) == ("RayCluster", "RayJob", "PersistentVolumeClaim")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["authOptions"]["mode"] == "token"
        major, minor, *_ = (int(x) for x in spec["rayVersion"].split("."))
        assert (major, minor) >= (2, 52), "authOptions needs Ray 2.52+"
        assert all(c["image"] == _containers(spec)[0]["image"] for c in _containers(spec))


def test_rayjob_runs_segtune_sweep_with_the_mlflow_uri_from_the_environment() -> None:
    [job] = docs(INFRA / "ray" / "kuberay-rayjob.yaml")
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("segtune sweep ") and '--tracking-uri "$MLFLOW_TRACKING_URI"' in entry
    assert "search.storage_path=s3://" in entry
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "MLFLOW_TRACKING_URI" in {e["name"] for e in head["env"]}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_shell_scripts_parse(path: Path) -> None:
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
