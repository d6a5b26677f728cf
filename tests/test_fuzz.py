"""Fuzzing the two places that read what users hand us: experiment files and masks.

Whatever comes in, the outcome is the config/mask or a SegtuneError with a message — never a
stray KeyError, TypeError or crash, which the CLI would show as a traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segtune.config import load_config, validate
from segtune.data.readers import binary_mask
from segtune.errors import ConfigError, DataError
from tests.conftest import DEMO

BASE = yaml.safe_load(DEMO.read_text())
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3))
values = st.recursive(scalars, lambda inner: st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
FIELDS = [f"{section}.{field}" for section, body in BASE.items() if isinstance(body, dict) for field in body]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS + ["train.bogus", "nosuch.section", "search.space.train.lr"]), value=values)
def test_any_value_in_any_field_validates_or_names_the_field(field: str, value: object) -> None:
    raw = yaml.safe_load(DEMO.read_text())
    section, key = field.split(".", 1)
    if section in raw and isinstance(raw[section], dict):
        if key.startswith("space."):
            raw[section]["space"][key.removeprefix("space.")] = value
        else:
            raw[section][key] = value
    else:
        raw[section] = {key: value}
    try:
        validate(raw, "fuzz.yaml")
    except ConfigError as err:
        assert "fuzz.yaml" in str(err) and section in str(err)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_as_an_experiment_file_loads_or_fails_cleanly(tmp_path_factory, text: str) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "x.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as err:
        assert "x.yaml" in str(err)


@settings(max_examples=300, deadline=None)
@given(mask=arrays(dtype=st.sampled_from([np.uint8, np.int16, np.int32, np.uint16, np.float32, np.bool_]),
                   shape=st.tuples(st.integers(0, 3), st.integers(1, 6), st.integers(1, 6))))
def test_any_label_array_is_a_binary_mask_or_a_data_error(mask: np.ndarray) -> None:
    try:
        out = binary_mask(mask, Path("labels.png"))
    except DataError as err:
        assert "labels.png" in str(err)
        return
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1} and out.shape == mask.shape
