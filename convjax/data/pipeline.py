"""The input pipeline: what the training loop asks of its data, and its two implementations.

The loop asks a pipeline for the splits' sizes, the feeds of training epoch e
(1-based, from step `start` on) and the feeds of an evaluation pass over a split,
and passes each feed to the jitted step, which turns it into a batch with
`pipeline.take(feed)` inside the same program. A batch is {'image': uint8
(B, H, W, C), 'label': int32 (B,), 'mask': float32 (B,)}, sharded over the mesh's
'data' axis; mask 0 marks padding rows.

Both pipelines draw every epoch from the same table of global row indices,
computed on the host from (seed, epoch), so they see the same batches in the same
order, whatever the device or process count and whether the run was interrupted:

`OnDevice` holds every split on the devices as uint8 rows sharded over the mesh
(each process loads only its own rows). A feed is (rows, index table, step); the
step gathers its batch: every device picks the rows it owns and a reduce-scatter
hands each device its slice. One program per step, so no other collective
program is ever in flight beside it.

`Stream` reads rows as training goes (grain: decoding, crops and batching in
worker processes or threads), each process only the rows of its own devices,
and puts a few batches on the devices ahead of the step
(`jax.make_array_from_process_local_data`: no collective). Host memory stays
bounded by the prefetch buffers, whatever the dataset's size.

`choose(config.data, source, mesh)` picks one: 'device' when the images fit
`device_fraction` of the smallest device's free memory (on CPU of free host RAM).
"""

import collections
import math
import multiprocessing
import os
import sys
import threading
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec as P

from convjax import parallel
from convjax.data.splits import Source, Split, image_bytes
from convjax.errors import UserError


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
  if any(a != b for a, b in zip(starts[1:], stops[:-1], strict=True)):
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


def make_gather(mesh: Mesh):
  """`gather(rows, indices) -> batch`, traced inside a jitted step.

  rows: dict of (R, ...) arrays sharded over 'data' (one dataset split).
  indices: replicated (B,) int32 global row indices; -1 pads.
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

  return jax.shard_map(gather_local, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(axis))


class OnDevice:
  """Every split's rows on the devices; each step gathers its batch by an index table.

  splits: {'train', 'validation'[, 'test']}: Split. An epoch is `steps_per_epoch`
  batches of `batch_size` from the (seed, epoch) stream of permutations; an
  evaluation pass is every row of a split once, in batches of `eval_batch_size`.
  """

  def __init__(self, splits: dict, mesh: Mesh, seed: int, batch_size: int, eval_batch_size: int, steps_per_epoch: int):
    self.mesh, self.seed, self.batch_size, self.steps_per_epoch = mesh, seed, batch_size, steps_per_epoch
    self.sizes = {name: split.size for name, split in splits.items()}
    self.rows = {name: load_split(split, mesh) for name, split in splits.items()}
    self.eval_tables = {
      name: parallel.put_replicated(mesh, eval_index_table(split.size, eval_batch_size))
      for name, split in splits.items()
      if name != "train"
    }
    self._gather = make_gather(mesh)

  def take(self, feed) -> dict:
    """The batch of a feed, inside the jitted step."""
    rows, table, i = feed
    return self._gather(rows, table[i])

  def train_batches(self, epoch: int, start: int = 0) -> Iterator:
    table = parallel.put_replicated(
      self.mesh, train_index_table(self.seed, epoch, self.steps_per_epoch, self.batch_size, self.sizes["train"])
    )
    for i in range(start, self.steps_per_epoch):
      yield self.rows["train"], table, np.int32(i)

  def eval_batches(self, split: str) -> Iterator:
    table = self.eval_tables[split]
    for i in range(table.shape[0]):
      yield self.rows[split], table, np.int32(i)

  def close(self) -> None:
    pass


class _Batches:
  """A grain source: element k is this process's part of batch `first + k` of an endless
  sequence, read, fitted to the image size and stacked: {'image', 'label', 'mask'}.

  table(position) -> (global row indices of that batch (-1: padding), rng key or None).
  A row that is padding or unreadable (None, a skipped bad file) becomes zeros with mask 0.
  Rows are read together where the source can (`rows.read(indices)`: ArrayRecord, arrays).
  A training crop draws from (rng key, the row's position in the batch), so it depends
  neither on the process count nor on where a resumed run restarts.
  """

  def __init__(self, rows, table, columns: tuple, first: int, fit, shape: tuple):
    self.rows, self.table, self.columns, self.first = rows, table, columns, first
    self.fit, self.shape = fit, tuple(shape)

  def __len__(self) -> int:
    return 2**40  # endless: the pipeline takes as many batches as it needs

  def __getitem__(self, k: int) -> dict:
    _prepare_reading_thread()
    row_indices, rng_key = self.table(self.first + int(k))
    lo, hi = self.columns
    indices = row_indices[lo:hi]
    columns = np.flatnonzero(indices >= 0)
    read = getattr(self.rows, "read", None)
    got = read(indices[columns]) if read else [self.rows[int(i)] for i in indices[columns]]
    out = {
      "image": np.zeros((len(indices), *self.shape), np.uint8),
      "label": np.zeros(len(indices), np.int32),
      "mask": np.zeros(len(indices), np.float32),
      "wanted": np.float32(len(columns)),
    }
    for j, row in zip(columns, got, strict=True):
      if row is None:
        continue
      rng = None if rng_key is None or not self.fit.random else np.random.default_rng([*rng_key, lo + j])
      image = self.fit(row["image"], rng)
      if image.shape != self.shape:
        index = int(indices[j])
        where = self.rows.files[index] if hasattr(self.rows, "files") else f"row {index}"
        raise UserError(
          f"{where} is {image.shape[1]}x{image.shape[0]}x{image.shape[2]}, the data "
          f"{self.shape[1]}x{self.shape[0]}x{self.shape[2]}: set config.data.image_size to "
          "resize every image"
        )
      out["image"][j], out["label"][j], out["mask"][j] = image, row["label"], 1
    return out


class _TrainTable:
  """Batch k of the endless training sequence: epoch k // steps + 1's table, row k % steps.
  Picklable; each worker keeps the table of the epoch it is in."""

  def __init__(self, seed: int, steps: int, batch: int, n: int):
    self.seed, self.steps, self.batch, self.n = seed, steps, batch, n
    self._epoch, self._table = None, None

  def __getstate__(self):
    return {**self.__dict__, "_epoch": None, "_table": None}

  def __call__(self, k: int):
    epoch, step = k // self.steps + 1, k % self.steps
    if epoch != self._epoch:
      self._epoch, self._table = epoch, train_index_table(self.seed, epoch, self.steps, self.batch, self.n)
    return self._table[step], (self.seed, epoch, step)


class _EvalTable:
  """Batch k of an endless repetition of an evaluation pass (every row once, padded)."""

  def __init__(self, n: int, batch: int):
    self.table = eval_index_table(n, batch)

  def __call__(self, k: int):
    return self.table[k % len(self.table)], None


# Batches read concurrently by threads of this process when there are no grain workers.
READ_THREADS = 2
# The nice value of the threads (or worker processes) that read batches. Where the step keeps
# every core busy (training on the CPU), reading then fills the step's idle time instead of
# stalling its threads: MNIST streamed on 2 cores, a step ~14% over on-device, ~20% with 4
# threads at the step's priority (BENCHMARKS.md). On Linux nice is a per-thread attribute.
READ_NICE = 19
_reader_thread = threading.local()


# glibc's mallopt: freed blocks up to this size stay in the process's heaps for the next batch.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_FREE_BYTES, MMAP_FROM_BYTES = 256 << 20, 32 << 20
_malloc_tuned = []


def keep_freed_memory() -> None:
  """Keeps the memory a batch frees for the next one, once per process (glibc; elsewhere a no-op).

  By default glibc hands large freed blocks (a decoded photo, its float copy, a batch) back to
  the kernel, trimming each thread's heap, and the next batch page-faults them in again: ~3,000
  faults and 10 of 34 ms of host time per batch of 64 cats-vs-dogs photos on this project's VM
  (BENCHMARKS.md); with these two settings ~1. mallopt, not an environment variable, so a user
  need not know; tcmalloc or jemalloc preloaded would do the same."""
  if _malloc_tuned or sys.platform != "linux":
    return
  _malloc_tuned.append(True)
  import ctypes

  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return
  mallopt(M_MMAP_THRESHOLD, MMAP_FROM_BYTES)
  mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES)


def _prepare_reading_thread() -> None:
  """Lowers this reading thread to READ_NICE, once; never the main thread of the training
  process, which dispatches the steps. Also keep_freed_memory, in each reading process."""
  keep_freed_memory()
  if not getattr(_reader_thread, "niced", False):
    reader = threading.current_thread() is not threading.main_thread() or multiprocessing.parent_process()
    if reader and sys.platform == "linux":
      os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READ_NICE)
    _reader_thread.niced = True


class _Reader:
  """One grain iterator over an endless batch sequence, from position `first` on, with up to
  `prefetch` batches already put on the devices. Kept open across epochs and evaluation
  passes, so worker processes start once."""

  def __init__(self, stream: "Stream", rows, table, first: int, global_batch: int):
    import grain  # only the streaming path needs it

    self.position, self.global_batch = first, global_batch
    columns = local_row_range(stream.mesh, global_batch)
    dataset = grain.MapDataset.source(_Batches(rows, table, columns, first, stream.fit, stream.image_shape))
    dataset = dataset.to_iter_dataset(
      grain.ReadOptions(
        num_threads=0 if stream.workers else READ_THREADS, prefetch_buffer_size=max(2 * stream.prefetch, 2)
      )
    )
    if stream.workers:
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=stream.workers))
    self.iterator, self.sharding, self.prefetch = iter(dataset), parallel.sharded(stream.mesh), stream.prefetch
    self.ahead = collections.deque()
    self.skipped = 0

  def _pull(self) -> None:
    local = self.iterator.__next__()
    self.skipped += int(local.pop("wanted") - np.sum(local["mask"]))  # unreadable rows, masked out
    shapes = {k: (self.global_batch, *v.shape[1:]) for k, v in local.items()}
    self.ahead.append(jax.make_array_from_process_local_data(self.sharding, local, shapes))

  def take(self, count: int) -> Iterator[dict]:
    """The next `count` batches."""
    for _ in range(count):
      while len(self.ahead) <= self.prefetch:
        self._pull()
      self.position += 1
      yield self.ahead.popleft()
    if self.skipped:
      logging.warning("skipped %d unreadable file(s) (masked out of their batches)", self.skipped)
      self.skipped = 0

  def close(self) -> None:
    close = getattr(self.iterator, "close", None)
    if close:
      close()


class Stream:
  """Rows read, decoded and batched by grain as training goes (see the module docstring).

  splits: Splits with random-access `rows`; fit: convjax.data.preprocess.Fit (training
  crops are drawn per row, evaluation's are fixed); workers: grain worker processes
  (0: threads of this process); prefetch: batches put on the devices ahead. Training is
  one endless sequence of batches over the epochs, each evaluation split one endless
  repetition of its pass: each is read by one iterator for the whole run.
  """

  def __init__(
    self,
    splits: dict,
    mesh: Mesh,
    seed: int,
    batch_size: int,
    eval_batch_size: int,
    steps_per_epoch: int,
    image_shape: tuple,
    fit,
    workers: int = 0,
    prefetch: int = 2,
  ):
    missing = [name for name, split in splits.items() if split.rows is None]
    if missing:
      raise ValueError(f"splits {missing} have no row access to stream from")
    self.splits, self.mesh, self.seed = splits, mesh, seed
    self.batch_size, self.eval_batch_size, self.steps_per_epoch = batch_size, eval_batch_size, steps_per_epoch
    self.image_shape, self.fit, self.workers, self.prefetch = tuple(image_shape), fit, workers, prefetch
    self.sizes = {name: split.size for name, split in splits.items()}
    self._readers = {}

  @staticmethod
  def take(feed) -> dict:
    return feed

  def _reader(self, name: str, position: int, table, global_batch: int) -> _Reader:
    reader = self._readers.get(name)
    if reader is None or reader.position != position:  # first use, or a jump (a resumed run)
      if reader is not None:
        reader.close()
      reader = self._readers[name] = _Reader(self, self.splits[name].rows, table, position, global_batch)
    return reader

  def train_batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
    table = _TrainTable(self.seed, self.steps_per_epoch, self.batch_size, self.sizes["train"])
    reader = self._reader("train", (epoch - 1) * self.steps_per_epoch + start, table, self.batch_size)
    return reader.take(self.steps_per_epoch - start)

  def eval_batches(self, split: str) -> Iterator[dict]:
    table = _EvalTable(self.sizes[split], self.eval_batch_size)
    reader = self._reader(
      split, self._readers[split].position if split in self._readers else 0, table, self.eval_batch_size
    )
    return reader.take(len(table.table))

  def close(self) -> None:
    """Stops grain's threads and worker processes."""
    for reader in self._readers.values():
      reader.close()
    self._readers = {}


def free_memory(mesh: Mesh) -> tuple:
  """(bytes free on the smallest of this process's devices, what that is); on CPU free host RAM."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  stats = [d.memory_stats() for d in local] if local[0].platform != "cpu" else []
  if stats and all(s and "bytes_limit" in s for s in stats):
    return (
      min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats),
      f"free memory of the smallest {local[0].device_kind}",
    )
  free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  try:  # MemAvailable counts reclaimable caches too, as the kernel would free them
    with open("/proc/meminfo") as f:
      free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
  except (OSError, StopIteration):
    pass
  return free, "free host RAM"


def choose(data, source: Source, mesh: Mesh) -> str:
  """'device' or 'stream' for config.data.pipeline, logging the numbers behind the choice;
  a forced 'device' that cannot fit, or a stream the source cannot give, is one UserError."""
  needed = image_bytes(source)
  free, what = free_memory(mesh)
  per_device = needed if what == "free host RAM" else math.ceil(needed / mesh.size)
  budget = data.device_fraction * free
  fits = per_device <= budget
  mb = lambda b: f"{b / 1e6:,.1f} MB"  # noqa: E731
  numbers = (
    f"{source.num_rows:,} images {'x'.join(map(str, source.image_shape))} = {mb(needed)}"
    f"{'' if what == 'free host RAM' else f' ({mb(per_device)} a device)'}; budget "
    f"{data.device_fraction:g} x {what} {mb(free)} = {mb(budget)}"
  )
  wants_stream = bool(tuple(data.random_resized_crop))
  kind = data.pipeline if data.pipeline != "auto" else ("device" if fits and not wants_stream else "stream")
  if kind == "device" and not fits:
    raise UserError(
      f"config.data.pipeline='device': the data does not fit ({numbers}); use "
      "config.data.pipeline='stream' (or 'auto'), or raise config.data.device_fraction"
    )
  if kind == "stream" and not source.streams:
    raise UserError(
      f"the data cannot stream ({numbers}): {source.description} is prepared in a file format "
      "that reads only in row ranges (TFRecord and ArrayRecord stream); prepare it as one of "
      "them: tfds.builder(NAME, file_format='array_record').download_and_prepare()"
    )
  logging.info("input pipeline: %s (%s)", kind, numbers)
  return kind
