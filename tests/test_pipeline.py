"""The input pipelines: on-device vs streamed (same batches), any device or process count, no
TensorFlow needed, crops for images of any size, and the choice between the two."""

import json
import os
import re
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convjax.errors import UserError
from tests.conftest import (
  MNIST_EPOCH,
  REPO,
  SHARED,
  binary_argv,
  binary_env,
  history,
  kill_after_first_checkpoint,
  restore_state,
  run_binary,
)

ARRAY_RECORD = SHARED / "datasets" / "tfds_array_record"
STREAM = ["--config.data.pipeline=stream", f"--config.data.data_dir={ARRAY_RECORD}"]

# Runs a binary with TensorFlow and TFDS absent: their imports fail as if not installed.
WITHOUT_TENSORFLOW = """
import importlib.machinery, runpy, sys
class Hide(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
      return None
    return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = Hide
module = sys.argv.pop(1)
sys.argv[0] = module
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_without_tensorflow(module, *args, timeout=900, hidden=("tensorflow", "tensorflow_datasets")):
  """The binary with the packages `hidden` absent (TensorFlow and TFDS unless told)."""
  script = WITHOUT_TENSORFLOW.replace('("tensorflow", "tensorflow_datasets")', repr(tuple(hidden)))
  return subprocess.run(
    [sys.executable, "-c", script, *binary_argv(module, *args)[2:]],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env={k: v for k, v in os.environ.items() if k != "TFDS_DATA_DIR"},
  )


def assert_close_histories(a, b, tol):
  assert [sorted(r) for r in a] == [sorted(r) for r in b]
  for ra, rb in zip(a, b, strict=True):
    for key in ra:
      assert abs(ra[key] - rb[key]) <= tol, (key, ra, rb)


@pytest.mark.slow
def test_the_documented_eight_device_command_runs_a_full_epoch_and_matches_one_device(tmp_path, mnist_epoch_run):
  """The 'Scaling out' guide's command as written (a full MNIST epoch, the project's default XLA
  settings) on 8 devices, against the same command on 1 (the session's shared run)."""
  workdir = tmp_path / "8"
  result = run_binary(
    "experiments.train",
    *MNIST_EPOCH,
    f"--workdir={workdir}",
    env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  one, one_stderr = mnist_epoch_run
  for n, stderr in ((1, one_stderr), (8, result.stderr)):
    assert f"mesh: {n} x cpu" in stderr and "input pipeline: device" in stderr
  runs = {1: history(one), 8: history(workdir)}
  assert [r.get("epoch") for r in runs[8]] == [1, None] and runs[8][-1]["test_accuracy"] > 0.97
  # The same batches; only the float summation order differs (XLA's CPU convolutions split
  # their work by the per-device batch; test_parallel compares steps to 1e-5). 390 RMSprop
  # steps amplify it: accuracies agree within 0.5 points and the epoch's mean train loss
  # within 2%, while the loss of the weights after the last steps moves most (measured: val
  # 0.0778 vs 0.0847, test 0.0624 vs 0.0685 for accuracies 0.9749/0.9739, 0.9804/0.9785).
  assert [sorted(r) for r in runs[1]] == [sorted(r) for r in runs[8]]
  for one, eight in zip(runs[1], runs[8], strict=True):
    for key in one:
      tolerance = {"train_loss": 0.02 * one[key], "val_loss": 0.2 * one[key], "test_loss": 0.2 * one[key]}.get(
        key, 0.005
      )
      assert abs(one[key] - eight[key]) <= tolerance, (key, one, eight)


@pytest.mark.slow
def test_stream_equals_device_for_one_mnist_epoch(tmp_path, mnist_epoch_run):
  """The streamed pipeline (grain over TFDS' ArrayRecord copy) sees the batches the on-device
  one (TFRecord copy, the session's shared run) does: the same history and weights, bit for bit."""
  device, device_stderr = mnist_epoch_run
  assert "input pipeline: device (70,000 images 28x28x1 = 54.9 MB; budget 0.25 x free host RAM" in device_stderr
  stream = run_binary("experiments.train", *MNIST_EPOCH, *STREAM, f"--workdir={tmp_path / 'stream'}")
  assert stream.returncode == 0, stream.stderr[-3000:]
  assert "input pipeline: stream" in stream.stderr
  assert history(device) == history(tmp_path / "stream")
  a, b = restore_state(device, 1), restore_state(tmp_path / "stream", 1)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def sharded_mnist_test(root, shard_lengths, truncated_images=(), file_format="array_record"):
  """A copy of MNIST's test split in several shard files of `file_format` (ArrayRecord or
  TFRecord; the shared copies have one), the PNGs of the rows in truncated_images cut short."""
  from tensorboardX.record_writer import masked_crc32c
  from tensorflow_datasets.proto import tf_example_pb2
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

  source = ARRAY_RECORD / "mnist" / "3.0.1"
  target = root / "mnist" / "3.0.1"
  target.mkdir(parents=True)
  (target / "features.json").write_text((source / "features.json").read_text())
  info = json.loads((source / "dataset_info.json").read_text())
  info["fileFormat"] = file_format
  info["splits"] = [
    {**split, "shardLengths": [str(n) for n in shard_lengths]} for split in info["splits"] if split["name"] == "test"
  ]
  (target / "dataset_info.json").write_text(json.dumps(info))
  reader = ArrayRecordReader(str(source / "mnist-test.array_record-00000-of-00001"))
  records = reader.read(0, sum(shard_lengths))
  for row in truncated_images:
    example = tf_example_pb2.Example.FromString(records[row])
    image = example.features.feature["image"].bytes_list
    image.value[0] = image.value[0][:40]
    records[row] = example.SerializeToString()
  start = 0
  for i, n in enumerate(shard_lengths):
    path = str(target / f"mnist-test.{file_format}-{i:05d}-of-{len(shard_lengths):05d}")
    if file_format == "tfrecord":  # length, its masked CRC-32C, data, its masked CRC-32C
      with open(path, "wb") as f:
        for record in records[start : start + n]:
          header = struct.pack("<Q", len(record))
          f.write(header + struct.pack("<I", masked_crc32c(header)) + record)
          f.write(struct.pack("<I", masked_crc32c(record)))
    else:
      writer = ArrayRecordWriter(path, "group_size:1")
      for record in records[start : start + n]:
        writer.write(record)
      writer.close()
    start += n
  return root


def with_first_crc_renewed(blob: bytearray) -> bytearray:
  """A TFRecord file's bytes with its first record's data CRC computed again (tensorboardX's
  CRC, not convjax's), as if the record had been written with what it now holds."""
  from tensorboardX.record_writer import masked_crc32c

  end = 12 + struct.unpack("<Q", blob[:8])[0]
  blob[end : end + 4] = struct.pack("<I", masked_crc32c(bytes(blob[12:end])))
  return blob


def test_tfrecord_rows_equal_tfds_own_decoding_without_tensorflow(tmp_path, monkeypatch):
  """TFRecord shards read row by row (offsets from the record headers, kept as an index in the
  cache directory) give what TFDS' as_dataset decodes; TensorFlow is not imported; a damaged
  or cut file is one error naming it."""
  import tensorflow_datasets as tfds
  from convjax.data import tfds as tfds_data
  from convjax.data import tfrecord

  monkeypatch.setenv("CONVJAX_CACHE_DIR", str(tmp_path / "cache"))
  tfrecord._record_offsets.cache_clear()

  builder = tfds.builder("mnist", data_dir=str(sharded_mnist_test(tmp_path, (300, 200, 500), file_format="tfrecord")))
  assert tfds_data.file_format(builder) == "tfrecord" and len(builder.info.splits["test"].file_instructions) == 3
  # TFDS' own decoding (TensorFlow), its shards read one after another, not interleaved.
  in_order = tfds.ReadConfig(interleave_cycle_length=1)
  want = tfds.as_numpy(builder.as_dataset(split="test[250:750]", batch_size=-1, read_config=in_order))
  got = tfds_data.read_rows(builder, tfds_data.row_range(builder, "test[250:750]"))
  assert np.array_equal(got["image"], want["image"]) and np.array_equal(got["label"], want["label"])
  assert np.array_equal(tfds_data.labels_of(builder, tfds_data.RowRange("test", 250, 750)), want["label"])
  positions = np.random.default_rng(0).choice(1000, 50, replace=False)
  rows = tfds_data.Rows(builder, "test", positions).read(range(50))
  full = tfds_data.read_rows(builder, tfds_data.RowRange("test", 0, 1000))
  assert all(np.array_equal(r["image"], full["image"][p]) for r, p in zip(rows, positions, strict=True))
  # One index per shard file, in the cache directory, none beside the data; a damaged index is
  # rebuilt, and a cache directory that cannot be written only costs the next reader a pass.
  indexes = sorted((tmp_path / "cache" / "tfrecord-index").glob("*.npy"))
  assert len(indexes) == 3 and not list((tmp_path / "mnist").rglob("*.npy"))
  shard0 = tmp_path / "mnist" / "3.0.1" / "mnist-test.tfrecord-00000-of-00003"
  status = shard0.stat()
  (index0,) = [p for p in indexes if p.name.endswith(f"-{status.st_size}-{status.st_mtime_ns}.npy")]
  want_offsets = np.load(index0)
  assert len(want_offsets) == 301 and want_offsets[0] == 12 and want_offsets[-1] == status.st_size + 12
  index0.write_bytes(b"not an index")
  tfrecord._record_offsets.cache_clear()
  np.testing.assert_array_equal(tfrecord.record_offsets(str(shard0)), want_offsets)
  np.testing.assert_array_equal(np.load(index0), want_offsets)
  monkeypatch.setenv("CONVJAX_CACHE_DIR", str(shard0 / "not-a-folder"))
  tfrecord._record_offsets.cache_clear()
  again = tfds_data.read_rows(builder, tfds_data.row_range(builder, "test[250:750]"))
  assert np.array_equal(again["image"], want["image"])
  monkeypatch.setenv("CONVJAX_CACHE_DIR", str(tmp_path / "cache"))

  script = (
    "import sys, tensorflow_datasets as tfds; from convjax.data import tfds as t; "
    f"b = tfds.builder('mnist', data_dir={str(tmp_path)!r}); "
    "print(list(t.read_rows(b, t.RowRange('test', 295, 305))['label']), 'tensorflow' in sys.modules)"
  )
  hide = WITHOUT_TENSORFLOW.replace('("tensorflow", "tensorflow_datasets")', '("tensorflow",)').split("module = ")[0]
  result = subprocess.run([sys.executable, "-c", hide + script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == f"{list(full['label'][295:305])} False", result.stdout

  shard = tmp_path / "mnist" / "3.0.1" / "mnist-test.tfrecord-00001-of-00003"
  data = bytearray(shard.read_bytes())
  shard.write_bytes(data[:-7])
  with pytest.raises(UserError, match=rf"{shard}: the last record ends past the file's end .* it is truncated"):
    tfds_data.read_rows(builder, tfds_data.RowRange("test", 0, 10))
  data[8] ^= 0xFF  # the first record's length CRC
  shard.write_bytes(data)
  with pytest.raises(UserError, match=rf"{shard}: record 0 \(byte 0\) has a damaged header"):
    tfds_data.read_rows(builder, tfds_data.RowRange("test", 0, 10))
  data[8] ^= 0xFF
  data[12:16] = b"\xff" * 4  # the first record's data, its CRC left as it was
  shard.write_bytes(data)
  with pytest.raises(UserError, match=rf"{shard}: record 0 \(byte 0\) has damaged data \(its CRC-32C does not match\)"):
    tfds_data.read_rows(builder, tfds_data.RowRange("test", 300, 310))
  shard.write_bytes(with_first_crc_renewed(data))  # the same bytes, intact: not a tf.Example
  with pytest.raises(UserError, match=r"row 300 of mnist's 'test' split in .*: its record does not parse"):
    tfds_data.read_rows(builder, tfds_data.RowRange("test", 300, 310))


def test_the_tfds_extra_reads_without_tensorflow_and_another_extra_prepares():
  """`pip install 'convjax[tfds]'` brings no TensorFlow (a fresh venv with only it streams TFDS'
  TFRecord MNIST and trains); TensorFlow is in 'tfds-prepare', which the tests install."""
  import tomllib

  extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  names = lambda extra: {re.split(r"[<>=\[ ]", d)[0] for d in extras[extra]}  # noqa: E731
  assert not {n for n in names("tfds") if n.startswith("tensorflow") and n != "tensorflow-datasets"}, extras["tfds"]
  assert {"convjax", "tensorflow-cpu"} <= names("tfds-prepare")
  assert any(d.startswith("convjax[") and "tfds-prepare" in d for d in extras["test"]), extras["test"]


def write_tf_examples(path, images, labels, image_feature="image", label_feature="label", fmt="PNG"):
  """A TFRecord file of tf.Example records as a user writes them (encoded images, int64 labels),
  written without TensorFlow: TFDS' proto and tensorboardX's record framing."""
  import io

  from tensorboardX.record_writer import RecordWriter
  from tensorflow_datasets.proto import tf_example_pb2

  writer = RecordWriter(str(path))
  for image, label in zip(images, labels, strict=True):
    encoded = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(encoded, fmt)
    example = tf_example_pb2.Example()
    example.features.feature[image_feature].bytes_list.value.append(encoded.getvalue())
    example.features.feature[label_feature].int64_list.value.append(int(label))
    writer.write(example.SerializeToString())
  writer.close()


def test_user_tf_example_files_equal_the_same_arrays_and_train_streamed_without_tensorflow(
  tmp_path, mnist_arrays, monkeypatch
):
  """config.data.tfrecord: a user's tf.Example files (a glob per split, their own feature names)
  give the rows the same digits give as arrays, with the same validation hold-out, and train
  streamed with TensorFlow absent; a glob that matches nothing, a missing feature and an image
  that does not decode are each one error naming the file."""
  from convjax.config import default_config
  from convjax.data import splits, tfrecord

  monkeypatch.setenv("CONVJAX_CACHE_DIR", str(tmp_path / "cache"))
  train, test = np.load(mnist_arrays / "train2048.npz"), np.load(mnist_arrays / "test500.npz")
  data = tmp_path / "records"
  data.mkdir()
  keys = {"image_feature": "image/encoded", "label_feature": "image/class/label"}
  for i, part in enumerate((slice(0, 1000), slice(1000, 2048))):
    write_tf_examples(data / f"train-{i:05d}-of-00002", train["image"][part], train["label"][part], *keys.values())
  write_tf_examples(data / "test-00000-of-00001", test["image"], test["label"], *keys.values())

  def source(**fields):
    config = default_config()
    config.data.update({"dataset": "", "channels": 1, "validation_size": 0.25, **fields})
    return splits.open_source(config.data)

  records = source(tfrecord=str(data), train_split="train-*", test_split="test-*", **keys)
  arrays = source(arrays=str(mnist_arrays), train_split="train2048", test_split="test500")
  assert records.classes == arrays.classes == tuple("0123456789") and records.image_shape == (28, 28, 1)
  for name, split in records.splits().items():
    want = arrays.splits()[name]
    got = split.read(0, split.size)
    assert split.size == want.size and "train-*" in split.spec or name == "test", split.spec
    np.testing.assert_array_equal(got["image"], want.read(0, want.size)["image"])
    np.testing.assert_array_equal(got["label"], want.read(0, want.size)["label"])
  # A colour JPEG record decodes as Pillow decodes the same bytes.
  photos = np.random.default_rng(0).integers(0, 256, (2, 20, 30, 3), np.uint8)
  write_tf_examples(tmp_path / "photos", photos, [0, 1], fmt="JPEG")
  rows = tfrecord.ExampleRows(tfrecord.open_split(str(tmp_path), "photos"), [0, 1], "image", "label", 3)
  encoded = tfrecord.example_proto().FromString(rows._record(1)).features.feature["image"].bytes_list.value[0]
  np.testing.assert_array_equal(rows[1]["image"], np.asarray(Image.open(__import__("io").BytesIO(encoded))))

  with pytest.raises(UserError, match=r"no TFRecord files match '.*records/valid-\*' \(found: test-00000"):
    source(tfrecord=str(data), train_split="train-*", validation_split="valid-*", **keys)
  with pytest.raises(
    UserError,
    match=r"records/test-00000-of-00001: record 0 has no int64 feature 'label' \(its "
    r"features: image/class/label, image/encoded\); set config.data.image_feature",
  ):
    source(tfrecord=str(data), train_split="test-*", test_split="")
  damaged = tmp_path / "damaged"
  damaged.mkdir()
  write_tf_examples(damaged / "train", train["image"][:3], train["label"][:3])
  blob = bytearray((damaged / "train").read_bytes())
  blob[blob.index(b"IDAT") + 8 : blob.index(b"IDAT") + 40] = b"\0" * 32  # the first PNG's pixel data
  (damaged / "train").write_bytes(blob)
  with pytest.raises(UserError, match=r"damaged/train: record 0 \(byte 0\) has damaged data"):
    source(tfrecord=str(damaged), train_split="train", test_split="", validation_size=1)
  (damaged / "train").write_bytes(with_first_crc_renewed(blob))  # the record intact, its PNG not
  with pytest.raises(UserError, match=r"damaged/train: record 0: its image 'image' does not decode"):
    source(tfrecord=str(damaged), train_split="train", test_split="", validation_size=1)

  run = run_without_tensorflow(
    "experiments.train",
    "--config=configs/mnist.py",
    f"--workdir={tmp_path / 'run'}",
    "--config.data.dataset=",
    f"--config.data.tfrecord={data}",
    "--config.data.train_split=train-*",
    "--config.data.test_split=test-*",
    "--config.data.image_feature=image/encoded",
    "--config.data.label_feature=image/class/label",
    "--config.data.validation_size=0.25",
    "--config.data.pipeline=stream",
    "--config.num_epochs=1",
    "--config.steps_per_epoch=16",
    "--config.eval_batch_size=250",
    hidden=("tensorflow",),
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert "input pipeline: stream" in run.stderr
  assert history(tmp_path / "run")[-1]["test_accuracy"] > 0.6, history(tmp_path / "run")


def test_array_record_rows_equal_tfds_own_decoding_across_shard_files(tmp_path):
  """Rows read record by record, parsed with TFDS' tf.Example proto and PNG-decoded by pyspng
  give what TFDS' own data source decodes, across shard files, with TensorFlow absent."""
  import tensorflow_datasets as tfds
  from convjax.data.tfds import Rows

  builder = tfds.builder("mnist", data_dir=str(sharded_mnist_test(tmp_path, (300, 200, 500))))
  assert len(builder.info.splits["test"].file_instructions) == 3
  positions = np.random.default_rng(0).choice(1000, 200, replace=False)
  want = builder.as_data_source("test").__getitems__([int(p) for p in positions])  # TFDS decodes
  fast, slow = Rows(builder, "test", positions), Rows(builder, "test", positions)
  slow.as_proto = False  # TFDS' per-feature numpy decoding of the records
  assert fast.as_proto
  for rows in (fast, slow):
    got = rows.read(range(200))
    assert [r["label"] for r in got] == [int(w["label"]) for w in want] and len({r["label"] for r in got}) == 10
    for a, b in zip(got, want, strict=True):
      assert a["image"].shape == (28, 28, 1) and a["image"].dtype == np.uint8 and np.array_equal(a["image"], b["image"])
  assert np.array_equal(fast[7]["image"], want[7]["image"])
  # The proto comes with TFDS, so rows still read with TensorFlow absent.
  script = (
    "import sys, numpy as np, tensorflow_datasets as tfds; from convjax.data.tfds import Rows; "
    f"rows = Rows(tfds.builder('mnist', data_dir={str(tmp_path)!r}), 'test', np.arange(295, 305)); "
    "print(rows.as_proto, [r['label'] for r in rows.read(range(10))], 'tensorflow' in sys.modules)"
  )
  hide = WITHOUT_TENSORFLOW.replace('("tensorflow", "tensorflow_datasets")', '("tensorflow",)').split("module = ")[0]
  assert '("tensorflow",)' in hide
  result = subprocess.run([sys.executable, "-c", hide + script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  labels = [int(w["label"]) for w in builder.as_data_source("test").__getitems__(list(range(295, 305)))]
  assert result.stdout.strip() == f"True {labels} False", result.stdout
  # A row whose image does not decode is one error naming it.
  broken = tfds.builder("mnist", data_dir=str(sharded_mnist_test(tmp_path / "broken", (300, 200), (350,))))
  with pytest.raises(UserError, match=r"row 350 of mnist's 'test' split in .*broken.*: its image does not decode"):
    Rows(broken, "test", np.arange(340, 360)).read(range(20))


def test_batches_are_read_at_low_priority_and_the_stepping_thread_keeps_its_own():
  """The reader threads yield the cores to the step (nice 19; per thread on Linux); the main
  thread, which dispatches the steps, keeps its priority."""
  import threading
  from types import SimpleNamespace
  from convjax import parallel
  from convjax.data import pipeline
  from convjax.data.preprocess import Fit

  class Rows:  # records the thread and nice value each row is read with
    def __init__(self):
      self.readers = set()

    def __getitem__(self, i):
      tid = threading.get_native_id()
      self.readers.add((tid, os.getpriority(os.PRIO_PROCESS, tid)))
      return {"image": np.full((4, 4, 1), i, np.uint8), "label": i % 3}

  rows, main = Rows(), threading.get_native_id()
  before = os.getpriority(os.PRIO_PROCESS, main)
  stream = pipeline.Stream(
    {"train": SimpleNamespace(rows=rows, size=64)}, parallel.make_mesh(1), 0, 8, 8, 8, (4, 4, 1), Fit()
  )
  try:
    batches = list(stream.train_batches(1))
  finally:
    stream.close()
  table = pipeline.train_index_table(0, 1, 8, 8, 64)
  assert [np.asarray(b["label"]).tolist() for b in batches] == (table % 3).tolist()
  assert {nice for _, nice in rows.readers} == {pipeline.READ_NICE} and main not in {t for t, _ in rows.readers}
  assert os.getpriority(os.PRIO_PROCESS, main) == before


FAULTS_PER_BATCH = """
import resource, sys
from convjax.benchmark import data_config
from convjax.data import pipeline
from convjax.data.splits import fit_for, open_source
if sys.argv[1] == "untuned":
  pipeline._malloc_tuned.append(True)  # keep_freed_memory skipped: glibc's defaults
data = data_config("folder:" + sys.argv[2] + "@150x150")
source = open_source(data)
train = source.splits(stream=True)["train"]
table = pipeline._TrainTable(0, train.size // 64, 64, train.size)
batches = pipeline._Batches(train.rows, table, (0, 64), 0, fit_for(data), source.image_shape)
for k in range(3):
  batches[k]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(3, 13):
  batches[k]
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def test_a_streamed_batch_of_photos_reuses_the_memory_the_last_one_freed():
  """keep_freed_memory (mallopt, in each reading process): reading batches of 64 cats-vs-dogs
  photos page-faults almost never; with glibc's defaults each batch faults thousands of times
  (its freed blocks went back to the kernel), which cost 10 of 34 ms of host time here."""
  folder = str(SHARED / "datasets" / "cats_and_dogs_small" / "train")
  faults = {}
  for mode in ("tuned", "untuned"):
    result = subprocess.run(
      [sys.executable, "-c", FAULTS_PER_BATCH, mode, folder], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    faults[mode] = float(result.stdout.split()[-1])
  assert faults["tuned"] < 100 and faults["untuned"] > 10 * max(faults["tuned"], 10), faults


SMALL = [
  "--config=configs/mnist.py",
  "--config.data.train_split=train[:2048]",
  "--config.data.validation_size=512",
  "--config.data.test_split=test[:512]",
  "--config.eval_batch_size=128",
  "--config.batch_size=64",
  "--config.num_epochs=3",
  "--config.steps_per_epoch=10",
  "--config.model_kwargs.dropout_rate=0.25",
  "--config.optimizer=sgd",
  "--config.learning_rate=0.01",
  *STREAM,
]


@pytest.mark.slow
def test_a_killed_streaming_run_resumes_to_the_uninterrupted_run(tmp_path):
  straight = run_binary("experiments.train", *SMALL, f"--workdir={tmp_path / 'straight'}")
  assert straight.returncode == 0, straight.stderr[-3000:]
  done = kill_after_first_checkpoint(tmp_path / "killed", *SMALL)
  assert 1 <= max(done) < 3, "no mid-run checkpoint to resume from"
  resumed = run_binary("experiments.train", *SMALL, f"--workdir={tmp_path / 'killed'}")
  assert resumed.returncode == 0 and "resumed from the checkpoint of step" in resumed.stderr
  assert history(tmp_path / "straight") == history(tmp_path / "killed")
  a, b = restore_state(tmp_path / "straight", 3), restore_state(tmp_path / "killed", 3)
  for k in a:
    assert np.array_equal(a[k], b[k]), k


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_streaming_processes_match_one(tmp_path):
  """Each process streams only its own devices' rows; together they train what one process does."""
  env = binary_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  one = subprocess.run(
    binary_argv("experiments.train", *SMALL, f"--workdir={tmp_path / 'one'}"),
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert one.returncode == 0, one.stderr[-3000:]
  port = _free_port()
  procs = [
    subprocess.Popen(
      binary_argv(
        "experiments.train",
        *SMALL,
        f"--workdir={tmp_path / 'two'}",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  errs = [p.communicate(timeout=600)[1] for p in procs]
  for p, err in zip(procs, errs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert "mesh: 4 x cpu over 2 process(es)" in errs[0] and "input pipeline: stream" in errs[0]
  # 1e-3: on an AVX2-only CPU the two runs' epoch-3 train loss differed by 1.1e-4 (2026-12-05)
  assert_close_histories(history(tmp_path / "one"), history(tmp_path / "two"), tol=1e-3)


def _mixed_size_folder(root, per_class=12):
  rng = np.random.default_rng(0)
  for split, n in (("train", per_class), ("validation", 4)):
    for c, colour in (("reds", 0), ("blues", 2)):
      os.makedirs(root / split / c)
      for i in range(n):
        h, w = rng.integers(20, 90, 2)
        pixels = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
        pixels[..., colour] = rng.integers(150, 255, (h, w))
        Image.fromarray(pixels).save(root / split / c / f"{i}.{'png' if i % 2 else 'jpg'}")
  return root


@pytest.mark.slow
def test_a_folder_of_mixed_image_sizes_trains_with_random_resized_crops(tmp_path):
  data = _mixed_size_folder(tmp_path / "data")
  args = [
    "--config=configs/cats_dogs.py",
    f"--config.data.folder={data}",
    "--config.data.test_split=",
    "--config.data.image_size=(32, 32)",
    "--config.data.random_resized_crop=(0.3, 1.0)",
    "--config.data.center_crop=0.875",
    "--config.model=mnist_convnet",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.num_epochs=2",
    "--config.steps_per_epoch=6",
    "--config.learning_rate=1e-3",
  ]
  result = run_binary("experiments.train", *args, f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "input pipeline: stream" in result.stderr  # random crops are drawn as the epoch goes
  records = history(tmp_path / "run")
  assert len(records) == 2 and all(np.isfinite(r["train_loss"]) for r in records)
  assert records[-1]["val_accuracy"] >= 0.75, records  # red vs blue: easy once it sees the images
  forced = run_binary("experiments.train", *args, "--config.data.pipeline=device", f"--workdir={tmp_path / 'x'}")
  assert forced.returncode == 1 and "random_resized_crop draws a new crop every epoch" in forced.stderr
  (data / "train" / "reds" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  broken = run_binary("experiments.train", *args, "--config.num_epochs=1", f"--workdir={tmp_path / 'z'}")
  assert broken.returncode == 1
  assert broken.stderr.strip().splitlines()[-1].startswith("error: cannot read image") and "broken.jpg" in broken.stderr
  skipped = run_binary(
    "experiments.train",
    *args,
    "--config.num_epochs=1",
    "--config.data.skip_bad_files=True",
    f"--workdir={tmp_path / 'w'}",
  )
  assert skipped.returncode == 0, skipped.stderr[-3000:]
  assert "unreadable file(s) (masked out of their batches)" in skipped.stderr
  (data / "train" / "reds" / "broken.jpg").unlink()
  plain = run_binary(
    "experiments.train",
    *args[:3],
    "--config.data.image_size=()",
    "--config.model=mnist_convnet",
    "--config.num_epochs=1",
    "--config.steps_per_epoch=6",
    "--config.data.pipeline=stream",
    f"--workdir={tmp_path / 'y'}",
  )
  assert plain.returncode == 1
  assert "set config.data.image_size to resize every image" in plain.stderr.strip().splitlines()[-1]


def test_random_resized_crop_draws_as_torchvision_and_center_crop_is_centred():
  from convjax.data.preprocess import Fit, center_crop_box, random_resized_crop_box

  rng = np.random.default_rng(0)
  boxes = [random_resized_crop_box(rng, 100, 200, (0.25, 0.5), (0.5, 2.0)) for _ in range(500)]
  for top, left, h, w in boxes:
    assert 0 <= top <= 100 - h and 0 <= left <= 200 - w
    assert 0.24 <= h * w / 20000 <= 0.51 and 0.45 <= w / h <= 2.2
  assert center_crop_box(100, 200, 0.5) == (25, 75, 50, 50)
  image = np.arange(100 * 200 * 3, dtype=np.uint8).reshape(100, 200, 3)
  out = Fit((32, 32), (0.08, 1.0), center_crop=0.875)(image, np.random.default_rng(1))
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(Fit((50, 50), center_crop=0.5)(image), image[25:75, 75:125])


@pytest.mark.slow
def test_the_pipeline_choice_is_logged_and_a_device_that_cannot_hold_the_data_is_one_error(tmp_path):
  args = [
    "--config=configs/mnist.py",
    "--config.data.train_split=train[:1024]",
    "--config.data.validation_size=256",
    "--config.data.test_split=",
    "--config.num_epochs=1",
    "--config.steps_per_epoch=2",
    f"--config.data.data_dir={ARRAY_RECORD}",
  ]
  small = run_binary("experiments.train", *args, "--config.data.device_fraction=1e-6", f"--workdir={tmp_path / 'a'}")
  assert small.returncode == 0, small.stderr[-3000:]
  assert "input pipeline: stream (1,024 images 28x28x1 = 0.8 MB; budget 1e-06 x free host RAM" in small.stderr
  forced = run_binary(
    "experiments.train",
    *args,
    "--config.data.device_fraction=1e-6",
    "--config.data.pipeline=device",
    f"--workdir={tmp_path / 'b'}",
  )
  assert forced.returncode == 1 and not (tmp_path / "b").exists()
  assert (
    forced.stderr.strip()
    .splitlines()[-1]
    .startswith(
      "error: config.data.pipeline='device': the data does not fit (1,024 images 28x28x1 = 0.8 MB; budget 1e-06"
    )
  )
  # TFDS' TFRecord copy of MNIST streams too, row by row without TensorFlow: the same batches.
  tfrecord = run_binary("experiments.train", *args[:-1], "--config.data.pipeline=stream", f"--workdir={tmp_path / 'c'}")
  assert tfrecord.returncode == 0, tfrecord.stderr[-3000:]
  assert "input pipeline: stream" in tfrecord.stderr
  assert history(tmp_path / "c") == history(tmp_path / "a")


def _digit_arrays(directory, n_train=3072, n_test=256):
  """Real MNIST digits written as the arrays a user brings (.npz and .npy pairs)."""
  from convjax.data import tfds as tfds_data

  builder = tfds_data.get_builder("mnist", str(ARRAY_RECORD), download=False)
  train = tfds_data.read_rows(builder, tfds_data.RowRange("train", 0, n_train))
  test = tfds_data.read_rows(builder, tfds_data.RowRange("test", 0, n_test))
  os.makedirs(directory)
  np.savez(directory / "train.npz", image=train["image"], label=train["label"])
  np.save(directory / "test_image.npy", test["image"])
  np.save(directory / "test_label.npy", test["label"])
  (directory / "classes.txt").write_text("\n".join(f"digit {i}" for i in range(10)))
  return directory


@pytest.mark.slow
def test_training_without_tensorflow_from_a_folder_and_from_arrays(tmp_path):
  """Neither tensorflow nor tensorflow_datasets importable: a folder run trains, checkpoints,
  resumes, writes history, plots and TensorBoard files; arrays train too; visualisation and
  the benchmark run; a TFDS dataset is one error naming the extra to install."""
  data = _mixed_size_folder(tmp_path / "folder")
  args = [
    "--config=configs/cats_dogs.py",
    f"--config.data.folder={data}",
    "--config.data.test_split=",
    "--config.data.image_size=(32, 32)",
    "--config.model=mnist_convnet",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.steps_per_epoch=3",
    "--config.learning_rate=1e-3",
  ]
  workdir = tmp_path / "run"
  first = run_without_tensorflow("experiments.train", *args, "--config.num_epochs=1", f"--workdir={workdir}")
  assert first.returncode == 0, first.stderr[-3000:]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "plots" / "learning_curves.png").exists()
  straight = run_without_tensorflow(
    "experiments.train", *args, "--config.num_epochs=2", "--config.overwrite=True", f"--workdir={tmp_path / 'straight'}"
  )
  assert straight.returncode == 0, straight.stderr[-3000:]
  # The same run, resumed from the first one's checkpoint: a kill between epochs, as far as it knows.
  (workdir / "config.json").write_text((tmp_path / "straight" / "config.json").read_text())
  resumed = run_without_tensorflow("experiments.train", *args, "--config.num_epochs=2", f"--workdir={workdir}")
  assert resumed.returncode == 0 and "resumed from the checkpoint of step 3 (the end of epoch 1)" in resumed.stderr, (
    resumed.stderr[-3000:]
  )
  assert history(workdir) == history(tmp_path / "straight")

  arrays = _digit_arrays(tmp_path / "arrays")
  on_arrays = run_without_tensorflow(
    "experiments.train",
    "--config=configs/mnist.py",
    f"--config.data.arrays={arrays}",
    "--config.data.validation_size=0.25",
    "--config.num_epochs=2",
    f"--workdir={tmp_path / 'arrays_run'}",
  )
  assert on_arrays.returncode == 0, on_arrays.stderr[-3000:]
  records = history(tmp_path / "arrays_run")
  assert records[-1]["test_accuracy"] > 0.85, records  # 72 steps of real digits
  assert "2304 of 3072 rows" in on_arrays.stderr  # 25% of the training arrays held out

  image = data / "validation" / "reds" / "0.jpg"
  viz = run_without_tensorflow(
    "experiments.visualize", f"--workdir={workdir}", f"--image={image}", "--config.viz.methods=activations,gradcam"
  )
  assert viz.returncode == 0, viz.stderr[-3000:]
  bench = run_without_tensorflow(
    "experiments.benchmark",
    f"--workdir={tmp_path / 'bench'}",
    "--config.models=mnist_convnet@28x28x1",
    "--config.batch_sizes=(8,)",
    "--config.precisions=('float32',)",
    "--config.modes=('inference',)",
    "--config.peers=",
    "--config.pipeline=",
  )
  assert bench.returncode == 0, bench.stderr[-3000:]
  tfds = run_without_tensorflow("experiments.train", "--config=configs/mnist.py", f"--workdir={tmp_path / 'tfds'}")
  assert tfds.returncode == 1 and "pip install 'convjax[tfds]'" in tfds.stderr.strip().splitlines()[-1]
