"""Checkpoints: orbax, one per epoch; the latest (for resume) and the best by val_accuracy.

A checkpoint holds the train state and the history up to its epoch, so a run
resumed from it rewrites history.json consistently whatever was killed when.
"""
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


def make_manager(directory: str) -> ocp.CheckpointManager:
  policy = pp.AnyPreservationPolicy([
      pp.LatestN(n=1),
      pp.BestN(get_metric_fn=lambda m: m["val_accuracy"], n=1),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, epoch: int, state, history: list) -> None:
  """Saves after `epoch` (1-based); metrics for the best-checkpoint policy come from history."""
  manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              history=ocp.args.JsonSave(history)),
               metrics={"val_accuracy": history[-1]["val_accuracy"]})


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """(epoch, state, history) from the latest checkpoint, or None when there is none.

  abstract_state: ShapeDtypeStructs with shardings; the restored arrays get
  them, whatever device count wrote the checkpoint.
  """
  epoch = manager.latest_step()
  return None if epoch is None else restore(manager, epoch, abstract_state)


def best_epoch(manager: ocp.CheckpointManager, history: list) -> int:
  """The kept checkpoint of highest val_accuracy (the earliest of equals)."""
  val = {r["epoch"]: r["val_accuracy"] for r in history if "val_accuracy" in r}
  kept = [e for e in manager.all_steps() if e in val]
  return max(sorted(kept), key=val.__getitem__)


def restore(manager: ocp.CheckpointManager, epoch: int, abstract_state):
  """(epoch, state, history) from the checkpoint of `epoch`."""
  restored = manager.restore(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), history=ocp.args.JsonRestore()))
  return epoch, restored["state"], list(restored["history"])


def read_state(path: str):
  """The train state saved at `path` (<run>/checkpoints/<epoch>/state) as stored, on one
  local device, whatever model, optimizer or device count wrote it."""
  # The item's tree metadata, from its handler: the checkpointer's metadata() would also
  # look for step metadata, which lives one level up (<epoch>/), and warn.
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, target)


def abstract(state, sharding):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
