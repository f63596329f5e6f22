import jax
import jax.numpy as jnp
import numpy as np

from convjax import run


def _state(value):
  return {"w": jnp.full((3,), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def test_keeps_latest_and_best_and_resumes_from_latest(tmp_path):
  val = [0.5, 0.9, 0.7, 0.6]
  manager = run.checkpoint_manager(str(tmp_path))
  history = []
  for epoch, acc in enumerate(val, start=1):
    history.append({"epoch": epoch, "val_accuracy": acc})
    run.save(manager, epoch, _state(epoch), history)
  manager.close()
  kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [2, 4]  # best by val_accuracy, and the latest

  manager = run.checkpoint_manager(str(tmp_path))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  epoch, state, restored_history = run.restore_latest(manager, run.abstract(_state(0), sharding))
  manager.close()
  assert epoch == 4 and restored_history == history
  np.testing.assert_array_equal(np.asarray(state["w"]), [4.0, 4.0, 4.0])
  assert int(state["step"]) == 4


def test_no_checkpoint_restores_nothing(tmp_path):
  manager = run.checkpoint_manager(str(tmp_path))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  assert run.restore_latest(manager, run.abstract(_state(0), sharding)) is None
  manager.close()
