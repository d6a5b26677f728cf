"""CLIPSeg's text-embedding memo: same logits, loss and gradients as running the text tower.

The memo is on only while the text tower is frozen (`decoder`); under `full` the tower runs
every step so its gradients flow. Tiny CLIPSeg (random init, seeded by `build_model`).
"""

from __future__ import annotations

import copy

import pytest
import torch

from segtune.cache import decode_cached
from segtune.config import ModelConfig
from segtune.losses import LOSSES
from segtune.models import build_model
from segtune.models.clipseg import ClipSegSegmenter
from segtune.prompts import PromptBatch

# Repeats and two distinct strings: the memo must keep the batch's order.
TEXTS = ["mitochondria", "nucleus", "mitochondria"]


def _clipseg(policy: str) -> ClipSegSegmenter:
    model = build_model(ModelConfig(name="clipseg", variant="tiny", train=policy))
    assert isinstance(model, ClipSegSegmenter)
    model.train()
    return model


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 255, (len(TEXTS), 3, 96, 96), dtype=torch.uint8, generator=g)
    mask = (torch.rand(len(TEXTS), 1, 96, 96, generator=g) > 0.5).float()
    return {"image": images, "mask": mask}


def _count_text_tower_runs(model: ClipSegSegmenter) -> list[int]:
    calls = [0]
    model.model.clip.text_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _text_tower_params(model: ClipSegSegmenter) -> list[torch.nn.Parameter]:
    clip = model.model.clip
    return [*clip.text_model.parameters(), *clip.text_projection.parameters()]


def test_memo_gives_the_text_towers_logits_loss_and_decoder_gradients(batch) -> None:
    memo = _clipseg("decoder")
    # Same weights with the text tower trainable: the memo is off, the tower runs as before.
    reference = copy.deepcopy(memo)
    reference.set_policy("full")
    prompts = PromptBatch(texts=TEXTS)
    emb = memo.encode(batch["image"]).detach()
    size = tuple(batch["image"].shape[-2:])
    runs = _count_text_tower_runs(memo)
    loss_fn = LOSSES["dice"]

    for _ in range(2):  # the first fills the memo, the second reads it
        got = memo.decode(emb, prompts, size)
        want = reference.decode(emb, prompts, size)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        loss, ref_loss = loss_fn(got, batch["mask"]), loss_fn(want, batch["mask"])
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
        memo.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        loss.backward()
        ref_loss.backward()
        for (name, p), q in zip(memo.model.decoder.named_parameters(), reference.model.decoder.parameters(), strict=False):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert runs[0] == 1 and sorted(memo._text_memo) == ["mitochondria", "nucleus"]
    # The cached-embedding training path (decode_cached) reads the memo too.
    rows = emb.movedim(0, 1)
    torch.testing.assert_close(decode_cached(memo, rows, batch["image"], prompts), want.detach(), rtol=1e-6, atol=1e-6)
    assert runs[0] == 1


def test_memo_is_invalidated_when_a_text_weight_changes(batch) -> None:
    model = _clipseg("decoder")
    prompts = PromptBatch(texts=TEXTS)
    emb = model.encode(batch["image"]).detach()
    before = model.decode(emb, prompts, (96, 96)).detach()
    with torch.no_grad():  # e.g. load_state_dict: an in-place copy into a frozen weight
        model.model.clip.text_projection.weight.mul_(-1.5)
    after = model.decode(emb, prompts, (96, 96)).detach()
    assert not torch.allclose(before, after)
    fresh = model._run_text_tower(TEXTS, emb.device).detach()
    torch.testing.assert_close(model.text_embeddings(TEXTS, emb.device), fresh, rtol=1e-6, atol=1e-6)


def test_full_policy_runs_the_text_tower_and_trains_it(batch) -> None:
    model = _clipseg("full")
    runs = _count_text_tower_runs(model)
    prompts = PromptBatch(texts=TEXTS)
    for _ in range(2):
        loss = LOSSES["dice"](model(batch["image"], prompts), batch["mask"])
        model.zero_grad(set_to_none=True)
        loss.backward()
    assert runs[0] == 2 and model._text_memo == {}
    assert all(p.grad is not None for p in _text_tower_params(model))
    assert model.model.clip.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0


def test_switching_decoder_to_full_stops_using_the_memo(batch) -> None:
    model = _clipseg("decoder")
    prompts = PromptBatch(texts=TEXTS)
    model(batch["image"], prompts)
    assert model._text_memo  # filled while frozen
    model.set_policy("full")
    runs = _count_text_tower_runs(model)
    LOSSES["dice"](model(batch["image"], prompts), batch["mask"]).backward()
    assert runs[0] == 1
    assert model.model.clip.text_projection.weight.grad.abs().sum() > 0
