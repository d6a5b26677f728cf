"""The Ray side of a sweep: connect to a cluster, and refuse a sweep it cannot run.

`preflight(cfg, address)` runs before the sweep's parent run opens, so a sweep that could
never start leaves nothing behind in MLflow. It checks, against the nodes alive now:

- resources: some node must hold one trial's `resources:` (`cpu`, `gpu`; Tune places a
  trial's bundle on a single node). Otherwise Tune would keep the trials PENDING forever.
- storage: `search.storage_path` (Tune state, checkpoints) and `dataset.cache_dir` (the
  prepared store the trials read) must be visible on every node. A URI (`s3://...`) is
  written to once from here; a local path is probed from a task pinned to each node, so a
  shared filesystem mounted at the same path passes and a node-local disk is refused.

`connect(address)` initialises Ray the way every driver in segtune does (segtune.tune's
`ray_session`); `experiment_dir` names a sweep's folder on that shared storage.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

from segtune.config import ExperimentConfig
from segtune.errors import ClusterError
from segtune.ray_compat import reset_ray_auth_cache

# Anything like s3://, gs://, abfs://, hdfs://; file:// is a local path spelled as a URI.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PROBE_TIMEOUT_S = 60.0


def is_uri(path: str) -> bool:
    """True for a storage URI that pyarrow resolves to a remote filesystem (not file://)."""
    return bool(_URI.match(path)) and not path.startswith("file://")


def storage_uri(path: str) -> str:
    """What Tune gets as `storage_path`: a URI unchanged, a local path made absolute."""
    if is_uri(path):
        return path.rstrip("/")
    return str(Path(path.removeprefix("file://")).expanduser().resolve())


def experiment_dir(cfg: ExperimentConfig, sweep_id: str) -> str:
    """The Tune experiment folder of a sweep, under `search.storage_path` (a path or a URI)."""
    return f"{storage_uri(cfg.search.storage_path)}/{cfg.name}-{sweep_id}"


def connect(address: str | None) -> bool:
    """Initialise Ray unless it is already; True if this call did (the caller shuts it down).

    `address` None means RAY_ADDRESS if set, else a new local Ray on this machine.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    reset_ray_auth_cache()  # a token from this process's environment, not a cached one
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=True)
    except ConnectionError as err:
        # Ray's own message is a bare "Failed to connect"; the token refusal is in its cause.
        refused = "InvalidAuthToken" in str(err.__cause__)
        why = "the cluster refused this process's auth token (InvalidAuthToken)" if refused else str(err)
        raise ClusterError(
            f"Cannot connect to the Ray cluster at {address}: {why}. Check the address (the head "
            "prints it; `ray status` on the head shows the nodes) and that this process has the "
            "cluster's token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<the token file every "
            "node uses> (or the token in ~/.ray/auth_token). See infra/local/README.md."
        ) from None
    return True


def _describe(node: dict[str, Any]) -> str:
    res = node["Resources"]
    name = ("this machine" if node["NodeID"] == "local"
            else f"node {node['NodeID'][:8]} at {node.get('NodeManagerAddress', '?')}")
    return f"{name}: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def check_fits(cpu: float, gpu: float, nodes: list[dict[str, Any]], where: str, workers: int = 1) -> None:
    """Refuse a trial the cluster cannot hold (Tune or Ray Train would wait for it forever).

    A one-worker trial must fit on a single node. A multi-worker trial's `cpu` and `gpu` are
    split over its workers; each worker must fit on a node and the nodes together must hold
    all of them at once.
    """
    need = {"CPU": cpu / workers, "GPU": gpu / workers}
    slots = 0
    for node in nodes:
        # 1e-9: Ray's resource arithmetic is fixed-point; 0.25 * 4 must count as 1.
        slots += min(int(node["Resources"].get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)
    if slots >= workers:
        return
    listing = "; ".join(_describe(n) for n in nodes) or "no alive nodes"
    if workers == 1:
        asked = f"each trial asks for {cpu:g} CPU and {gpu:g} GPU (resources.cpu, resources.gpu), but no node"
    else:
        asked = (f"each trial runs {workers} workers of {need['CPU']:g} CPU and {need['GPU']:g} GPU "
                 f"(resources.cpu and resources.gpu split over resources.workers), but the nodes")
    raise ClusterError(
        f"resources: {asked} of {where} can hold that ({listing}). Lower resources.gpu / "
        "resources.cpu (a fractional gpu such as 0.25 shares one GPU) or resources.workers, or run "
        "on a cluster with more room (--address)."
    )


def _local_node(count_gpus: bool) -> dict[str, Any]:
    """This machine's CPUs and GPUs as Ray would count them for a local cluster."""
    gpus = 0
    if count_gpus:  # importing torch costs seconds; a CPU-only sweep need not pay them here
        import torch

        gpus = torch.cuda.device_count()  # honours CUDA_VISIBLE_DEVICES, as Ray does
    return {"NodeID": "local", "NodeManagerAddress": "this machine",
            "Resources": {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}}


def check_uri_storage(uri: str) -> None:
    """Write and delete one object under a storage URI: wrong endpoints and keys fail here."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        probe = f"{root.rstrip('/')}/.segtune-probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as out:
            out.write(b"segtune storage probe\n")
        fs.delete_file(probe)
    except Exception as err:  # pyarrow raises OSError, ArrowInvalid, ... by backend
        raise ClusterError(
            f"search.storage_path: cannot write to {uri} ({err.__class__.__name__}: {err}). "
            "The bucket must exist and this process needs credentials for it (AWS_ACCESS_KEY_ID "
            "/ AWS_SECRET_ACCESS_KEY, a profile or an instance role); for an S3-compatible "
            "server (MinIO, Ceph) set AWS_ENDPOINT_URL=http://host:port on the driver and every node."
        ) from None


def _exists(paths: list[str]) -> list[bool]:
    """Run on a node: which of these paths does it see?"""
    return [os.path.exists(p) for p in paths]


def unseen_paths(paths: list[Path], nodes: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Node description -> the local paths (of `paths`) that node does not see.

    Writes a marker file into each path here, then asks a zero-CPU task pinned to each node
    whether the markers exist there. Ray must be initialised.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tag = uuid.uuid4().hex
    markers = []
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        marker = path / f".segtune-probe-{tag}"
        marker.write_text("written by segtune's preflight; safe to delete\n")
        markers.append(marker)
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_exists)
        refs = {_describe(n): probe.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                ).remote([str(m) for m in markers]) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=_PROBE_TIMEOUT_S)
        unseen = {}
        for node, ref in refs.items():
            if ref not in ready:
                unseen[node] = [f"{p} (no answer within {_PROBE_TIMEOUT_S:g} s)" for p in paths]
                continue
            missing = [str(p) for p, seen in zip(paths, ray.get(ref), strict=True) if not seen]
            if missing:
                unseen[node] = missing
        return unseen
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)


def check_shared_paths(cfg: ExperimentConfig, nodes: list[dict[str, Any]], driver_node: str) -> None:
    """Refuse local storage or data paths that some node of the cluster cannot see."""
    paths = [Path(storage_uri(cfg.search.storage_path))] if not is_uri(cfg.search.storage_path) else []
    paths.append(Path(cfg.dataset.cache_dir).expanduser().resolve())
    # Trials spool what the tracking server missed here, and the driver delivers it at the end.
    paths.append(Path(cfg.tracking.spool_dir).expanduser().resolve())
    others = [n for n in nodes if n["NodeID"] != driver_node]
    if not others:
        return  # every trial runs where this process runs: local paths are fine
    unseen = unseen_paths(paths, others)
    if unseen:
        detail = "; ".join(f"{node} does not see {', '.join(p)}" for node, p in unseen.items())
        raise ClusterError(
            f"search.storage_path / dataset.cache_dir / tracking.spool_dir: this Ray cluster has "
            f"{len(nodes)} nodes and its trials run on any of them, so Tune's checkpoints, the "
            f"prepared data and the tracking spool must be on storage every node sees. {detail}. "
            "Use a shared filesystem mounted at the same path on every node (NFS, Lustre, ...), or "
            "put search.storage_path on object storage (s3://bucket/prefix) and dataset.cache_dir "
            "and tracking.spool_dir on a shared mount."
        )


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes, as `ray.nodes()` describes them."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def preflight(cfg: ExperimentConfig, address: str | None = None) -> None:
    """Refuse, with the reason, a sweep that the cluster (or this machine) cannot run.

    With no address and no RAY_ADDRESS, the sweep starts a local Ray here: the check uses this
    machine's CPUs and GPUs without starting Ray twice. Otherwise it connects (unless Ray is
    already initialised), checks, and disconnects again if it connected.
    """
    import ray

    if is_uri(cfg.search.storage_path):
        check_uri_storage(cfg.search.storage_path)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None and not ray.is_initialized():
        check_fits(cfg.resources.cpu, cfg.resources.gpu, [_local_node(cfg.resources.gpu > 0)],
                   "the local Ray this sweep would start (no --address or RAY_ADDRESS given)",
                   cfg.resources.workers)
        return
    started = connect(address)
    try:
        nodes = alive_nodes()
        check_fits(cfg.resources.cpu, cfg.resources.gpu, nodes, f"the Ray cluster at {address or 'this process'}",
                   cfg.resources.workers)
        check_shared_paths(cfg, nodes, ray.get_runtime_context().get_node_id())
    finally:
        if started:
            ray.shutdown()
