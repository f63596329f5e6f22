"""One device mesh with a 'data' axis: params replicated, batches and dataset rows sharded.

The same program runs on 1 CPU, 8 GPUs or several hosts: `make_mesh` takes every
device of every process (or the first N), `replicated` and `sharded` are the two
shardings a run uses. The input pipeline (convjax.data.pipeline) and the train
steps (convjax.train.steps) both build on these.
"""

from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from convjax.errors import UserError

DATA = "data"


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` global devices (default: all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise UserError(
        f"num_devices={num_devices} but only {len(devices)} devices are visible: {devices[0].platform} x{len(devices)}"
      )
    devices = devices[:num_devices]
  mesh = Mesh(np.asarray(devices), (DATA,))
  if not any(d.process_index == jax.process_index() for d in devices):
    raise UserError(f"process {jax.process_index()} has no device in the mesh of {len(devices)}; raise num_devices")
  return mesh


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over 'data' (batches, dataset rows)."""
  return NamedSharding(mesh, P(DATA))


def put_replicated(mesh: Mesh, value: np.ndarray) -> jax.Array:
  """A global replicated array; every process must pass the same value."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, replicated(mesh), lambda idx: value[idx])


def put_replicated_tree(mesh: Mesh, tree):
  """put_replicated of every leaf of a pytree."""
  return jax.tree_util.tree_map(lambda x: put_replicated(mesh, x), tree)
