"""One device mesh with a 'data' axis: params replicated, batches sharded.

Datasets small enough for device memory live there as global arrays whose rows
are sharded over the 'data' axis, so each process holds (and loads) only its
own rows. A batch is gathered by global example index: every device picks the
rows it owns and a reduce-scatter hands each device its slice of the batch.
The batch order is a function of the indices alone, so a run on 1 device, 8
devices or 2 hosts sees the same batches.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from convjax.errors import UserError

DATA = "data"


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` global devices (default: all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise UserError(f"num_devices={num_devices} but only {len(devices)} devices are visible: "
                      f"{devices[0].platform} x{len(devices)}")
    devices = devices[:num_devices]
  mesh = Mesh(np.asarray(devices), (DATA,))
  if not any(d.process_index == jax.process_index() for d in devices):
    raise UserError(f"process {jax.process_index()} has no device in the mesh of {len(devices)}; "
                    "raise num_devices")
  return mesh


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over 'data' (batches, dataset rows)."""
  return NamedSharding(mesh, P(DATA))


def padded_rows(num_rows: int, mesh: Mesh) -> int:
  """Rows of a dataset array: `num_rows` rounded up to a multiple of the device count."""
  d = mesh.size
  return -(-num_rows // d) * d


def local_row_range(mesh: Mesh, num_rows: int) -> tuple[int, int]:
  """[start, stop) of the rows of a `sharded` array of `num_rows` this process holds."""
  index_map = sharded(mesh).addressable_devices_indices_map((num_rows,))
  starts = sorted(idx[0].start or 0 for idx in index_map.values())
  stops = sorted(idx[0].stop if idx[0].stop is not None else num_rows for idx in index_map.values())
  if any(a != b for a, b in zip(starts[1:], stops[:-1])):
    raise ValueError("this process's devices do not hold a contiguous block of rows")
  return starts[0], stops[-1]


def put_rows(mesh: Mesh, local: np.ndarray, num_rows: int) -> jax.Array:
  """A global (num_rows, ...) array from this process's rows (see local_row_range)."""
  return jax.make_array_from_process_local_data(sharded(mesh), local, (num_rows, *local.shape[1:]))


def put_replicated(mesh: Mesh, value: np.ndarray) -> jax.Array:
  """A global replicated array; every process must pass the same value."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, replicated(mesh), lambda idx: value[idx])


def make_get_batch(mesh: Mesh):
  """Returns jitted `get_batch(rows, index_table, i) -> batch`.

  rows: dict of (R, ...) arrays sharded over 'data' (one dataset split).
  index_table: replicated (num_batches, B) int32 of global row indices; -1 pads.
  Returns dict of (B, ...) arrays sharded over 'data', plus 'mask' (float32,
  0 where the index was -1).
  """
  d = mesh.size

  def gather_local(rows, idx):
    shard = jax.lax.axis_index(DATA)
    per_device = idx.shape[0] // d
    out = {}
    for key, x in rows.items():
      n = x.shape[0]
      local = idx - shard * n
      owned = (local >= 0) & (local < n)
      picked = jnp.take(x, jnp.clip(local, 0, n - 1), axis=0)
      picked = jnp.where(owned.reshape(-1, *([1] * (x.ndim - 1))), picked, jnp.zeros((), x.dtype))
      # Exactly one device owns each valid index, so the sum is a copy.
      out[key] = jax.lax.psum_scatter(picked, DATA, scatter_dimension=0, tiled=True)
    mine = jax.lax.dynamic_slice_in_dim(idx, shard * per_device, per_device)
    out["mask"] = (mine >= 0).astype(jnp.float32)
    return out

  gather = jax.shard_map(gather_local, mesh=mesh, in_specs=(P(DATA), P()), out_specs=P(DATA))

  @jax.jit
  def get_batch(rows, index_table, i):
    return gather(rows, index_table[i])

  return get_batch
