r"""Input readers compared, images/s of training batches from the same data: convjax's stream
(convjax.data.pipeline.Stream: grain's MapDataset, two reader threads), grain's default
`DataLoader` as a grain user writes it, and tf.data as TFDS and Keras users write it.

Run as a subprocess, one per reader (so that each has the machine's threads to itself and
TensorFlow is imported only by its own):

  python -m convjax.input_readers --reader=tf.data --data='mnist@../shared/datasets/tfds' \
      --data='folder:../shared/datasets/cats_and_dogs_small/train@150x150' --batch=64 --batches=50

prints a JSON line per --data: {"data", "reader", "images_per_second"} or {"data", "reader",
"error"} where the reader cannot read it (grain's DataLoader: a TFRecord-prepared TFDS
dataset, which has no random access; tf.data: an ArrayRecord-prepared one, which TFDS'
as_dataset does not read). DATA as experiments.benchmark's: NAME@DIR (a
prepared TFDS dataset) or folder:PATH@HxW (class folders, resized to HxW).

- convjax: the training loop's streamed batches (shuffled rows read by index, decoded,
  fitted, put on the device), as `experiments.train --config.data.pipeline=stream` reads:
  two reader threads, or with convjax:N N grain worker processes (`config.data.workers`).
- grain: `grain.DataLoader` with its defaults (no worker processes) over TFDS'
  `as_data_source` (ArrayRecord; TFDS decodes each record) or, for a folder, a data source
  of the files that Pillow decodes and resizes; shuffled IndexSampler, Batch.
- tf.data: TFDS' `as_dataset` (files interleaved, decode in parallel: AUTOTUNE), or for a
  folder `list_files` then `read_file`/`decode_jpeg`/`resize` mapped with AUTOTUNE
  parallelism and deterministic=False (the fastest settings found here; Keras'
  `image_dataset_from_directory` is the same ops without them); repeat, batch, prefetch.
Every reader yields uint8 images at the data's size and the labels.
"""

import json
import os
import time

import numpy as np
from absl import app, flags

from convjax import cli
from convjax.errors import UserError

READERS = ("convjax", "grain", "tf.data")
flags.DEFINE_string("reader", None, "convjax, convjax:N (N grain worker processes), grain or tf.data.")
flags.DEFINE_multi_string("data", None, "NAME@DIR (a prepared TFDS dataset) or folder:PATH@HxW; repeatable.")
flags.DEFINE_integer("batch", 64, "Images per batch.")
flags.DEFINE_integer("batches", 50, "Batches timed.")
flags.DEFINE_integer("warmup", 5, "Batches read first, untimed.")


def parse(spec: str) -> tuple:
  """('tfds', name, dir, None) or ('folder', path, None, (h, w)), as experiments.benchmark reads
  DATA (convjax.benchmark.data_config)."""
  from convjax.benchmark import data_config

  data = data_config(spec)
  if data.folder:
    if not data.image_size:
      raise UserError(f"--data={spec!r}: a folder needs its image size, folder:PATH@HxW")
    return "folder", data.folder, None, tuple(data.image_size)
  return "tfds", data.dataset, data.data_dir or None, None


def reader_name(reader: str) -> tuple:
  """('convjax', workers) or (name, 0); a UserError for an unknown one."""
  name, _, workers = reader.partition(":")
  if name not in READERS or (workers and (name != "convjax" or not workers.isdigit())):
    raise UserError(f"unknown reader {reader!r}; valid: convjax, convjax:N (grain workers), grain, tf.data")
  return name, int(workers or 0)


def convjax_batches(spec: str, batch: int, workers: int = 0):
  from convjax import parallel
  from convjax.benchmark import data_config
  from convjax.data import pipeline
  from convjax.data.splits import fit_for, open_source

  data = data_config(spec)
  source = open_source(data)
  train = {"train": source.splits(stream=True)["train"]}
  steps = train["train"].size // batch
  stream = pipeline.Stream(
    train, parallel.make_mesh(), 0, batch, batch, steps, source.image_shape, fit_for(data), workers
  )
  epoch = 0
  while True:
    epoch += 1
    for feed in stream.train_batches(epoch):
      yield feed["image"].block_until_ready(), feed["label"]


class FolderFiles:
  """A grain data source of class folders' files, decoded and resized by Pillow."""

  def __init__(self, root: str, size: tuple):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    self.items = [
      (os.path.join(root, c, f), i) for i, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(root, c)))
    ]
    self.size = size

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i: int) -> dict:
    from PIL import Image

    path, label = self.items[i]
    with Image.open(path) as image:
      pixels = np.asarray(image.convert("RGB").resize(self.size[::-1], Image.BILINEAR))
    return {"image": pixels, "label": label}


def grain_batches(spec: str, batch: int):
  import grain

  kind, where, directory, size = parse(spec)
  if kind == "folder":
    source = FolderFiles(where, size)
  else:
    import tensorflow_datasets as tfds

    builder = tfds.builder(where, data_dir=directory)
    try:
      source = builder.as_data_source(split="train")
    except Exception as e:  # a TFRecord-prepared dataset: TFDS has no random access to it
      raise UserError(f"TFDS' as_data_source: {str(e).strip().splitlines()[0]}") from None
  sampler = grain.samplers.IndexSampler(len(source), shuffle=True, seed=0, num_epochs=None)
  loader = grain.DataLoader(
    data_source=source, sampler=sampler, operations=[grain.transforms.Batch(batch, drop_remainder=True)]
  )
  for element in loader:
    yield element["image"], element["label"]


def tf_data_batches(spec: str, batch: int):
  import tensorflow as tf

  kind, where, directory, size = parse(spec)
  autotune = tf.data.AUTOTUNE
  if kind == "folder":
    classes = sorted(d for d in os.listdir(where) if os.path.isdir(os.path.join(where, d)))
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(classes, list(range(len(classes)))), -1)

    def load(path):
      image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
      image = tf.cast(tf.round(tf.image.resize(image, size, method="bilinear")), tf.uint8)
      return image, table.lookup(tf.strings.split(path, os.sep)[-2])

    options = tf.data.Options()
    options.deterministic = False
    files = tf.data.Dataset.list_files(os.path.join(where, "*", "*"), shuffle=True, seed=0)
    dataset = files.repeat().map(load, num_parallel_calls=autotune).with_options(options)
  else:
    import tensorflow_datasets as tfds

    read = tfds.ReadConfig(num_parallel_calls_for_decode=autotune, shuffle_seed=0)
    try:
      dataset = tfds.builder(where, data_dir=directory).as_dataset(
        split="train", shuffle_files=True, as_supervised=True, read_config=read
      )
    except NotImplementedError as e:  # an ArrayRecord-prepared dataset: TFDS reads it only with grain
      raise UserError(f"TFDS' as_dataset: {str(e).strip().splitlines()[0]}") from None
    dataset = dataset.repeat()
  for images, labels in dataset.batch(batch, drop_remainder=True).prefetch(autotune):
    yield images.numpy(), labels.numpy()


def measure(batches, batch: int, count: int, warmup: int) -> float:
  for _ in range(warmup):
    next(batches)
  start = time.perf_counter()
  for _ in range(count):
    images, _ = next(batches)
    assert images.shape[0] == batch and images.dtype == np.uint8, (images.shape, images.dtype)
  return count * batch / (time.perf_counter() - start)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.reader or not f.data:
    raise UserError("give --reader and at least one --data")
  name, workers = reader_name(f.reader)
  for spec in f.data:
    parse(spec)
    row = {"data": spec, "reader": f.reader}
    try:
      if name == "convjax":
        batches = convjax_batches(spec, f.batch, workers)
      else:
        batches = {"grain": grain_batches, "tf.data": tf_data_batches}[name](spec, f.batch)
      row["images_per_second"] = measure(batches, f.batch, f.batches, f.warmup)
    except UserError as e:
      row["error"] = str(e)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  cli.run(main)
