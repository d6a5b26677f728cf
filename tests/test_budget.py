"""Trial cost and the sweep budget's ledger (segtune.budget); the budget stopping a real sweep
is tested with the warm start, in tests/test_warm_start.py."""

from __future__ import annotations

import time

import pytest

from segtune.budget import Ledger, cost_metrics
from segtune.config import load_config
from segtune.errors import ConfigError
from tests.conftest import DEMO


def test_budget_must_be_positive_and_names_its_field() -> None:
    with pytest.raises(ConfigError, match="budget_gpu_hours"):
        load_config(DEMO, ["search.budget_gpu_hours=0"])
    assert load_config(DEMO, ["search.budget_gpu_hours=2.5"]).search.budget_gpu_hours == 2.5


def test_cost_counts_gpus_or_else_cpus_and_adds_earlier_attempts() -> None:
    cpu = load_config(DEMO, ["resources.cpu=2"])
    assert cost_metrics(cpu, 1800) == {"cost/gpu_hours": 0.0, "cost/cpu_hours": 1.0}
    assert cost_metrics(cpu, 1800, {"cost/cpu_hours": 0.5}) == {"cost/gpu_hours": 0.0, "cost/cpu_hours": 1.5}
    gpu = load_config(DEMO, ["resources.gpu=0.5"])
    assert cost_metrics(gpu, 3600) == {"cost/gpu_hours": 0.5}


def test_ledger_counts_finished_and_running_trials_and_stops_once() -> None:
    lines: list[str] = []
    ledger = Ledger(budget=0.2 / 3600, rate_=2.0, unit_="cpu", spent_before=0.0, log=lines.append)
    ledger.start("a")
    assert not ledger.exhausted()
    time.sleep(0.06)
    running = ledger.spent()
    assert running >= 2 * 0.06 / 3600  # a running trial counts what it has spent so far
    ledger.end("a")
    ledger.start("b")
    time.sleep(0.05)
    assert ledger.exhausted() and ledger.exhausted()
    assert ledger.stopped_at is not None and ledger.stopped_at >= ledger.budget
    assert len(lines) == 1 and "budget spent" in lines[0] and "CPU-hours" in lines[0] and "1 running" in lines[0]
    assert not Ledger(None, 1.0, "gpu").exhausted()
