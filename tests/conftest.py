import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# The offline MNIST copy and VGG16 weights, unless the caller points elsewhere.
if "TFDS_DATA_DIR" not in os.environ and (SHARED / "datasets" / "tfds").is_dir():
  os.environ["TFDS_DATA_DIR"] = str(SHARED / "datasets" / "tfds")
if "CONVJAX_WEIGHTS_DIR" not in os.environ and (SHARED / "weights").is_dir():
  os.environ["CONVJAX_WEIGHTS_DIR"] = str(SHARED / "weights")


# Under CI=true every test must run: a skip (an importorskip of a missing package, a missing
# dataset or mount permission) is a failure there, so a check is never turned off unseen.
IN_CI = os.environ.get("CI") == "true"


def _fail_if_skipped_in_ci(report):
  if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  _fail_if_skipped_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  outcome = yield
  _fail_if_skipped_in_ci(outcome.get_result())


# Whether this session runs every test of the suite (no -k, -m or paths that leave some out).
WHOLE_SUITE = pytest.StashKey[bool]()
_DESELECTED = pytest.StashKey[bool]()


def pytest_collection_modifyitems(config, items):
  """Tests marked after_suite run last: they check what the others did."""
  items.sort(key=lambda item: item.get_closest_marker("after_suite") is not None)


def pytest_deselected(items):
  if items:
    items[0].config.stash[_DESELECTED] = True


def pytest_collection_finish(session):
  every_file = {p.name for p in pathlib.Path(__file__).parent.glob("test_*.py")}
  collected = {item.path.name for item in session.items}
  session.config.stash[WHOLE_SUITE] = (
    collected == every_file and not session.config.stash.get(_DESELECTED, False) and not session.config.option.keyword
  )


# Every binary the tests start, as (module, args): tests/test_docs.py checks the guides'
# commands against these at the end of the whole suite.
INVOCATIONS = []


def binary_argv(module: str, *args) -> list:
  """The command line `python -m module args`, recorded in INVOCATIONS."""
  INVOCATIONS.append((module, tuple(str(a) for a in args)))
  return [sys.executable, "-m", module, *args]


def run_binary(module: str, *args, env=None, timeout=900):
  """Runs `python -m module args` from the repo root; returns CompletedProcess (text)."""
  full_env = {**os.environ, **(env or {})}
  return subprocess.run(
    binary_argv(module, *args), cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
  )


@pytest.fixture
def mnist_small():
  """A config on a 4,096-example slice of the real MNIST: seconds per epoch on 2 cores."""
  from configs.mnist import get_config

  config = get_config()
  config.data.train_split = "train[:4096]"
  config.data.validation_size = 1024
  config.data.test_split = "test[:1000]"
  config.batch_size = 64
  config.eval_batch_size = 200
  config.num_epochs = 2
  return config


# Slices of the real MNIST as .npz (convjax/data/arrays.py), {split file: TFDS split}, for the
# binaries whose subject is not TFDS: reading them, a binary starts ~6 s sooner than on TFDS'
# TFRecord, which imports TensorFlow. Written once per machine (the `mnist_arrays` fixture).
MNIST_ARRAYS = pathlib.Path(tempfile.gettempdir()) / "convjax-tests" / "mnist-arrays-1"
MNIST_SLICES = {
  "train2048": "train[:2048]",
  "train4096": "train[:4096]",
  "train6144": "train[:6144]",
  "test500": "test[:500]",
  "test1000": "test[:1000]",
}


def mnist_arrays_args(train: str, test: str) -> list:
  """The flags that read MNIST_ARRAYS' `train` and `test` files instead of TFDS."""
  return [
    "--config.data.dataset=",
    f"--config.data.arrays={MNIST_ARRAYS}",
    f"--config.data.train_split={train}",
    f"--config.data.test_split={test}",
  ]


@pytest.fixture(scope="session")
def mnist_arrays():
  """MNIST_ARRAYS, written from TFDS' MNIST unless a complete copy is there."""
  import numpy as np

  from convjax.data import tfds as tfds_data

  if not (MNIST_ARRAYS / "complete").exists():
    MNIST_ARRAYS.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=MNIST_ARRAYS.parent))
    builder = tfds_data.get_builder("mnist", None, False)
    for name, spec in MNIST_SLICES.items():
      rows = tfds_data.read_rows(builder, tfds_data.row_range(builder, spec))
      np.savez(staging / f"{name}.npz", image=rows["image"], label=rows["label"])
    (staging / "complete").touch()
    shutil.rmtree(MNIST_ARRAYS, ignore_errors=True)
    staging.rename(MNIST_ARRAYS)
  return MNIST_ARRAYS


# A run of 3 x 10 steps on 4,096 images of the real MNIST, the latest two checkpoints kept.
TINY_MNIST = [
  "--config=configs/mnist.py",
  *mnist_arrays_args("train4096", "test500"),
  "--config.data.validation_size=1024",
  "--config.num_epochs=3",
  "--config.steps_per_epoch=10",
  "--config.keep_checkpoints=2",
  "--config.eval_batch_size=250",
]


@pytest.fixture(scope="session")
def tiny_mnist_run(tmp_path_factory, mnist_arrays):
  """The finished TINY_MNIST run (checkpoints of steps 20 and 30, its test record), trained
  once for the session: copy it before changing it."""
  from convjax import run

  workdir = tmp_path_factory.mktemp("tiny_mnist") / "run"
  result = run_binary("experiments.train", *TINY_MNIST, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(run.checkpoints(str(workdir))) == [20, 30]
  return workdir


@pytest.fixture
def validation_best_at_epoch_1(monkeypatch):
  """Every later epoch reads 0.5 worse on validation per epoch than it is: epoch 1 is the best."""
  from convjax.train import loop

  real, seen = loop._metric_record, []

  def falling(prefix, sums):
    record = real(prefix, sums)
    if prefix == "val":
      seen.append(1)
      record["val_accuracy"] -= 0.5 * (len(seen) - 1)
    return record

  monkeypatch.setattr(loop, "_metric_record", falling)


def epoch_checkpoint(workdir, epoch):
  """The path of the run's checkpoint at the end of `epoch`."""
  from convjax import run

  steps = [s for s, p in run.checkpoints(workdir).items() if p.get("epoch_end") and p["epochs"] == epoch]
  assert steps, f"no checkpoint of epoch {epoch} in {workdir}: {run.checkpoints(workdir)}"
  return os.path.join(os.path.abspath(workdir), "checkpoints", str(steps[0]))


def restore_state(workdir, epoch):
  """The train state at the end of `epoch` as numpy leaves {path: array}, whatever wrote it."""
  import jax
  import numpy as np
  from convjax import run

  state = run.read_state(os.path.join(epoch_checkpoint(workdir, epoch), "state"))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def loop_probabilities(workdir, epoch: int, images):
  """What the training loop's evaluation computes for `images`: the run's model in inference
  mode on the checkpoint of `epoch`, read with orbax directly."""
  import jax
  import numpy as np
  from convjax import run
  from convjax.data.preprocess import input_transform

  state = run.read_state(os.path.join(epoch_checkpoint(workdir, epoch), "state"))
  config = run.read_config(str(workdir))
  model = run.model_of(config)
  x = input_transform(config.data.rescale, config.data.preprocess)(images.astype(np.float32))
  logits = model.apply({"params": state["params"], **(state["model_state"] or {})}, x, train=False)
  return np.asarray(jax.nn.softmax(logits) if logits.shape[-1] > 1 else jax.nn.sigmoid(logits))


def kill_after_first_checkpoint(workdir, *args, env=None):
  """Starts `python -m experiments.train args`, kill -9s it once its first checkpoint is committed.

  Returns the epochs completed in the checkpoints on disk after the kill.
  """
  import signal
  import time
  from convjax import run

  proc = subprocess.Popen(
    binary_argv("experiments.train", *args, f"--workdir={workdir}"),
    cwd=REPO,
    env={**os.environ, **(env or {})},
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  while not run.checkpoints(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return sorted(p.get("epochs", 0) for p in run.checkpoints(workdir).values())


def link_cats_dogs_subset(root, per_split):
  """A cats_and_dogs_small-shaped folder of symlinks to the first real files (no copies)."""
  source_root = SHARED / "datasets" / "cats_and_dogs_small"
  for split, n in per_split.items():
    for c in ("cats", "dogs"):
      os.makedirs(root / split / c)
      for name in sorted(os.listdir(source_root / split / c))[:n]:
        os.symlink(source_root / split / c / name, root / split / c / name)
  return root
