"""The training contract: real MNIST, the workdir layout, resume, overrides, errors."""

import hashlib
import json
import os
import pathlib
import subprocess

import jax
import numpy as np
import pytest

from convjax.errors import UserError
from convjax.train.loop import train_and_evaluate
from tests.conftest import (
  REPO,
  binary_argv,
  history,
  kill_after_first_checkpoint,
  mnist_arrays_args,
  restore_state,
  run_binary,
)

SMALL = [
  *mnist_arrays_args("train6144", "test1000"),
  "--config.data.validation_size=1024",
  "--config.eval_batch_size=256",
  "--config.model_kwargs.dropout_rate=0.25",
]


@pytest.mark.slow
def test_binary_trains_real_mnist_with_overrides(mnist_epoch_run):
  """The main job on the real data for one epoch (the session's shared run of the guides'
  command, two fields overridden): test accuracy >= 0.97, and every output of a run."""
  workdir, stderr = mnist_epoch_run
  config = json.loads((workdir / "config.json").read_text())
  assert (config["num_epochs"], config["batch_size"], config["learning_rate"]) == (1, 128, 1e-3)
  records = json.loads((workdir / "history.json").read_text())
  assert [sorted(r) for r in records] == [
    ["epoch", "seconds", "train_accuracy", "train_loss", "val_accuracy", "val_loss"],
    ["test_accuracy", "test_epoch", "test_loss"],
  ]
  assert records[-1]["test_accuracy"] >= 0.97 and records[-1]["test_epoch"] == 1, records
  assert records[0]["val_accuracy"] >= 0.97, records
  assert "epoch 1/1" in stderr and "steps/s" in stderr and "left" in stderr
  assert "Total params: 93,322" in (workdir / "summary.txt").read_text()
  assert (workdir / "plots" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["390"]  # named by train steps


def test_a_runs_readers_find_its_tfds_data_without_tfds_data_dir(mnist_epoch_run, tmp_path):
  """The run records the TFDS data directory it read (TFDS_DATA_DIR here), absolute; its
  readers then find the data in a shell without TFDS_DATA_DIR and another home (TFDS' default
  directory empty), where TFDS would retry a download for minutes before one error."""
  workdir, _ = mnist_epoch_run
  stored = json.loads((workdir / "config.json").read_text())
  assert stored["data"]["data_dir"] == os.path.abspath(os.environ["TFDS_DATA_DIR"])
  env = {k: v for k, v in os.environ.items() if k != "TFDS_DATA_DIR"}
  env["HOME"] = str(tmp_path)
  argv = binary_argv("experiments.evaluate", f"--workdir={workdir}", "--num_wrong=0")
  result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "accuracy" in result.stdout + result.stderr and "download" not in result.stderr.lower()


def test_a_moved_runs_missing_data_directory_gives_way_to_tfds_data_dir(tmp_path):
  """A run read on another machine, where the data directory it recorded is not: its readers
  take TFDS_DATA_DIR (or TFDS' default) as a run that recorded none."""
  from convjax import run
  from convjax.config import default_config, to_dict

  stored = to_dict(default_config())
  stored["data"]["data_dir"] = str(tmp_path / "elsewhere" / "tfds")
  (tmp_path / "config.json").write_text(json.dumps(stored))
  assert run.read_config(str(tmp_path)).data.data_dir == ""
  (tmp_path / "elsewhere" / "tfds").mkdir(parents=True)
  assert run.read_config(str(tmp_path)).data.data_dir == str(tmp_path / "elsewhere" / "tfds")


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(tmp_path, mnist_arrays):
  """kill -9 in the middle of a run, run the same command again: same params and history."""
  args = ["--config=configs/mnist.py", "--config.num_epochs=3", *SMALL]
  straight = tmp_path / "straight"
  result = run_binary("experiments.train", *args, f"--workdir={straight}")
  assert result.returncode == 0, result.stderr[-3000:]

  killed = tmp_path / "killed"
  done = kill_after_first_checkpoint(killed, *args)
  assert max(done) < 3, "the run finished before it was killed; the test proves nothing"

  result = run_binary("experiments.train", *args, f"--workdir={killed}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from the checkpoint of step" in result.stderr
  config = json.loads((killed / "config.json").read_text())
  assert config["model_kwargs"] == {"dropout_rate": 0.25, "num_classes": 10}
  assert config["data"]["train_split"] == "train6144"
  assert history(killed) == history(straight)
  a, b = restore_state(straight, 3), restore_state(killed, 3)
  assert a.keys() == b.keys() and any("opt_state" in k for k in a)
  for path in a:
    assert np.array_equal(a[path], b[path]), path


def test_unknown_config_key_is_refused_by_name(tmp_path):
  result = run_binary("experiments.train", "--config=configs/mnist.py", f"--workdir={tmp_path}", "--config.num_epoch=1")
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: bad config override: 'num_epoch'") and "num_epochs" in last
  assert "Traceback" not in result.stderr
  assert not any(tmp_path.iterdir())
  moved = run_binary(
    "experiments.train", "--config=configs/mnist.py", f"--workdir={tmp_path}", "--config.train_split=train[:100]"
  )
  assert moved.returncode == 1 and moved.stderr.strip().splitlines()[-1] == (
    "error: bad config override: config.train_split is now config.data.train_split (--config.data.train_split=...)"
  )


@pytest.mark.slow
def test_compiles_once_whatever_the_number_of_epochs(tmp_path, mnist_small):
  """3 epochs compile exactly what 1 epoch does: nothing per step or epoch. The last eval
  batches are ragged (1024 validation and 1000 test rows in batches of 300): padded and
  masked, not compiled again. A first, uncounted run compiles what a process compiles once
  (small helpers JAX caches across runs), so the count doesn't depend on the tests before."""
  compiles = []

  def count(event, _, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  mnist_small.eval_batch_size = 300
  mnist_small.num_epochs = 1
  train_and_evaluate(mnist_small, str(tmp_path / "warm-up"))
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    train_and_evaluate(mnist_small, str(tmp_path / "one"))
    one = len(compiles)
    mnist_small.num_epochs = 3
    train_and_evaluate(mnist_small, str(tmp_path / "three"))
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  assert one > 0 and len(compiles) - one == one, (one, len(compiles) - one)


def _tree_digest(workdir):
  digest = hashlib.sha256()
  for path in sorted(pathlib.Path(workdir).rglob("*")):
    if path.is_file():
      digest.update(str(path.relative_to(workdir)).encode() + path.read_bytes())
  return digest.hexdigest()


@pytest.fixture
def no_compilation(monkeypatch):
  """Fails any test whose error comes only after something was jitted or compiled: jax.jit
  refuses, and XLA's compilations (eager operations compile too) are counted."""

  def refuse(*args, **kwargs):
    raise AssertionError("jax.jit was reached before the error")

  compiled = []

  def count(event, _, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(event)

  monkeypatch.setattr(jax, "jit", refuse)
  jax.monitoring.register_event_duration_secs_listener(count)
  yield
  jax.monitoring.unregister_event_duration_listener(count)
  assert not compiled, f"{len(compiled)} program(s) compiled before the error"


@pytest.fixture
def no_data_read(monkeypatch):
  """Fails any test whose error comes only after a split's rows were read or decoded."""
  from convjax.data import folders
  from convjax.data import tfds as tfds_data

  def refuse(*args, **kwargs):
    raise AssertionError("data was read before the error")

  for module, name in ((tfds_data, "read_rows"), (tfds_data, "balanced_positions"), (folders, "decode_split")):
    monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("batch_size", 0, "config.batch_size must be positive, got 0"),
    ("learning_rate", -1e-3, "config.learning_rate must be positive"),
    ("num_epochs", 0, "config.num_epochs must be positive"),
    ("model", "mnist_convent", "unknown model 'mnist_convent'; valid models: .*mnist_convnet"),
    ("optimizer", "adagrad", "unknown optimizer 'adagrad'; valid: rmsprop, adam, adamw, sgd"),
    ("data.dataset", "mnsit", r"unknown dataset 'mnsit' \(did you mean mnist"),
    ("batch_size", 10_000, "batch_size=10000 exceeds the 3072 training examples"),
    ("test_weights", "final", "config.test_weights must be 'last' or 'best', got 'final'"),
  ],
)
def test_bad_config_is_one_clear_error(tmp_path, mnist_small, no_compilation, no_data_read, field, value, message):
  *parents, leaf = field.split(".")
  node = mnist_small
  for name in parents:
    node = node[name]
  node[leaf] = value
  with pytest.raises(UserError, match=message):
    train_and_evaluate(mnist_small, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_dataset_missing_offline_says_to_set_tfds_data_dir(tmp_path, mnist_small, no_compilation, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "empty"))
  mnist_small.data.download = False
  with pytest.raises(UserError, match=r"'mnist' is not prepared in .*empty.*set TFDS_DATA_DIR"):
    train_and_evaluate(mnist_small, str(tmp_path / "run"))


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_and_left_intact(tmp_path, mnist_small):
  mnist_small.num_epochs = 1
  train_and_evaluate(mnist_small, str(tmp_path))
  before = _tree_digest(tmp_path)
  other = mnist_small.copy_and_resolve_references()
  other.seed = 1
  other.learning_rate = 1e-4
  with pytest.raises(UserError, match=r"different config \(differs in: learning_rate, seed\)"):
    train_and_evaluate(other, str(tmp_path))
  assert _tree_digest(tmp_path) == before
  other.overwrite = True
  records = train_and_evaluate(other, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1
  assert len(records) == 2 and history(tmp_path) == [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_binary_prints_one_error_line(tmp_path):
  result = run_binary(
    "experiments.train", "--config=configs/mnist.py", f"--workdir={tmp_path}", "--config.model=lenet9"
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: unknown model 'lenet9'; valid models:")
  assert "Traceback" not in result.stderr


def test_corrupt_config_json_is_refused_by_name_and_left_intact(tmp_path, mnist_small, no_compilation, no_data_read):
  (tmp_path / "config.json").write_text("{not json")
  (tmp_path / "history.json").write_text('[{"epoch": 1}]')
  before = _tree_digest(tmp_path)
  with pytest.raises(UserError, match=r"config\.json is not valid JSON .*--config\.overwrite=True"):
    train_and_evaluate(mnist_small, str(tmp_path))
  assert _tree_digest(tmp_path) == before


def test_early_stopping_follows_keras_rules():
  from convjax.train.loop import early_stop_epoch

  history = [
    {"epoch": e, "val_loss": v} for e, v in enumerate([1.0, 0.9, 0.8995, 0.91, 0.85, 0.86, 0.87, 0.851], start=1)
  ]
  # min_delta 0.001: epoch 3 (0.8995) is no improvement on 0.9; epoch 5 is (0.85).
  assert early_stop_epoch(history, 3, 0.001) == 8
  assert early_stop_epoch(history, 2, 0.001) == 4
  assert early_stop_epoch(history, 0, 0.001) is None and early_stop_epoch(history, 4, 0.001) is None
  assert early_stop_epoch(history + [{"test_loss": 1.0}], 3, 0.001) == 8  # the test record is skipped


@pytest.mark.slow
def test_early_stopping_stops_the_run_and_resume_keeps_it_stopped(tmp_path, mnist_small):
  mnist_small.num_epochs = 6
  mnist_small.steps_per_epoch = 8
  mnist_small.early_stopping_patience = 1
  mnist_small.early_stopping_min_delta = 10.0  # no epoch can improve by 10: stop after epoch 2
  history = train_and_evaluate(mnist_small, str(tmp_path))
  assert [r.get("epoch") for r in history] == [1, 2, None]
  again = train_and_evaluate(mnist_small, str(tmp_path))
  assert [r.get("epoch") for r in again] == [1, 2, None]


def test_a_stored_config_predating_new_fields_reads_with_defaults():
  from convjax import config as config_lib

  stored = config_lib.to_dict(config_lib.default_config())
  del stored["data"]["preprocess"], stored["data"]["per_class"]
  stored["data"]["image_size"] = [150, 150]
  stored["model_kwargs"] = {"dropout_rate": 0.5}
  config = config_lib.from_stored(stored)
  assert config.data.preprocess == "" and config.data.per_class == ()
  assert config.data.image_size == (150, 150) and dict(config.model_kwargs) == {"dropout_rate": 0.5}
  assert config_lib.differences(stored, config_lib.to_dict(config)) == []
  # A run of an earlier convjax: data fields at the top level, a hold-out per source.
  old = {
    "dataset": "mnist",
    "train_split": "train[:6144]",
    "validation_size": 1024,
    "rescale": 0.5,
    "data": {"folder": "", "validation_fraction": 0.3, "test_fraction": 0.25},
  }
  config = config_lib.from_stored(old)
  assert (config.data.dataset, config.data.train_split, config.data.rescale) == ("mnist", "train[:6144]", 0.5)
  assert (config.data.validation_size, config.data.test_size) == (1024, 0.25)  # TFDS: its row count
  old["data"]["folder"] = "/images"
  assert config_lib.from_stored(old).data.validation_size == 0.3  # a folder: its fraction
  current = config_lib.to_dict(config_lib.from_stored(old))
  current["model_kwargs"]["num_classes"] = 10  # recorded now; the old run took the dataset's too
  assert config_lib.differences(config_lib.to_dict(config_lib.from_stored(old)), current) == []


def test_time_to_accuracy_stops_at_the_first_epoch_reaching_the_target(tmp_path, mnist_small):
  from convjax.train.loop import target_epoch

  mnist_small.num_epochs = 6
  mnist_small.steps_per_epoch = 8
  mnist_small.target_accuracy = 0.5  # a few dozen steps of batch 64 reach 50% on MNIST
  history = train_and_evaluate(mnist_small, str(tmp_path))
  epochs = [r for r in history if "epoch" in r]
  reached = target_epoch(history, "test", 0.5)
  assert reached == epochs[-1]["epoch"] < 6  # it stopped there, early
  assert all(r["test_accuracy"] < 0.5 for r in epochs[:-1]) and epochs[-1]["test_accuracy"] >= 0.5
  walls = [r["wall_seconds"] for r in epochs]
  assert walls == sorted(walls) and walls[0] > epochs[0]["seconds"]  # since start: includes loading
  assert history[-1]["test_accuracy"] == epochs[-1]["test_accuracy"]  # the final test: same weights
  assert target_epoch(history, "validation", 1.01) is None


def test_test_weights_best_evaluates_the_best_validation_checkpoint(tmp_path, mnist_small, validation_best_at_epoch_1):
  mnist_small.num_epochs = 3
  mnist_small.steps_per_epoch = 8
  mnist_small.target_accuracy = 1.0  # unreachable: a test evaluation after every epoch
  mnist_small.test_weights = "best"
  history = train_and_evaluate(mnist_small, str(tmp_path))
  epochs = {r["epoch"]: r["test_accuracy"] for r in history if "epoch" in r}
  assert epochs[3] - epochs[1] > 0.1  # the epochs' weights differ in what they score
  assert history[-1]["test_epoch"] == 1 and history[-1]["test_accuracy"] == epochs[1], history
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["24", "8"]  # latest, best (8 steps/epoch)


def test_target_split_must_exist(tmp_path, mnist_small, no_compilation, no_data_read):
  mnist_small.target_accuracy = 0.9
  mnist_small.data.test_split = ""
  with pytest.raises(UserError, match="config.target_split='test', but this run has no test split"):
    train_and_evaluate(mnist_small, str(tmp_path))


def test_init_from_starts_a_new_run_from_another_runs_latest_weights(tmp_path, mnist_small):
  import jax.numpy as jnp
  from convjax.models import get_model
  from convjax.train.state import starting_params

  mnist_small.num_epochs = 1
  mnist_small.steps_per_epoch = 8
  train_and_evaluate(mnist_small, str(tmp_path / "first"))
  stored = restore_state(tmp_path / "first", 1)
  config = mnist_small.copy_and_resolve_references()
  config.init_from = str(tmp_path / "first")
  fresh = get_model("mnist_convnet").init(jax.random.key(5), jnp.zeros((1, 28, 28, 1)))["params"]
  params, _ = starting_params(config, fresh, {})
  got = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  assert got.keys() == {k[len("['params']") :] for k in stored if k.startswith("['params']")}
  for key, value in got.items():
    np.testing.assert_array_equal(value, stored["['params']" + key])
  other = get_model("mnist_dense").init(jax.random.key(5), jnp.zeros((1, 28, 28, 1)))["params"]
  with pytest.raises(UserError, match="init_from=.*does not fit the model"):
    starting_params(config, other, {})
  config.init_from = str(tmp_path / "nothing")
  with pytest.raises(UserError, match="init_from=.*nothing.*has no config.json: not a training run"):
    starting_params(config, fresh, {})
