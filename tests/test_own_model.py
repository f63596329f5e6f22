"""A researcher's own model, Linen and NNX, from a file of their own, through every binary
(convjax/models/own.py): the models are docs/your-own-model.md's worked example, and the
binaries run in subprocesses with their folder on PYTHONPATH, as a user runs them."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import (
  MNIST_ARRAYS,
  REPO,
  binary_argv,
  binary_env,
  history,
  mnist_arrays_args,
  run_binary,
  served_probabilities,
)

GUIDE = REPO / "docs" / "your-own-model.md"


def guide_file(name: str) -> str:
  """The Python block of the guide that starts `# name`: the tests run its worked example as written."""
  blocks = re.findall(r"^```python\n(.*?)^```\n", GUIDE.read_text(), re.M | re.S)
  (block,) = [b for b in blocks if b.startswith(f"# {name}\n")]
  return block


ARGS = [
  "--config=configs/mnist.py",
  *mnist_arrays_args("train6144", "test1000"),
  "--config.data.validation_size=1024",
  "--config.eval_batch_size=256",
  "--config.checkpoint_every_steps=20",
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, mnist_arrays):
  folder = tmp_path_factory.mktemp("own")
  for name in ("mynet.py", "nnxnet.py"):
    (folder / name).write_text(guide_file(name))
  return folder


def _env(folder):
  return {"PYTHONPATH": f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _train(folder, model, workdir, *extra, epochs=1):
  result = run_binary(
    "experiments.train",
    *ARGS,
    f"--config.model={model}",
    f"--config.num_epochs={epochs}",
    f"--workdir={workdir}",
    *extra,
    env=_env(folder),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _kill_mid_epoch_two(folder, model, workdir):
  """kill -9 once a checkpoint inside epoch 2 is committed."""
  from convjax import checkpoints

  proc = subprocess.Popen(
    binary_argv("experiments.train", *ARGS, f"--config.model={model}", "--config.num_epochs=2", f"--workdir={workdir}"),
    cwd=REPO,
    env=binary_env(_env(folder)),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    kept = checkpoints.kept(workdir)
    if any(p.get("epochs") == 1 and not p.get("epoch_end") for p in kept.values()):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  kept = checkpoints.kept(workdir)
  assert kept and max(p.get("epochs", 0) for p in kept.values()) < 2, f"not killed mid-epoch 2: {kept}"


def _digits(tmp_path, n=20):
  data = np.load(MNIST_ARRAYS / "test1000.npz")
  folder = tmp_path / "digits"
  folder.mkdir()
  for i in range(n):
    Image.fromarray(data["image"][i, ..., 0]).save(folder / f"{i:02d}.png")
  return folder, data["image"][:n]


def _check_readers(folder, workdir, tmp_path, loop_epoch):
  """predict's labels on 20 real digits equal the loop's; evaluate's accuracy equals history's;
  visualize writes Grad-CAM of its last conv; the export runs with jax alone."""
  from tests.conftest import loop_probabilities

  env = _env(folder)
  digits, images = _digits(tmp_path)
  out, export = tmp_path / "predictions.json", tmp_path / "export"
  result = run_binary(
    "experiments.predict",
    f"--workdir={workdir}",
    f"--images={digits}",
    f"--output={out}",
    f"--export={export}",
    env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  table = {p["file"]: p["top"][0]["index"] for p in json.loads(out.read_text())["predictions"]}
  predicted = [table[str(digits / f"{i:02d}.png")] for i in range(len(images))]
  assert predicted == list(np.argmax(loop_probabilities(workdir, loop_epoch, images), -1))

  result = run_binary("experiments.evaluate", f"--workdir={workdir}", env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / "eval" / "test" / "metrics.json").read_text())
  assert report["accuracy"] == pytest.approx(json.loads((workdir / "history.json").read_text())[-1]["test_accuracy"])

  result = run_binary(
    "experiments.visualize",
    f"--workdir={workdir}",
    f"--image={digits / '00.png'}",
    "--config.viz.methods=gradcam,activations",
    env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / "viz" / "gradcam.png").stat().st_size > 1000
  assert "conv2" in result.stderr or "Conv_1" in result.stderr  # Grad-CAM's layer: the last conv

  served = served_probabilities(str(export), images, str(tmp_path))
  assert list(np.argmax(served, -1)) == predicted


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mynet:TinyNet", "nnxnet:NnxNet"])
def test_own_model_trains_resumes_and_every_reader_reads_it(tmp_path, models, model, monkeypatch):
  """A Linen model (BatchNorm, dropout, no features/head) and the same in NNX, from the user's
  own module on PYTHONPATH: 2 epochs on 5,120 MNIST digits, kill -9 mid-epoch 2 and the rerun
  equals the uninterrupted run; predict, evaluate, visualize and the export read it."""
  straight = tmp_path / "straight"
  _train(models, model, straight, epochs=2)
  records = json.loads((straight / "history.json").read_text())
  assert records[-1]["test_accuracy"] > 0.9, records[-1]
  source = json.loads((straight / "model_source" / "source.json").read_text())
  assert source["how"] == "import" and source["module_file"] == str(models / f"{model.split(':')[0]}.py")
  assert source["flax"] == ("nnx" if "nnx" in model else "linen")

  killed = tmp_path / "killed"
  _kill_mid_epoch_two(models, model, killed)
  result = _train(models, model, killed, epochs=2)
  assert "resumed from the checkpoint of step" in result.stderr
  assert history(killed) == history(straight)

  monkeypatch.syspath_prepend(str(models))  # the loop's own evaluation, in this process
  _check_readers(models, straight, tmp_path, loop_epoch=records[-1]["test_epoch"])


@pytest.mark.slow
def test_own_models_are_benchmarked(tmp_path, models):
  result = run_binary(
    "experiments.benchmark",
    f"--workdir={tmp_path}",
    "--config.models=mynet:TinyNet@28x28x1,nnxnet:NnxNet@28x28x1",
    "--config.batch_sizes=(8,)",
    "--config.precisions=('float32',)",
    "--config.warmup=1",
    "--config.peers=",
    "--config.pipeline=",
    env=_env(models),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
  assert {(r["model"], r["mode"]) for r in rows} == {
    (m, mode) for m in ("mynet:TinyNet", "nnxnet:NnxNet") for mode in ("train", "inference")
  }
  assert all(r["images_per_second"] > 0 for r in rows)


TINY = [
  "--config=configs/mnist.py",
  *mnist_arrays_args("train2048", "test500"),
  "--config.data.validation_size=512",
  "--config.eval_batch_size=256",
  "--config.num_epochs=1",
  "--config.steps_per_epoch=5",
]


def test_a_model_file_is_recorded_and_read_after_the_run_moves(tmp_path, models):
  """path/to/file.py:Class (relative to the working directory): the run records its absolute
  path, digest and a copy; moved, with the file gone, predict reads the copy; with the file
  changed, a warning names it."""
  own = tmp_path / "code" / "filenet.py"
  own.parent.mkdir()
  shutil.copyfile(models / "mynet.py", own)
  workdir = tmp_path / "run"
  relative = os.path.relpath(own, REPO)
  result = run_binary("experiments.train", *TINY, f"--config.model={relative}:TinyNet", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((workdir / "config.json").read_text())["model"] == f"{own}:TinyNet"
  source = json.loads((workdir / "model_source" / "source.json").read_text())
  assert source["how"] == "file" and source["file"] == str(own) and source["flax"] == "linen"
  assert (workdir / "model_source" / "filenet.py").read_text() == own.read_text()

  moved = tmp_path / "moved"
  workdir.rename(moved)
  own.rename(own.with_suffix(".away"))
  digits, _ = _digits(tmp_path, 3)
  result = run_binary("experiments.predict", f"--workdir={moved}", f"--images={digits}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "3 images classified" in result.stdout
  own.with_suffix(".away").rename(own)
  with open(own, "a") as f:
    f.write("# changed after the run\n")
  result = run_binary("experiments.evaluate", f"--workdir={moved}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"the model file {own} changed since the run; reading the run's copy" in result.stderr


def test_register_and_an_entry_point_name_a_model(tmp_path, models):
  """@convjax.models.register in the user's module (imported by their config file), and a
  package's entry point (a dist-info folder on the path, as pip installs one)."""
  (tmp_path / "regnet.py").write_text(
    "import convjax.models\nfrom mynet import TinyNet\n\n\n@convjax.models.register('tinynet')\n"
    "class RegNet(TinyNet):\n  pass\n"
  )
  (tmp_path / "myconfig.py").write_text(
    "import regnet  # registers tinynet\nfrom configs.mnist import get_config as mnist\n\n\n"
    "def get_config():\n  config = mnist()\n  config.model, config.model_kwargs = 'tinynet', {}\n  return config\n"
  )
  info = tmp_path / "epnet-0.1.dist-info"
  info.mkdir()
  (info / "METADATA").write_text("Metadata-Version: 2.1\nName: epnet\nVersion: 0.1\n")
  (info / "entry_points.txt").write_text("[convjax.models]\nepnet = mynet:TinyNet\n")
  env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{models}{os.pathsep}{REPO}"}
  for name, args in (("tinynet", [f"--config={tmp_path / 'myconfig.py'}", *TINY[1:]]), ("epnet", TINY)):
    workdir = tmp_path / name
    result = run_binary("experiments.train", *args, f"--config.model={name}", f"--workdir={workdir}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    source = json.loads((workdir / "model_source" / "source.json").read_text())
    assert source["how"] == ("registered" if name == "tinynet" else "entry_point"), source
  # A new process finds the registered model by importing the module the run recorded.
  result = run_binary("experiments.evaluate", f"--workdir={tmp_path / 'tinynet'}", env=env)
  assert result.returncode == 0, result.stderr[-3000:]


def test_a_model_that_cannot_be_found_is_one_error_line(tmp_path, models):
  from convjax.errors import UserError
  from convjax.models import factory_of, get_model

  sys.path.insert(0, str(models))
  try:
    for name, message in (
      ("nosuch:Net", "config.model='nosuch:Net': no module named 'nosuch' on the path (PYTHONPATH="),
      ("mynet:Nope", "config.model='mynet:Nope': module 'mynet' has no 'Nope'"),
      ("lenet9", "unknown model 'lenet9'; valid models: "),
    ):
      with pytest.raises(UserError, match=re.escape(message)):
        factory_of(name)
    with pytest.raises(UserError, match=re.escape("model 'mynet:TinyNet' has no field 'depth'")):
      get_model("mynet:TinyNet", depth=3)
  finally:
    sys.path.remove(str(models))
  # Through the binary: one line, nothing written.
  result = run_binary("experiments.train", *TINY, "--config.model=nosuch:Net", f"--workdir={tmp_path / 'a'}")
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
    "error: config.model='nosuch:Net': no module named 'nosuch'"
  )
  assert "Traceback" not in result.stderr and not (tmp_path / "a").exists()
  result = run_binary(
    "experiments.train",
    *TINY,
    "--config.model=mynet:TinyNet",
    "--config.feature_extractor.model=mynet:TinyNet",
    f"--workdir={tmp_path / 'b'}",
    env=_env(models),
  )
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
    "error: config.feature_extractor.model='mynet:TinyNet' has no `features`: feature extraction runs a model's "
    "features(x) (see the model contract in convjax/models/__init__.py)"
  )
  assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ["mynet:TinyNet", "nnxnet:NnxNet"])
def test_fused_cams_of_an_own_model_take_every_layer_from_one_pass(models, name, monkeypatch):
  """cam.fused reads every layer's output and gradient off one forward and one backward
  pass (layers.shifted_logits: Linen's interceptor, NNX's hook): the same maps as each
  layer's own CAM."""
  import jax

  from convjax.models import get_model, init_variables
  from convjax.viz import cam, explain

  monkeypatch.syspath_prepend(str(models))
  model = get_model(name)
  variables = init_variables(model, jax.random.key(0), (28, 28, 1))
  x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
  convs = explain.conv_layers(model, (28, 28, 1))
  assert len(convs) == 2, convs
  for method in ("layercam", "gradcam++"):
    fused, classes = cam.fused(model, variables, x, convs, method)
    each = [cam.cam(model, variables, x, c, method, classes)[0] for c in convs]
    resized = [jax.image.resize(cam._min_max(m), (2, 28, 28), "bilinear") for m in each]
    np.testing.assert_allclose(fused, cam._min_max(np.mean(np.stack(resized), 0)), atol=1e-5, err_msg=method)
