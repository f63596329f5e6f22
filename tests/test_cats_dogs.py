"""The cats-vs-dogs pipeline end to end: real folders, the TFDS route, data preparation."""

import csv
import json
import os
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from convjax.data import splits
from convjax.data.folders import decode_image
from convjax.train.loop import train_and_evaluate
from tests.conftest import (
  SHARED,
  assert_onnx_export_gives_the_runs_probabilities,
  link_cats_dogs_subset,
  loop_probabilities,
  run_binary,
)

CATS_DOGS = SHARED / "datasets" / "cats_and_dogs_small"


@pytest.mark.slow
def test_short_real_run_learns(tmp_path):
  """600 real training photos at 64x64, 240 steps: the loss falls and validation beats chance;
  predict labels test photos as the loop's evaluation does, and the ONNX export gives the
  run's probabilities."""
  data = link_cats_dogs_subset(tmp_path / "data", {"train": 300, "validation": 500})
  workdir = tmp_path / "run"
  result = run_binary(
    "experiments.train",
    "--config=configs/cats_dogs.py",
    f"--workdir={workdir}",
    f"--config.data.folder={data}",
    "--config.data.test_split=",
    "--config.data.image_size=(64, 64)",
    "--config.num_epochs=8",
    "--config.steps_per_epoch=30",
    "--config.learning_rate=3e-4",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  history = json.loads((workdir / "history.json").read_text())
  assert len(history) == 8
  assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.05, history
  # 1,000 validation photos: chance is 0.5 +- 0.016, so 0.58 is 5 standard deviations above it.
  assert history[-1]["val_accuracy"] > 0.58, history
  assert "train (600 images, 2 classes)" in result.stderr

  # predict on 20 real test photos of mixed sizes: the labels the loop's evaluation gives them.
  test_root = SHARED / "datasets" / "cats_and_dogs_small" / "test"
  photos = [str(test_root / c / f) for c in ("cats", "dogs") for f in sorted(os.listdir(test_root / c))[:10]]
  photo_dir = tmp_path / "photos"
  photo_dir.mkdir()
  for path in photos:
    os.symlink(path, photo_dir / os.path.basename(path))
  predicted = run_binary(
    "experiments.predict", f"--workdir={workdir}", f"--images={photo_dir}/*.jpg", f"--output={tmp_path / 'preds.csv'}"
  )
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  rows = list(csv.DictReader(open(tmp_path / "preds.csv")))
  assert len(rows) == 20 and {r["class_1"] for r in rows} <= {"cats", "dogs"}
  images = np.stack([decode_image(str(photo_dir / os.path.basename(p)), 3, (64, 64)) for p in photos])
  p_dog = loop_probabilities(workdir, 8, images)[:, 0]
  by_file = {os.path.basename(r["file"]): r["class_1"] for r in rows}
  assert [by_file[os.path.basename(p)] for p in photos] == ["dogs" if p > 0.5 else "cats" for p in p_dog]
  # Its ONNX export: the run's probabilities on 100 real test photos.
  photos = [str(test_root / c / f) for c in ("cats", "dogs") for f in sorted(os.listdir(test_root / c))[:50]]
  assert_onnx_export_gives_the_runs_probabilities(workdir, tmp_path / "served", photos=photos)


def _mock_cats_vs_dogs_metadata(data_dir, num_examples):
  """TFDS metadata (split sizes) for the mocked cats_vs_dogs, as a prepared copy would have."""
  builder = tfds.builder("cats_vs_dogs", data_dir=str(data_dir))
  os.makedirs(builder.data_dir)
  template = tfds.core.naming.ShardedFileTemplate(
    data_dir=builder.data_dir, dataset_name="cats_vs_dogs", split="train", filetype_suffix="tfrecord"
  )
  builder.info.set_splits(
    tfds.core.SplitDict(
      [tfds.core.SplitInfo(name="train", shard_lengths=[num_examples], num_bytes=0, filename_template=template)]
    )
  )
  builder.info.write_to_directory(builder.data_dir)


@pytest.mark.slow
def test_tfds_route_gives_balanced_subsets_and_trains_with_augmentation(tmp_path):
  """Online users' path: TFDS cats_vs_dogs (mocked), balanced by class, resized, augmented."""
  from configs.cats_dogs_augmented import get_config

  _mock_cats_vs_dogs_metadata(tmp_path / "tfds", 300)
  config = get_config()
  config.data.folder = ""
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.per_class = (40, 20, 20)
  config.data.image_size = (48, 48)
  config.num_epochs, config.steps_per_epoch, config.batch_size, config.eval_batch_size = 1, 2, 8, 8
  with tfds.testing.mock_data(
    num_examples=300, data_dir=str(tmp_path / "tfds"), policy=tfds.testing.MockPolicy.USE_FILES
  ):
    opened = splits.open_source(config.data).splits()
    assert {k: s.size for k, s in opened.items()} == {"train": 80, "validation": 40, "test": 40}
    train = opened["train"].read(0, 80)
    assert train["image"].shape == (80, 48, 48, 3) and train["image"].dtype == np.uint8
    assert np.bincount(train["label"]).tolist() == [40, 40]
    history = train_and_evaluate(config, str(tmp_path / "run"))
  assert [sorted(r) for r in history][-1] == ["test_accuracy", "test_epoch", "test_loss"]
  assert np.isfinite(history[0]["train_loss"])


def test_balanced_positions_take_each_class_in_order(tmp_path):
  _mock_cats_vs_dogs_metadata(tmp_path / "tfds", 200)
  with tfds.testing.mock_data(
    num_examples=200, data_dir=str(tmp_path / "tfds"), policy=tfds.testing.MockPolicy.USE_FILES
  ):
    from convjax.data import tfds as tfds_data

    builder = tfds_data.get_builder("cats_vs_dogs", str(tmp_path / "tfds"), download=False)
    labels = tfds_data.read_rows(builder, tfds_data.RowRange("train", 0, 200))["label"]
    subsets = tfds_data.balanced_positions(builder, "train", (10, 5, 5))
    with pytest.raises(Exception, match="fewer than the 300 that per_class"):
      tfds_data.balanced_positions(builder, "train", (100, 100, 100))
  for c in (0, 1):
    where = np.flatnonzero(labels == c)
    assert [np.intersect1d(s, where).tolist() for s in subsets] == [
      where[:10].tolist(),
      where[10:15].tolist(),
      where[15:20].tolist(),
    ]


def _kaggle_zip(path, per_class):
  with zipfile.ZipFile(path, "w") as archive:
    for c in ("cat", "dog"):
      for i in range(per_class):
        archive.writestr(f"train/{c}.{i}.jpg", f"{c} {i}".encode())
  return path


def test_prepare_data_builds_the_layout_and_never_overwrites(tmp_path):
  source = _kaggle_zip(tmp_path / "train.zip", 12)
  out = tmp_path / "small"
  result = run_binary("experiments.prepare_data", f"--source={source}", f"--output={out}", "--counts=5,3,2")
  assert result.returncode == 0, result.stderr[-2000:]
  listing = {
    split: {c: sorted(os.listdir(out / split / c)) for c in os.listdir(out / split)} for split in os.listdir(out)
  }
  # The first 5/3/2 files per class by number (numeric, not string, order: 10 after 9).
  assert listing["train"]["cats"] == sorted(f"cat.{i}.jpg" for i in range(5))
  assert listing["validation"]["dogs"] == sorted(f"dog.{i}.jpg" for i in range(5, 8))
  assert listing["test"]["cats"] == ["cat.8.jpg", "cat.9.jpg"]
  assert (out / "test" / "cats" / "cat.9.jpg").read_bytes() == b"cat 9"

  before = sorted(str(p) for p in out.rglob("*"))
  again = run_binary("experiments.prepare_data", f"--source={source}", f"--output={out}")
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1].startswith("error: output") and "already exists" in again.stderr
  assert sorted(str(p) for p in out.rglob("*")) == before
  # A source with too few files fails before writing anything.
  short = run_binary("experiments.prepare_data", f"--source={source}", f"--output={tmp_path / 'x'}")
  assert "has 12 cat files, fewer than the 2000" in short.stderr and not (tmp_path / "x").exists()
  # An extracted folder works the same way.
  folder = tmp_path / "extracted"
  with zipfile.ZipFile(source) as archive:
    archive.extractall(folder)
  result = run_binary(
    "experiments.prepare_data", f"--source={folder / 'train'}", f"--output={tmp_path / 'from_folder'}", "--counts=5,3,2"
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / "from_folder" / "train" / "dogs")) == sorted(f"dog.{i}.jpg" for i in range(5))


@pytest.mark.slow
def test_bad_file_in_a_folder_is_one_error_or_skipped_with_the_flag(tmp_path):
  data = link_cats_dogs_subset(tmp_path / "data", {"train": 20, "validation": 10})
  (data / "train" / "dogs" / "dog.broken.jpg").write_bytes(b"\xff\xd8 truncated")
  args = [
    "--config=configs/cats_dogs.py",
    f"--config.data.folder={data}",
    "--config.data.test_split=",
    "--config.data.image_size=(48, 48)",
    "--config.num_epochs=1",
    "--config.steps_per_epoch=1",
  ]
  failed = run_binary("experiments.train", *args, f"--workdir={tmp_path / 'a'}")
  assert failed.returncode == 1
  last = failed.stderr.strip().splitlines()[-1]
  assert last.startswith("error: cannot read image") and "dog.broken.jpg" in last
  assert not (tmp_path / "a").exists()
  skipped = run_binary("experiments.train", *args, "--config.data.skip_bad_files=True", f"--workdir={tmp_path / 'b'}")
  assert skipped.returncode == 0, skipped.stderr[-2000:]
  assert "skipped 1 unreadable file(s)" in skipped.stderr and "train (40 images" in skipped.stderr
  tiny = run_binary(
    "experiments.train",
    *args[:3],
    "--config.data.image_size=(28, 28)",
    "--config.data.skip_bad_files=True",
    f"--workdir={tmp_path / 'c'}",
  )
  assert tiny.returncode == 1 and not (tmp_path / "c").exists()
  assert (
    "error: model 'cats_dogs_convnet' cannot take input of shape (28, 28, 3) (its feature map "
    "comes out (0, 0, 128): the image is too small)"
  ) in tiny.stderr


def test_preview_binary_writes_a_grid(tmp_path):
  out = tmp_path / "aug.png"
  result = run_binary(
    "experiments.preview_augmentation",
    "--config=configs/cats_dogs_augmented.py",
    f"--image={CATS_DOGS / 'train' / 'cats' / 'cat.3.jpg'}",
    f"--output={out}",
    "--num=3",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert out.read_bytes()[:4] == b"\x89PNG"
  none = run_binary(
    "experiments.preview_augmentation",
    "--config=configs/cats_dogs.py",
    f"--image={CATS_DOGS / 'train' / 'cats' / 'cat.3.jpg'}",
    f"--output={out}",
  )
  assert none.returncode == 1 and "error: the config has no augmentation" in none.stderr
