"""CLIPSeg (transformers) behind segtune's model interface: images + text in, mask logits out.

`model.checkpoint` is a Hugging Face id (`CIDAS/clipseg-rd64-refined`) or a local directory
written by `save_pretrained`; variant `rd64-refined` defaults to that id. Images are prepared as
`CLIPSegProcessor` prepares them, at its size (352 for the released checkpoints, not the vision
config's 224); tests/models/test_reference_equivalence.py compares the two pipelines. `tiny` is a
small `CLIPSegConfig` with the tokenizer vocabulary shipped in `assets/tiny_clip_tokenizer`.
Policies: `decoder` (CLIP frozen, as the CLIPSeg paper trains it) and `full`.

The vision activations are computed here, not by `CLIPSegForImageSegmentation.forward`: since
transformers 5 that forward runs CLIP under `torch.no_grad()`, which would make `full` train
only the decoder, and computing them apart is what lets `encode()` be cached.

With the text tower frozen (`decoder`), a prompt's text embedding never changes, so it is
memoised per prompt string: on the cached path the text tower was most of a step's cost.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segtune.config import ModelConfig
from segtune.errors import CheckpointError, ConfigError
from segtune.models.base import Segmenter
from segtune.prompts import PromptBatch
from segtune.ray_compat import version_counter

TINY_TOKENIZER = Path(__file__).with_name("assets") / "tiny_clip_tokenizer"
HF_IDS = {"rd64-refined": "CIDAS/clipseg-rd64-refined", "rd64": "CIDAS/clipseg-rd64", "rd16": "CIDAS/clipseg-rd16"}
# The released checkpoints' architectures: CLIP ViT-B/16 (vision config image_size 224) and the
# CLIP text tower at transformers' defaults, decoder reading layers 3, 6 and 9; what differs.
RELEASED = {"rd64-refined": {"reduce_dim": 64, "use_complex_transposed_convolution": True},
            "rd64": {"reduce_dim": 64}, "rd16": {"reduce_dim": 16}}
# The side CLIPSegProcessor resizes every image to for the released checkpoints (their
# preprocessor_config.json), whatever the vision config's image_size (224) says: the model
# interpolates its position embeddings to the 22x22 grid of a 352 image.
PROCESSOR_SIZE = 352
# CLIPSeg's processor (ViTImageProcessor): ImageNet mean/std on [0,1] pixels.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Prompts are usually a few class names per dataset; the cap only bounds per-sample free text.
TEXT_MEMO_LIMIT = 4096


def released_config(variant: str):
    """The architecture of a released CIDAS checkpoint (`rd64-refined`, `rd64`, `rd16`), random weights."""
    from transformers import CLIPSegConfig

    return CLIPSegConfig(vision_config={"patch_size": 16, "image_size": 224}, projection_dim=512,
                         extract_layers=[3, 6, 9], decoder_num_attention_heads=4,
                         decoder_intermediate_size=2048, conditional_layer=0, **RELEASED[variant])


def processor_size(source: str | Path, vision_image_size: int) -> int:
    """The square side CLIPSegProcessor resizes images to for `source`: what a local directory's
    preprocessor_config.json says; else 352 for the released architecture (vision config at
    224, as every CIDAS checkpoint), and the vision config's own size for any other."""
    config = Path(source) / "preprocessor_config.json"
    if not config.is_file():
        return PROCESSOR_SIZE if vision_image_size == 224 else vision_image_size
    try:
        size = json.loads(config.read_text()).get("size", PROCESSOR_SIZE)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"model.checkpoint: {config} is not readable JSON ({err}); expected "
                              "the preprocessor_config.json save_pretrained writes.") from None
    return int(size["height"] if isinstance(size, dict) else size)


def tiny_config():
    """A CLIPSeg small enough to train on a CPU in seconds; its vocabulary is the shipped tokenizer's."""
    from transformers import CLIPSegConfig

    text = dict(vocab_size=522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=520, eos_token_id=521, pad_token_id=521)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=128, patch_size=16)
    return CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=32, extract_layers=[1, 2],
                         reduce_dim=16, decoder_num_attention_heads=2, decoder_intermediate_size=64,
                         conditional_layer=0, use_complex_transposed_convolution=False)


def _features(out) -> torch.Tensor:
    # transformers 4 returns a tensor from get_text_features, 5 an output object.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipSegSegmenter(Segmenter):
    policies = ("decoder", "full")
    cacheable_encoder = True
    embedding_batch_axis = 1  # encode stacks the extracted layers first: (L, B, tokens, C)

    def __init__(self, model: nn.Module, tokenizer, image_size: int):
        super().__init__()
        self.model, self.tokenizer, self.image_size = model, tokenizer, image_size
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.max_len = min(getattr(tokenizer, "model_max_length", 77), model.config.text_config.max_position_embeddings)
        # prompt string -> text embedding `(D,)`, valid while `_text_memo_key` matches (see `_memo_key`).
        self._text_memo: dict[str, torch.Tensor] = {}
        self._text_memo_key: tuple | None = None

    def save_assets(self, folder: Path) -> None:
        """What rebuilds this model without `model.checkpoint`: the HF config, the tokenizer's
        files (save_pretrained) and the processor size (preprocessor_config.json)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        size = {"height": self.image_size, "width": self.image_size}
        (folder / "preprocessor_config.json").write_text(json.dumps({"size": size}, indent=1))

    def encoder_state(self) -> dict[str, torch.Tensor]:
        state = {f"vision_model.{k}": v for k, v in self.model.clip.vision_model.state_dict().items()}
        state.update(mean=self.mean, std=self.std, extract_layers=torch.tensor(list(self.model.extract_layers)))
        return state

    def encoder_trains(self) -> bool:
        return any(p.requires_grad for p in self.model.clip.vision_model.parameters())

    def trainable_parameters(self, policy: str) -> list[nn.Parameter]:
        if policy == "decoder":
            return list(self.model.decoder.parameters())
        if policy == "full":
            return list(self.model.parameters())
        raise ConfigError(f"model.train: CLIPSeg has no policy {policy!r}; expected one of {', '.join(self.policies)}")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # As CLIPSegProcessor prepares pixels: an antialiased bilinear resize of the 8-bit image,
        # rounded back to 8 bit (PIL works in uint8), then [0,1] and ImageNet mean/std. Shrinking
        # without antialiasing aliases, and the released models saw the processor's pixels.
        x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False,
                          antialias=True).round().clamp(0, 255)
        return (x / 255.0 - self.mean) / self.std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIP vision activations the decoder reads, stacked: `(L,B,tokens,C)`."""
        out = self.model.clip.vision_model(pixel_values=self.preprocess(images), output_hidden_states=True)
        return torch.stack([out.hidden_states[i + 1] for i in self.model.extract_layers])

    def text_embeddings(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """CLIP text features `(B,D)` for `texts`; memoised per string while the text tower is frozen."""
        key = self._memo_key(device)
        if key is None:
            return self._run_text_tower(texts, device)
        if key != self._text_memo_key or len(self._text_memo) > TEXT_MEMO_LIMIT:
            self._text_memo.clear()
            self._text_memo_key = key
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_memo]
        if missing:
            # Nothing upstream trains, so no graph is needed; clone so each row owns its storage.
            with torch.no_grad():
                rows = self._run_text_tower(missing, device)
            self._text_memo.update((t, row.clone()) for t, row in zip(missing, rows, strict=True))
        return torch.stack([self._text_memo[t] for t in texts])

    def _run_text_tower(self, texts: list[str], device: torch.device) -> torch.Tensor:
        enc = self.tokenizer(texts, padding="max_length", max_length=self.max_len, truncation=True, return_tensors="pt")
        out = self.model.clip.get_text_features(input_ids=enc["input_ids"].to(device),
                                                attention_mask=enc["attention_mask"].to(device))
        return _features(out)

    def _memo_key(self, device: torch.device) -> tuple | None:
        """What a memoised text embedding depends on, or None when it must not be memoised.

        None when a text-tower weight trains (`full`: gradients must reach it) or when dropout
        is live (each pass differs). Otherwise the key holds each weight's storage and version
        counter, so `.to()`, `load_state_dict` or any in-place edit invalidates the memo, plus
        the device and autocast state, which change the embedding's dtype and rounding.
        """
        clip = self.model.clip
        params = [*clip.text_model.parameters(), *clip.text_projection.parameters()]
        if any(p.requires_grad for p in params):
            return None
        if clip.text_model.training and self.model.config.text_config.attention_dropout > 0:
            return None
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        return (device, autocast, tuple((p.data_ptr(), version_counter(p)) for p in params))

    def decode(self, embeddings: torch.Tensor, prompts: PromptBatch, size: tuple[int, int]) -> torch.Tensor:
        if not prompts.texts:
            raise ConfigError("prompt: CLIPSeg needs text prompts; set prompt.train/eval to `text` "
                              "and prompt.text (or use a dataset whose samples carry text)")
        b = embeddings.shape[1]
        cond = self.text_embeddings(list(prompts.texts), embeddings.device)
        logits = self.model.decoder(list(embeddings), cond).logits
        # The decoder squeezes its channel (and, in transformers 4, a batch of one): restore (B,1,h,w).
        logits = logits.reshape(b, 1, *logits.shape[-2:])
        return F.interpolate(logits, size, mode="bilinear", align_corners=False)


def _tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


def clipseg_architecture(cfg: ModelConfig, assets: Path | None) -> ClipSegSegmenter:
    """CLIPSeg with random weights from what `save_assets` wrote (config, tokenizer, processor
    size); `tiny` needs no assets. Nothing is downloaded: a full state dict loads over it."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    if assets is None or not (Path(assets) / "config.json").is_file():
        if cfg.variant == "tiny":
            return build_clipseg(cfg.model_copy(update={"checkpoint": None}))
        raise CheckpointError(f"CLIPSeg {cfg.variant}: no config.json in {assets}; expected the assets "
                              "folder a registered segtune model carries (config, tokenizer files).")
    model = CLIPSegForImageSegmentation(CLIPSegConfig.from_pretrained(str(assets)))
    return ClipSegSegmenter(model, _tokenizer(assets), processor_size(assets, model.config.vision_config.image_size))


def build_clipseg(cfg: ModelConfig) -> ClipSegSegmenter:
    """CLIPSeg from a Hugging Face id or local directory, or the `tiny` preset (random init)."""
    from transformers import CLIPSegForImageSegmentation

    if cfg.variant == "tiny" and cfg.checkpoint is None:
        model = CLIPSegForImageSegmentation(tiny_config())
        return ClipSegSegmenter(model, _tokenizer(TINY_TOKENIZER), model.config.vision_config.image_size)
    if cfg.variant != "tiny" and cfg.variant not in HF_IDS:
        raise ConfigError(f"model.variant: CLIPSeg has variants {', '.join(HF_IDS)} and tiny, not {cfg.variant!r}")
    source = cfg.checkpoint or HF_IDS[cfg.variant]
    try:
        model = CLIPSegForImageSegmentation.from_pretrained(source)
        tokenizer = _tokenizer(source)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"model.checkpoint: cannot load CLIPSeg from {source!r} ({str(err).splitlines()[0][:300]}). "
                              "Expected a Hugging Face id such as CIDAS/clipseg-rd64-refined (with network access "
                              "or a filled HF cache) or a directory written by save_pretrained.") from None
    return ClipSegSegmenter(model, tokenizer, processor_size(source, model.config.vision_config.image_size))
