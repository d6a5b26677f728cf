"""`segtune prompt-search` finds the prompt a tiny CLIPSeg was trained to respond to.

A tiny CLIPSeg is trained (decoder only, on cached CLIP features, a few seconds) to segment
mitochondria when told "black shadow" and to predict nothing for the other candidates the
twin's search will try. Saved with `save_pretrained`, it is loaded back through
`model.checkpoint` (the real loading path), and the search, a real Ray Tune + Optuna study,
must pick "black shadow", log every candidate, and write it where the next run reads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient

from segtune.config import ModelConfig, load_config
from segtune.data import open_store
from segtune.errors import ConfigError
from segtune.models import build_model
from segtune.prepare import prepare_data
from segtune.prompt_search import candidates, prompt_search, set_prompt_text
from segtune.prompts import PromptBatch
from tests.study.conftest import THESIS, twin_config

TWIN = THESIS / "tiny" / "em_clipseg_e20_tiny.yaml"
GOOD = "black shadow"


@pytest.fixture(scope="module")
def responsive_clipseg(twin_runs, tmp_path_factory) -> Path:
    """A tiny CLIPSeg that segments only for GOOD among the twin's candidates, saved as a
    Hugging Face folder."""
    cfg = twin_config(TWIN, twin_runs.root, twin_runs.uri)
    texts = candidates(cfg.prompt_search)
    assert GOOD in texts and len(texts) == 4
    store, _ = prepare_data(cfg, log=lambda _: None)
    train = open_store(store).split("train")
    images = torch.stack([train[i]["image"] for i in range(len(train))])
    masks = F.interpolate(torch.stack([train[i]["mask"] for i in range(len(train))]), (64, 64))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="clipseg", variant="tiny", train="decoder"))
    with torch.no_grad():
        features = model.encode(images)  # CLIP is frozen: encode once, train the decoder on it
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=6e-3)
    others = [t for t in texts if t != GOOD]
    for _ in range(60):
        idx = torch.randint(0, len(train), (8,))
        prompts = [GOOD if k % 2 == 0 else others[(k // 2) % len(others)] for k in range(8)]
        target = masks[idx] * torch.tensor([float(p == GOOD) for p in prompts]).view(-1, 1, 1, 1)
        loss = F.binary_cross_entropy_with_logits(model.decode(features[:, idx], PromptBatch(texts=prompts),
                                                               (64, 64)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("clipseg-black-shadow")
    model.model.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    return out


def test_search_picks_the_trained_prompt_logs_all_and_writes_it(responsive_clipseg, twin_runs, ray_local,
                                                                tmp_path: Path) -> None:
    # The file to update: the twin, with a worse prompt than the search will find.
    target = tmp_path / "next.yaml"
    target.write_text(TWIN.read_text().replace(f"text: {GOOD}", "text: mitochondria"))
    assert load_config(target).prompt.text == "mitochondria"
    cfg = twin_config(TWIN, twin_runs.root, twin_runs.uri, [
        f"model.checkpoint={responsive_clipseg}", f"prompt_search.output={tmp_path / 'best.yaml'}",
        "tracking.experiment=prompt-search"])
    lines: list[str] = []
    outcome = prompt_search(cfg, write=[target], log=lines.append)
    # Progress counted per candidate scored (by a Tune callback on the driver).
    count = len(candidates(cfg.prompt_search))
    assert any(line.startswith(f"prompt search: scoring candidates: done, {count} prompts in ")
               for line in lines), lines

    assert outcome.best == GOOD
    texts = candidates(cfg.prompt_search)
    assert set(outcome.scores) == set(texts)  # every candidate scored once
    # What the search recorded is the maximum of what its runs logged.
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("prompt-search")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`segtune.sweep_id` = '{outcome.search_id}'")
    parent = [r for r in runs if r.data.tags["segtune.kind"] == "prompt_search"]
    trials = [r for r in runs if r.data.tags["segtune.kind"] == "zero_shot"]
    assert len(parent) == 1 and len(trials) == len(texts)
    logged = {r.data.params["prompt.text"]: r.data.metrics["train/iou"] for r in trials}
    assert logged == pytest.approx(outcome.scores)
    assert max(logged, key=logged.get) == GOOD
    assert logged[GOOD] > max(v for t, v in logged.items() if t != GOOD) + 0.02  # clearly better
    for r in trials:
        assert r.info.status == "FINISHED" and r.data.tags["segtune.search"] == "prompt"
        assert r.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert r.data.metrics["train/samples"] == 4  # prompt_search.sample on the train split
    assert parent[0].data.tags["segtune.best.prompt"] == GOOD and parent[0].info.status == "FINISHED"

    # Written where the next fine-tuning picks it up: the YAML beside, and the experiment file.
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["prompt"] == {"text": GOOD} and best["score"] == pytest.approx(logged[GOOD])
    assert load_config(target).prompt.text == GOOD
    assert target.read_text().startswith("# Tiny twin")  # comments kept


def test_set_prompt_text_edits_block_flow_and_missing_sections(tmp_path: Path) -> None:
    base = "name: x\ndataset: {name: synthetic_em, root: r}\nmodel: {name: clipseg, variant: tiny}\n"
    cases = {
        "block": base + "prompt:\n  train: text   # trained with text\n  eval: text\n  text: old  # was\ntrain:\n  epochs: 1\n",
        "block_without_text": base + "prompt:\n  train: text\n  eval: text\n",
        "flow": base + "prompt: {train: text, eval: text, text: old}\n",
        "missing": base,
    }
    for name, text in cases.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(text)
        set_prompt_text(f, 'a "dark" shadow: here')
        assert load_config(f).prompt.text == 'a "dark" shadow: here', name
    assert "# was" in (tmp_path / "block.yaml").read_text()
    assert "# trained with text" in (tmp_path / "block.yaml").read_text()


def test_search_refuses_files_it_cannot_serve() -> None:
    from segtune.prompt_search import check

    with pytest.raises(ConfigError, match="prompt_search"):
        check(load_config(THESIS / "tiny" / "em_sam_e20_tiny.yaml"))
    with pytest.raises(ConfigError, match="clipseg"):
        check(load_config(TWIN, ["model.name=sam", "model.train=full"]))
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(TWIN, ["prompt_search.templates=['a photo']"])
