"""Per-trial machine settings: loader workers, and torch.compile through Accelerate.

A trial that loads batches in worker processes, or runs its model through TorchDynamo, must
train exactly as the plain one does.
"""

from __future__ import annotations

from pathlib import Path

from segtune.config import apply_params
from segtune.loaders import loader_options
from segtune.prepare import prepare_data
from segtune.train import TrialContext, run_trial


def test_loader_workers_follow_the_trials_cpus(tiny_config) -> None:
    def workers(**res) -> int:
        return loader_options(apply_params(tiny_config, {f"resources.{k}": v for k, v in res.items()}))["num_workers"]

    assert workers(cpu=1) == 0 and workers(cpu=2) == 1 and workers(cpu=16) == 4
    assert workers(cpu=8, workers=4) == 1  # each data-parallel worker has 2 CPUs
    assert workers(cpu=1, loader_workers=3) == 3


def test_two_loader_workers_give_the_same_trial_as_none(tiny_config, tmp_path: Path) -> None:
    store = prepare_data(tiny_config, log=lambda _: None)[0]
    results = []
    for n in (0, 2):
        cfg = apply_params(tiny_config, {"resources.loader_workers": n, "train.epochs": 2})
        results.append(run_trial(cfg, TrialContext(store=store, workdir=tmp_path / f"w{n}", log=lambda _: None)))
    # Same batches and the same prompts: the workers saw the collate's epoch change to 2
    # (persistent workers would keep drawing epoch 1's training prompts, and this would fail).
    assert results[0] == results[1]


def test_a_compiled_trial_trains_like_an_eager_one(tiny_config, tmp_path: Path) -> None:
    """train.compile goes through Accelerate's dynamo backend; "eager" traces the model with
    TorchDynamo (graph breaks and all) without generating kernels, so it must match exactly."""
    store = prepare_data(tiny_config, log=lambda _: None)[0]
    results = [run_trial(apply_params(tiny_config, {"train.compile": mode, "train.epochs": 1}),
                         TrialContext(store=store, workdir=tmp_path / mode, log=lambda _: None))
               for mode in ("no", "eager")]
    assert results[0].keys() == results[1].keys()
    for key, value in results[0].items():
        assert abs(value - results[1][key]) < 1e-5, key


def test_each_trial_gets_its_own_compile_setting_in_a_reused_process(tiny_config) -> None:
    """Accelerate keeps the backend in process-wide state; Tune reuses a worker for trial after trial."""
    from segtune.train import _accelerator

    for mode in ("no", "eager", "inductor", "no"):
        acc = _accelerator(apply_params(tiny_config, {"train.compile": mode}))
        assert acc.state.dynamo_plugin.backend.value.lower() == mode


def test_segtune_train_says_that_workers_apply_to_sweeps_and_runs_one_process(tiny_config, tmp_path: Path) -> None:
    from segtune.commands import train_one

    lines: list[str] = []
    cfg = apply_params(tiny_config, {"resources.workers": 2, "resources.cpu": 2, "train.epochs": 1})
    out = train_one(cfg, tmp_path / "w", track=False, log=lines.append)
    assert any("resources.workers=2 applies to sweeps" in line for line in lines), lines
    assert 0.0 <= out["test/iou"] <= 1.0
