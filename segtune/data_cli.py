"""`segtune data ...`: synthetic twins, raw-file checks, prepared stores and their contents.

Mounted by the main CLI as ``app.add_typer(data_app, name="data")``. Every command turns a
:class:`~segtune.errors.SegtuneError` into its message on stderr and exit status 1 (no
traceback), on its own as well as under the main app. Heavy modules (numpy, torch via the
store) are imported inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, List, Optional

import typer

data_app = typer.Typer(help="Datasets: generate synthetic twins, check raw files, prepare and "
                            "inspect patch stores.", no_args_is_help=True,
                       pretty_exceptions_enable=False, add_completion=False)

NameArg = typer.Argument(..., help="Dataset name: cityscapes, corsican_fire, lucchi_em, "
                                   "qata_cov19, folder, or a synthetic_* twin.")
RootArg = typer.Argument(..., help="The dataset's folder (what dataset.root points at).")
PatchOpt = typer.Option(256, "--patch-size", min=1, help="Side of the square patches.")
# "\\[" keeps rich's help formatting from reading [car,road] as a markup tag.
SetOpt = typer.Option(None, "--set", help="A dataset field or option, e.g. --set fit=resize, "
                                          "--set classes=\\[car,road], --set drop_empty=false "
                                          "(repeatable; values are read as YAML).")


def _say(line: str) -> None:
    typer.echo(line)


@contextmanager
def _user_errors() -> Iterator[None]:
    """SegtuneError -> its message on stderr and exit 1, as the main CLI does."""
    from segtune.errors import SegtuneError

    try:
        yield
    except SegtuneError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _dataset_config(name: str, root: Path, patch_size: int, sets: Optional[List[str]],
                    cache_dir: Optional[Path] = None) -> Any:
    """A validated DatasetConfig from the arguments and ``--set key=value`` pairs."""
    from pydantic import ValidationError

    from segtune.config import DatasetConfig, parse_override
    from segtune.errors import ConfigError

    raw: dict[str, Any] = {"name": name, "root": str(root), "patch_size": patch_size}
    if cache_dir is not None:
        raw["cache_dir"] = str(cache_dir)
    for text in sets or []:
        key, value = parse_override(text)
        if key in ("name", "root") or "." in key:
            raise ConfigError(f"--set {text}: expected a dataset field such as fit=resize or "
                              f"classes=[car,road]; the name and root are the arguments.")
        raw[key] = value
    try:
        return DatasetConfig.model_validate(raw)
    except ValidationError as err:
        details = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: "
            f"{'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in err.errors())
        raise ConfigError(f"--set: invalid dataset settings — {details}.") from None


@data_app.command()
def synth(name: str = NameArg,
          out: Path = typer.Argument(..., help="Folder to write the files into."),
          seed: int = typer.Option(0, "--seed", help="Seed of the generator.")) -> None:
    """Write a small synthetic dataset in the real file layout of NAME into OUT."""
    with _user_errors():
        from segtune.data import synthesize

        real = synthesize(name, out, seed)
        _say(f"wrote a synthetic {real} dataset to {out}; read it like the real one with: "
             f"segtune data prepare {real} {out}")


@data_app.command()
def check(name: str = NameArg, root: Path = RootArg, patch_size: int = PatchOpt,
          set_: Optional[List[str]] = SetOpt,
          as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON.")
          ) -> None:
    """Validate every raw file of a dataset; report all problems at once."""
    with _user_errors():
        from segtune.data import check_dataset, dataset_options

        d = _dataset_config(name, root, patch_size, set_)
        result = check_dataset(d.name, Path(d.root), patch_size=d.patch_size,
                               drop_empty=d.drop_empty, fit=d.fit,
                               options=dataset_options(d), progress=None if as_json else _say)
        if as_json:
            _say(json.dumps(result, indent=1))
            return
        samples = ", ".join(f"{split} {n}" for split, n in result["samples"].items())
        items = ", ".join(f"{split} {n}" for split, n in result["items"].items())
        classes = ", ".join(f"{c} {n}" for c, n in result["classes"].items())
        objects = ", ".join(f"{split} {n}" for split, n in result.get("instances", {}).items())
        _say(f"ok: {name} at {root}: images {items}; samples of {d.patch_size}x{d.patch_size} "
             f"({result['fit']}) {samples}; classes: {classes}"
             + (f"; instances: {objects}" if objects else ""))


@data_app.command()
def prepare(name: str = NameArg, root: Path = RootArg,
            out: Path = typer.Option(Path(".segtune/cache"), "--out",
                                     help="Cache folder the store is written under."),
            patch_size: int = PatchOpt,
            seed: int = typer.Option(0, "--seed", help="Seed of the validation hold-out "
                                                       "(an experiment's train.seed)."),
            set_: Optional[List[str]] = SetOpt) -> None:
    """Check the raw files, then write (or reuse) the prepared patch store."""
    with _user_errors():
        from segtune.data import dataset_options, prepare_store

        d = _dataset_config(name, root, patch_size, set_, out)
        store = prepare_store(d.name, Path(d.root), Path(d.cache_dir),
                              patch_size=d.patch_size, drop_empty=d.drop_empty,
                              val_fraction=d.val_fraction, seed=seed, fit=d.fit,
                              options=dataset_options(d), progress=_say)
        _say(f"store: {store}")


@data_app.command()
def info(store: Path = typer.Argument(..., help="A store folder printed by prepare."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON (with a `splits` "
                                                            "object of counts).")) -> None:
    """Show a prepared store: samples per split, dropped empties, classes, hash."""
    with _user_errors():
        from segtune.data import open_store

        opened = open_store(store)
        _say(json.dumps(opened.info(), indent=1) if as_json else opened.summary())
