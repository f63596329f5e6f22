"""Keras' ImageDataGenerator augmentation as a pure JAX function, run on the device.

`make_augment(...)` returns `augment(rng, images) -> images` for a float batch
(B, H, W, C): each image gets its own random rotation, shifts, shear, zoom and
horizontal flip, drawn as Keras draws them, then one bilinear resampling with
the chosen fill mode. For fixed parameters `affine_matrix` + `warp` equal
Keras' `apply_affine_transform` (scipy.ndimage, order 1); tests check it.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from convjax.config import AUGMENT_RANGES, FILL_MODES, augments


class AugmentParams(NamedTuple):
  """One image's transform, in Keras' units (degrees, pixels, factors); a pytree."""

  theta: jax.Array  # rotation, degrees
  tx: jax.Array  # shift along rows (height), pixels
  ty: jax.Array  # shift along columns (width), pixels
  shear: jax.Array  # degrees
  zx: jax.Array  # zoom along rows
  zy: jax.Array  # zoom along columns
  flip: jax.Array  # bool: mirror left-right after the affine transform


def affine_matrix(p: AugmentParams, height: int, width: int) -> jax.Array:
  """3x3 map from output (row, col, 1) to input coordinates, built as Keras builds it."""
  theta, shear = jnp.deg2rad(p.theta), jnp.deg2rad(p.shear)
  one, zero = jnp.ones_like(theta), jnp.zeros_like(theta)

  def mat(*rows):
    return jnp.stack([jnp.stack(r) for r in rows])

  rotation = mat((jnp.cos(theta), -jnp.sin(theta), zero), (jnp.sin(theta), jnp.cos(theta), zero), (zero, zero, one))
  shift = mat((one, zero, p.tx), (zero, one, p.ty), (zero, zero, one))
  shear_m = mat((one, -jnp.sin(shear), zero), (zero, jnp.cos(shear), zero), (zero, zero, one))
  zoom = mat((p.zx, zero, zero), (zero, p.zy, zero), (zero, zero, one))
  m = rotation @ shift @ shear_m @ zoom
  # About the image centre, as keras' transform_matrix_offset_center.
  ox, oy = height / 2 - 0.5, width / 2 - 0.5
  to_centre = jnp.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]], m.dtype)
  from_centre = jnp.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1]], m.dtype)
  m = to_centre @ m @ from_centre
  # Keras builds the matrix in (x, y) order and swaps it to (row, col) for scipy.
  return m[jnp.array([1, 0, 2])][:, jnp.array([1, 0, 2])]


# Coordinates within this many pixels of the image's edge count as on it, so
# that float32 rounding (Keras computes in float64) doesn't flip a sample
# between inside and outside, e.g. in a 90 degree rotation.
EDGE_TOLERANCE = 1e-3


def _sample_axis(coord, n: int, fill_mode: str):
  """Indices (lo, hi), weight of hi, and an in-range mask for coordinates along an axis of n."""
  inside = (coord >= -EDGE_TOLERANCE) & (coord <= n - 1 + EDGE_TOLERANCE)
  if fill_mode == "wrap":  # scipy 'wrap': outside [0, n-1], period n - 1 (first and last coincide)
    coord = jnp.where(inside, coord, jnp.mod(coord, max(n - 1, 1)))
  coord = jnp.where(inside, jnp.clip(coord, 0, n - 1), coord)
  lo = jnp.floor(coord)
  t = coord - lo
  lo = lo.astype(jnp.int32)
  hi = lo + 1
  if fill_mode == "reflect":  # scipy 'reflect': half-sample symmetric, d c b a | a b c d | d c b a

    def reflect(i):
      i = jnp.mod(i, 2 * n)
      return jnp.where(i >= n, 2 * n - 1 - i, i)

    lo, hi = reflect(lo), reflect(hi)
  # 'nearest' repeats the edge pixel: clipping the indices does it.
  valid = inside if fill_mode == "constant" else jnp.ones(coord.shape, bool)
  return jnp.clip(lo, 0, n - 1), jnp.clip(hi, 0, n - 1), t, valid


def warp(image: jax.Array, matrix: jax.Array, flip=False, fill_mode: str = "nearest", cval: float = 0.0) -> jax.Array:
  """Bilinear resampling of (H, W, C) at matrix @ (row, col, 1) for every output pixel."""
  if fill_mode not in FILL_MODES:
    raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
  h, w, _ = image.shape
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=matrix.dtype), jnp.arange(w, dtype=matrix.dtype), indexing="ij")
  cols = jnp.where(flip, w - 1 - cols, cols)  # Keras flips after transforming
  src_r = matrix[0, 0] * rows + matrix[0, 1] * cols + matrix[0, 2]
  src_c = matrix[1, 0] * rows + matrix[1, 1] * cols + matrix[1, 2]
  r0, r1, tr, vr = _sample_axis(src_r, h, fill_mode)
  c0, c1, tc, vc = _sample_axis(src_c, w, fill_mode)
  tr, tc = tr[..., None].astype(image.dtype), tc[..., None].astype(image.dtype)
  top = image[r0, c0] * (1 - tc) + image[r0, c1] * tc
  bottom = image[r1, c0] * (1 - tc) + image[r1, c1] * tc
  out = top * (1 - tr) + bottom * tr
  return jnp.where((vr & vc)[..., None], out, jnp.asarray(cval, image.dtype))


def sample_params(
  rng,
  height: int,
  width: int,
  rotation_range=0.0,
  width_shift_range=0.0,
  height_shift_range=0.0,
  shear_range=0.0,
  zoom_range=0.0,
  horizontal_flip=False,
) -> AugmentParams:
  """One image's random transform, drawn like ImageDataGenerator.get_random_transform."""
  k = jax.random.split(rng, 6)

  def uniform(key, r):
    return jax.random.uniform(key, (), jnp.float32, -r, r)

  zx, zy = jax.random.uniform(k[4], (2,), jnp.float32, 1 - zoom_range, 1 + zoom_range)
  # Keras: a range < 1 is a fraction of the image size; >= 1 is in pixels.
  tx = uniform(k[1], height_shift_range) * (height if height_shift_range < 1 else 1)
  ty = uniform(k[2], width_shift_range) * (width if width_shift_range < 1 else 1)
  flip = jax.random.bernoulli(k[5]) if horizontal_flip else jnp.zeros((), bool)
  return AugmentParams(uniform(k[0], rotation_range), tx, ty, uniform(k[3], shear_range), zx, zy, flip)


def make_augment(
  rotation_range=0.0,
  width_shift_range=0.0,
  height_shift_range=0.0,
  shear_range=0.0,
  zoom_range=0.0,
  horizontal_flip=False,
  fill_mode="nearest",
  cval=0.0,
):
  """`augment(rng, images (B, H, W, C) float) -> images`, one random transform per image."""
  if fill_mode not in FILL_MODES:
    raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}")
  ranges = dict(
    rotation_range=rotation_range,
    width_shift_range=width_shift_range,
    height_shift_range=height_shift_range,
    shear_range=shear_range,
    zoom_range=zoom_range,
  )

  def augment_one(rng, image):
    h, w, _ = image.shape
    p = sample_params(rng, h, w, horizontal_flip=horizontal_flip, **ranges)
    return warp(image, affine_matrix(p, h, w), p.flip, fill_mode, cval)

  def augment(rng, images):
    return jax.vmap(augment_one)(jax.random.split(rng, images.shape[0]), images)

  return augment


def from_config(augment_config):
  """The `augment(rng, images)` that config.augment describes, or None when it changes nothing."""
  if not augments(augment_config):
    return None
  a = augment_config
  return make_augment(
    **{k: a[k] for k in AUGMENT_RANGES}, horizontal_flip=a.horizontal_flip, fill_mode=a.fill_mode, cval=a.cval
  )
