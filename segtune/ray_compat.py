"""Every private API of Ray, Accelerate and torch that segtune touches, and nowhere else.

Each function here leans on something its library does not promise to keep: a Ray, Accelerate
or torch upgrade that breaks segtune breaks it here first, and `tests/test_ray_compat.py`
runs each one against the installed versions. The module imports nothing from segtune, so any
floor may use it (the model wrappers and the training loop as well as the Ray layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def reset_ray_auth_cache() -> None:
    """Make Ray read RAY_AUTH_MODE and the auth token afresh from the environment.

    Ray caches both for the life of the process; a process that already ran a local Ray
    (the default token in ~/.ray/auth_token) and now joins a cluster with another token
    (RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN) would otherwise present the stale one and be
    refused. Ray's own CLI resets the same cache after writing a token.
    """
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication: nothing is cached
        return
    Config.initialize("")
    loader = AuthenticationTokenLoader.instance()
    if hasattr(loader, "reset_cache"):  # a Ray that lacks it keeps its old cache
        loader.reset_cache()


@dataclass(frozen=True)
class PlacementGroupRecord:
    """What segtune needs to know of one placement group in Ray's GCS table."""

    group_id: bytes
    job_id: str  # hex, as `ray.get_runtime_context().get_job_id()` gives it
    created_by_actor: bool  # False for groups a driver made (Tune's, one per trial)
    creator_actor_dead: bool
    detached: bool
    removed: bool


def placement_groups() -> list[PlacementGroupRecord]:
    """Every placement group the cluster's GCS knows of, alive or not (needs `ray.init` first).

    Ray's public State API answers the same question only through the dashboard, which
    segtune's local Ray runs without.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = table.FromString(raw)
        out.append(PlacementGroupRecord(
            group_id=pg.placement_group_id, job_id=pg.creator_job_id.hex(),
            created_by_actor=not ray.ActorID(pg.creator_actor_id).is_nil(),
            creator_actor_dead=pg.creator_actor_dead, detached=pg.is_detached,
            removed=pg.state == table.REMOVED))
    return out


def remove_placement_group(group_id: bytes) -> None:
    """Remove a placement group known only by its id (a record of `placement_groups`)."""
    import ray
    from ray.util.placement_group import PlacementGroup
    from ray.util.placement_group import remove_placement_group as remove

    remove(PlacementGroup(ray.PlacementGroupID(group_id)))


def reset_accelerate_state() -> None:
    """Forget the precision and compile settings the process's first Accelerator fixed.

    Accelerate keeps them in process-wide singletons; a Tune worker runs trial after trial
    (actor reuse), each with its own settings. The process group (PartialState, set up by Ray
    Train for a data-parallel trial) is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def version_counter(tensor: Any) -> int:
    """torch's in-place modification counter of a tensor: it changes whenever the data does
    (an optimizer step, `load_state_dict`, `copy_`), so a memo keyed on it goes stale then."""
    return int(tensor._version)
