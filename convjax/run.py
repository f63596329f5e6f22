"""A run on disk: its files, its identity, its history, its checkpoints, and `load_run`.

  <workdir>/config.json    the resolved config (model_kwargs include num_classes)
            history.json   one record per epoch, then the test record
            summary.txt, model.png, plots/, tensorboard/, features/, eval/ (experiments.evaluate)
            checkpoints/<step>/   orbax, by train steps taken: the latest (for resume) and the
                                  best epoch-end one by val_accuracy, each with its digest

A checkpoint holds the train state, the history of the epochs completed and the
running metric sums of the epoch in progress, so a run resumed from it (mid-epoch
too) rewrites history.json consistently whatever was killed when.
Everything that reads a run (the trainer resuming it, init_from, visualisation,
predict, evaluate, export) goes through this module: `read_run(workdir, weights)` is the one
reader of a trained run, and verifies what it reads.
"""

import contextlib
import errno
import gc
import hashlib
import json
import logging as py_logging
import os
import shutil
import sys
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from ml_collections import ConfigDict
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from convjax import config as config_lib
from convjax.errors import UserError
from convjax.models import factory_of, get_model, how_named, own, with_num_classes

# What a run owns in its workdir; `overwrite` removes exactly these.
RUN_FILES = (
  "config.json",
  "history.json",
  "summary.txt",
  "model.png",
  "checkpoints",
  "plots",
  "tensorboard",
  "features",
  "eval",
  "model_source",
)


_CAUSES = {
  errno.ENOSPC: "the disk is full",
  errno.EDQUOT: "the disk quota is exceeded",
  errno.EROFS: "the file system is read-only",
  errno.EACCES: "permission denied",
  errno.EPERM: "permission denied",
  errno.ENOTDIR: "a part of the path is a file, not a directory",
  errno.EISDIR: "it is a directory",
  errno.ENOENT: "a directory on the way does not exist",
}


@contextlib.contextmanager
def writing(what: str):
  """Turns a failed write of `what` (a path) into one UserError naming the path and the cause:
  OSError, and orbax's own errors for a full or read-only disk (tensorstore reports them as text)."""
  try:
    yield
  except OSError as e:
    cause = _CAUSES.get(e.errno, e.strerror or type(e).__name__)
    raise UserError(f"cannot write {e.filename or what}: {cause}") from None
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types; only known causes are caught)
    text = str(e)
    for marker, cause in (
      ("No space left", "the disk is full"),
      ("RESOURCE_EXHAUSTED", "the disk is full"),
      ("Read-only file system", "the file system is read-only"),
      ("Permission denied", "permission denied"),
    ):
      if marker in text:
        raise UserError(f"cannot write {what}: {cause}") from None
    raise


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
    raise UserError(
      f"{workdir} holds a run of a different config (differs in: {', '.join(diff)}); "
      "use another --workdir, or --config.overwrite=True to replace that run"
    )
  return diff


def claim(workdir: str, config: ConfigDict) -> None:
  """Makes `workdir` this config's run: removes another config's run files (checked to be
  allowed by check_identity), writes config.json. Process 0 writes; all call it."""
  replace = check_identity(workdir, config)
  if jax.process_index() == 0:
    with writing(workdir):
      if replace:  # overwrite=True: remove the old run, nothing else in the workdir
        for name in RUN_FILES:
          path = os.path.join(workdir, name)
          if os.path.isdir(path):
            shutil.rmtree(path)
          elif os.path.exists(path):
            os.remove(path)
      os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
      write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))
    own.write_record(workdir, own.record(config.model, factory_of(config.model), how_named(config.model)))


def write_history(workdir: str, history: list) -> None:
  if jax.process_index() == 0:
    path = os.path.join(workdir, "history.json")
    with writing(path):
      write_json(path, history)


class TensorBoard:
  """Scalars for TensorBoard in <workdir>/tensorboard (process 0; elsewhere nothing).

  Written through tensorboardX's event-file writer, which needs no TensorFlow (clu's
  SummaryWriter writes through tf.summary, so it cannot run where TensorFlow is absent).
  """

  def __init__(self, workdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter

      path = os.path.join(workdir, "tensorboard")
      with writing(path):
        self._writer = SummaryWriter(path, flush_secs=30)

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
  step: int  # train steps taken (the checkpoint's orbax step)
  state: object  # TrainState
  history: list  # the records of the epochs completed
  sums: object  # the train metric sums of the epoch in progress (zeros at an epoch's end)


def _val_accuracy(metrics) -> float:
  return metrics["val_accuracy"]


def checkpoint_manager(workdir: str, keep: int = 1) -> ocp.CheckpointManager:
  """The orbax manager of <workdir>/checkpoints/<step>/ (step: train steps taken): keeps the
  latest `keep` checkpoints and the best epoch-end one by val_accuracy, also across resumes
  (the metric is stored with each epoch-end checkpoint; mid-epoch ones have none)."""
  policy = pp.AnyPreservationPolicy(
    [
      pp.LatestN(n=keep),
      pp.BestN(get_metric_fn=_val_accuracy, n=1, keep_checkpoints_without_metrics=False),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=policy, best_fn=_val_accuracy, best_mode="max", create=True
  )
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  _repair_metrics(directory)
  with writing(directory):
    return ocp.CheckpointManager(directory, options=options)


def _repair_metrics(directory: str) -> None:
  """Rewrites a checkpoint's unreadable metrics file (orbax reads them all when it opens the
  directory, and fails on one) from the history saved with it; without one, removes it (the
  checkpoint then only counts as a latest one)."""
  for step in ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []:
    path = os.path.join(directory, str(step), "metrics", "metrics")
    try:
      with open(path) as f:
        json.load(f)
      continue
    except FileNotFoundError:
      continue
    except (OSError, json.JSONDecodeError):
      pass
    try:
      with open(os.path.join(directory, str(step), "history", "metadata")) as f:
        history = json.load(f)
      with open(os.path.join(directory, str(step), "progress", "metadata")) as f:
        epoch_end = json.load(f)["epoch_end"]
      metrics = {"val_accuracy": history[-1]["val_accuracy"], "epoch": len(history)} if epoch_end else None
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError):
      metrics = None
    with writing(path):
      if metrics is None:
        os.remove(path)
      else:
        write_json(path, metrics)
    logging.warning(
      "checkpoint %s had an unreadable metrics file: %s",
      os.path.dirname(os.path.dirname(path)),
      "rewritten from its history" if metrics else "removed (it now counts only as a latest one)",
    )


def tree_digest(tree) -> dict:
  """{leaf path: SHA-256 of its dtype, shape and bytes}, from this process's copy of each leaf
  (the state is replicated: every process holds all of it)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    host = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    digest = hashlib.sha256(f"{host.dtype}{host.shape}".encode())
    digest.update(np.ascontiguousarray(host).tobytes())
    out[jax.tree_util.keystr(path)] = digest.hexdigest()
  return out


def save(manager: ocp.CheckpointManager, step: int, state, history: list, sums, epoch_end: bool) -> None:
  """Saves the state after `step` train steps, the history of the epochs completed, the running
  train sums of the epoch in progress and a digest of every array (checked on restore); an
  epoch-end checkpoint carries its val_accuracy. Asynchronous: manager.wait_until_finished()."""
  progress = {"step": step, "epochs": len(history), "epoch_end": epoch_end}
  metrics = {"val_accuracy": history[-1]["val_accuracy"], "epoch": len(history)} if epoch_end else None
  digest = {"state": tree_digest(state), "sums": tree_digest(sums), "history": _json_digest(history)}
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      sums=ocp.args.StandardSave(sums),
      history=ocp.args.JsonSave(history),
      progress=ocp.args.JsonSave(progress),
      digest=ocp.args.JsonSave(digest),
    ),
    metrics=metrics,
  )


def _json_digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class Damaged(Exception):
  """A checkpoint that cannot be restored as written: its message says what is wrong."""


def _first_line(error: BaseException) -> str:
  """The cause of an exception in one line: the innermost of its chain (tensorstore's status,
  e.g. OUT_OF_RANGE, sits under orbax's message), without the store's whole spec."""
  while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
    error = error.__cause__ or error.__context__
  text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
  return (text or type(error).__name__)[:300]


def _differences(expected: dict, got: dict) -> list:
  """The items (and array paths) whose digest differs from the one saved."""
  out = []
  for item, value in got.items():
    want = expected.get(item)
    if isinstance(value, dict):
      out += [f"{item}{path}" for path, digest in value.items() if (want or {}).get(path) != digest]
    elif want != value:
      out.append(item)
  return out


def _drop_failed_reads() -> None:
  """Keeps the reads a failed restore leaves behind from each printing its traceback: their
  coroutines and tasks when collected (now or later), and tensorstore's completions that
  arrive after orbax closed their event loop. The failure they share is reported once, as
  Damaged."""
  if getattr(sys.unraisablehook, "drops_failed_reads", False):
    return
  previous = sys.unraisablehook

  def unraisable_hook(unraisable):
    late = unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
    if not late and "_read_array_index_and_device_put" not in repr(unraisable.object):
      previous(unraisable)

  unraisable_hook.drops_failed_reads = True
  sys.unraisablehook = unraisable_hook
  # A read task collected later is reported by asyncio's exception handler, through logging.
  py_logging.getLogger("asyncio").addFilter(
    lambda record: (
      "Task exception was never retrieved" not in record.getMessage() or "async_deserialize" not in record.getMessage()
    )
  )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, abstract_sums) -> Restored:
  """The checkpoint of `step`, checked against its digest; Damaged if it cannot be read, is
  incomplete or differs from what was saved. One written before the running sums (or the
  digest) were saved restores zeros (unchecked)."""
  directory = os.path.join(str(manager.directory), str(step))
  missing = [item for item in ("state", "history") if not os.path.isdir(os.path.join(directory, item))]
  if missing:
    raise Damaged(f"its {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
  has = {item: os.path.isdir(os.path.join(directory, item)) for item in ("sums", "digest")}
  items = {"state": ocp.args.StandardRestore(abstract_state), "history": ocp.args.JsonRestore()}
  if has["sums"]:
    items["sums"] = ocp.args.StandardRestore(abstract_sums)
  if has["digest"]:
    items["digest"] = ocp.args.JsonRestore()
  _drop_failed_reads()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # tensorstore, JSON, orbax metadata: every way a file can be unreadable
    gc.collect()
    raise Damaged(f"cannot be read: {_first_line(e)}") from None
  sums = restored["sums"] if has["sums"] else None
  if has["digest"]:
    expected = restored["digest"]
    got = {"state": tree_digest(restored["state"]), "history": _json_digest(list(restored["history"]))}
    if has["sums"]:
      got["sums"] = tree_digest(sums)
    differ = _differences(expected, got)
    if differ:
      raise Damaged(
        f"{len(differ)} of its arrays differ from the digest saved with them "
        f"(first: {differ[0]}): the files were changed after they were written"
      )
  return Restored(step, restored["state"], list(restored["history"]), sums)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, abstract_sums):
  """Restored from the latest checkpoint that restores and verifies, or None when there is
  none. A damaged one is logged in one line naming it and what is wrong, and the next earlier
  one is tried; if every one is damaged, one UserError.

  abstract_state/abstract_sums: ShapeDtypeStructs with shardings; the restored arrays
  get them, whatever device count wrote the checkpoint.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = restore(manager, step, abstract_state, abstract_sums)
    except Damaged as e:
      path = os.path.join(str(manager.directory), str(step))
      damaged.append(f"{path}: {e}")
      logging.warning("checkpoint %s is damaged (%s); trying the one before it", path, e)
      continue
    if damaged:
      logging.warning("resuming from checkpoint %s, the newest that verifies", step)
    return restored
  if damaged:
    raise UserError(
      f"no checkpoint in {manager.directory} can be restored: {'; '.join(damaged)}; move the "
      "checkpoints away (or --config.overwrite=True) to start the run again"
    )
  return None


def best_checkpoint(manager: ocp.CheckpointManager) -> tuple:
  """(step, epoch) of the kept epoch-end checkpoint of highest val_accuracy (the earliest of
  equals), or None."""
  scored = [
    (m["val_accuracy"], -m["epoch"], step) for step in manager.all_steps() if (m := manager.metrics(step)) is not None
  ]
  if not scored:
    return None
  _, neg_epoch, step = max(scored)
  return step, -neg_epoch


def checkpoints(workdir: str) -> dict:
  """{step: progress} of the run's committed checkpoints; progress is {'step', 'epochs' (epochs
  completed), 'epoch_end'}, or {} for a checkpoint from before it was recorded."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  out = {}
  for step in ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []:
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


# What `weights` name (predict, evaluate, export, visualize): the weights history.json's test
# record used (the EMA where the run kept one, as it evaluated), the latest checkpoint's or the
# best epoch end's trained params, or the latest EMA. config.init_from reads 'latest': the
# latest checkpoint's EMA where the run kept one, else its params.
WEIGHTS = ("tested", "last", "best", "ema")


def read_verified(workdir: str, step: int) -> dict:
  """The state of the run's checkpoint `step` as stored (read_state), checked against the
  digest saved with it; one that cannot be read or differs is one UserError naming it."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  _drop_failed_reads()
  try:
    state = read_state(os.path.join(path, "state"))
  except Exception as e:  # tensorstore, JSON, orbax metadata: every way a file can be unreadable
    gc.collect()
    raise UserError(f"checkpoint {path} cannot be read: {_first_line(e)}") from None
  try:
    with open(os.path.join(path, "digest", "metadata")) as f:
      expected = json.load(f)["state"]
  except FileNotFoundError:  # written before checkpoints carried a digest
    return state
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"checkpoint {path} has an unreadable digest: {_first_line(e)}") from None
  # The same leaves, named by the stored tree (a dict) instead of the TrainState's fields.
  if sorted(tree_digest(state).values()) != sorted(expected.values()):
    raise UserError(f"checkpoint {path} is damaged: its arrays differ from the digest saved with them")
  return state


def select_checkpoint(workdir: str, weights: str) -> tuple:
  """(step, what it holds, in words) of the checkpoint that `weights` (WEIGHTS) names."""
  kept = checkpoints(workdir)
  if weights not in (*WEIGHTS, "latest"):
    raise UserError(f"unknown --weights={weights!r}; valid: {', '.join(WEIGHTS)}")
  if not kept:
    raise UserError(f"{workdir} has no checkpoints")
  if weights in ("last", "ema", "latest"):
    step = max(kept)
    return step, f"the latest checkpoint (step {step}, {kept[step].get('epochs', '?')} epochs)"
  if weights == "best":
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
      best = best_checkpoint(manager)
    if best is None:
      raise UserError(f"--workdir={workdir} keeps no epoch-end checkpoint with a validation score")
    return best[0], f"the best epoch end (epoch {best[1]}, step {best[0]})"
  history = read_history(workdir)
  tested = [r["test_epoch"] for r in history if "test_epoch" in r]
  if not tested:
    step = max(kept)
    return step, f"the latest checkpoint (step {step}; the run has no test record)"
  ends = [s for s, p in kept.items() if p.get("epoch_end") and p.get("epochs") == tested[-1]]
  if not ends:
    raise UserError(
      f"the weights the run tested (epoch {tested[-1]}) are no longer kept in {workdir}/checkpoints;"
      " use --weights=last or --weights=best"
    )
  return ends[-1], f"the weights the run tested (epoch {tested[-1]}, step {ends[-1]})"


def read_history(workdir: str) -> list:
  path = os.path.join(workdir, "history.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return []
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path}: {_first_line(e)}") from None


def run_variables(workdir: str, weights: str = "tested") -> tuple:
  """(step, {'params': ..., **model_state} as numpy, what they are in words) of the run's
  checkpoint that `weights` names (WEIGHTS, or 'latest'), verified."""
  step, what = select_checkpoint(workdir, weights)
  state = read_verified(workdir, step)
  ema = state.get("ema_params")
  if weights == "ema" and not ema:
    raise UserError(f"--weights=ema: the run in {workdir} kept no EMA (config.ema_decay was 0)")
  use_ema = ema and weights in ("tested", "ema", "latest")
  params = ema if use_ema else state["params"]
  what += ", its EMA" if use_ema else ""
  logging.info("weights: %s", what)
  return step, jax.device_get({"params": params, **(state["model_state"] or {})}), what


class Run(NamedTuple):
  """A trained run as every reader sees it (read_run)."""

  config: ConfigDict
  model: object  # the Linen module it trained
  variables: dict  # {'params': ..., **model_state}, numpy
  step: int  # the checkpoint read
  weights: str  # which weights, in words


def read_run(workdir: str, weights: str = "tested") -> Run:
  """The one reader of a finished or running run (predict, evaluate, export, visualize,
  config.init_from): its config, its model found where the run recorded it, and the verified
  variables of the checkpoint `weights` names (run.WEIGHTS, or 'latest')."""
  config = read_config(workdir)
  model = model_of(config, workdir)
  step, variables, what = run_variables(workdir, weights)
  return Run(config, model, variables, step, what)


def model_of(config: ConfigDict, workdir: str):
  """The run's model as it trained: its config's model (found where the run recorded it:
  own.use_run_source) and model_kwargs (num_classes included; a run of an earlier convjax
  that did not record it takes its dataset's)."""
  own.use_run_source(workdir, config.model)
  kwargs = dict(config.model_kwargs)
  if "num_classes" not in kwargs:
    from convjax.data.splits import open_source

    kwargs = with_num_classes(config.model, kwargs, len(open_source(config.data).classes))
  return get_model(config.model, **kwargs)
