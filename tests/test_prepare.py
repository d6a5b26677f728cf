"""What every command checks before it builds data or models: registry names, and whether the
model, its prompts and the data fit together (segtune.prepare.check_experiment)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from segtune.config import load_config
from segtune.errors import ConfigError
from segtune.models import MODELS, PROMPT_KINDS
from segtune.prepare import check_experiment
from segtune.prompts import PROMPTS
from tests.conftest import DEMO, REPO

EXPERIMENTS = sorted((REPO / "experiments").rglob("*.yaml"))


def test_every_family_says_which_prompts_it_takes() -> None:
    assert set(PROMPT_KINDS) == set(MODELS)
    assert all(set(kinds) <= set(PROMPTS) and kinds for kinds in PROMPT_KINDS.values())


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_every_shipped_experiment_fits(path: Path) -> None:
    check_experiment(load_config(path))


@pytest.mark.parametrize("sets,field,words", [
    (["model.name=clipseg", "model.variant=tiny", "model.train=decoder"], "prompt.train", ["text"]),
    (["prompt.train=text", "prompt.eval=text", "prompt.text=cells"], "prompt.train", ["clipseg"]),
    (["model.name=medsam", "model.train=mask_decoder", "prompt.train=box"], "prompt.eval", ["box"]),
    (["model.name=clipseg", "model.variant=tiny", "model.train=decoder", "prompt.train=text",
      "prompt.eval=text"], "prompt.text", ["synthetic_em"]),
    (["model.name=pasam", "model.train=adapter", "eval.protocol=amg"], "eval.protocol", ["sam"]),
    (["model.name=nope"], "model.name", ["sam", "clipseg"]),
])
def test_a_misfit_is_named_before_anything_is_built(sets: list[str], field: str, words: list[str]) -> None:
    cfg = load_config(DEMO, sets)
    with pytest.raises(ConfigError) as err:
        check_experiment(cfg)
    message = str(err.value)
    assert message.startswith(f"{field}:") and "\n" not in message, message
    assert all(w in message for w in words), message


def test_text_from_the_samples_or_from_prompt_text_fits() -> None:
    clip = ["model.name=clipseg", "model.variant=tiny", "model.train=decoder", "prompt.train=text", "prompt.eval=text"]
    check_experiment(load_config(DEMO, [*clip, "prompt.text=mitochondria"]))
    check_experiment(load_config(DEMO, [*clip, "dataset.name=synthetic_cityscapes"]))  # class names
    check_experiment(load_config(DEMO, [*clip, "dataset.name=qata_cov19", "dataset.description_file=Train_text.xlsx"]))
    with pytest.raises(ConfigError, match="prompt.text"):
        check_experiment(load_config(DEMO, [*clip, "dataset.name=qata_cov19"]))
    # AMG draws no eval prompt: SAM with protocol amg fits whatever prompt.eval says.
    check_experiment(load_config(DEMO, ["eval.protocol=amg"]))


def test_the_text_prompt_mistake_exits_1_before_data_or_model(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    res = subprocess.run(
        [sys.executable, "-m", "segtune.cli", "train", str(DEMO), "--no-track", "--set", "model.name=clipseg",
         "--set", "model.variant=tiny", "--set", "model.train=decoder", "--set", "prompt.train=text",
         "--set", "prompt.eval=text", "--set", f"dataset.cache_dir={cache}", "--set", f"dataset.root={tmp_path / 'em'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and res.stderr.startswith("error: prompt.text:"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not cache.exists() and not (tmp_path / "em").exists()  # no data written, no store prepared
