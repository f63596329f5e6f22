"""A run on disk: its files, its identity, its history, its checkpoints, and `load_run`.

  <workdir>/config.json    the resolved config (model_kwargs include num_classes)
            history.json   one record per epoch, then the test record
            summary.txt, plots/, tensorboard/, features/
            checkpoints/<step>/   orbax, by train steps taken: the latest (for resume) and the
                                  best epoch-end one by val_accuracy

A checkpoint holds the train state, the history of the epochs completed and the
running metric sums of the epoch in progress, so a run resumed from it (mid-epoch
too) rewrites history.json consistently whatever was killed when.
Everything that reads a run (the trainer resuming it, init_from, visualisation,
benchmarks) goes through this module: `load_run(workdir)` is the one reader.
"""
import json
import os
import shutil
from typing import NamedTuple

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from ml_collections import ConfigDict
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from convjax import config as config_lib
from convjax.errors import UserError
from convjax.models import get_model, with_num_classes

# What a run owns in its workdir; `overwrite` removes exactly these.
RUN_FILES = ("config.json", "history.json", "summary.txt", "checkpoints", "plots", "tensorboard",
             "features")


def write_json(path: str, value) -> None:
  """Atomic: a reader (or a kill) never sees half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def check_identity(workdir: str, config: ConfigDict) -> list:
  """The fields in which the run in `workdir` differs from `config` ([] for none or no run).

  Read-only and cheap: set-up calls it before reading any data. A difference is
  a UserError unless config.overwrite.
  """
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    diff = config_lib.differences(config_lib.read_stored(config_path), config_lib.to_dict(config))
  elif os.path.exists(os.path.join(workdir, "checkpoints")):
    diff = ["<no config.json beside checkpoints/>"]
  else:
    diff = []
  if diff and not config.overwrite:
    raise UserError(f"{workdir} holds a run of a different config (differs in: {', '.join(diff)}); "
                    "use another --workdir, or --config.overwrite=True to replace that run")
  return diff


def claim(workdir: str, config: ConfigDict) -> None:
  """Makes `workdir` this config's run: removes another config's run files (checked to be
  allowed by check_identity), writes config.json. Process 0 writes; all call it."""
  replace = check_identity(workdir, config)
  if jax.process_index() == 0:
    if replace:  # overwrite=True: remove the old run, nothing else in the workdir
      for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.exists(path):
          os.remove(path)
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))


def write_history(workdir: str, history: list) -> None:
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "history.json"), history)


class TensorBoard:
  """Scalars for TensorBoard in <workdir>/tensorboard (process 0; elsewhere nothing).

  Written through tensorboardX's event-file writer, which needs no TensorFlow (clu's
  SummaryWriter writes through tf.summary, so it cannot run where TensorFlow is absent).
  """

  def __init__(self, workdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

  def write_scalars(self, step: int, scalars: dict) -> None:
    if self._writer:
      for name, value in scalars.items():
        self._writer.add_scalar(name, float(value), step)

  def flush(self) -> None:
    if self._writer:
      self._writer.flush()

  def close(self) -> None:
    if self._writer:
      self._writer.close()


# Checkpoints.

class Restored(NamedTuple):
  step: int            # train steps taken (the checkpoint's orbax step)
  state: object        # TrainState
  history: list        # the records of the epochs completed
  sums: object         # the train metric sums of the epoch in progress (zeros at an epoch's end)


def _val_accuracy(metrics) -> float:
  return metrics["val_accuracy"]


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  """The orbax manager of <workdir>/checkpoints/<step>/ (step: train steps taken): keeps the
  latest checkpoint and the best epoch-end one by val_accuracy, also across resumes (the
  metric is stored with each epoch-end checkpoint; mid-epoch ones have none)."""
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=1),
      pp.BestN(get_metric_fn=_val_accuracy, n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_val_accuracy, best_mode="max",
                                         create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, history: list, sums, epoch_end: bool) -> None:
  """Saves the state after `step` train steps, the history of the epochs completed and the
  running train sums of the epoch in progress; an epoch-end checkpoint carries its val_accuracy."""
  progress = {"step": step, "epochs": len(history), "epoch_end": epoch_end}
  metrics = {"val_accuracy": history[-1]["val_accuracy"], "epoch": len(history)} if epoch_end else None
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), sums=ocp.args.StandardSave(sums),
      history=ocp.args.JsonSave(history), progress=ocp.args.JsonSave(progress)), metrics=metrics)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, abstract_sums):
  """Restored from the latest checkpoint, or None when there is none.

  abstract_state/abstract_sums: ShapeDtypeStructs with shardings; the restored arrays
  get them, whatever device count wrote the checkpoint.
  """
  step = manager.latest_step()
  return None if step is None else restore(manager, step, abstract_state, abstract_sums)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, abstract_sums) -> Restored:
  """The checkpoint of `step`. One written before the running sums were saved restores zeros."""
  has_sums = os.path.isdir(os.path.join(str(manager.directory), str(step), "sums"))
  items = {"state": ocp.args.StandardRestore(abstract_state), "history": ocp.args.JsonRestore()}
  if has_sums:
    items["sums"] = ocp.args.StandardRestore(abstract_sums)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  sums = restored["sums"] if has_sums else None
  return Restored(step, restored["state"], list(restored["history"]), sums)


def best_checkpoint(manager: ocp.CheckpointManager) -> tuple:
  """(step, epoch) of the kept epoch-end checkpoint of highest val_accuracy (the earliest of
  equals), or None."""
  scored = [(m["val_accuracy"], -m["epoch"], step) for step in manager.all_steps()
            if (m := manager.metrics(step)) is not None]
  if not scored:
    return None
  _, neg_epoch, step = max(scored)
  return step, -neg_epoch


def checkpoints(workdir: str) -> dict:
  """{step: progress} of the run's committed checkpoints; progress is {'step', 'epochs' (epochs
  completed), 'epoch_end'}, or {} for a checkpoint from before it was recorded."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  out = {}
  for step in (ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []):
    path = os.path.join(directory, str(step), "progress", "metadata")
    try:
      with open(path) as f:
        out[step] = json.load(f)
    except (OSError, json.JSONDecodeError):
      out[step] = {}
  return dict(sorted(out.items()))


def abstract(state, sharding):
  """ShapeDtypeStructs of `state` placed with `sharding`: what restore fills in."""
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def read_state(path: str):
  """The train state saved at `path` (<run>/checkpoints/<step>/state) as stored, on one
  local device, whatever model, optimizer or device count wrote it."""
  # The item's tree metadata, from its handler: the checkpointer's metadata() would also
  # look for step metadata, which lives one level up (<step>/), and warn.
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, target)


# Reading a run.

def read_config(workdir: str) -> ConfigDict:
  """The run's config.json as a ConfigDict (fields it predates take their defaults)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir!r} has no config.json: not a training run")
  return config_lib.from_stored(config_lib.read_stored(path))


def latest_variables(workdir: str, what: str = "config.init_from") -> tuple:
  """(step, {'params': ..., **model_state}) of the run's latest checkpoint, as numpy; the
  params are the EMA where the run kept one (what it evaluated)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []  # finalized only
  if not steps:
    raise UserError(f"{what}={workdir!r} has no checkpoints")
  path = os.path.join(directory, str(max(steps)), "state")
  state = read_state(path)
  logging.info("read %s (step %d)", path, max(steps))
  params = state.get("ema_params") or state["params"]
  return max(steps), jax.device_get({"params": params, **(state["model_state"] or {})})


def model_of(config: ConfigDict):
  """The run's model as it trained: its config's model and model_kwargs (num_classes
  included; a run of an earlier convjax that did not record it takes its dataset's)."""
  kwargs = dict(config.model_kwargs)
  if "num_classes" not in kwargs:
    from convjax.data.splits import open_source
    kwargs = with_num_classes(config.model, kwargs, len(open_source(config.data).classes))
  return get_model(config.model, **kwargs)


def load_run(workdir: str):
  """(model, variables, config) of the run in `workdir`: the model it trained, the variables
  of its latest checkpoint (params and e.g. BatchNorm statistics) and its config."""
  config = read_config(workdir)
  _, variables = latest_variables(workdir, "workdir")
  return model_of(config), variables, config
