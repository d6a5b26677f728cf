"""Experiment files: loading, errors that name the file and field, overrides, search spaces."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from segtune.config import (
    ExperimentConfig,
    SearchDim,
    TrainConfig,
    apply_params,
    flatten,
    load_config,
    load_raw,
    parse_override,
)
from segtune.errors import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"


def _write(tmp_path: Path, raw: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _demo_with(tmp_path: Path, section: str, key: str, value: object, name: str = "exp.yaml") -> Path:
    raw = load_raw(DEMO)
    raw.setdefault(section, {})[key] = value
    return _write(tmp_path, raw, name)


def test_demo_loads() -> None:
    cfg = load_config(DEMO)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == "demo"
    assert (cfg.model.name, cfg.model.variant, cfg.model.train) == ("sam", "tiny", "full")
    assert cfg.model.key == "sam_tiny"
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 4 and cfg.train.loss == "dice"
    assert set(cfg.search.space) == {"train.lr", "train.batch_size", "train.epochs"}
    assert cfg.search.space["train.lr"].kind == "loguniform"
    assert cfg.search.space["train.lr"].args == (3e-4, 1e-2)
    assert cfg.search.space["train.batch_size"].args == [2, 4, 8]


def test_unknown_key_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = _demo_with(tmp_path, "train", "lrr", 0.01, name="typo.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "typo.yaml" in msg and "train.lrr" in msg
    assert "unknown field" in msg


def test_wrong_type_names_the_field(tmp_path: Path) -> None:
    path = _demo_with(tmp_path, "train", "epochs", "many", name="wrong.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "wrong.yaml" in str(exc.value) and "train.epochs" in str(exc.value)


def test_missing_required_section_is_named(tmp_path: Path) -> None:
    raw = load_raw(DEMO)
    del raw["model"]
    with pytest.raises(ConfigError, match=r"model: Field required"):
        load_config(_write(tmp_path, raw))


@pytest.mark.parametrize("text, problem", [
    ("name: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_malformed_files_name_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as exc:
        load_config(path)
    assert "bad.yaml" in str(exc.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nowhere.yaml: no such experiment file"):
        load_config(tmp_path / "nowhere.yaml")


def test_set_override_reads_python_style_floats() -> None:
    cfg = load_config(DEMO, ["train.lr=3e-4"])
    assert cfg.train.lr == 0.0003
    assert load_config(DEMO).train.lr == 1e-3  # the file itself is untouched


@pytest.mark.parametrize("text, key, value", [
    ("train.epochs=7", "train.epochs", 7),
    ("train.optimizer=sgd", "train.optimizer", "sgd"),
    ("model.train=mask_decoder", "model.train", "mask_decoder"),
    ("dataset.max_train=16", "dataset.max_train", 16),
    ("prompt.text=fire", "prompt.text", "fire"),
    # The value is read as YAML, so a plain word stays a string even where Python's float()
    # would accept it ("nan", "inf", "infinity").
    ("prompt.text=nan", "prompt.text", "nan"),
    ("tracking.experiment=inf", "tracking.experiment", "inf"),
])
def test_set_overrides_any_field(text: str, key: str, value: object) -> None:
    cfg = load_config(DEMO, [text])
    section, field = key.split(".")
    assert getattr(getattr(cfg, section), field) == value


def test_set_search_space_dimension() -> None:
    cfg = load_config(DEMO, ["search.space.train.epochs={randint: [1, 2]}"])
    dim = cfg.search.space["train.epochs"]
    assert dim.kind == "randint" and dim.args == (1, 2)
    assert cfg.search.space["train.lr"].kind == "loguniform"  # the others stay


def test_set_unknown_field_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        load_config(DEMO, ["train.lrr=1"])


@pytest.mark.parametrize("text, match", [
    ("train.lr", "expected section.field=value"),
    ("train.lr.x=1", "`lr` is not a section"),
])
def test_malformed_overrides_are_refused(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(DEMO, [text])


def test_parse_override_reads_yaml() -> None:
    assert parse_override("train.batch_size=8") == ("train.batch_size", 8)
    assert parse_override("search.space.train.lr={uniform: [0.1, 0.2]}") == (
        "search.space.train.lr", {"uniform": [0.1, 0.2]})
    assert parse_override("model.checkpoint=") == ("model.checkpoint", None)


def test_search_space_key_naming_no_field_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"search\.space\.train\.nope"):
        load_config(DEMO, ["search.space.train.nope={choice: [1, 2]}"])
    raw = load_raw(DEMO)
    raw["search"]["space"]["train.nope"] = {"uniform": [0.0, 1.0]}
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, raw, "space.yaml"))
    assert "space.yaml" in str(exc.value) and "train.nope" in str(exc.value)


def test_search_space_value_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"search\.space\.train\.optimizer"):
        load_config(DEMO, ["search.space.train.optimizer={choice: [rmsprop, adam]}"])


@pytest.mark.parametrize("dim", [
    {"uniform": [0.0, 1.0], "choice": [1, 2]},
    {},
    {"uniform": [1.0, 1.0]},
    {"loguniform": [1e-2, 1e-3]},
    {"randint": [5, 2]},
    {"loguniform": [0.0, 1.0]},
    {"choice": []},
    {"normal": [0.0, 1.0]},
], ids=["two", "none", "low=high", "loguniform-low>high", "randint-low>high",
        "loguniform-zero", "empty-choice", "unknown-distribution"])
def test_bad_search_dims_are_refused(dim: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        SearchDim.model_validate(dim)
    override = "search.space.train.lr=" + yaml.safe_dump(dim, default_flow_style=True).strip()
    with pytest.raises(ConfigError, match=r"search\.space\.train\.lr"):
        load_config(DEMO, [override])


def test_apply_params_returns_a_new_config_and_leaves_the_original() -> None:
    cfg = load_config(DEMO)
    before = cfg.model_dump()
    new = apply_params(cfg, {"train.lr": 0.005, "train.batch_size": 8, "model.train": "mask_decoder"})
    assert new is not cfg
    assert (new.train.lr, new.train.batch_size, new.model.train) == (0.005, 8, "mask_decoder")
    assert cfg.model_dump() == before
    assert new.search.space.keys() == cfg.search.space.keys()


def test_apply_params_refuses_an_invalid_value() -> None:
    with pytest.raises(ConfigError, match=r"trial parameters.*train\.epochs"):
        apply_params(load_config(DEMO), {"train.epochs": 0})


def test_flatten_gives_dotted_keys_without_the_search_section() -> None:
    cfg = load_config(DEMO)
    flat = flatten(cfg)
    assert flat["train.lr"] == 1e-3
    assert flat["model.variant"] == "tiny"
    assert flat["dataset.root"] == ".segtune/data/synthetic_em"
    assert flat["name"] == "demo"
    assert flat["model.checkpoint"] is None
    assert not any(k.startswith("search") for k in flat)
    assert all(not isinstance(v, dict) for v in flat.values())
    # One key per leaf field of the sections it covers.
    assert {k for k in flat if k.startswith("train.")} == {f"train.{f}" for f in TrainConfig.model_fields}
