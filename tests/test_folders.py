"""Image folders on the real cats_and_dogs_small, resizing, and every bad-input case."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from convjax.data import folders, splits
from convjax.data.preprocess import resize_bilinear
from convjax.errors import UserError
from convjax.config import default_config
from tests.conftest import SHARED

CATS_DOGS = SHARED / "datasets" / "cats_and_dogs_small"


def test_listing_counts_and_labels_of_the_real_folders():
  counts = {}
  for split in ("train", "validation", "test"):
    listing = folders.list_split(str(CATS_DOGS), split)
    assert listing.classes == ("cats", "dogs")
    counts[split] = np.bincount(listing.labels).tolist()
    # Label i is the i-th class folder, whatever the file is called.
    for path, label in zip(listing.files, listing.labels, strict=True):
      assert os.path.basename(os.path.dirname(path)) == listing.classes[label]
  assert counts == {"train": [1000, 1000], "validation": [500, 500], "test": [500, 500]}


def test_decoded_split_shapes_and_values():
  listing = folders.list_split(str(CATS_DOGS), "validation")
  small = listing._replace(
    files=listing.files[:3] + listing.files[-3:], labels=np.concatenate([listing.labels[:3], listing.labels[-3:]])
  )
  arrays = folders.decode_split(small, channels=3, image_size=(150, 150))
  assert arrays["image"].shape == (6, 150, 150, 3) and arrays["image"].dtype == np.uint8
  assert arrays["label"].tolist() == [0, 0, 0, 1, 1, 1]
  with Image.open(small.files[0]) as img:
    expected = resize_bilinear(np.asarray(img.convert("RGB")), (150, 150))
  assert np.abs(arrays["image"][0] - expected).max() <= 0.5 + 1e-4
  gray = folders.decode_split(small, channels=1, image_size=(64, 48))
  assert gray["image"].shape == (6, 64, 48, 1)


def test_load_folder_label_modes():
  images, labels, classes = folders.load_folder(str(CATS_DOGS), "test", (32, 32), label_mode="categorical")
  assert images.shape == (1000, 32, 32, 3) and classes == ("cats", "dogs")
  assert labels.shape == (1000, 2) and labels.sum(0).tolist() == [500.0, 500.0]
  binary = folders.encode_labels(np.array([0, 1, 1]), 2, "binary")
  assert binary.dtype == np.float32 and binary.tolist() == [0.0, 1.0, 1.0]
  with pytest.raises(UserError, match="label_mode='binary' needs 2 classes"):
    folders.encode_labels(np.array([0, 1, 2]), 3, "binary")


def test_resize_matches_tf_image_resize_on_a_real_photo():
  tf = pytest.importorskip("tensorflow")
  with Image.open(CATS_DOGS / "train" / "dogs" / "dog.1.jpg") as img:
    photo = np.asarray(img.convert("RGB"))
  for size in ((150, 150), (64, 100), (300, 41)):
    ours = resize_bilinear(photo, size)
    theirs = tf.image.resize(photo, size, method="bilinear").numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-3, err_msg=str(size))


def _pillow_decode(path, mode):
  with Image.open(path) as img:
    return np.asarray(img.convert(mode))


def test_a_files_bytes_read_in_four_calls_are_its_bytes():
  """read_bytes: a photo's bytes; a file whose size the file system does not know in advance
  (/proc's, fstat size 0) read to its end; a missing file is an OSError naming it."""
  photo = next((CATS_DOGS / "train" / "cats").glob("*.jpg"))
  assert folders.read_bytes(str(photo)) == photo.read_bytes()
  assert os.stat("/proc/self/status").st_size == 0
  assert folders.read_bytes("/proc/self/status").startswith(b"Name:\t")
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    folders.read_bytes(str(CATS_DOGS / "missing.jpg"))


def test_jpeg_decoded_by_simplejpeg_equals_pillow_on_every_real_photo(tmp_path):
  """decode_image reads JPEG through simplejpeg (libjpeg-turbo, accurate DCT, fancy
  upsampling), as Pillow does: the same pixels on the 2,000 cats-vs-dogs training photos in
  colour and every tenth in grey; a grey JPEG, a CMYK one (Pillow's fallback) and a truncated one (one error naming it)."""
  photos = sorted(CATS_DOGS.glob("train/*/*.jpg"))
  assert len(photos) == 2000
  for path in photos:
    assert folders.decode_jpeg(path.read_bytes(), 3) is not None, path
    np.testing.assert_array_equal(folders.decode_image(str(path), 3, None), _pillow_decode(path, "RGB"), str(path))
  for path in photos[::10]:
    np.testing.assert_array_equal(
      folders.decode_image(str(path), 1, None)[..., 0], _pillow_decode(path, "L"), str(path)
    )
  rng = np.random.default_rng(0)
  grey, cmyk = tmp_path / "grey.jpg", tmp_path / "cmyk.jpg"
  Image.fromarray(rng.integers(0, 256, (40, 30), np.uint8), "L").save(grey, quality=80)
  Image.fromarray(rng.integers(0, 256, (40, 30, 4), np.uint8), "CMYK").save(cmyk, quality=80)
  for path in (grey, cmyk):
    for channels, mode in ((1, "L"), (3, "RGB")):
      ours = folders.decode_image(str(path), channels, None)
      np.testing.assert_array_equal(ours.reshape(_pillow_decode(path, mode).shape), _pillow_decode(path, mode), mode)
  assert folders.decode_jpeg(cmyk.read_bytes(), 3) is None  # libjpeg does not convert CMYK: Pillow does
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(photos[0].read_bytes()[:2000])
  with pytest.raises(UserError, match=r"cannot read image .*truncated\.jpg"):
    folders.decode_image(str(truncated), 3, None)


def test_png_decoded_by_libspng_equals_pillow_and_16_bit_png_is_scaled_not_truncated(tmp_path, monkeypatch):
  """One decoder for folders and TFRecord rows: 8-bit (and 1-bit) PNGs of every colour type
  through libspng give Pillow's pixels at 1 and 3 channels; 16-bit PNGs go to Pillow and are
  rounded x / 257, where libspng would drop the low byte (1 level apart)."""
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (20, 30, 3), np.uint8)
  ramp = (np.arange(600) * 109).reshape(20, 30).astype(np.uint16)
  images = {
    "grey": Image.fromarray(rgb[..., 0], "L"),
    "rgb": Image.fromarray(rgb, "RGB"),
    "rgba": Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"),
    "grey_alpha": Image.fromarray(rgb[..., 0], "L").convert("LA"),
    "palette": Image.fromarray(rgb, "RGB").convert("P"),
    "one_bit": Image.fromarray(rgb[..., 0] > 127),
    "grey16": Image.fromarray(ramp),
  }
  load, by_libspng = folders.pyspng.load, []
  monkeypatch.setattr(folders.pyspng, "load", lambda *a: by_libspng.append(a) or load(*a))
  for name, image in images.items():
    path = tmp_path / f"{name}.png"
    image.save(path)
    for channels, mode in ((1, "L"), (3, "RGB")):
      with Image.open(path) as img:
        pillow = np.asarray(folders.to_8_bits(img, name).convert(mode)).reshape(20, 30, channels)
      np.testing.assert_array_equal(folders.decode_image(str(path), channels, None), pillow, f"{name} {mode}")
  assert len(by_libspng) == 12  # 8-bit and 1-bit: 6 at 3 channels, 6 tried at 1 (colour ones fall back)
  for channels in (1, 3):
    np.testing.assert_array_equal(
      folders.decode_image(str(tmp_path / "grey16.png"), channels, None),
      np.repeat(np.rint(ramp / 257.0).astype(np.uint8)[..., None], channels, -1),
    )


def _tiny_folder(root, per_class=4, size=(20, 30)):
  rng = np.random.default_rng(0)
  for split in ("train", "validation"):
    for name in ("cats", "dogs"):
      os.makedirs(root / split / name)
      for i in range(per_class):
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(root / split / name / f"{i}.png")
  return root


def test_mixed_modes_are_converted_and_bad_files_named_or_skipped(tmp_path, caplog):
  root = _tiny_folder(tmp_path / "data")
  cats = root / "train" / "cats"
  Image.fromarray(np.full((20, 30), 7, np.uint8), "L").save(cats / "gray.png")
  Image.fromarray(np.full((20, 30, 4), 9, np.uint8), "RGBA").save(cats / "rgba.png")
  listing = folders.list_split(str(root), "train")
  arrays = folders.decode_split(listing, channels=3)
  assert arrays["image"].shape == (10, 20, 30, 3)
  assert (arrays["image"][listing.files.index(str(cats / "gray.png"))] == 7).all()
  assert (arrays["image"][listing.files.index(str(cats / "rgba.png"))] == 9).all()

  (cats / "broken.jpg").write_bytes(b"this is not a jpeg")
  listing = folders.list_split(str(root), "train")
  with pytest.raises(UserError, match=r"cannot read image .*broken\.jpg"):
    folders.decode_split(listing)
  arrays = folders.decode_split(listing, skip_bad_files=True)
  assert arrays["image"].shape[0] == 10
  assert "skipped 1 unreadable file(s)" in caplog.text and "broken.jpg" in caplog.text


def test_streamed_rows_read_together_are_each_files_image_and_a_bad_one_is_named_or_none(tmp_path):
  """FolderRows.read (the streamed batches' reader: every file read, then every image decoded)
  gives what decode_image gives file by file; a damaged file and a file gone since the listing
  are one error naming the file, or None rows with skip_bad_files."""
  photos = sorted(CATS_DOGS.glob("train/*/*.jpg"))[:6]
  root = tmp_path / "photos"
  root.mkdir()
  files = [str(shutil.copy(p, root / p.name)) for p in photos]
  rows = folders.FolderRows(files, np.arange(6), 3)
  got = rows.read([4, 0, 2])
  assert [r["label"] for r in got] == [4, 0, 2]
  for r, i in zip(got, (4, 0, 2), strict=True):
    np.testing.assert_array_equal(r["image"], folders.decode_image(files[i], 3, None))
  np.testing.assert_array_equal(rows[1]["image"], _pillow_decode(photos[1], "RGB"))
  (root / photos[1].name).write_bytes(b"\xff\xd8 damaged")
  os.remove(files[3])
  for i, name in ((1, photos[1].name), (3, photos[3].name)):
    with pytest.raises(UserError, match=rf"cannot read image .*{name}"):
      rows.read([0, i, 2])
  skipping = folders.FolderRows(files, np.arange(6), 3, skip_bad_files=True)
  assert [r is None for r in skipping.read([0, 1, 2, 3])] == [False, True, False, True]


def test_structural_errors_name_the_folder(tmp_path):
  root = _tiny_folder(tmp_path / "data")
  with pytest.raises(UserError, match="image folder root .*nowhere.* does not exist"):
    folders.list_split(str(tmp_path / "nowhere"), "train")
  with pytest.raises(UserError, match=r"split folder .*test.* does not exist \(splits in .*: train, validation\)"):
    folders.list_split(str(root), "test")
  for f in (root / "validation" / "dogs").iterdir():
    f.unlink()
  with pytest.raises(UserError, match=r"class folder .*validation/dogs.* has no images"):
    folders.list_split(str(root), "validation")
  shutil.rmtree(root / "validation" / "dogs")
  with pytest.raises(UserError, match=r"has classes \['cats'\] but the training split has \['cats', 'dogs'\]"):
    folders.list_split(str(root), "validation", classes=("cats", "dogs"))
  os.makedirs(root / "empty")
  with pytest.raises(UserError, match="has no class sub-folders"):
    folders.list_split(str(root), "empty")
  Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(root / "train" / "dogs" / "small.png")
  with pytest.raises(UserError, match=r"small\.png.* is 10x10 but .* is 30x20; set an image size"):
    folders.decode_split(folders.list_split(str(root), "train"))


def test_config_splits_from_a_folder(tmp_path):
  root = _tiny_folder(tmp_path / "data", per_class=3)
  config = default_config()
  config.data.folder = str(root)
  config.data.image_size = (8, 12)
  config.data.validation_split = "validation"
  config.data.test_split = ""
  opened = splits.open_source(config.data).splits()
  assert {k: s.size for k, s in opened.items()} == {"train": 6, "validation": 6}
  rows = opened["train"].read(2, 5)
  assert rows["image"].shape == (3, 8, 12, 3) and rows["label"].tolist() == [0, 1, 1]
  assert opened["train"].read(6, 6)["image"].shape == (0, 8, 12, 3)
  # Without a validation folder, a seeded random fraction of train is held out.
  config.data.validation_split = ""
  config.data.validation_size = 0.34
  held = splits.open_source(config.data).splits()
  assert {k: s.size for k, s in held.items()} == {"train": 3, "validation": 3}
  assert sorted(np.concatenate([held[k].read(0, 3)["label"] for k in held]).tolist()) == [0, 0, 0, 1, 1, 1]
  config.data.validation_size = 0.0
  with pytest.raises(UserError, match="leaves 0 of 6 training images for validation"):
    splits.open_source(config.data).splits()


def test_an_archive_is_extracted_once_into_the_cache(tmp_path):
  import tarfile

  root = _tiny_folder(tmp_path / "pets", per_class=2)
  archive = tmp_path / "pets.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(root, arcname="pets")
  cache = tmp_path / "cache"
  extracted = folders.extracted_root(str(archive), str(cache))
  assert extracted.startswith(str(cache)) and extracted.endswith("pets")
  assert folders.list_split(extracted, "train").classes == ("cats", "dogs")
  marker = os.path.join(extracted, "train", "cats", "0.png")
  mtime = os.stat(marker).st_mtime_ns
  assert folders.extracted_root(str(archive), str(cache)) == extracted  # reused, not re-extracted
  assert os.stat(marker).st_mtime_ns == mtime
  assert [p for p in os.listdir(cache) if p.startswith(".")] == []
  (tmp_path / "bad.tar.gz").write_bytes(b"not a tar file")
  with pytest.raises(UserError, match="cannot extract image folder archive .*bad.tar.gz"):
    folders.extracted_root(str(tmp_path / "bad.tar.gz"), str(cache))
  assert [p for p in os.listdir(cache) if p.startswith(".")] == []


def test_a_folder_without_splits_is_split_at_random_with_a_seed(tmp_path):
  root = tmp_path / "digits"
  rng = np.random.default_rng(0)
  for c in range(3):
    os.makedirs(root / str(c))
    for i in range(10):
      Image.fromarray(rng.integers(0, 255, (6, 6, 3), np.uint8)).save(root / str(c) / f"{i}.png")
  config = default_config()
  config.data.folder, config.data.train_split = str(root), ""
  config.data.test_size, config.data.validation_size, config.data.split_seed = 0.2, 0.1, 8
  config.data.channels = 1
  opened = splits.open_source(config.data).splits()
  # 30 images: 6 test (20%), 3 validation (10% of 24, rounded up), 21 train.
  assert {k: s.size for k, s in opened.items()} == {"train": 21, "validation": 3, "test": 6}
  assert opened["train"].classes == ("0", "1", "2")
  images = {k: s.read(0, s.size)["image"] for k, s in opened.items()}
  assert images["test"].shape == (6, 6, 6, 1)
  every = np.concatenate([x.reshape(len(x), -1) for x in images.values()])
  assert len({row.tobytes() for row in every}) == 30  # disjoint, nothing lost
  again = splits.open_source(config.data).splits()["test"].read(0, 6)["image"]
  np.testing.assert_array_equal(again, images["test"])
  config.data.split_seed = 9
  assert not np.array_equal(splits.open_source(config.data).splits()["test"].read(0, 6)["image"], images["test"])
