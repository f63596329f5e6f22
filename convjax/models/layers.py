"""Keras-shaped Linen layers.

Each layer owns its activation, so a captured intermediate is what Keras shows
for that layer (post-ReLU), and parameters sit at `<layer>/kernel`,
`<layer>/bias` exactly as in a Keras HDF5 file.
"""

import contextlib
import contextvars
import functools
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  tiny_maps=True,
):
  """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`, except for two 2-D
  NHWC convolutions that XLA:CPU runs at a small fraction of its speed elsewhere:
  - a map at most 2x2 in space (unless not `tiny_maps`) runs as its patches times the kernel:
    the same sums, as one matrix product. XLA:CPU convolves such maps at 1.5-12 GFLOP/s
    against ~170 at 7x7 (a 3x3 conv of ResNet's last stages on 32x32 images; BENCHMARKS.md,
    "Convolutions of tiny maps");
  - inside `narrow_convs()`, a stride-1 convolution of at most 4 input channels (a first
    layer on RGB or grey images) has its input gradient as one matrix product and a sum of
    shifted slices, and with one channel its forward pass as 9 broadcast products
    (`_narrow_conv`)."""
  plain = (
    feature_group_count == 1
    and all(d == 1 for d in (*(lhs_dilation or (1,)), *(rhs_dilation or (1,))))
    and lhs.ndim == 4
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    == lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  )
  if plain and _NARROW.get() and lhs.shape[-1] <= _NARROW_CHANNELS and all(s == 1 for s in window_strides):
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    if any(p != 0 for pair in padding for p in pair):
      lhs = jnp.pad(lhs, ((0, 0), *(tuple(p) for p in padding), (0, 0)))
    return _narrow_conv(lhs, rhs, precision)
  if not (plain and tiny_maps and max(lhs.shape[1:3]) <= 2):
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
    )
  kh, kw, c, out = rhs.shape
  patches = lax.conv_general_dilated_patches(
    lhs, (kh, kw), window_strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )  # (N, H', W', C * kh * kw), channel-major
  return jnp.dot(patches, jnp.transpose(rhs, (2, 0, 1, 3)).reshape(c * kh * kw, out), precision=precision)


class Conv2D(nn.Conv):
  """`nn.Conv` with Keras defaults: 'VALID' padding and a fused activation; convolved by
  `conv_general_dilated` above: its narrow convolutions inside explanations, not its tiny
  maps (measured on ResNet only; the VGG and course convnets' programs stay XLA's)."""

  padding: str = "VALID"
  activation: Optional[Callable] = None
  conv_general_dilated: Callable = functools.partial(conv_general_dilated, tiny_maps=False)

  def __call__(self, x):
    y = super().__call__(x)
    return y if self.activation is None else self.activation(y)


# Explanations differentiate with respect to the input, through the first convolution too,
# whose few input channels XLA:CPU convolves slowly: on this project's AVX2 VM (a timing
# script, BENCHMARKS.md "First convolutions"), the input gradient of the cats-vs-dogs
# convnet's first layer at batch 16 in 77 ms by XLA against 33 as below, the MNIST
# convnet's at batch 64 in 7.2 against 2.2 ms, and the MNIST layer's forward pass in 3.1
# against 1.2 ms. Training, which never needs that gradient, keeps XLA's convolution.
_NARROW_CHANNELS = 4
_NARROW = contextvars.ContextVar("narrow_convs", default=False)


@contextlib.contextmanager
def narrow_convs(on: bool = True):
  """Within it (or outside it, with on=False), Conv2D and the other convolutions through
  `conv_general_dilated` convolve few input channels as `_narrow_conv`: the same sums in
  another order (float32 rounding apart)."""
  token = _NARROW.set(on)
  try:
    yield
  finally:
    _NARROW.reset(token)


def _valid_conv(x, w, precision):
  return lax.conv_general_dilated(
    x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _narrow_conv(x, w, precision):
  """A 'VALID' stride-1 NHWC x HWIO convolution of few input channels."""
  return _narrow_forward(x, w, precision)


def _narrow_forward(x, w, precision):
  """With one input channel the sum of the kernel's taps times the shifted input (broadcast
  products, accumulated in float32), otherwise XLA's convolution."""
  kh, kw, c, _ = w.shape
  if c != 1:
    return _valid_conv(x, w, precision)
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  wide = jnp.promote_types(x.dtype, jnp.float32)
  taps = [x[:, i : i + oh, j : j + ow, :].astype(wide) * w[i, j, 0].astype(wide) for i in range(kh) for j in range(kw)]
  return functools.reduce(jnp.add, taps).astype(jnp.result_type(x, w))


def _narrow_conv_fwd(x, w, precision):
  # Under differentiation XLA's convolution: XLA fuses broadcast products into the backward
  # pass of the ReLU and pool after them, recomputing them for each position of each pool
  # window (the MNIST convnet's input gradient: 2.7 -> 6.7 ms in that fusion).
  return _valid_conv(x, w, precision), (x, w)


def _narrow_conv_bwd(precision, saved, g):
  """The input's gradient as the output's gradient times the kernel's transpose, (N, H', W',
  kh * kw * C), each tap's C columns then added into place (a transposed im2col); the
  kernel's gradient XLA's."""
  x, w = saved
  kh, kw, c, out = w.shape
  columns = jnp.dot(g, w.reshape(kh * kw * c, out).T, precision=precision)
  taps = [
    jnp.pad(columns[..., (i * kw + j) * c : (i * kw + j + 1) * c], ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
    for i in range(kh)
    for j in range(kw)
  ]
  _, pull_kernel = jax.vjp(lambda k: _valid_conv(x, k, precision), w)
  return functools.reduce(jnp.add, taps).astype(x.dtype), pull_kernel(g)[0]


_narrow_conv.defvjp(_narrow_conv_fwd, _narrow_conv_bwd)


class Dense(nn.Dense):
  """`nn.Dense` with a fused activation."""

  activation: Optional[Callable] = None

  def __call__(self, x):
    y = super().__call__(x)
    return y if self.activation is None else self.activation(y)


class Layer(nn.Module):
  """Marks a parameter-free module as one row of a model summary."""


# Under differentiation, above this many bytes of input the window max is a reduce over the
# window axes, below it (and always without a gradient) an elementwise max of the k*k
# strided views. XLA:CPU runs the elementwise form several times faster on its own, but
# recomputes it within the gradient's loops, which costs more than it saves on large
# feature maps. Measured (BENCHMARKS.md): the MNIST convnet's train step at batch 128
# 45.5 -> 31.5 ms; the cats-vs-dogs convnet's, whose first three pools are larger, unchanged.
# Programs that differentiate with respect to the input only (explanations) run the
# elementwise form faster at every size: inside `elementwise_max_pools()`.
_ELEMENTWISE_MAX_BYTES = 16 * 2**20
_ELEMENTWISE = contextvars.ContextVar("elementwise_max_pools", default=False)


@contextlib.contextmanager
def elementwise_max_pools():
  """Within it, MaxPooling2D's forward pass is the elementwise max at every size, also under
  differentiation (the same numbers and gradient). convjax.viz.explain traces its methods
  in it: on the cats-vs-dogs convnet at batch 16 Integrated Gradients and SmoothGrad ran
  5-12% faster so, while its train step ran 8% slower (BENCHMARKS.md, "The max pool of
  explanations")."""
  token = _ELEMENTWISE.set(True)
  try:
    yield
  finally:
    _ELEMENTWISE.reset(token)


def _windows(x, k: int) -> list:
  """The k*k strided views (N, H/k, W/k, C) of x, window positions in row-major order."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // k, k, w // k, k, c)
  return [x[:, :, i, :, j, :] for i in range(k) for j in range(k)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _window_max(x, k: int, elementwise: bool):
  """Max over non-overlapping k x k windows of x (N, H, W, C); H and W multiples of k. Under
  differentiation its forward pass is a reduce over the window axes above
  _ELEMENTWISE_MAX_BYTES, unless `elementwise`."""
  views = _windows(x, k)
  y = views[0]
  for view in views[1:]:
    y = jnp.maximum(y, view)
  return y


def _window_max_fwd(x, k, elementwise):
  if not elementwise and x.size * x.dtype.itemsize > _ELEMENTWISE_MAX_BYTES:
    n, h, w, c = x.shape
    y = jnp.max(x.reshape(n, h // k, k, w // k, k, c), axis=(2, 4))
  else:
    y = _window_max(x, k, True)
  return y, (x, y)


def _window_max_bwd(k, elementwise, residuals, g):
  """The gradient goes to the first maximum of each window in row-major order, as
  TensorFlow's MaxPoolGrad and XLA's select-and-scatter give it (not shared among ties):
  the first maximum's position per window, then one select over x's shape."""
  x, y = residuals
  n, h, w, c = y.shape
  index = jnp.int8 if k * k < 128 else jnp.int32
  first = jnp.full(y.shape, k * k - 1, index)
  for p, view in reversed(list(enumerate(_windows(x, k)[:-1]))):
    first = jnp.where(view == y, index(p), first)
  position = jnp.arange(k * k, dtype=index).reshape(1, 1, k, 1, k, 1)
  grad = jnp.where(position == first[:, :, None, :, None, :], g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  return (grad.reshape(x.shape),)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)


class MaxPooling2D(Layer):
  """Keras' MaxPooling2D(pool_size) with strides = pool_size and 'valid' padding.

  The windows don't overlap, so it is an elementwise max of a reshape's strided views (or
  a reduce over its window axes): on CPU several times faster than `nn.max_pool`'s
  reduce-window and select-and-scatter. Its gradient (a custom VJP) has Keras' semantics:
  all of it to the first maximum of a window with ties, as TensorFlow's MaxPoolGrad does,
  so gradient maps match Keras-based tools'.
  """

  pool_size: int = 2

  def __call__(self, x):
    k = self.pool_size
    n, h, w, c = x.shape
    h, w = h // k, w // k
    return _window_max(x[:, : h * k, : w * k], k, _ELEMENTWISE.get())


def max_pool(x, window_shape: tuple, strides: tuple, padding="VALID"):
  """`nn.max_pool` as the ONNX export (jax2onnx 0.12-0.17) can convert it: it replaces flax's
  pools while it traces with ones that take keywords and string padding only (and converts
  lax's NHWC reduce-window to a pool onnxruntime rejects). Explicit padding is -inf padded on
  first, then a 'VALID' pool: the same numbers, as reduce-window pads with -inf."""
  if not isinstance(padding, str):
    x = jnp.pad(x, ((0, 0), *(tuple(p) for p in padding), (0, 0)), constant_values=-jnp.inf)
    padding = "VALID"
  return nn.max_pool(x, window_shape=window_shape, strides=strides, padding=padding)


class Flatten(Layer):
  def __call__(self, x):
    return jnp.reshape(x, (x.shape[0], -1))


def _column_sums(a):
  """Sums of the rows of a (N, C) matrix in float32 as matrix-vector products: XLA:CPU's
  dot does this several times faster than its reduce over a leading axis. In
  two stages, so that rounding grows with N/b + b rather than N: ones @ (N/b, b*C),
  then a sum over the b blocks (b a power of two dividing N, at most 256). On a
  batch sharded over devices the contraction is one all-reduce, as a sum's would be."""
  n, c = a.shape
  b = math.gcd(n, 256)
  partial = jnp.dot(
    jnp.ones((n // b,), a.dtype),
    a.reshape(n // b, b * c),
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.float32,
  )
  return jnp.sum(partial.reshape(b, c), axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm(x, scale, bias, epsilon):
  """(x - mean) / sqrt(var + epsilon) * scale + bias over the rows of x (N, C), with the
  batch mean and biased variance (float32). The statistics carry no gradient: they
  feed only the running averages, under stop_gradient."""
  return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
  n = x.shape[0]
  mean = _column_sums(x) / n
  var = jnp.maximum(_column_sums(x * x) / n - mean * mean, 0.0)  # flax's use_fast_variance
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (x - mean.astype(x.dtype)) * (rstd * scale).astype(x.dtype) + bias.astype(x.dtype)
  return (y, mean, var), (x, mean, rstd, scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, mean, rstd, scale = residuals
  g, n = cotangents[0], x.shape[0]
  xhat = (x - mean.astype(x.dtype)) * rstd.astype(x.dtype)
  dbias, dscale = _column_sums(g), _column_sums(g * xhat)
  dx = (scale * rstd / n).astype(x.dtype) * (n * g - dbias.astype(x.dtype) - xhat * dscale.astype(x.dtype))
  return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


_FROZEN = contextvars.ContextVar("frozen_batch_norm", default=frozenset())


@contextlib.contextmanager
def frozen_batch_norm(paths):
  """Within it, the BatchNorm layers at `paths` (module paths, e.g. ('features', 'bn1')) run in
  inference mode even in a training apply: running averages, not updated. Keras runs a
  BatchNormalization layer whose weights are frozen (trainable=False) this way."""
  token = _FROZEN.set(frozenset(tuple(p) for p in paths))
  try:
    yield
  finally:
    _FROZEN.reset(token)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` (the same variables, statistics, update and numerics up to float32
  rounding) whose training-mode sums over batch, height and width, forward and
  backward, are float32 matrix-vector products (`_column_sums`): on CPU they made
  ResNet-50's train step much faster (BENCHMARKS.md). Other uses (running averages,
  masks, axis_name, another feature axis, no scale or bias) are nn.BatchNorm's own.
  Inside `frozen_batch_norm(paths)` a layer at one of the paths uses its running averages.
  """

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
    training = not nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    if training and tuple(self.path) in _FROZEN.get():
      return self._frozen(x)
    if (
      not training
      or mask is not None
      or self.axis_name is not None
      or self.axis not in (-1, x.ndim - 1)
      or not (self.use_scale and self.use_bias)
      or self.force_float32_reductions is False
    ):
      return super().__call__(x, use_running_average, mask=mask)
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    y, mean, var = _batch_norm(x.reshape(-1, features).astype(dtype), scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * jax.lax.stop_gradient(mean)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * jax.lax.stop_gradient(var)
    return y.reshape(x.shape)

  def _frozen(self, x):
    """Inference mode as nn.BatchNorm computes it: (x - mean) * rsqrt(var + eps) * scale + bias."""
    features = x.shape[-1]
    mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,)).value
    var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,)).value
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    return ((x - mean) * mul + bias).astype(dtype)
