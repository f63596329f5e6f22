"""The input pipeline: what the training loop asks of its data, and the on-device path.

The loop asks an input pipeline for the splits' sizes, the batches of training
epoch e (1-based) and the batches of an evaluation pass over a split. A batch is
{'image': uint8 (B, H, W, C), 'label': int32 (B,), 'mask': float32 (B,)}, global
arrays sharded over the mesh's 'data' axis; mask 0 marks padding rows.

`OnDevice` holds every split on the devices as uint8 rows sharded over the mesh,
so each process holds (and loads) only its own rows. An epoch is a table of
global row indices drawn on the host from (seed, epoch), so the data order
depends on nothing else: not on device or process count, and not on whether
the run was interrupted. A batch is gathered by global example index: every
device picks the rows it owns and a reduce-scatter hands each device its slice.
"""
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from convjax import parallel
from convjax.data.splits import Split


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


def eval_index_table(n: int, batch: int) -> np.ndarray:
  """Every row once, in order; the last batch is padded with -1 (masked out)."""
  num_batches = -(-n // batch)
  idx = np.arange(num_batches * batch, dtype=np.int32)
  return np.where(idx < n, idx, -1).reshape(num_batches, batch)


def padded_rows(num_rows: int, mesh: Mesh) -> int:
  """Rows of a dataset array: `num_rows` rounded up to a multiple of the device count."""
  d = mesh.size
  return -(-num_rows // d) * d


def local_row_range(mesh: Mesh, num_rows: int) -> tuple[int, int]:
  """[start, stop) of the rows of a `sharded` array of `num_rows` this process holds."""
  index_map = parallel.sharded(mesh).addressable_devices_indices_map((num_rows,))
  starts = sorted(idx[0].start or 0 for idx in index_map.values())
  stops = sorted(idx[0].stop if idx[0].stop is not None else num_rows for idx in index_map.values())
  if any(a != b for a, b in zip(starts[1:], stops[:-1])):
    raise ValueError("this process's devices do not hold a contiguous block of rows")
  return starts[0], stops[-1]


def put_rows(mesh: Mesh, local: np.ndarray, num_rows: int) -> jax.Array:
  """A global (num_rows, ...) array from this process's rows (see local_row_range)."""
  return jax.make_array_from_process_local_data(parallel.sharded(mesh), local, (num_rows, *local.shape[1:]))


def load_split(split: Split, mesh: Mesh) -> dict:
  """This process's rows of a split, padded, as global arrays sharded over the mesh."""
  total = padded_rows(split.size, mesh)
  start, stop = local_row_range(mesh, total)
  local = split.read(min(start, split.size), min(stop, split.size))
  pad = (stop - start) - local["image"].shape[0]
  if pad:
    local = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in local.items()}
  return {k: put_rows(mesh, v, total) for k, v in local.items()}


def make_get_batch(mesh: Mesh):
  """Returns jitted `get_batch(rows, index_table, i) -> batch`.

  rows: dict of (R, ...) arrays sharded over 'data' (one dataset split).
  index_table: replicated (num_batches, B) int32 of global row indices; -1 pads.
  Returns dict of (B, ...) arrays sharded over 'data', plus 'mask' (float32,
  0 where the index was -1).
  """
  d, axis = mesh.size, parallel.DATA

  def gather_local(rows, idx):
    shard = jax.lax.axis_index(axis)
    per_device = idx.shape[0] // d
    out = {}
    for key, x in rows.items():
      n = x.shape[0]
      local = idx - shard * n
      owned = (local >= 0) & (local < n)
      picked = jnp.take(x, jnp.clip(local, 0, n - 1), axis=0)
      picked = jnp.where(owned.reshape(-1, *([1] * (x.ndim - 1))), picked, jnp.zeros((), x.dtype))
      # Exactly one device owns each valid index, so the sum is a copy.
      out[key] = jax.lax.psum_scatter(picked, axis, scatter_dimension=0, tiled=True)
    mine = jax.lax.dynamic_slice_in_dim(idx, shard * per_device, per_device)
    out["mask"] = (mine >= 0).astype(jnp.float32)
    return out

  gather = jax.shard_map(gather_local, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(axis))

  @jax.jit
  def get_batch(rows, index_table, i):
    return gather(rows, index_table[i])

  return get_batch


class OnDevice:
  """Every split's rows on the devices; batches gathered from them by index tables.

  splits: {'train', 'validation'[, 'test']}: Split. An epoch is `steps_per_epoch`
  batches of `batch_size` from the (seed, epoch) stream of permutations; an
  evaluation pass is every row of a split once, in batches of `eval_batch_size`.
  """

  def __init__(self, splits: dict, mesh: Mesh, seed: int, batch_size: int, eval_batch_size: int,
               steps_per_epoch: int):
    self.mesh, self.seed, self.batch_size, self.steps_per_epoch = mesh, seed, batch_size, steps_per_epoch
    self.sizes = {name: split.size for name, split in splits.items()}
    self.rows = {name: load_split(split, mesh) for name, split in splits.items()}
    self.eval_tables = {name: parallel.put_replicated(mesh, eval_index_table(split.size, eval_batch_size))
                        for name, split in splits.items() if name != "train"}
    self.get_batch = make_get_batch(mesh)

  def train_batches(self, epoch: int) -> Iterator[dict]:
    table = parallel.put_replicated(self.mesh, train_index_table(
        self.seed, epoch, self.steps_per_epoch, self.batch_size, self.sizes["train"]))
    for i in range(self.steps_per_epoch):
      yield self.get_batch(self.rows["train"], table, i)

  def eval_batches(self, split: str) -> Iterator[dict]:
    table = self.eval_tables[split]
    for i in range(table.shape[0]):
      yield self.get_batch(self.rows[split], table, i)
