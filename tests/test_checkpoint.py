import jax
import jax.numpy as jnp
import numpy as np

from convjax import checkpoints


def _state(value):
  return {"w": jnp.full((3,), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def _sums(value):
  return {"loss_sum": jnp.asarray(value, jnp.float32)}


def test_keeps_latest_and_best_and_resumes_from_latest(tmp_path):
  """Epoch-end checkpoints carry val_accuracy, mid-epoch ones none: kept are the latest and the best
  epoch end, also when a second manager (a resumed run) saves beside the first one's."""
  val = [0.5, 0.9, 0.7, 0.6]
  manager = checkpoints.checkpoint_manager(str(tmp_path))
  history = []
  for epoch, acc in enumerate(val[:2], start=1):
    checkpoints.save(manager, epoch * 10 - 5, _state(epoch * 10 - 5), history, _sums(1.0), epoch_end=False)
    history.append({"epoch": epoch, "val_accuracy": acc})
    checkpoints.save(manager, epoch * 10, _state(epoch * 10), history, _sums(2.0), epoch_end=True)
  manager.close()
  manager = checkpoints.checkpoint_manager(str(tmp_path))  # the run resumed: its metrics are read back
  for epoch, acc in enumerate(val[2:], start=3):
    history.append({"epoch": epoch, "val_accuracy": acc})
    checkpoints.save(manager, epoch * 10, _state(epoch * 10), history, _sums(3.0), epoch_end=True)
  checkpoints.save(manager, 45, _state(45), history, _sums(4.0), epoch_end=False)
  manager.close()
  kept = checkpoints.kept(str(tmp_path))
  assert {step: (p["epochs"], p["epoch_end"]) for step, p in kept.items()} == {20: (2, True), 45: (4, False)}

  manager = checkpoints.checkpoint_manager(str(tmp_path))
  assert checkpoints.best_checkpoint(manager) == (20, 2)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored = checkpoints.restore_latest(
    manager, checkpoints.abstract(_state(0), sharding), checkpoints.abstract(_sums(0.0), sharding)
  )
  manager.close()
  assert restored.step == 45 and restored.history == history
  np.testing.assert_array_equal(np.asarray(restored.state["w"]), [45.0, 45.0, 45.0])
  assert float(restored.sums["loss_sum"]) == 4.0


def test_no_checkpoint_restores_nothing(tmp_path):
  manager = checkpoints.checkpoint_manager(str(tmp_path))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  assert (
    checkpoints.restore_latest(
      manager, checkpoints.abstract(_state(0), sharding), checkpoints.abstract(_sums(0.0), sharding)
    )
    is None
  )
  manager.close()
