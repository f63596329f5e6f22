"""A run's checkpoints: <workdir>/checkpoints/<step>/, written and read with orbax.

Each checkpoint holds the train state, the history of the epochs completed, the running
metric sums of the epoch in progress and a digest of every array, checked whenever it is
read (`restore` for a resume, `read_verified` for every other reader). Retention keeps the
latest `keep` and the best epoch end by val_accuracy, also across resumes.
"""

import gc
import hashlib
import json
import logging as py_logging
import os
import sys
import traceback
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from convjax.errors import UserError, chain, closed_loop_leftover
from convjax.files import write_json, writing


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
    if metrics is None:
      with writing(path):
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


def first_line(error: BaseException) -> str:
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


def _raised_by_a_read(error) -> bool:
  """Whether `error`, or an exception it was raised from, was raised inside orbax's array
  deserialisation (every read of a damaged checkpoint's arrays fails there)."""
  return any(
    "orbax/checkpoint/_src/serialization" in frame.f_code.co_filename
    for e in chain(error)
    for frame, _ in traceback.walk_tb(e.__traceback__)
  )


def _drop_failed_reads() -> None:
  """Keeps the reads a failed restore leaves behind from each printing its traceback: their
  coroutines and tasks when collected (now or later, whichever of orbax's gathered reads is
  collected), and tensorstore's completions that arrive after orbax closed their event loop.
  The failure they share is reported once, as Damaged."""
  if getattr(sys.unraisablehook, "drops_failed_reads", False):
    return
  previous = sys.unraisablehook

  def unraisable_hook(unraisable):
    if not (
      closed_loop_leftover(unraisable.exc_value)
      or _raised_by_a_read(unraisable.exc_value)
      or "_read_array_index" in repr(unraisable.object)
    ):
      previous(unraisable)

  unraisable_hook.drops_failed_reads = True
  sys.unraisablehook = unraisable_hook
  # A read task collected later is reported by asyncio's exception handler, through logging.
  py_logging.getLogger("asyncio").addFilter(
    lambda record: (
      not ("never retrieved" in record.getMessage() and record.exc_info and _raised_by_a_read(record.exc_info[1]))
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
    raise Damaged(f"cannot be read: {first_line(e)}") from None
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


def best_kept(workdir: str) -> tuple:
  """best_checkpoint of the run in `workdir`, its checkpoints opened read-only."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    return best_checkpoint(manager)


def kept(workdir: str) -> dict:
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


def read_verified(workdir: str, step: int) -> dict:
  """The state of the run's checkpoint `step` as stored (read_state), checked against the
  digest saved with it; one that cannot be read or differs is one UserError naming it."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  _drop_failed_reads()
  try:
    state = read_state(os.path.join(path, "state"))
  except Exception as e:  # tensorstore, JSON, orbax metadata: every way a file can be unreadable
    gc.collect()
    raise UserError(f"checkpoint {path} cannot be read: {first_line(e)}") from None
  try:
    with open(os.path.join(path, "digest", "metadata")) as f:
      expected = json.load(f)["state"]
  except FileNotFoundError:  # written before checkpoints carried a digest
    return state
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"checkpoint {path} has an unreadable digest: {first_line(e)}") from None
  # The same leaves, named by the stored tree (a dict) instead of the TrainState's fields.
  if sorted(tree_digest(state).values()) != sorted(expected.values()):
    raise UserError(f"checkpoint {path} is damaged: its arrays differ from the digest saved with them")
  return state
