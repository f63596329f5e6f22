"""`train_and_evaluate(config, workdir)` in three parts: set-up, fit, final test.

set_up: every check first (config, devices, the data source, the model on its
        input shape, the workdir's identity): nothing is read or compiled before
        they pass. Then the data (read, put on the devices), the train state and
        its start: the workdir's latest checkpoint, or pretrained / init_from weights.
fit:    the epoch loop. Each epoch trains, validates, checkpoints (with the
        history up to it), writes history.json, plots and TensorBoard scalars;
        one stop rule ends it (num_epochs, early stopping, time to accuracy).
test:   the final test evaluation, with the last epoch's or the best
        validation checkpoint's weights.

Each step is one asynchronous dispatch (the batch's gather, the step and the
metric sums in one program); the host runs at most MAX_IN_FLIGHT steps ahead
and reads the metrics once per epoch. The input pipeline (convjax.data.pipeline) decides
the data order, the run on disk (convjax.run) owns the workdir's files.
"""
import collections
import hashlib
import os
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from convjax import parallel, run
from convjax import config as config_lib
from convjax.data import augment as augment_lib
from convjax.data import pipeline
from convjax.data.preprocess import input_transform
from convjax.data.splits import fit_for, open_source
from convjax.errors import UserError
from convjax.models import get_model, with_num_classes
from convjax.models.summary import summary
from convjax.pretrained import transfer
from convjax.train.optim import make_optimizer
from convjax.train.state import create_from, create_train_state, starting_params
from convjax.train.steps import jit_steps, zero_metrics
from convjax.viz.plots import learning_curves


# Stop rules: functions of the history alone, so a resumed run stops where an
# uninterrupted one would.

def _accuracy_key(split: str) -> str:
  return "val_accuracy" if split == "validation" else f"{split}_accuracy"


def target_epoch(history: list, split: str, accuracy: float):
  """The first epoch whose `split` accuracy reached `accuracy` (config.target_*), or None."""
  key = _accuracy_key(split)
  return next((r["epoch"] for r in history if "epoch" in r and r.get(key, -1) >= accuracy), None)


def early_stop_epoch(history: list, patience: int, min_delta: float):
  """The epoch at which Keras' EarlyStopping(monitor='val_loss') stops, or None."""
  if not patience:
    return None
  best, wait = float("inf"), 0
  for record in history:
    if "val_loss" not in record:
      continue
    if record["val_loss"] < best - min_delta:
      best, wait = record["val_loss"], 0
    else:
      wait += 1
      if wait >= patience:
        return record["epoch"]
  return None


def stop_epoch(config: ConfigDict, history: list):
  """The epoch after which the run stops early (early stopping or target reached), or None."""
  stopped = early_stop_epoch(history, config.early_stopping_patience, config.early_stopping_min_delta)
  if config.target_accuracy:
    stopped = stopped or target_epoch(history, config.target_split, config.target_accuracy)
  return stopped


# Set-up.

class Trainer(NamedTuple):
  """What set-up hands to fit and test."""
  config: ConfigDict
  workdir: str
  mesh: Any
  data: Any                    # the input pipeline: pipeline.OnDevice or pipeline.Stream
  train_step: Any
  eval_step: Any
  dropout_rng: jax.Array
  manager: Any                 # the run's orbax checkpoint manager
  writer: run.TensorBoard
  steps_per_epoch: int
  started: float               # perf_counter at the start of the run


def abstract_params(model, input_shape: tuple, name: str):
  """The model's param shapes for `input_shape`; an input it cannot take is one UserError."""
  x = jnp.zeros((1, *input_shape))
  try:
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
  except Exception as e:  # flax/jax raise several types for shape mismatches; name the cause
    detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    try:  # the usual cause: the conv base shrinks the image to nothing
      features = jax.eval_shape(lambda: model.init_with_output(
          jax.random.key(0), x, method=lambda m, x: m.features(x))[0])
      if 0 in features.shape:
        detail = f"its feature map comes out {tuple(features.shape[1:])}: the image is too small"
    except Exception:
      pass
    raise UserError(f"model {name!r} cannot take input of shape {tuple(input_shape)} ({detail}); "
                    "change config.data.image_size or the model") from None


def check(config: ConfigDict, workdir: str):
  """Every check a run can fail before reading data or compiling: (config with the model's
  resolved kwargs, mesh, data source, model, its param shapes). Raises UserError naming the
  culprit."""
  config_lib.validate(config)
  mesh = parallel.make_mesh(config.num_devices or None)
  for key in ("batch_size", "eval_batch_size"):
    value = config[key] or config.batch_size
    if value % mesh.size:
      raise UserError(f"config.{key}={value} is not divisible by the {mesh.size} devices in use; "
                      "change it or set --config.num_devices")
  source = open_source(config.data)
  if config.feature_extractor.model:  # the model trains on the frozen base's outputs
    source = transfer.feature_source(source, config.feature_extractor, config.data,
                                     os.path.join(workdir, "features"))
  config = config.copy_and_resolve_references()
  config.model_kwargs = ConfigDict(with_num_classes(config.model, config.model_kwargs, len(source.classes)))
  model = get_model(config.model, **config.model_kwargs)
  params_shape = abstract_params(model, source.image_shape, config.model)
  run.check_identity(workdir, config)
  return config, mesh, source, model, params_shape


def load_data(config: ConfigDict, workdir: str, mesh, source) -> tuple:
  """(input pipeline, steps per epoch): on the devices (splits read, folders decoded, put
  there) or streamed, as pipeline.choose decides. The workdir becomes this config's run
  once the data is known to fit it."""
  kind = pipeline.choose(config.data, source, mesh)
  splits = source.splits(stream=kind == "stream")
  n_train = splits["train"].size
  steps_per_epoch = config.steps_per_epoch or n_train // config.batch_size
  if steps_per_epoch == 0:
    raise UserError(f"config.batch_size={config.batch_size} exceeds the {n_train} training "
                    "examples; lower it or set steps_per_epoch")
  run.claim(workdir, config)
  logging.info("mesh: %d x %s over %d process(es); splits: %s", mesh.size,
               mesh.devices.flat[0].device_kind, jax.process_count(),
               {k: s.spec for k, s in splits.items()})
  eval_batch = config.eval_batch_size or config.batch_size
  if kind == "stream":
    data = pipeline.Stream(splits, mesh, config.seed, config.batch_size, eval_batch, steps_per_epoch,
                           source.image_shape, fit_for(config.data), config.data.workers, config.data.prefetch)
  else:
    data = pipeline.OnDevice(splits, mesh, config.seed, config.batch_size, eval_batch, steps_per_epoch)
  return data, steps_per_epoch


def start_state(config: ConfigDict, workdir: str, mesh, model, input_shape: tuple, tx, manager):
  """(state, dropout rng, history): restored from the latest checkpoint, else fresh from
  config.pretrained / config.init_from or the seed."""
  repl = parallel.replicated(mesh)

  def init(seed):
    init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
    return create_train_state(model, tx, input_shape, init_rng), dropout_rng

  state, dropout_rng = jax.jit(init, static_argnums=0, out_shardings=repl)(config.seed)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.txt"), "w") as f:
      f.write(summary(model, input_shape, name=config.model, trainable=config.trainable or None))
  restored = run.restore_latest(manager, run.abstract(state, repl))
  if restored:
    epoch, state, history = restored
    logging.info("resumed from the checkpoint of epoch %d", epoch)
    run.write_history(workdir, history)  # history.json may be ahead of the checkpoint after a kill
    return state, dropout_rng, history
  if config.pretrained.weights or config.init_from:
    params, model_state = starting_params(config, state.params, state.model_state)
    state = jax.jit(lambda p, s: create_from(state.step, p, s, tx), out_shardings=repl)(params, model_state)
  return state, dropout_rng, []


def set_up(config: ConfigDict, workdir: str, started: float):
  """(Trainer, state, history) for the configured run in `workdir`, new or resumed."""
  config, mesh, source, model, params_shape = check(config, workdir)
  data, steps_per_epoch = load_data(config, workdir, mesh, source)
  tx = make_optimizer(config, steps_per_epoch, params_shape)
  manager = run.checkpoint_manager(workdir)
  state, dropout_rng, history = start_state(config, workdir, mesh, model, source.image_shape, tx, manager)
  prepare = (input_transform(config.data.rescale, config.data.preprocess)
             if not config.feature_extractor.model else lambda x: x)
  train_step, eval_step = jit_steps(model, tx, prepare, mesh, augment_lib.from_config(config.augment),
                                    data.take)
  writer = run.TensorBoard(workdir)
  trainer = Trainer(config, workdir, mesh, data, train_step, eval_step, dropout_rng, manager, writer,
                    steps_per_epoch, started)
  return trainer, state, history


# Fit.

# Steps the host dispatches ahead of the devices. Bounded: XLA:CPU deadlocks (a collective's
# rendezvous times out and aborts the process) once about 32 programs with collectives are
# in flight per device, which 8 host-platform devices reach within an epoch; on accelerators
# a few steps ahead are all that async dispatch needs.
MAX_IN_FLIGHT = 8


class InFlight:
  """Outputs of dispatched steps; holding more than MAX_IN_FLIGHT waits for the oldest."""

  def __init__(self):
    self.outputs = collections.deque()

  def add(self, output) -> None:
    self.outputs.append(output)
    if len(self.outputs) > MAX_IN_FLIGHT:
      jax.block_until_ready(self.outputs.popleft())


def _metric_record(prefix: str, sums: dict) -> dict:
  sums = jax.device_get(sums)
  count = float(sums["count"])
  return {f"{prefix}_loss": float(sums["loss_sum"]) / count,
          f"{prefix}_accuracy": float(sums["correct"]) / count}


def evaluate(t: Trainer, state, split: str) -> dict:
  """Metric sums of `state` over every row of `split` (asynchronous: nothing is read back)."""
  sums, in_flight = parallel.put_replicated_tree(t.mesh, zero_metrics()), InFlight()
  for feed in t.data.eval_batches(split):
    sums = t.eval_step(state, feed, sums)
    in_flight.add(sums)
  return sums


def train_epoch(t: Trainer, state, epoch: int) -> tuple:
  """(state, record) after training epoch `epoch` and evaluating it."""
  t0 = time.perf_counter()
  sums, in_flight = parallel.put_replicated_tree(t.mesh, zero_metrics()), InFlight()
  for feed in t.data.train_batches(epoch):
    state, sums = t.train_step(state, feed, t.dropout_rng, sums)
    in_flight.add(sums)
  record = {"epoch": epoch, **_metric_record("train", sums)}
  train_seconds = time.perf_counter() - t0
  record.update(_metric_record("val", evaluate(t, state, "validation")))
  if t.config.target_accuracy and t.config.target_split == "test":
    record.update(_metric_record("test", evaluate(t, state, "test")))
  record["seconds"] = time.perf_counter() - t0
  if t.config.target_accuracy:  # since this process started the run: resumed runs count from their restart
    record["wall_seconds"] = time.perf_counter() - t.started
  left = (t.config.num_epochs - epoch) * record["seconds"]
  logging.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | "
               "%.1f steps/s | %.1fs | ~%.0fs left", epoch, t.config.num_epochs,
               record["train_loss"], record["train_accuracy"], record["val_loss"],
               record["val_accuracy"], t.steps_per_epoch / train_seconds, record["seconds"], left)
  return state, record


def fit(t: Trainer, state, history: list) -> tuple:
  """(state, history) after the epochs left, each checkpointed and recorded as it ends."""
  config = t.config
  for epoch in range(len(history) + 1, config.num_epochs + 1):
    if stop_epoch(config, history):
      break
    state, record = train_epoch(t, state, epoch)
    history = history + [record]
    run.save(t.manager, epoch, state, history)
    run.write_history(t.workdir, history)
    if jax.process_index() == 0:
      learning_curves(history, os.path.join(t.workdir, "plots", "learning_curves.png"),
                      config.plot_smoothing, title=config.model)
    t.writer.write_scalars(epoch, {k: v for k, v in record.items() if k != "epoch"})
  stopped = early_stop_epoch(history, config.early_stopping_patience, config.early_stopping_min_delta)
  if stopped:
    logging.info("early stopping at epoch %d: val_loss improved by no more than %g in %d epochs",
                 stopped, config.early_stopping_min_delta, config.early_stopping_patience)
  reached = config.target_accuracy and target_epoch(history, config.target_split, config.target_accuracy)
  if reached:
    record = next(r for r in history if r.get("epoch") == reached)
    logging.info("time to accuracy: %s accuracy %.4f >= %g at epoch %d, %.1f s after start "
                 "(data loading and compilation included)", config.target_split,
                 record[_accuracy_key(config.target_split)], config.target_accuracy, reached,
                 record["wall_seconds"])
  return state, history


# Final test.

def params_checksum(params) -> str:
  """SHA-256 of this process's copy of the params: equal on every process of a healthy run."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
  return digest.hexdigest()[:16]


def test_weights(t: Trainer, state, history: list) -> tuple:
  """(epoch, state) whose weights the test evaluates: the last epoch's, or with
  config.test_weights='best' the kept checkpoint of highest val_accuracy."""
  last = history[-1]["epoch"] if history else 0
  if t.config.test_weights != "best" or not history:
    return last, state
  best = run.best_epoch(t.manager, history)
  if best != last:
    _, state, _ = run.restore(t.manager, best, run.abstract(state, parallel.replicated(t.mesh)))
  logging.info("test with the weights of epoch %d (best val_accuracy %.4f)", best,
               next(r["val_accuracy"] for r in history if r.get("epoch") == best))
  return best, state


def final_test(t: Trainer, state, history: list, test_epoch: int) -> list:
  """history with the test record appended (and written), when the run has a test split."""
  if "test" not in t.data.sizes:
    return history
  test = {**_metric_record("test", evaluate(t, state, "test")), "test_epoch": test_epoch}
  t.writer.write_scalars(test_epoch, test)
  logging.info("test loss %.4f acc %.4f (weights of epoch %d)", test["test_loss"], test["test_accuracy"],
               test_epoch)
  history = history + [test]
  run.write_history(t.workdir, history)
  return history


def train_and_evaluate(config: ConfigDict, workdir: str) -> list:
  """Trains (or resumes) the configured run in `workdir` and returns its history."""
  started = time.perf_counter()
  t, state, history = set_up(config, workdir, started)
  test_epoch: Optional[int] = None
  try:
    state, history = fit(t, state, history)
    if jax.process_count() > 1:
      logging.info("process %d params checksum %s", jax.process_index(), params_checksum(state.params))
    if "test" in t.data.sizes:
      test_epoch, state = test_weights(t, state, history)
  finally:
    t.manager.close()  # waits for a checkpoint still being written, also on Ctrl-C
    t.data.close()
    t.writer.flush()
  history = final_test(t, state, history, test_epoch)
  t.writer.close()
  return history
