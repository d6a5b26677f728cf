"""segtune.ray_compat against the installed Ray, Accelerate and torch: each private API still
does what segtune relies on (a library upgrade that breaks one fails here first)."""

from __future__ import annotations

import pytest
import torch

from segtune import ray_compat


def test_version_counter_moves_with_in_place_changes_only() -> None:
    t = torch.zeros(3)
    before = ray_compat.version_counter(t)
    _ = t + 1  # out of place: the same data
    assert ray_compat.version_counter(t) == before
    t.add_(1)
    assert ray_compat.version_counter(t) > before
    with torch.no_grad():
        t.copy_(torch.ones(3))  # what load_state_dict does
    assert ray_compat.version_counter(t) > before + 1


def test_reset_accelerate_state_lets_the_next_accelerator_choose_again() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    ray_compat.reset_accelerate_state()
    Accelerator(cpu=True, mixed_precision="bf16")
    assert AcceleratorState().mixed_precision == "bf16"
    # Without the reset Accelerate refuses another precision in the same process.
    with pytest.raises(ValueError):
        Accelerator(cpu=True, mixed_precision="no")
    ray_compat.reset_accelerate_state()
    Accelerator(cpu=True, mixed_precision="no")
    assert AcceleratorState().mixed_precision == "no"
    ray_compat.reset_accelerate_state()


def test_reset_ray_auth_cache_runs_on_this_ray() -> None:
    ray_compat.reset_ray_auth_cache()  # raises if Ray renamed what it reaches for
    ray_compat.reset_ray_auth_cache()


@pytest.fixture
def local_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def test_placement_groups_are_read_and_an_orphaned_one_released(local_ray) -> None:
    """What segtune.distributed.release_orphaned_groups does between a sweep's steps, for real:
    an actor creates a placement group and dies; the group outlives it until released."""
    from ray.util.placement_group import placement_group

    from segtune.distributed import release_orphaned_groups

    ray = local_ray

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self) -> bytes:
            pg = placement_group([{"CPU": 1}])
            ray.get(pg.ready(), timeout=60)
            return pg.id.binary()

    creator = Creator.remote()
    group = ray.get(creator.make.remote(), timeout=60)
    job = ray.get_runtime_context().get_job_id()
    records = {r.group_id: r for r in ray_compat.placement_groups()}
    assert group in records
    mine = records[group]
    assert (mine.job_id, mine.created_by_actor, mine.creator_actor_dead, mine.removed) == (job, True, False, False)
    assert release_orphaned_groups(job) == 0  # its creator lives: not orphaned

    ray.kill(creator)
    for _ in range(100):  # the GCS learns of the death asynchronously
        if {r.group_id: r for r in ray_compat.placement_groups()}[group].creator_actor_dead:
            break
        import time

        time.sleep(0.1)
    assert release_orphaned_groups(job) == 1
    assert {r.group_id: r for r in ray_compat.placement_groups()}[group].removed
    assert release_orphaned_groups(job) == 0
