"""The trainer of long runs: progress, step checkpoints and SIGTERM, extension, no silent NaN,
mixed precision, optimizers and regularisers, frozen BatchNorm, the model from the command line."""

import os
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from convjax import checkpoints
from convjax.config import default_config
from convjax.models import get_model
from convjax.train.optim import learning_rate_schedule, make_optimizer
from convjax.train.state import create_train_state
from convjax.train.steps import loss_and_correct, make_train_step
from tests.conftest import (
  MNIST_EPOCH,
  ONE_DEVICE,
  REPO,
  binary_argv,
  binary_env,
  epoch_checkpoint,
  history,
  mnist_arrays_args,
  restore_state,
  run_binary,
)

pytestmark = pytest.mark.usefixtures("mnist_arrays")

SMALL = [
  "--config=configs/mnist.py",
  *mnist_arrays_args("train6144", "test1000"),
  "--config.data.validation_size=1024",
  "--config.eval_batch_size=256",
  "--config.steps_per_epoch=40",
  "--config.model_kwargs.dropout_rate=0.25",
]


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_the_rerun_equals_the_uninterrupted_run(tmp_path, mnist_epoch_run):
  """The MNIST recipe for a full epoch of 390 steps, SIGTERM in the middle: it finishes the step,
  saves, says so and exits; the same command resumes inside the epoch and ends where the
  uninterrupted run (the session's shared one) does, bit for bit. Progress lines come during
  the epoch, not only after it."""
  straight, _ = mnist_epoch_run
  args = [*MNIST_EPOCH, "--config.log_every_steps=100", f"--workdir={tmp_path / 'killed'}"]
  proc = subprocess.Popen(
    binary_argv("experiments.train", *args), cwd=REPO, env=binary_env(ONE_DEVICE), stderr=subprocess.PIPE, text=True
  )
  seen = []
  for line in proc.stderr:
    seen.append(line)
    if "epoch 1/1 step " in line and int(line.split("epoch 1/1 step ")[1].split("/")[0]) >= 150:
      proc.send_signal(signal.SIGTERM)
      break
  seen += proc.stderr.readlines()
  proc.wait(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, "".join(seen[-20:])
  assert any("epoch 1/1 step 1/390: first step done" in line for line in seen)
  assert any("epoch 1/1 step 101/390  loss" in line and "images/s" in line and "ETA epoch" in line for line in seen)
  stopped = [line for line in seen if "interrupted at step" in line]
  assert stopped and "rerun the same command to resume" in stopped[0] and "Traceback" not in "".join(seen)
  step = int(stopped[0].split("interrupted at step ")[1].split()[0])
  assert 150 <= step < 390, step  # inside the epoch

  resumed = run_binary("experiments.train", *args, env=ONE_DEVICE)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from the checkpoint of step {step} (epoch 1, step {step}/390)" in resumed.stderr
  assert history(tmp_path / "killed") == history(straight)
  a, b = restore_state(straight, 1), restore_state(tmp_path / "killed", 1)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_error_and_saves_nothing_non_finite(tmp_path):
  result = run_binary(
    "experiments.train",
    *SMALL,
    "--config.learning_rate=1e6",
    "--config.num_epochs=2",
    "--config.log_every_steps=10",
    f"--workdir={tmp_path}",
  )
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: non-finite loss or gradient at epoch 1, step ") and "train step" in last, last
  assert "no checkpoint was saved before it" in last and "Traceback" not in result.stderr
  assert checkpoints.kept(str(tmp_path)) == {}  # as the error line says


@pytest.mark.slow
def test_raising_num_epochs_continues_a_finished_run(tmp_path):
  """2 epochs, then the same command with num_epochs=3: it continues to epoch 3 and equals a
  3-epoch run. Logging and checkpoint cadence may change on the way; other fields may not."""
  two = run_binary(
    "experiments.train",
    *SMALL,
    "--config.num_epochs=2",
    "--config.profile_steps=(2, 4)",
    f"--workdir={tmp_path / 'extended'}",
  )
  assert two.returncode == 0, two.stderr[-3000:]
  assert list((tmp_path / "extended" / "tensorboard").rglob("*.xplane.pb"))  # the profile of steps 2-4
  three = run_binary(
    "experiments.train",
    *SMALL,
    "--config.num_epochs=3",
    "--config.log_every_steps=7",
    "--config.checkpoint_every_steps=30",
    f"--workdir={tmp_path / 'extended'}",
  )
  assert three.returncode == 0, three.stderr[-3000:]
  assert "resumed from the checkpoint of step 80 (the end of epoch 2)" in three.stderr
  straight = run_binary("experiments.train", *SMALL, "--config.num_epochs=3", f"--workdir={tmp_path / 'straight'}")
  assert straight.returncode == 0, straight.stderr[-3000:]
  assert history(tmp_path / "extended") == history(tmp_path / "straight")
  other = run_binary(
    "experiments.train",
    *SMALL,
    "--config.num_epochs=4",
    "--config.learning_rate=0.01",
    f"--workdir={tmp_path / 'extended'}",
  )
  assert other.returncode == 1 and "differs in: learning_rate)" in other.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_bfloat16_compute_trains_with_float32_params(tmp_path):
  result = run_binary(
    "experiments.train", *SMALL, "--config.num_epochs=1", "--config.compute_dtype=bfloat16", f"--workdir={tmp_path}"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  records = history(tmp_path)
  assert records[-1]["test_accuracy"] > 0.75, records  # 40 steps; seen 0.833
  state = checkpoints.read_state(os.path.join(epoch_checkpoint(tmp_path, 1), "state"))
  assert {np.asarray(x).dtype for x in jax.tree_util.tree_leaves(state["params"])} == {np.dtype("float32")}


def _mnist_batches(n, batch):
  rng = np.random.default_rng(0)
  return [
    {
      "image": jnp.asarray(rng.integers(0, 256, (batch, 28, 28, 1), np.uint8)),
      "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
      "mask": jnp.ones(batch),
    }
    for _ in range(n)
  ]


def _train(config, batches, **options):
  model = get_model("mnist_convnet")
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))["params"]
  tx, _ = make_optimizer(config, 100, params)
  state = create_train_state(model, tx, (28, 28, 1), jax.random.key(0), ema=config.ema_decay > 0)
  step = jax.jit(make_train_step(model, tx, lambda x: x / 255, ema_decay=config.ema_decay, **options))
  trajectory = []
  for batch in batches:
    state, _ = step(state, batch, jax.random.key(1))
    trajectory.append(state.params)
  return state, trajectory


def test_gradient_accumulation_of_4_x_32_equals_batch_128():
  config = default_config()
  config.optimizer = "adam"
  big = _mnist_batches(3, 128)
  small = [{k: v[i * 32 : (i + 1) * 32] for k, v in b.items()} for b in big for i in range(4)]
  once, _ = _train(config, big)
  config.grad_accum_steps = 4
  accumulated, trajectory = _train(config, small)
  for a, b in zip(jax.tree_util.tree_leaves(once.params), jax.tree_util.tree_leaves(accumulated.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # No update between the micro-steps of an accumulation.
  first = jax.tree_util.tree_leaves(trajectory[0])[0]
  assert np.array_equal(first, jax.tree_util.tree_leaves(trajectory[2])[0])


def test_ema_is_the_moving_average_of_the_params_and_weight_decay_is_decoupled():
  config = default_config()
  config.ema_decay = 0.9
  state, trajectory = _train(config, _mnist_batches(4, 16))
  initial = create_train_state(get_model("mnist_convnet"), optax.identity(), (28, 28, 1), jax.random.key(0)).params
  ema = initial
  for params in trajectory:
    ema = jax.tree_util.tree_map(lambda e, p: 0.9 * e + 0.1 * p, ema, params)
  for a, b in zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(state.ema_params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  # AdamW: decay is lr * weight_decay * param on kernels (the mask), nothing on biases.
  config = default_config()
  config.optimizer, config.learning_rate = "adamw", 1e-3
  batches = _mnist_batches(1, 16)
  plain, _ = _train(config, batches)
  config.weight_decay = 0.5
  decayed, _ = _train(config, batches)
  start = create_train_state(get_model("mnist_convnet"), optax.identity(), (28, 28, 1), jax.random.key(0)).params
  kernel = ("features", "conv2d", "kernel")
  bias = ("features", "conv2d", "bias")
  get = lambda tree, path: tree[path[0]][path[1]][path[2]]  # noqa: E731
  np.testing.assert_allclose(
    get(plain.params, kernel) - get(decayed.params, kernel), 1e-3 * 0.5 * get(start, kernel), atol=1e-7
  )  # float32 rounding of ~0.1 params
  np.testing.assert_array_equal(get(plain.params, bias), get(decayed.params, bias))


def test_schedules_and_label_smoothing_are_optax_s():
  config = default_config()
  config.learning_rate, config.num_epochs, config.warmup_steps = 0.1, 1, 10
  config.schedule = "cosine"
  cosine = learning_rate_schedule(config, 110)
  assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.05) and float(cosine(10)) == pytest.approx(0.1)
  assert float(cosine(110)) == pytest.approx(0.0, abs=1e-9)
  config.schedule, config.schedule_boundaries, config.schedule_factor = "step", (50, 80), 0.5
  step = learning_rate_schedule(config, 110)
  assert [float(step(s)) for s in (5, 49, 50, 79, 80)] == pytest.approx([0.05, 0.1, 0.05, 0.05, 0.025])
  logits, labels = jnp.array([[2.0, -1.0, 0.5]]), jnp.array([2])
  loss, _ = loss_and_correct(logits, labels, label_smoothing=0.3)
  expected = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 3), 0.3))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.slow
def test_a_frozen_batch_norm_runs_in_inference_mode_as_keras_does():
  """ResNet-18 with its stem (conv1, bn1) frozen by config.trainable: a train step leaves the stem's
  statistics untouched, and the stem computes with them, as Keras does for trainable=False."""
  from convjax.models.layers import frozen_batch_norm
  from convjax.train.loop import frozen_batch_norms

  config = default_config()
  config.trainable = "(?!features/(conv1|bn1)/).*"
  model = get_model("resnet18", num_classes=10)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1))))["params"]
  frozen = frozen_batch_norms(config, params)
  assert frozen == [("features", "bn1")]
  tx, _ = make_optimizer(config, 100, params)
  state = create_train_state(model, tx, (32, 32, 1), jax.random.key(0))
  stats = {"mean": jnp.full((64,), 0.3), "var": jnp.full((64,), 2.0)}
  state = state.replace(
    model_state={
      "batch_stats": {
        **state.model_state["batch_stats"],
        "features": {**state.model_state["batch_stats"]["features"], "bn1": stats},
      }
    }
  )
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.integers(0, 256, (8, 32, 32, 1), np.uint8)),
    "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
    "mask": jnp.ones(8),
  }
  step = jax.jit(make_train_step(model, tx, lambda x: x / 255, frozen=frozen))
  after, _ = step(state, batch, jax.random.key(1))
  for name in ("mean", "var"):
    np.testing.assert_array_equal(after.model_state["batch_stats"]["features"]["bn1"][name], stats[name])
  assert not np.array_equal(
    after.model_state["batch_stats"]["features"]["layer1_0"]["BatchNorm_0"]["mean"],
    state.model_state["batch_stats"]["features"]["layer1_0"]["BatchNorm_0"]["mean"],
  )
  variables = {"params": state.params, **state.model_state}
  x = batch["image"] / 255
  capture = lambda m, _: m.path == ("features", "bn1")  # noqa: E731
  with frozen_batch_norm(frozen):
    _, train_mode = model.apply(
      variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=capture
    )
  _, inference = model.apply(variables, x, train=False, mutable=["intermediates"], capture_intermediates=capture)
  np.testing.assert_allclose(
    train_mode["intermediates"]["features"]["bn1"]["__call__"][0],
    inference["intermediates"]["features"]["bn1"]["__call__"][0],
    rtol=1e-5,
    atol=1e-6,
  )


@pytest.mark.slow
def test_any_model_field_from_the_command_line_and_a_switched_model_takes_its_own_defaults():
  """The transfer guide's include_top example and --config.model=alexnet on the MNIST config; --config.help lists."""
  listing = run_binary(
    "experiments.train",
    "--config=configs/mnist.py",
    "--workdir=/nonexistent",
    "--config.model=vgg16",
    "--config.model_kwargs.include_top=False",
    "--config.help",
  )
  assert listing.returncode == 0, listing.stderr[-3000:]
  out = listing.stdout
  assert "model = 'vgg16' (default 'mnist_convnet')" in out and "model_kwargs = {'include_top': False}" in out
  assert "learning_rate = 0.001  # the peak learning rate of the schedule" in out
  assert "data.pipeline = 'auto'  # " in out and "  include_top = True" in out
  switched = run_binary(
    "experiments.train",
    "--config=configs/mnist.py",
    "--workdir=/nonexistent",
    "--config.model=alexnet",
    "--config.help",
  )
  assert "model_kwargs = {}" in switched.stdout and "  dropout_rate = 0.5" in switched.stdout
  kept = run_binary(
    "experiments.train",
    "--config=configs/mnist.py",
    "--workdir=/nonexistent",
    "--config.model_kwargs.hidden=(128, 32)",
    "--config.help",
  )
  assert "model_kwargs = {'dropout_rate': 0.0, 'hidden': [128, 32]}" in kept.stdout  # as JSON (config.json) has it
  bad = run_binary(
    "experiments.train",
    "--config=configs/mnist.py",
    "--workdir=/nonexistent",
    "--config.model_kwargs.include_tops=False",
  )
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
    "error: model 'mnist_convnet' has no field 'include_tops' (--config.model_kwargs.include_tops); its fields: "
  )
