import numpy as np
import pytest

from convjax.data import tfds as tfds_data
from convjax.errors import UserError
from convjax.data.pipeline import eval_index_table, train_index_table


@pytest.fixture(scope="module")
def mnist():
  return tfds_data.get_builder("mnist", download=False)


def test_validation_is_carved_from_the_end_of_train(mnist):
  splits = tfds_data.resolve_splits(mnist, "train", "", 10_000, "test")
  assert splits["train"] == tfds_data.RowRange("train", 0, 50_000)
  assert splits["validation"] == tfds_data.RowRange("train", 50_000, 60_000)
  assert splits["test"] == tfds_data.RowRange("test", 0, 10_000)
  sliced = tfds_data.resolve_splits(mnist, "train[1000:5000]", "", 1000, "")
  assert sliced == {
    "train": tfds_data.RowRange("train", 1000, 4000),
    "validation": tfds_data.RowRange("train", 4000, 5000),
  }


def test_validation_size_is_a_count_or_a_fraction_of_train():
  from convjax.config import default_config
  from convjax.data.splits import open_source

  data = default_config().data
  data.train_split = "train[:1000]"
  for size, expected in ((0.1, 100), (0.25, 250), (300, 300)):
    data.validation_size = size
    splits = open_source(data).splits()
    assert (splits["train"].size, splits["validation"].size) == (1000 - expected, expected)
    assert splits["validation"].spec == f"train[{1000 - expected}:1000]"


def test_read_rows_gives_uint8_images_in_split_order(mnist):
  a = tfds_data.read_rows(mnist, tfds_data.RowRange("train", 0, 8))
  b = tfds_data.read_rows(mnist, tfds_data.RowRange("train", 4, 8))
  assert a["image"].shape == (8, 28, 28, 1) and a["image"].dtype == np.uint8
  assert a["label"].dtype == np.int32
  np.testing.assert_array_equal(a["image"][4:], b["image"])
  np.testing.assert_array_equal(a["label"][4:], b["label"])
  # The first MNIST training labels as TFDS serves them (shuffled by TFDS at preparation).
  assert a["label"].tolist() == [4, 1, 0, 7, 8, 1, 2, 7]
  empty = tfds_data.read_rows(mnist, tfds_data.RowRange("train", 10, 10))
  assert empty["image"].shape == (0, 28, 28, 1)


def test_bad_splits_are_user_errors(mnist):
  with pytest.raises(UserError, match="bad split 'validation'.*splits: "):
    tfds_data.row_range(mnist, "validation")
  with pytest.raises(UserError, match="validation_size=70000 must be in"):
    tfds_data.resolve_splits(mnist, "train", "", 70_000, "test")


def test_train_index_table_is_a_seeded_stream_of_permutations():
  n, batch, steps = 10, 4, 5  # 20 indices per epoch: two passes over 10 examples
  t1 = train_index_table(0, 1, steps, batch, n)
  assert t1.shape == (5, 4) and t1.dtype == np.int32
  flat = t1.reshape(-1)
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
  np.testing.assert_array_equal(t1, train_index_table(0, 1, steps, batch, n))
  assert not np.array_equal(t1, train_index_table(1, 1, steps, batch, n))
  # Epoch 2 continues the stream: passes 2 and 3.
  t2 = train_index_table(0, 2, steps, batch, n).reshape(-1)
  assert sorted(t2[:10]) == list(range(10)) and not np.array_equal(t2[:10], flat[:10])
  # An epoch shorter than a pass takes the next slice of the same permutation.
  half = np.concatenate([train_index_table(0, e, 1, 5, n).reshape(-1) for e in (1, 2)])
  np.testing.assert_array_equal(half, flat[:10])


def test_eval_index_table_pads_the_last_batch():
  t = eval_index_table(10, 4)
  assert t.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
