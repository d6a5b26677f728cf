"""Shared set-up for the benchmark scripts: a prepared synthetic store and a config over it.

Each benchmark prints one ratio measured within one run (both sides timed in the same process
on the same machine), never an absolute threshold: the 2-core machines are shared.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.yaml"


def workdir(name: str) -> Path:
    """A fresh temporary folder for one benchmark run, removed when the script exits.

    Ray's session logs go to a second one (RAY_TMPDIR; short, as Ray's socket paths must be),
    so a run leaves nothing in /tmp. SEGTUNE_BENCH_KEEP=1 keeps both for a look afterwards.
    """
    root = Path(tempfile.mkdtemp(prefix=f"segtune-bench-{name}-"))
    ray_tmp = tempfile.mkdtemp(prefix="segtune-ray-")
    os.environ["RAY_TMPDIR"] = ray_tmp
    if os.environ.get("SEGTUNE_BENCH_KEEP") == "1":
        print(f"benchmark files kept in {root} and {ray_tmp}", flush=True)
    else:
        for folder in (root, ray_tmp):
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return root


def config(root: Path, *sets: str):
    """The demo experiment over synthetic EM under `root`, with overrides."""
    from segtune.config import load_config

    return load_config(DEMO, [f"dataset.root={root / 'em'}", f"dataset.cache_dir={root / 'cache'}",
                              f"search.storage_path={root / 'ray'}", *sets])


def store(cfg) -> Path:
    """Prepare (or reuse) the config's store."""
    from segtune.prepare import prepare_data

    return prepare_data(cfg, log=lambda _: None)[0]


@contextmanager
def timed(out: dict, key: str) -> Iterator[None]:
    """Adds the block's wall seconds to out[key]."""
    t = time.perf_counter()
    yield
    out[key] = out.get(key, 0.0) + time.perf_counter() - t


def verdict(name: str, ratio: float, goal: str, ok: bool, note: str = "") -> None:
    """The one line every benchmark ends with (RESULTS.md quotes it)."""
    print(f"RESULT {name}: {ratio:.3f}x (goal {goal}) {'MET' if ok else 'MISSED'}{'; ' + note if note else ''}", flush=True)
