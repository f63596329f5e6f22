"""Augmentation: parity with Keras' apply_affine_transform, randomness, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convjax.data import augment
from convjax.data.folders import decode_image
from tests.conftest import SHARED

CAT = SHARED / "datasets" / "cats_and_dogs_small" / "train" / "cats" / "cat.3.jpg"

# (theta, tx, ty, shear, zx, zy, flip): the notes' ranges at their extremes, a quarter
# turn, a pure shift, a strong zoom-out (much filling), and identity with a flip.
TRANSFORMS = [
  (30.0, 10.0, -20.0, 15.0, 0.85, 1.15, False),
  (-40.0, -30.0, 30.0, -0.2, 1.2, 0.8, True),
  (90.0, 0.0, 0.0, 0.0, 1.0, 1.0, False),
  (0.0, 30.0, -30.0, 0.0, 1.0, 1.0, False),
  (10.0, -50.0, 60.0, 30.0, 0.6, 1.4, True),
  (0.0, 0.0, 0.0, 0.0, 1.0, 1.0, True),
]


@pytest.fixture(scope="module")
def cat():
  return decode_image(str(CAT), 3, (150, 120)).astype(np.float32)  # not square: catches axis swaps


@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
def test_fixed_transforms_equal_keras_apply_affine_transform(cat, fill_mode):
  tf = pytest.importorskip("tensorflow")
  keras_transform = tf.keras.preprocessing.image.apply_affine_transform
  h, w, _ = cat.shape
  for theta, tx, ty, shear, zx, zy, flip in TRANSFORMS:
    expected = keras_transform(
      cat, theta, tx, ty, shear, zx, zy, row_axis=0, col_axis=1, channel_axis=2, fill_mode=fill_mode, cval=17.0, order=1
    )
    if flip:  # ImageDataGenerator flips after the affine transform
      expected = expected[:, ::-1]
    p = augment.AugmentParams(*(jnp.float32(v) for v in (theta, tx, ty, shear, zx, zy)), jnp.bool_(flip))
    ours = np.asarray(augment.warp(jnp.asarray(cat), augment.affine_matrix(p, h, w), p.flip, fill_mode, 17.0))
    off = (np.abs(ours - expected) > 0.01).any(-1)
    # Keras computes coordinates in float64, we in float32. Where a fill mode jumps
    # ('constant' at the edges, 'wrap' at each period) a sample a hair from the jump
    # may land on either side: such pixels may differ, no others.
    if fill_mode in ("constant", "wrap"):
      off &= ~_near_a_jump(np.asarray(augment.affine_matrix(p, h, w)), h, w, flip)
    assert off.sum() == 0, (fill_mode, theta, np.argwhere(off)[:5])


def _near_a_jump(matrix, h, w, flip, tol=1e-3):
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  cols = w - 1 - cols if flip else cols
  near = np.zeros((h, w), bool)
  for k, n in ((0, h), (1, w)):
    coord = matrix[k, 0] * rows + matrix[k, 1] * cols + matrix[k, 2]
    near |= np.abs(coord / (n - 1) - np.round(coord / (n - 1))) * (n - 1) < tol
  return near


def test_identity_and_pure_flip(cat):
  images = jnp.asarray(cat)[None]
  assert np.array_equal(augment.make_augment()(jax.random.key(0), images), images)
  flip = jax.jit(augment.make_augment(horizontal_flip=True))  # as the train step runs it
  flips = [np.asarray(flip(jax.random.key(k), images))[0] for k in range(16)]
  kinds = {
    "same" if np.array_equal(f, cat) else "mirrored" if np.array_equal(f, cat[:, ::-1]) else "other" for f in flips
  }
  assert kinds == {"same", "mirrored"}


def test_random_parameters_cover_keras_ranges():
  keys = jax.random.split(jax.random.key(0), 2000)
  p = jax.vmap(
    lambda k: augment.sample_params(
      k,
      150,
      100,
      rotation_range=40,
      width_shift_range=0.2,
      height_shift_range=0.1,
      shear_range=0.2,
      zoom_range=0.2,
      horizontal_flip=True,
    )
  )(keys)
  for value, bound in ((p.theta, 40), (p.tx, 0.1 * 150), (p.ty, 0.2 * 100), (p.shear, 0.2)):
    value = np.asarray(value)
    assert np.abs(value).max() <= bound and np.abs(value).max() > 0.95 * bound
    assert abs(value.mean()) < 0.05 * bound
  for zoom in (np.asarray(p.zx), np.asarray(p.zy)):
    assert zoom.min() >= 0.8 and zoom.max() <= 1.2 and zoom.min() < 0.81 and zoom.max() > 1.19
  assert not np.array_equal(p.zx, p.zy)  # drawn independently, as Keras does
  assert 0.45 < np.asarray(p.flip).mean() < 0.55
  # A shift range >= 1 is in pixels (Keras' convention), not a fraction of the size.
  pixels = jax.vmap(lambda k: augment.sample_params(k, 150, 100, width_shift_range=3.0))(keys)
  assert 2.9 < np.abs(np.asarray(pixels.ty)).max() <= 3.0  # a fraction of 100 would reach 300


def test_each_image_gets_its_own_transform_deterministically(cat):
  fn = jax.jit(
    augment.make_augment(
      rotation_range=40,
      width_shift_range=0.2,
      height_shift_range=0.2,
      shear_range=0.2,
      zoom_range=0.2,
      horizontal_flip=True,
    )
  )
  batch = jnp.asarray(np.repeat(cat[None], 4, axis=0))
  a, b, c = fn(jax.random.key(3), batch), fn(jax.random.key(3), batch), fn(jax.random.key(4), batch)
  assert a.shape == batch.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert len({np.asarray(x).tobytes() for x in a}) == 4
  # nearest fill invents no values: the output stays within the input's range.
  assert float(a.min()) >= cat.min() and float(a.max()) <= cat.max()
