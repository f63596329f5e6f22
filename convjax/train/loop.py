"""`train_and_evaluate(config, workdir)`: data -> model -> jitted steps -> checkpoints, history, plots.

Every split lives on the devices as uint8 rows sharded over the mesh. An epoch
is a table of global row indices drawn on the host from (seed, epoch), so the
data order depends on nothing else: not on device or process count, and not
on whether the run was interrupted. Each step is three asynchronous dispatches
(gather, step, metric sum); the host waits once per epoch.
"""
import hashlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers
from ml_collections import ConfigDict

from convjax.data.splits import Split, open_splits
from convjax.errors import UserError
from convjax.models import get_model
from convjax.models.summary import summary
from convjax.pretrained import transfer
from convjax.train import checkpoint, parallel
from convjax.train import config as config_lib
from convjax.train.optim import make_optimizer
from convjax.train.state import TrainState, create_train_state
from convjax.train.steps import make_eval_step, make_train_step
from convjax.viz.plots import learning_curves

# What a run owns in its workdir; `overwrite` removes exactly these.
RUN_FILES = ("config.json", "history.json", "summary.txt", "checkpoints", "plots", "tensorboard",
             "features")


def train_index_table(seed: int, epoch: int, steps: int, batch: int, n: int) -> np.ndarray:
  """(steps, batch) row indices for training epoch `epoch` (1-based).

  The examples form an endless stream of permutations, one per pass over the
  data drawn from (seed, pass); epoch e takes the next steps*batch of them, so
  steps_per_epoch may be more or less than one pass.
  """
  start = (epoch - 1) * steps * batch
  positions = np.arange(start, start + steps * batch, dtype=np.int64)
  passes = positions // n
  out = np.empty_like(positions)
  for p in np.unique(passes):
    perm = np.random.default_rng([seed, int(p)]).permutation(n)
    sel = passes == p
    out[sel] = perm[positions[sel] % n]
  return out.reshape(steps, batch).astype(np.int32)


def _accuracy_key(split: str) -> str:
  return "val_accuracy" if split == "validation" else f"{split}_accuracy"


def target_epoch(history: list, split: str, accuracy: float):
  """The first epoch whose `split` accuracy reached `accuracy` (config.target_*), or None."""
  key = _accuracy_key(split)
  return next((r["epoch"] for r in history if "epoch" in r and r.get(key, -1) >= accuracy), None)


def early_stop_epoch(history: list, patience: int, min_delta: float):
  """The epoch at which Keras' EarlyStopping(monitor='val_loss') stops, or None.

  A function of the history alone, so a resumed run stops where an
  uninterrupted one would.
  """
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


def eval_index_table(n: int, batch: int) -> np.ndarray:
  """Every row once, in order; the last batch is padded with -1 (masked out)."""
  num_batches = -(-n // batch)
  idx = np.arange(num_batches * batch, dtype=np.int32)
  return np.where(idx < n, idx, -1).reshape(num_batches, batch)


def load_split(split: Split, mesh) -> dict:
  """This process's rows of a split, padded, as global arrays sharded over the mesh."""
  total = parallel.padded_rows(split.size, mesh)
  start, stop = parallel.local_row_range(mesh, total)
  local = split.read(min(start, split.size), min(stop, split.size))
  pad = (stop - start) - local["image"].shape[0]
  if pad:
    local = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in local.items()}
  return {k: parallel.put_rows(mesh, v, total) for k, v in local.items()}


def fit_num_classes(model, num_classes: int, config):
  """The model with the dataset's class count, unless model_kwargs sets num_classes.

  A model with one output (a sigmoid binary classifier) fits two classes.
  """
  current = getattr(model, "num_classes", None)
  if current is None or not num_classes or current == num_classes or (current == 1 and num_classes == 2):
    return model
  if "num_classes" in config.model_kwargs:
    if current < num_classes:
      raise UserError(f"config.model_kwargs.num_classes={current} but the dataset has "
                      f"{num_classes} classes")
    return model
  logging.info("model %s: num_classes %d -> %d, the dataset's", config.model, current, num_classes)
  return model.clone(num_classes=num_classes)


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


def jit_steps(model, tx, prepare, mesh, augment=None):
  """The train and eval steps, each one SPMD program over the whole mesh.

  State and metrics are replicated, batches sharded over 'data'; XLA inserts
  the gradient all-reduce. The state is donated: the step updates it in place.
  """
  repl, shard = parallel.replicated(mesh), parallel.sharded(mesh)
  train_step = jax.jit(make_train_step(model, tx, prepare, augment), in_shardings=(repl, shard, repl),
                       out_shardings=(repl, repl), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model, prepare), in_shardings=(repl, shard), out_shardings=repl)
  return train_step, eval_step


def create_from(step, params, model_state, tx) -> TrainState:
  """A train state starting from given params: a fresh optimizer state for them."""
  return TrainState(step=step, params=params, model_state=model_state, opt_state=tx.init(params))


def params_checksum(params) -> str:
  """SHA-256 of this process's copy of the params: equal on every process of a healthy run."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
  return digest.hexdigest()[:16]


def _write_json(path: str, value) -> None:
  """Atomic: a reader (or a kill) never sees half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def prepare_workdir(config: ConfigDict, workdir: str) -> None:
  """Refuses a workdir holding another config's run unless config.overwrite; writes config.json."""
  current = config_lib.to_dict(config)
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      try:
        stored = json.load(f)
      except json.JSONDecodeError as e:
        raise UserError(f"{config_path} is not valid JSON ({e}); fix it or set --config.overwrite=True")
    diff = config_lib.differences(stored, current)
  elif os.path.exists(os.path.join(workdir, "checkpoints")):
    diff = ["<no config.json beside checkpoints/>"]
  else:
    diff = []
  if diff and not config.overwrite:
    raise UserError(f"{workdir} holds a run of a different config (differs in: {', '.join(diff)}); "
                    "use another --workdir, or --config.overwrite=True to replace that run")
  if jax.process_index() == 0:
    if diff:  # overwrite=True: remove the old run, nothing else in the workdir
      for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.exists(path):
          os.remove(path)
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    _write_json(config_path, current)


def _metric_record(prefix: str, sums: dict) -> dict:
  sums = jax.device_get(sums)
  count = float(sums["count"])
  return {f"{prefix}_loss": float(sums["loss_sum"]) / count,
          f"{prefix}_accuracy": float(sums["correct"]) / count}


def train_and_evaluate(config: ConfigDict, workdir: str) -> list:
  """Trains (or resumes) the configured run in `workdir` and returns its history."""
  started = time.perf_counter()
  config_lib.validate(config)
  mesh = parallel.make_mesh(config.num_devices or None)
  eval_batch = config.eval_batch_size or config.batch_size
  for key, value in (("batch_size", config.batch_size), ("eval_batch_size", eval_batch)):
    if value % mesh.size:
      raise UserError(f"config.{key}={value} is not divisible by the {mesh.size} devices in use; "
                      "change it or set --config.num_devices")
  model = get_model(config.model, **config.model_kwargs)
  augment = config_lib.make_augment(config)
  sources = open_splits(config)
  model = fit_num_classes(model, len(sources["train"].classes), config)
  n_train = sources["train"].size
  steps_per_epoch = config.steps_per_epoch or n_train // config.batch_size
  if steps_per_epoch == 0:
    raise UserError(f"config.batch_size={config.batch_size} exceeds the {n_train} training "
                    "examples; lower it or set steps_per_epoch")
  input_shape = sources["train"].read(0, 1)["image"].shape[1:]
  prepare = config_lib.input_transform(config)
  if config.feature_extractor.model:  # the model trains on the frozen base's outputs
    extract, input_shape = transfer.make_extractor(config, input_shape)
    prepare = lambda x: x  # noqa: E731
  params_shape = abstract_params(model, input_shape, config.model)
  prepare_workdir(config, workdir)
  is_main = jax.process_index() == 0
  if config.feature_extractor.model:
    cache = os.path.join(workdir, "features")
    sources = {k: transfer.feature_split(k, s, extract, cache) for k, s in sources.items()}

  logging.info("mesh: %d x %s over %d process(es); splits: %s", mesh.size,
               mesh.devices.flat[0].device_kind, jax.process_count(),
               {k: r.spec for k, r in sources.items()})
  splits = {name: load_split(source, mesh) for name, source in sources.items()}

  repl = parallel.replicated(mesh)
  tx = make_optimizer(config, steps_per_epoch, params_shape)

  def init(seed):
    init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
    return create_train_state(model, tx, input_shape, init_rng), dropout_rng

  state, dropout_rng = jax.jit(init, static_argnums=0, out_shardings=repl)(config.seed)
  if is_main:
    with open(os.path.join(workdir, "summary.txt"), "w") as f:
      f.write(summary(model, input_shape, name=config.model, trainable=config.trainable or None))

  manager = checkpoint.make_manager(os.path.join(os.path.abspath(workdir), "checkpoints"))
  restored = checkpoint.restore_latest(manager, checkpoint.abstract(state, repl))
  history, start_epoch = [], 0
  if not restored and (config.pretrained.weights or config.init_from):
    params, model_state = transfer.starting_params(config, state.params, state.model_state)
    state = jax.jit(lambda p, s: create_from(state.step, p, s, tx), out_shardings=repl)(params, model_state)
  if restored:
    start_epoch, state, history = restored
    logging.info("resumed from the checkpoint of epoch %d", start_epoch)
    if is_main:  # history.json may be ahead of the checkpoint if a kill came in between
      _write_json(os.path.join(workdir, "history.json"), history)

  get_batch = parallel.make_get_batch(mesh)
  train_step, eval_step = jit_steps(model, tx, prepare, mesh, augment)
  add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))

  eval_tables = {name: parallel.put_replicated(mesh, eval_index_table(source.size, eval_batch))
                 for name, source in sources.items() if name != "train"}

  def evaluate(split):
    table = eval_tables[split]
    sums = None
    for i in range(table.shape[0]):
      metrics = eval_step(state, get_batch(splits[split], table, i))
      sums = metrics if sums is None else add(sums, metrics)
    return sums

  writer = (metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")) if is_main
            else metric_writers.MultiWriter([]))
  stop_args = (config.early_stopping_patience, config.early_stopping_min_delta)
  target = (config.target_split, config.target_accuracy) if config.target_accuracy else None
  if target and target[0] not in splits:
    raise UserError(f"config.target_split={target[0]!r}, but this run has no {target[0]} split")
  try:
    for epoch in range(start_epoch + 1, config.num_epochs + 1):
      if early_stop_epoch(history, *stop_args) or (target and target_epoch(history, *target)):
        break
      t0 = time.perf_counter()
      table = parallel.put_replicated(mesh, train_index_table(
          config.seed, epoch, steps_per_epoch, config.batch_size, n_train))
      sums = None
      for i in range(steps_per_epoch):
        state, metrics = train_step(state, get_batch(splits["train"], table, i), dropout_rng)
        sums = metrics if sums is None else add(sums, metrics)
      record = {"epoch": epoch, **_metric_record("train", sums)}
      train_seconds = time.perf_counter() - t0
      record.update(_metric_record("val", evaluate("validation")))
      if target and target[0] == "test":
        record.update(_metric_record("test", evaluate("test")))
      record["seconds"] = time.perf_counter() - t0
      if target:  # since this process started the run: resumed runs count from their restart
        record["wall_seconds"] = time.perf_counter() - started
      history.append(record)
      checkpoint.save(manager, epoch, state, history)
      if is_main:
        _write_json(os.path.join(workdir, "history.json"), history)
        learning_curves(history, os.path.join(workdir, "plots", "learning_curves.png"),
                        config.plot_smoothing, title=config.model)
      writer.write_scalars(epoch, {k: v for k, v in record.items() if k != "epoch"})
      left = (config.num_epochs - epoch) * record["seconds"]
      logging.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | "
                   "%.1f steps/s | %.1fs | ~%.0fs left", epoch, config.num_epochs,
                   record["train_loss"], record["train_accuracy"], record["val_loss"],
                   record["val_accuracy"], steps_per_epoch / train_seconds, record["seconds"], left)
    stopped = early_stop_epoch(history, *stop_args)
    if stopped:
      logging.info("early stopping at epoch %d: val_loss improved by no more than %g in %d epochs",
                   stopped, config.early_stopping_min_delta, config.early_stopping_patience)
    reached = target and target_epoch(history, *target)
    if reached:
      record = next(r for r in history if r.get("epoch") == reached)
      logging.info("time to accuracy: %s accuracy %.4f >= %g at epoch %d, %.1f s after start "
                   "(data loading and compilation included)", target[0],
                   record[_accuracy_key(target[0])], target[1], reached, record["wall_seconds"])
    if jax.process_count() > 1:
      logging.info("process %d params checksum %s", jax.process_index(), params_checksum(state.params))
    test_epoch = history[-1]["epoch"] if history else 0
    if "test" in splits and history and config.test_weights == "best":
      test_epoch = checkpoint.best_epoch(manager, history)
      if test_epoch != history[-1]["epoch"]:
        _, state, _ = checkpoint.restore(manager, test_epoch, checkpoint.abstract(state, repl))
      logging.info("test with the weights of epoch %d (best val_accuracy %.4f)", test_epoch,
                   next(r["val_accuracy"] for r in history if r.get("epoch") == test_epoch))
  finally:
    manager.close()  # waits for a checkpoint still being written, also on Ctrl-C
    writer.flush()

  if "test" in splits:
    test = {**_metric_record("test", evaluate("test")), "test_epoch": test_epoch}
    writer.write_scalars(test_epoch, test)
    history.append(test)
    logging.info("test loss %.4f acc %.4f (weights of epoch %d)", test["test_loss"],
                 test["test_accuracy"], test_epoch)
    if is_main:
      _write_json(os.path.join(workdir, "history.json"), history)
  writer.close()
  return history
