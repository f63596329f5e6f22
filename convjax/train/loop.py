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
from flax import traverse_util
from ml_collections import ConfigDict

from convjax import checkpoints, files, parallel, run
from convjax import config as config_lib
from convjax.data import augment as augment_lib
from convjax.data import pipeline
from convjax.data import tfds as tfds_data
from convjax.data.preprocess import input_transform
from convjax.data.splits import fit_for, open_source, uses_tfds
from convjax.errors import UserError
from convjax.models import RUN_ONCE, get_model, has_features, own, with_num_classes
from convjax.models.diagram import plot_model
from convjax.models.summary import summary, trainable_mask
from convjax.pretrained import transfer
from convjax.train.optim import make_optimizer
from convjax.train.progress import Interrupts, Progress, pause_point
from convjax.train.state import create_from, create_train_state, starting_params
from convjax.train.steps import NO_STEP, jit_steps, zero_metrics
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
  data: Any  # the input pipeline: pipeline.OnDevice or pipeline.Stream
  train_step: Any
  eval_step: Any
  dropout_rng: jax.Array
  manager: Any  # the run's orbax checkpoint manager
  writer: run.TensorBoard
  steps_per_epoch: int
  schedule: Any  # optimizer step -> learning rate
  started: float  # perf_counter at the start of the run
  curves: dict  # {'drawn': perf_counter of the last draw, 'history': the history not drawn yet}


def abstract_params(model, input_shape: tuple, name: str):
  """The model's param shapes for `input_shape`; an input it cannot take is one UserError.
  Nothing is computed or compiled: the image and the key are abstract too."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  try:
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
  except Exception as e:  # flax/jax raise several types for shape mismatches; name the cause
    detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    try:  # the usual cause: the conv base shrinks the image to nothing
      features = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, method=lambda m, x: m.features(x))[0], x
      )
      if 0 in features.shape:
        detail = f"its feature map comes out {tuple(features.shape[1:])}: the image is too small"
    except Exception:
      pass
    raise UserError(
      f"model {name!r} cannot take input of shape {tuple(input_shape)} ({detail}); "
      "change config.data.image_size or the model"
    ) from None


def check(config: ConfigDict, workdir: str):
  """Every check a run can fail before reading data or compiling: (config with the model's
  resolved kwargs, mesh, data source, model, its param shapes). Raises UserError naming the
  culprit."""
  config_lib.validate(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is a file, not a directory")
  mesh = parallel.make_mesh(config.num_devices or None)
  for key in ("batch_size", "eval_batch_size"):
    value = config[key] or config.batch_size
    if value % mesh.size:
      raise UserError(
        f"config.{key}={value} is not divisible by the {mesh.size} devices in use; "
        "change it or set --config.num_devices"
      )
  config = config.copy_and_resolve_references()
  config.model = own.absolute(config.model)
  if uses_tfds(config.data):
    config.data.data_dir = tfds_data.run_data_dir(config.data.data_dir)
  source = open_source(config.data)
  if config.feature_extractor.model:  # the model trains on the frozen base's outputs
    base = transfer.base_model(config.feature_extractor)
    if not has_features(base, source.image_shape):
      raise UserError(
        f"config.feature_extractor.model={config.feature_extractor.model!r} has no `features`: feature "
        "extraction runs a model's features(x) (see the model contract in convjax/models/__init__.py)"
      )
    source = transfer.feature_source(source, config.feature_extractor, config.data, os.path.join(workdir, "features"))
  config.model_kwargs = ConfigDict(with_num_classes(config.model, config.model_kwargs, len(source.classes)))
  model = get_model(config.model, **config.model_kwargs)
  params_shape = abstract_params(model, source.image_shape, config.model)
  run.check_identity(workdir, config)
  own.warn_if_changed(workdir, config.model)
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
    raise UserError(
      f"config.batch_size={config.batch_size} exceeds the {n_train} training examples; lower it or set steps_per_epoch"
    )
  run.claim(workdir, config)
  logging.info(
    "mesh: %d x %s over %d process(es); splits: %s",
    mesh.size,
    mesh.devices.flat[0].device_kind,
    jax.process_count(),
    {k: s.spec for k, s in splits.items()},
  )
  eval_batch = config.eval_batch_size or config.batch_size
  if kind == "stream":
    data = pipeline.Stream(
      splits,
      mesh,
      config.seed,
      config.batch_size,
      eval_batch,
      steps_per_epoch,
      source.image_shape,
      fit_for(config.data),
      config.data.workers,
      config.data.prefetch,
    )
  else:
    data = pipeline.OnDevice(splits, mesh, config.seed, config.batch_size, eval_batch, steps_per_epoch)
  return data, steps_per_epoch


class Start(NamedTuple):
  """Where fit begins: a fresh state, or the latest checkpoint's (mid-epoch too)."""

  state: Any
  dropout_rng: jax.Array
  history: list  # the epochs completed
  sums: Any  # train metric sums of the epoch in progress, or None
  position: int  # train steps of that epoch already taken


def start_state(
  config: ConfigDict, workdir: str, mesh, model, input_shape: tuple, tx, manager, steps_per_epoch: int
) -> Start:
  """Restored from the latest checkpoint, else fresh from config.pretrained / config.init_from
  or the seed."""
  repl = parallel.replicated(mesh)
  ema = config.ema_decay > 0

  def init(seed):
    init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
    return create_train_state(model, tx, input_shape, init_rng, ema), dropout_rng

  state, dropout_rng = jax.jit(init, static_argnums=0, out_shardings=repl, compiler_options=RUN_ONCE)(config.seed)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "summary.txt")
    files.write_text(path, summary(model, input_shape, name=config.model, trainable=config.trainable or None))
    plot_model(model, input_shape, os.path.join(workdir, "model.png"), config.model)
  restored = checkpoints.restore_latest(
    manager, checkpoints.abstract(state, repl), checkpoints.abstract(zero_metrics(), repl)
  )
  if restored:
    position = restored.step - len(restored.history) * steps_per_epoch
    if not 0 <= position <= steps_per_epoch:
      raise UserError(
        f"the latest checkpoint (step {restored.step}, {len(restored.history)} epochs) does "
        f"not fit {steps_per_epoch} steps an epoch"
      )
    where = (
      f"the end of epoch {len(restored.history)}"
      if position in (0, steps_per_epoch) and restored.history
      else f"epoch {len(restored.history) + 1}, step {position}/{steps_per_epoch}"
    )
    logging.info("resumed from the checkpoint of step %d (%s)", restored.step, where)
    run.write_history(workdir, restored.history)  # history.json may be ahead of the checkpoint after a kill
    return Start(restored.state, dropout_rng, restored.history, restored.sums if position else None, position)
  if config.pretrained.weights or config.init_from:
    params, model_state = starting_params(config, state.params, state.model_state)
    fresh = jax.jit(lambda p, s: create_from(state.step, p, s, tx, ema), out_shardings=repl, compiler_options=RUN_ONCE)
    state = fresh(params, model_state)
  return Start(state, dropout_rng, [], None, 0)


def frozen_batch_norms(config: ConfigDict, params_shape) -> list:
  """Module paths whose BatchNorm scale config.trainable freezes: they run in inference mode."""
  if not config.trainable:
    return []
  flat = traverse_util.flatten_dict(trainable_mask(params_shape, config.trainable))
  return [path[:-1] for path, trains in flat.items() if path[-1] == "scale" and not trains]


def set_up(config: ConfigDict, workdir: str, started: float):
  """(Trainer, Start) for the configured run in `workdir`, new or resumed."""
  config, mesh, source, model, params_shape = check(config, workdir)
  data, steps_per_epoch = load_data(config, workdir, mesh, source)
  tx, schedule = make_optimizer(config, steps_per_epoch, params_shape)
  manager = checkpoints.checkpoint_manager(workdir, config.keep_checkpoints)
  start = start_state(config, workdir, mesh, model, source.image_shape, tx, manager, steps_per_epoch)
  prepare = (
    input_transform(config.data.rescale, config.data.preprocess) if not config.feature_extractor.model else lambda x: x
  )
  train_step, eval_step = jit_steps(
    model,
    tx,
    prepare,
    mesh,
    augment_lib.from_config(config.augment),
    data.take,
    compute_dtype=jnp.dtype(config.compute_dtype),
    label_smoothing=config.label_smoothing,
    ema_decay=config.ema_decay,
    frozen=frozen_batch_norms(config, params_shape),
    trainable=trainable_mask(params_shape, config.trainable) if config.trainable else None,
  )
  trainer = Trainer(
    config,
    workdir,
    mesh,
    data,
    train_step,
    eval_step,
    start.dropout_rng,
    manager,
    run.TensorBoard(workdir),
    steps_per_epoch,
    schedule,
    started,
    {"drawn": started, "history": None},
  )
  return trainer, start


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
  return {f"{prefix}_loss": float(sums["loss_sum"]) / count, f"{prefix}_accuracy": float(sums["correct"]) / count}


def evaluate(t: Trainer, state, split: str) -> dict:
  """Metric sums of `state` over every row of `split` (asynchronous: nothing is read back)."""
  sums, in_flight = parallel.put_replicated_tree(t.mesh, zero_metrics(train=False)), InFlight()
  for feed in t.data.eval_batches(split):
    sums = t.eval_step(state, feed, sums)
    in_flight.add(sums)
  return sums


def check_finite(t: Trainer, sums, epoch: int) -> None:
  """One error naming the first step whose loss or gradient was not finite, if any (its update
  was not applied, so the params stay finite, but the run cannot go on); nothing is saved."""
  first = int(jax.device_get(sums["first_nonfinite"]))
  if first == int(NO_STEP):
    return
  latest = t.manager.latest_step()
  last_good = (
    f"the last good checkpoint is {os.path.join(t.workdir, 'checkpoints', str(latest))}"
    if latest is not None
    else "no checkpoint was saved before it"
  )
  raise UserError(
    f"non-finite loss or gradient at epoch {epoch}, step {first % t.steps_per_epoch + 1}/"
    f"{t.steps_per_epoch} (train step {first + 1}); {last_good}; lower config.learning_rate "
    "or set config.grad_clip_norm"
  )


def save(t: Trainer, state, history: list, sums, epoch: int, epoch_end: bool) -> str:
  """Checks the run is finite, saves a checkpoint at the state's step, returns its path. An
  epoch's checkpoint is committed before history.json lists the epoch (they never disagree);
  mid-epoch ones are written in the background."""
  check_finite(t, sums, epoch)
  step = int(jax.device_get(state.step))
  path = os.path.join(t.workdir, "checkpoints", str(step))
  if jax.process_count() == 1 and not os.path.isfile(os.path.join(t.workdir, "config.json")):
    # orbax would make the folders again: a run deleted (or moved) while it trains stops instead.
    raise UserError(f"cannot write {path}: the run's folder {t.workdir} was deleted or moved while it trained")
  with files.writing(path, name_what=True):  # not orbax's temporary folder
    checkpoints.save(t.manager, step, state, history, sums, epoch_end)
    if epoch_end:
      pause_point("checkpoint")
      t.manager.wait_until_finished()
  return path


def profile(t: Trainer, global_step: int, outputs) -> None:
  """Starts or stops the jax.profiler trace of config.profile_steps (in tensorboard/)."""
  profile_steps = tuple(t.config.profile_steps)
  if profile_steps and global_step == profile_steps[0]:
    jax.profiler.start_trace(os.path.join(t.workdir, "tensorboard"))
  elif profile_steps and global_step == profile_steps[1]:
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    logging.info("profile of steps %d-%d written to %s", *profile_steps, os.path.join(t.workdir, "tensorboard"))


def train_epoch(t: Trainer, state, epoch: int, start: Start, interrupts: Interrupts, first: bool) -> tuple:
  """(state, train sums) after training epoch `epoch` from step start.position on, with
  progress lines, checkpoints every config.checkpoint_every_steps, and a save-and-stop on
  an interrupt. first: whether it begins this process's training (its first line says so)."""
  spe, every = t.steps_per_epoch, t.config.checkpoint_every_steps
  sums = start.sums if start.sums is not None else parallel.put_replicated_tree(t.mesh, zero_metrics())
  in_flight, progress = InFlight(), Progress(t, epoch, start.position, sums, first)
  if first:
    pause_point("first_step")
  for i, feed in enumerate(t.data.train_batches(epoch, start.position), start=start.position + 1):
    global_step = (epoch - 1) * spe + i
    profile(t, global_step - 1, sums)
    state, sums = t.train_step(state, feed, t.dropout_rng, sums)
    in_flight.add(sums)
    if progress.due(i):
      check_finite(t, progress.report(i, sums), epoch)
    if interrupts.stop_at(global_step):
      where = save(t, state, start.history, sums, epoch, epoch_end=False)
      interrupts.stop(global_step, epoch, i, spe, where)
    if every and global_step % every == 0 and i < spe:
      save(t, state, start.history, sums, epoch, epoch_end=False)
  return state, sums


def fit(t: Trainer, start: Start, interrupts: Interrupts) -> tuple:
  """(state, history) after the epochs left, each checkpointed and recorded as it ends."""
  config, state, history = t.config, start.state, start.history
  for epoch in range(len(history) + 1, config.num_epochs + 1):
    if stop_epoch(config, history):
      break
    t0 = time.perf_counter()
    first = epoch == len(start.history) + 1
    state, sums = train_epoch(t, state, epoch, start._replace(history=history), interrupts, first)
    start = start._replace(sums=None, position=0)
    record = {"epoch": epoch, **_metric_record("train", sums)}
    train_seconds = time.perf_counter() - t0
    pause_point("evaluate")
    record.update(_metric_record("val", evaluate(t, state, "validation")))
    if config.target_accuracy and config.target_split == "test":
      record.update(_metric_record("test", evaluate(t, state, "test")))
    record["seconds"] = time.perf_counter() - t0
    if config.target_accuracy:  # since this process started the run: resumed runs count from their restart
      record["wall_seconds"] = time.perf_counter() - t.started
    history = history + [record]
    path = save(t, state, history, sums, epoch, epoch_end=True)
    end_epoch(t, history, record, train_seconds)
    interrupts.stop_after(
      f"during epoch {epoch}'s evaluation or checkpoint",
      f"saved {path} (the end of epoch {epoch}): rerun the same command to resume",
    )
  return state, history


# The learning curves are redrawn at most this often during a run, and when its epochs end:
# a draw costs ~0.3 s (matplotlib), which epochs of a second or two would feel.
CURVES_EVERY_SECONDS = 30.0


def draw_curves(t: Trainer) -> None:
  """plots/learning_curves.png of the history not drawn yet, if any (process 0 draws)."""
  history, t.curves["history"] = t.curves["history"], None
  t.curves["drawn"] = time.perf_counter()
  if history and jax.process_index() == 0:
    plot = os.path.join(t.workdir, "plots", "learning_curves.png")
    learning_curves(history, plot, t.config.plot_smoothing, title=t.config.model)


def end_epoch(t: Trainer, history: list, record: dict, train_seconds: float) -> None:
  """history.json, the learning curves (CURVES_EVERY_SECONDS), TensorBoard and the epoch's line."""
  config, epoch = t.config, record["epoch"]
  run.write_history(t.workdir, history)
  t.curves["history"] = history
  if time.perf_counter() - t.curves["drawn"] >= CURVES_EVERY_SECONDS:
    draw_curves(t)
  t.writer.write_scalars(epoch * t.steps_per_epoch, {k: v for k, v in record.items() if k != "epoch"})
  left = (config.num_epochs - epoch) * record["seconds"]
  logging.info(
    "epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f steps/s | %.1fs | ~%.0fs left",
    epoch,
    config.num_epochs,
    record["train_loss"],
    record["train_accuracy"],
    record["val_loss"],
    record["val_accuracy"],
    t.steps_per_epoch / train_seconds,
    record["seconds"],
    left,
  )


def log_stop(config: ConfigDict, history: list) -> None:
  """Says why the run stopped before num_epochs, if it did."""
  stopped = early_stop_epoch(history, config.early_stopping_patience, config.early_stopping_min_delta)
  if stopped:
    logging.info(
      "early stopping at epoch %d: val_loss improved by no more than %g in %d epochs",
      stopped,
      config.early_stopping_min_delta,
      config.early_stopping_patience,
    )
  reached = config.target_accuracy and target_epoch(history, config.target_split, config.target_accuracy)
  if reached:
    record = next(r for r in history if r.get("epoch") == reached)
    logging.info(
      "time to accuracy: %s accuracy %.4f >= %g at epoch %d, %.1f s after start "
      "(data loading and compilation included)",
      config.target_split,
      record[_accuracy_key(config.target_split)],
      config.target_accuracy,
      reached,
      record["wall_seconds"],
    )


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
  best = checkpoints.best_checkpoint(t.manager) if t.config.test_weights == "best" and history else None
  if best is None:
    return last, state
  step, epoch = best
  if epoch != last:
    repl = parallel.replicated(t.mesh)
    state = checkpoints.restore(
      t.manager, step, checkpoints.abstract(state, repl), checkpoints.abstract(zero_metrics(), repl)
    ).state
  logging.info(
    "test with the weights of epoch %d (best val_accuracy %.4f)",
    epoch,
    next(r["val_accuracy"] for r in history if r.get("epoch") == epoch),
  )
  return epoch, state


def final_test(t: Trainer, state, history: list, test_epoch: int) -> list:
  """history with the test record appended (and written), when the run has a test split."""
  if "test" not in t.data.sizes:
    return history
  pause_point("final_test")
  test = {**_metric_record("test", evaluate(t, state, "test")), "test_epoch": test_epoch}
  # On the one step axis of the train and validation scalars: the step of the weights tested.
  t.writer.write_scalars(test_epoch * t.steps_per_epoch, {k: v for k, v in test.items() if k != "test_epoch"})
  logging.info("test loss %.4f acc %.4f (weights of epoch %d)", test["test_loss"], test["test_accuracy"], test_epoch)
  history = history + [test]
  run.write_history(t.workdir, history)
  return history


def train_and_evaluate(config: ConfigDict, workdir: str) -> list:
  """Trains (or resumes) the configured run in `workdir` and returns its history."""
  started = time.perf_counter()
  with Interrupts() as interrupts:  # SIGTERM/SIGINT: each phase ends, then one line and 128 + the signal
    t, start = set_up(config, workdir, started)
    test_epoch: Optional[int] = None
    completed = False
    try:
      pause_point("set_up")
      interrupts.stop_after(
        "while the run was set up (data read, state made or restored)",
        "nothing was trained since the last checkpoint: rerun the same command to resume",
      )
      state, history = fit(t, start, interrupts)
      draw_curves(t)
      log_stop(t.config, history)
      if jax.process_count() > 1:
        logging.info("process %d params checksum %s", jax.process_index(), params_checksum(state.params))
      if "test" in t.data.sizes:
        test_epoch, state = test_weights(t, state, history)
      completed = True
    finally:
      t.data.close()
      try:
        with files.writing(os.path.join(workdir, "checkpoints")):
          t.manager.close()  # waits for a checkpoint still being written, also on Ctrl-C
      except UserError:
        if completed:  # else the error on its way out already names what failed first
          raise
    history = final_test(t, state, history, test_epoch)
    interrupts.stop_after("during the final test", "its record is in history.json: the run is complete")
  return history
