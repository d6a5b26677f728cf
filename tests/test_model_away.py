"""A promoted model away from home: its version carries every weight, its config, the tokenizer,
segtune's code and pinned requirements, so it predicts where the training folders are gone.

The module trains two tiny champions (`commands.train_one`, then `promote --approve`): a SAM
whose frozen encoder comes from a base weights file (`model.checkpoint`) that is deleted
afterwards, with the whole training folder (data, store, checkpoints), and a CLIPSeg prompted
with text. Each test then loads or serves what was registered:

- here, in this environment: the masks equal what the trial's model predicts, and `segtune
  serve` answers point, box and text requests over HTTP;
- `real`: in a new virtual environment made from the model's own requirements.txt, from a
  folder outside the checkout, `mlflow.pyfunc.load_model` predicts the same masks and `mlflow
  models serve --env-manager local` answers them (pip installs the pinned packages: minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient

from segtune.checkpoint import load_model
from tests.conftest import DEMO, REPO
from tracking.server import free_port

CLIPSEG = REPO / "experiments" / "demo_clipseg.yaml"


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(120, 200, (96, 128)).astype(np.uint8)
    image[30:60, 40:90] = 40  # a dark "mitochondrion"
    return image


# The requests each champion must answer, as JSON (what a REST client sends).
REQUESTS = {
    "sam": [{"image": _image().tolist(), "points": [[60, 45]], "labels": [1]},
            {"image": _image(1).tolist(), "box": [38, 28, 92, 62]}],
    "clipseg": [{"image": _image().tolist(), "text": "mitochondria"}],
}


def _train_and_promote(kind: str, file: Path, root: Path, uri: str, extra: list[str]) -> tuple[str, list]:
    """Train one tiny trial, promote and approve it; return (registered name, its masks here)."""
    from segtune.commands import train_one
    from segtune.config import load_config
    from segtune.promotion import promote

    experiment = f"away-{kind}"
    cfg = load_config(file, [
        f"dataset.root={root / 'data'}", f"dataset.cache_dir={root / 'cache'}", "dataset.max_train=8",
        "dataset.max_eval=4", "train.epochs=1", "train.batch_size=4", f"tracking.spool_dir={root / 'spool'}",
        f"tracking.uri={uri}", f"tracking.experiment={experiment}", *extra])
    train_one(cfg, root / f"work-{kind}", log=lambda _: None)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]
    name = f"segtune-away-{kind}"
    p = promote(uri, experiment, run_id=run.info.run_id, name=name, approve=True, reason="test",
                log=lambda _: None)
    assert p.passed and p.approved, p.gates
    # The trial's own model (base weights + its checkpoint), as training left it.
    model, _ = load_model(root / f"work-{kind}" / "checkpoints" / "best")
    masks = [_predict(model, r) for r in REQUESTS[kind]]
    return name, masks


def _predict(model, request: dict) -> np.ndarray:
    """The trial's model on one request, the way serving.py prepares it."""
    from segtune.prompts import PromptBatch

    image = torch.tensor(request["image"], dtype=torch.float32)[None, None]
    prompts = PromptBatch()
    if "text" in request:
        prompts.texts = [request["text"]]
    elif "box" in request:
        prompts.boxes = torch.tensor([request["box"]], dtype=torch.float32)
    else:
        prompts.points = torch.tensor([request["points"]], dtype=torch.float32)
        prompts.labels = torch.tensor([request["labels"]])
    model.eval()
    with torch.no_grad():
        return (model(image, prompts)[0, 0] > 0).numpy().astype(np.uint8)


@pytest.fixture(scope="module")
def champions(tmp_path_factory, mlflow_server):
    """{kind: (registered name, the trial's masks)}; the training folders are gone afterwards."""
    from segtune.models.sam import SAM_VARIANTS, build_sam_modules

    home = tmp_path_factory.mktemp("home")  # the training machine's folders
    base = home / "base" / "sam_tiny_base.pth"
    base.parent.mkdir(parents=True)
    torch.manual_seed(1234)  # other weights than segtune's seeded init: they must travel with the model
    torch.save(build_sam_modules(SAM_VARIANTS["tiny"]).state_dict(), base)
    out = {
        "sam": _train_and_promote("sam", DEMO, home, mlflow_server.uri,
                                  [f"model.checkpoint={base}", "model.train=mask_decoder"]),
        "clipseg": _train_and_promote("clipseg", CLIPSEG, home, mlflow_server.uri, []),
    }
    shutil.rmtree(home)  # base weights, data, prepared store, embedding cache, checkpoints
    return out


def test_the_version_holds_everything_it_needs(champions, mlflow_server, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(mlflow_server.uri)
    for kind, (name, _) in champions.items():
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / kind)))
        model = local / "artifacts" / "model"
        state = json.loads((model / "state.json").read_text())
        assert state["weights"] == "full" and state["config"]["model"]["name"] == kind
        assert (model / "model.safetensors").is_file() and (model / "manifest.json").is_file()
        assert (local / "code" / "segtune" / "serving.py").is_file() and (local / "code" / "tracking").is_dir()
        assert not list((local / "code").rglob("__pycache__"))
        if kind == "clipseg":
            assert (model / "assets" / "tokenizer_config.json").is_file()
            assert (model / "assets" / "config.json").is_file()
        pins = dict(line.split("==") for line in (local / "requirements.txt").read_text().split())
        for dist in ("torch", "torchvision", "numpy", "segment-anything", "transformers", "safetensors",
                     "pydantic", "pyyaml", "scipy", "mlflow"):
            assert pins[dist], dist
        assert pins["torch"] == torch.__version__.split("+")[0]
        signature = mlflow.models.get_model_info(f"models:/{name}@champion").signature
        assert [c.name for c in signature.inputs.inputs] == ["image", "points", "labels", "box", "text"]
        assert signature.inputs.required_input_names() == ["image"]
        assert (local / "serving_input_example.json").is_file()


def test_loaded_here_it_predicts_the_trials_masks_without_the_training_folders(champions, mlflow_server) -> None:
    mlflow.set_tracking_uri(mlflow_server.uri)
    for kind, (name, expected) in champions.items():
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
        for request, mask in zip(REQUESTS[kind], expected, strict=True):
            got = model.predict(request)
            assert np.array_equal(got[0], mask), (kind, request.keys())
    # A model answers the prompts its family answers, and says so otherwise.
    sam = mlflow.pyfunc.load_model(f"models:/{champions['sam'][0]}@champion")
    with pytest.raises(Exception, match="answers box or points prompts, not text"):
        sam.predict({"image": _image().tolist(), "text": "mitochondria"})


def _post(url: str, body: dict) -> np.ndarray:
    session = requests.Session()
    session.trust_env = False
    resp = session.post(f"{url}/invocations", json=body, timeout=120)
    assert resp.status_code == 200, resp.text[:2000]
    return np.asarray(resp.json()["predictions"], dtype=np.uint8)


def _wait_ready(proc: subprocess.Popen, timeout: float = 300) -> str:
    """`segtune serve`'s output up to its `ready:` line."""
    lines, deadline = [], time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("ready:"):
            return "".join(lines)
    raise AssertionError("segtune serve was not ready:\n" + "".join(lines) + (proc.stderr.read() if proc.stderr else ""))


# Serving the CLIPSeg champion too costs another half minute: `make test-real` does (its text
# requests also go through MLflow's signature check in the test above, and over HTTP below).
@pytest.mark.parametrize("kind", ["sam", pytest.param("clipseg", marks=pytest.mark.real)])
def test_segtune_serve_answers_point_box_and_text_requests(kind, champions, mlflow_server, tmp_path: Path) -> None:
    name, expected = champions[kind]
    port = free_port(0)
    proc = subprocess.Popen([sys.executable, "-m", "segtune.cli", "serve", name, "--port", str(port),
                             "--tracking-uri", mlflow_server.uri], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = _wait_ready(proc)
        assert "smoke request answered: mask 32x32" in out and f"127.0.0.1:{port}" in out
        for request, mask in zip(REQUESTS[kind], expected, strict=True):
            got = _post(f"http://127.0.0.1:{port}", {"inputs": request})
            assert got.shape == (1, *mask.shape) and np.array_equal(got[0], mask)
        if kind == "clipseg":  # a batch of two prompts in one request
            two = {"dataframe_records": [dict(REQUESTS[kind][0]), {**REQUESTS[kind][0], "text": "membrane"}]}
            assert _post(f"http://127.0.0.1:{port}", two).shape == (2, *expected[0].shape)
    finally:
        proc.send_signal(signal.SIGTERM)  # by the pid we started; it stops its server
        proc.wait(timeout=60)
    with pytest.raises(requests.ConnectionError):  # the model server went with it
        requests.get(f"http://127.0.0.1:{port}/ping", timeout=5)


def test_serve_names_what_it_expected(mlflow_server, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "segtune.cli", "serve", "segtune-no-such-model",
                          "--tracking-uri", mlflow_server.uri], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and "segtune-no-such-model" in res.stderr and "Traceback" not in res.stderr


AWAY = '''
import importlib.util, json, sys
assert importlib.util.find_spec("segtune") is None, "segtune is installed here"
import mlflow, numpy as np, torch
requests, out = json.load(open("requests.json")), {}
for kind, (name, reqs) in requests.items():
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out[kind] = [model.predict(r)[0].tolist() for r in reqs]
import segtune
out["segtune"] = segtune.__file__
out["versions"] = {"torch": torch.__version__, "numpy": np.__version__, "mlflow": mlflow.__version__}
json.dump(out, open("masks.json", "w"))
'''


@pytest.mark.real
@pytest.mark.timeout(1800)
def test_away_from_home_in_a_new_environment_from_its_own_requirements(champions, mlflow_server,
                                                                        tmp_path: Path) -> None:
    mlflow.set_tracking_uri(mlflow_server.uri)
    deps = {kind: Path(mlflow.pyfunc.get_model_dependencies(f"models:/{name}@champion")).read_text()
            for kind, (name, _) in champions.items()}
    assert deps["sam"] == deps["clipseg"]
    pins = dict(line.split("==") for line in deps["sam"].split())
    away = tmp_path / "away"  # outside the checkout; nothing of it on sys.path there
    away.mkdir()
    (away / "requirements.txt").write_text(deps["sam"])
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", "requirements.txt"], cwd=away,
                         capture_output=True, text=True, timeout=1500)
    assert pip.returncode == 0, pip.stderr[-3000:]
    frozen = subprocess.run([str(venv / "bin" / "pip"), "freeze"], capture_output=True, text=True, check=True).stdout

    def norm(dist: str) -> str:  # as pip compares names: huggingface_hub is huggingface-hub
        return dist.lower().replace("_", "-").replace(".", "-")

    resolved = {norm(k): v.split("+")[0] for k, v in (line.split("==") for line in frozen.split() if "==" in line)}
    for dist, version in pins.items():  # the pinned versions are the ones installed
        assert resolved[norm(dist)] == version, (dist, resolved.get(norm(dist)), version)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(MLFLOW_TRACKING_URI=mlflow_server.uri, PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    (away / "requests.json").write_text(json.dumps({k: (name, REQUESTS[k]) for k, (name, _) in champions.items()}))
    (away / "away.py").write_text(AWAY)
    res = subprocess.run([str(venv / "bin" / "python"), "away.py"], cwd=away, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((away / "masks.json").read_text())
    assert str(REPO) not in got["segtune"] and "/code/segtune/" in got["segtune"]  # the model's own copy
    assert got["versions"]["torch"].split("+")[0] == pins["torch"] and got["versions"]["mlflow"] == pins["mlflow"]
    for kind, (_, expected) in champions.items():
        for mask, want in zip(got[kind], expected, strict=True):
            assert np.array_equal(np.asarray(mask, dtype=np.uint8), want), kind

    # And served from there: mlflow models serve in the new environment.
    for kind, (name, expected) in champions.items():
        port = free_port(0)
        log = open(away / f"serve-{kind}.log", "wb")  # noqa: SIM115 — closed below, after the server
        proc = subprocess.Popen([str(venv / "bin" / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], cwd=away, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None, (away / f"serve-{kind}.log").read_text()[-3000:]
                try:
                    if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
                time.sleep(1)
            for request, mask in zip(REQUESTS[kind], expected, strict=True):
                assert np.array_equal(_post(f"http://127.0.0.1:{port}", {"inputs": request})[0], mask)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the pid we started
            proc.wait(timeout=60)
            log.close()
