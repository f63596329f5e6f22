import fcntl
import importlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
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


# Every binary the tests start is recorded, one JSON line (module, args) per start, in a
# folder shared by the xdist workers; at the end of the whole suite the controller checks
# the guides' commands against them (tests/test_docs.py).
INVOCATIONS_DIR = "CONVJAX_TEST_INVOCATIONS"

# The binaries the tests start share JAX's persistent compilation cache, one folder per
# session: ~90 binaries compile the same few programs, and a hit saves a few seconds each.
# The pytest processes keep it off (they inherit the variable), so test_train counts
# their compilations; a session starts with an empty cache, as on a fresh clone.
CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"
jax.config.update("jax_enable_compilation_cache", False)


def pytest_configure(config):
  if not hasattr(config, "workerinput"):  # the controller (or the only process)
    os.environ[INVOCATIONS_DIR] = tempfile.mkdtemp(prefix="convjax-invocations-")
    os.environ[CACHE_DIR] = tempfile.mkdtemp(prefix="convjax-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def binary_argv(module: str, *args) -> list:
  """The command line `python -m module args`, recorded for the guides' check."""
  with open(os.path.join(os.environ[INVOCATIONS_DIR], f"{os.getpid()}.jsonl"), "a") as out:
    out.write(json.dumps([module, [str(a) for a in args]]) + "\n")
  return [sys.executable, "-m", module, *args]


def _whole_suite(config) -> bool:
  """Whether this session runs every test (no -k, -m, --deselect, or paths that leave some out)."""
  tests = pathlib.Path(__file__).parent
  if tests != REPO / "tests":  # a copy of this file elsewhere (tests/test_conftest.py's)
    return False
  paths = {(config.invocation_params.dir / a.split("::")[0]).resolve() for a in config.args}
  return (
    not config.option.keyword
    and not config.option.markexpr
    and not config.option.collectonly
    and not config.getoption("deselect", None)
    and "::" not in "".join(config.args)
    and paths <= {tests, tests.parent}
  )


def pytest_sessionfinish(session, exitstatus):
  if hasattr(session.config, "workerinput"):
    return
  folder = pathlib.Path(os.environ[INVOCATIONS_DIR])
  invocations = [json.loads(line) for f in folder.glob("*.jsonl") for line in f.read_text().splitlines()]
  shutil.rmtree(folder, ignore_errors=True)  # also after a partial run
  shutil.rmtree(os.environ[CACHE_DIR], ignore_errors=True)
  if not _whole_suite(session.config):
    return
  from tests.test_docs import uncovered_commands

  missing = uncovered_commands(invocations)
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  if missing:
    reporter.write_line("FAILED the guides' commands: no test runs these and no RESULTS/BENCHMARKS link follows them:")
    for line in missing:
      reporter.write_line(f"  {line}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
  else:
    reporter.write_line(
      f"the guides' commands: each is run by a test or names its result ({len(invocations)} binaries run)"
    )


def history(workdir) -> list:
  """A run's history.json without the wall times (what two runs of the same work share)."""
  return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads((workdir / "history.json").read_text())]


def binary_env(env=None) -> dict:
  """This process's environment with `env` on top; XLA_FLAGS that a test sets are added to
  the session's own (`XLA_FLAGS=--xla_cpu_max_isa=AVX2 pytest` limits every binary's code)."""
  full_env = {**os.environ, **(env or {})}
  if os.environ.get("XLA_FLAGS") and "XLA_FLAGS" in (env or {}):
    full_env["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {env['XLA_FLAGS']}"
  return full_env


def run_binary(module: str, *args, env=None, timeout=900):
  """Runs `python -m module args` from the repo root; returns CompletedProcess (text)."""
  full_env = binary_env(env)
  return subprocess.run(
    binary_argv(module, *args), cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
  )


@pytest.fixture
def import_binary():
  """Imports experiments.<name> in this process; its absl flags and module are removed after
  the test, so that a later test in this worker can import another binary (absl allows each
  flag name once: both binaries define --config)."""
  from absl import flags

  before, imported = set(flags.FLAGS), []

  def load(name):
    imported.append(f"experiments.{name}")
    return importlib.import_module(imported[-1])

  yield load
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
  for module in imported:
    sys.modules.pop(module, None)


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
# binaries whose subject is not TFDS: reading them, a binary starts ~1.5 s sooner than on
# TFDS (its import and dataset info). Written once per machine (the `mnist_arrays` fixture).
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

  MNIST_ARRAYS.parent.mkdir(parents=True, exist_ok=True)
  with open(MNIST_ARRAYS.parent / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one writer, also among xdist workers
    if not (MNIST_ARRAYS / "complete").exists():
      shutil.rmtree(MNIST_ARRAYS, ignore_errors=True)
      MNIST_ARRAYS.mkdir()
      builder = tfds_data.get_builder("mnist", None, False)
      for name, spec in MNIST_SLICES.items():
        rows = tfds_data.read_rows(builder, tfds_data.row_range(builder, spec))
        np.savez(MNIST_ARRAYS / f"{name}.npz", image=rows["image"], label=rows["label"])
      (MNIST_ARRAYS / "complete").touch()
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


def _trained_once(tmp_path_factory, name, args, env=None):
  """The folder of `experiments.train args`, trained once per session for every xdist worker
  (the first to ask trains it while the other waits) and its stderr: read it, never change it."""
  base = tmp_path_factory.getbasetemp()
  folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
  folder.mkdir(exist_ok=True)
  workdir = folder / "run"
  with open(folder / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (folder / "complete").exists():
      shutil.rmtree(workdir, ignore_errors=True)
      result = run_binary("experiments.train", *args, f"--workdir={workdir}", env=env)
      assert result.returncode == 0, result.stderr[-3000:]
      (folder / "stderr.txt").write_text(result.stderr)
      (folder / "complete").touch()
  return workdir, (folder / "stderr.txt").read_text()


@pytest.fixture(scope="session")
def tiny_mnist_run(tmp_path_factory, mnist_arrays):
  """The finished TINY_MNIST run (checkpoints of steps 20 and 30, its test record), trained
  once for the session: copy it before changing it."""
  from convjax import checkpoints

  workdir, _ = _trained_once(tmp_path_factory, "tiny_mnist", TINY_MNIST)
  assert sorted(checkpoints.kept(str(workdir))) == [20, 30]
  return workdir


# The 'Scaling out' guide's command on one device: a full MNIST epoch of 390 steps (batch 128).
MNIST_EPOCH = ["--config=configs/mnist.py", "--config.num_epochs=1", "--config.batch_size=128"]
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


@pytest.fixture(scope="session")
def mnist_epoch_run(tmp_path_factory):
  """The finished MNIST_EPOCH run on one device (its workdir, its stderr), for the tests that
  compare another run with it or read it."""
  return _trained_once(tmp_path_factory, "mnist_epoch", MNIST_EPOCH, env=ONE_DEVICE)


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
  from convjax import checkpoints

  steps = [s for s, p in checkpoints.kept(workdir).items() if p.get("epoch_end") and p["epochs"] == epoch]
  assert steps, f"no checkpoint of epoch {epoch} in {workdir}: {checkpoints.kept(workdir)}"
  return os.path.join(os.path.abspath(workdir), "checkpoints", str(steps[0]))


def restore_state(workdir, epoch):
  """The train state at the end of `epoch` as numpy leaves {path: array}, whatever wrote it."""
  import jax
  import numpy as np
  from convjax import checkpoints

  state = checkpoints.read_state(os.path.join(epoch_checkpoint(workdir, epoch), "state"))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def loop_probabilities(workdir, epoch: int, images):
  """What the training loop's evaluation computes for `images`: the run's model in inference
  mode on the checkpoint of `epoch`, read with orbax directly."""
  import jax
  import numpy as np
  from convjax import checkpoints, run
  from convjax.data.preprocess import input_transform

  state = checkpoints.read_state(os.path.join(epoch_checkpoint(workdir, epoch), "state"))
  config = run.read_config(str(workdir))
  model = run.model_of(config, str(workdir))
  x = input_transform(config.data.rescale, config.data.preprocess)(images.astype(np.float32))
  logits = model.apply({"params": state["params"], **(state["model_state"] or {})}, x, train=False)
  return np.asarray(jax.nn.softmax(logits) if logits.shape[-1] > 1 else jax.nn.sigmoid(logits))


def assert_onnx_export_gives_the_runs_probabilities(workdir, folder, digits=None, photos=None):
  """The ONNX export of the run in `workdir` (convjax.inference.export, as `experiments.predict
  --export_format=onnx` makes it), run by onnxruntime in a process without jax, gives the
  run's own probabilities within 1e-5 on 100 real images: `digits` (uint8, fitted to the run's
  image size as its data were) or the image files `photos` (read as predict reads them)."""
  import numpy as np

  from convjax import inference

  classifier = inference.from_run(str(workdir), "last")
  if digits is not None:
    images = np.stack([classifier.fit(digit) for digit in digits])
  else:
    images, read, _ = inference.read_images(photos, classifier)
    assert len(read) == len(photos)
  assert len(images) == 100
  ours = np.asarray(jax.jit(classifier.forward)(classifier.variables, images))
  os.makedirs(folder)
  inference.export(classifier, os.path.join(folder, "export"), "last", "onnx")
  served = served_probabilities(os.path.join(folder, "export"), images, str(folder))
  assert served.shape == ours.shape == (100, 1 if classifier.binary else len(classifier.classes))
  np.testing.assert_allclose(served, ours, atol=1e-5)


def served_probabilities(export, images, folder):
  """What the export in `export` outputs for `images`, run in a new process that imports only
  jax and numpy (a model.jax) or onnxruntime and numpy (a model.onnx); it fails if convjax or
  flax get imported (or jax, for ONNX)."""
  import numpy as np

  np.save(os.path.join(folder, "images.npy"), images)
  images_npy, probs_npy = os.path.join(folder, "images.npy"), os.path.join(folder, "probs.npy")
  if os.path.exists(os.path.join(export, "model.onnx")):
    program = (
      "import sys, numpy as np, onnxruntime\n"
      f"session = onnxruntime.InferenceSession({os.path.join(export, 'model.onnx')!r})\n"
      f"np.save({probs_npy!r}, session.run(['probabilities'], {{'images': np.load({images_npy!r})}})[0])\n"
      "assert not {'convjax', 'flax', 'jax'} & {m.split('.')[0] for m in sys.modules}, 'imported jax'\n"
    )
  else:
    program = (
      "import sys, numpy as np, jax\n"
      "from jax import export\n"
      f"module = export.deserialize(open({os.path.join(export, 'model.jax')!r}, 'rb').read())\n"
      f"np.save({probs_npy!r}, np.asarray(module.call(np.load({images_npy!r}))))\n"
      "assert not {'convjax', 'flax'} & {m.split('.')[0] for m in sys.modules}, 'imported convjax or flax'\n"
    )
  loaded = subprocess.run([sys.executable, "-c", program], cwd=folder, capture_output=True, text=True)
  assert loaded.returncode == 0, loaded.stderr[-3000:]
  return np.load(probs_npy)


def kill_after_first_checkpoint(workdir, *args, env=None):
  """Starts `python -m experiments.train args`, kill -9s it once its first checkpoint is committed.

  Returns the epochs completed in the checkpoints on disk after the kill.
  """
  from convjax import checkpoints

  proc = subprocess.Popen(
    binary_argv("experiments.train", *args, f"--workdir={workdir}"),
    cwd=REPO,
    env=binary_env(env),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  while not checkpoints.kept(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return sorted(p.get("epochs", 0) for p in checkpoints.kept(workdir).values())


def link_cats_dogs_subset(root, per_split):
  """A cats_and_dogs_small-shaped folder of symlinks to the first real files (no copies)."""
  source_root = SHARED / "datasets" / "cats_and_dogs_small"
  for split, n in per_split.items():
    for c in ("cats", "dogs"):
      os.makedirs(root / split / c)
      for name in sorted(os.listdir(source_root / split / c))[:n]:
        os.symlink(source_root / split / c / name, root / split / c / name)
  return root


def paused(argv, phase, env=None):
  """The binary started with CONVJAX_PAUSE_AT=phase (convjax/train/progress.py), once it has
  stopped itself there; and the lines it wrote so far. `finish` continues it."""
  proc = subprocess.Popen(
    argv, cwd=REPO, env=binary_env({"CONVJAX_PAUSE_AT": phase, **(env or {})}), stderr=subprocess.PIPE, text=True
  )
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if f"paused at {phase}" in line:
      break
  else:
    raise AssertionError(f"never paused at {phase}: {''.join(lines[-20:])}")
  while open(f"/proc/{proc.pid}/stat").read().rsplit(") ", 1)[1][0] != "T":
    time.sleep(0.01)
  return proc, lines


def finish(proc, lines):
  """Continues a paused binary to its end; all it wrote."""
  proc.send_signal(signal.SIGCONT)
  lines += proc.stderr.readlines()
  proc.wait(timeout=300)
  return "".join(lines)
