"""Which runs `segtune report` may put in a thesis column: those whose settings are the row's.

A run is compared through the params it logged (every run logs its flattened config, values as
`str()` writes them) against the experiment file it belongs to:

- the reference settings: model (`model.name`, `model.variant`), freeze policy (`model.train`),
  prompts (`prompt.train`, `prompt.eval`, `prompt.text`) and protocol (`eval.protocol`), as the
  file sets them (`FileSpec.settings`; without them, only the model key the file names);
- the training length: a fine-tuned column's `reference.epochs` must be the run's `train.epochs`
  (a sweep's best trial and a zero-shot run are not held to it: the sweep searched the length,
  zero-shot has none);
- the data: a run that capped samples (`dataset.max_train`, `dataset.max_eval`) or scored only
  part of a split (`eval.sample`) is *reduced*, whatever its file says, because the thesis
  numbers are on whole splits.

A run that differs in any of these is not placed; the report shows it apart with the reasons.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The settings of a reference row a run must share, as flattened config keys.
REFERENCE_KEYS = ("model.name", "model.variant", "model.train", "prompt.train", "prompt.eval", "prompt.text",
                  "eval.protocol")
# Settings a zero-shot run has no use for: a different value there changes nothing it scored.
TRAINING_ONLY = ("model.train", "prompt.train")
# Caps that make a run score less data than the thesis did.
REDUCTIONS = ("dataset.max_train", "dataset.max_eval", "eval.sample")
UNSET = ("None", "")


def reference_settings(flat: Mapping[str, Any]) -> dict[str, str]:
    """The settings a thesis column compares, picked from an experiment file's flattened config
    (`segtune.config.flatten`) and written as MLflow logs params."""
    return {k: str(flat.get(k)) for k in REFERENCE_KEYS}


@dataclass
class Verdict:
    """Why a run does not belong in a column; a run with no reasons is placed."""

    reduced: list[str] = field(default_factory=list)  # e.g. "dataset.max_train=4"
    differs: list[str] = field(default_factory=list)  # e.g. "train.epochs=1 (reference 20)"

    @property
    def placed(self) -> bool:
        return not self.reduced and not self.differs

    def why(self) -> str:
        """One line: what was reduced, then what differs from the reference."""
        parts = []
        if self.reduced:
            parts.append("reduced: " + ", ".join(self.reduced))
        if self.differs:
            parts.append("settings differ: " + ", ".join(self.differs))
        return "; ".join(parts)


def judge(params: Mapping[str, str], *, settings: Mapping[str, str], model: str, epochs: int | None,
          zero_shot: bool = False) -> Verdict:
    """Compare a run's params with a column's reference.

    `settings`: the file's reference settings (`reference_settings`), or empty to compare only
    `model` (the file's `name_variant` key); `epochs`: the column's length, None for a column
    not held to one (zero-shot, best sweep trial); `zero_shot`: skip training-only settings.
    """
    verdict = Verdict()
    for key in REDUCTIONS:
        value = params.get(key, "None")
        if value not in UNSET:
            verdict.reduced.append(f"{key}={value}")
    if epochs is not None and params.get("train.epochs") != str(epochs):
        verdict.differs.append(f"train.epochs={params.get('train.epochs')} (reference {epochs})")
    if settings:
        for key, want in settings.items():
            if zero_shot and key in TRAINING_ONLY:
                continue
            have = params.get(key, "None")
            if have != want:
                verdict.differs.append(f"{key}={have} (reference {want})")
    else:
        have = f"{params.get('model.name')}_{params.get('model.variant')}"
        if have != model:
            verdict.differs.append(f"model {have} (reference {model})")
    return verdict
