"""The convolution primer of the notes, runnable: 2-D convolution three ways,
classic filters (sharpen, Sobel, Gabor) and the arithmetic of conv layers.

`conv2d` is the deep-learning convolution (cross-correlation: the kernel is
not flipped), via `lax.conv_general_dilated`; `conv2d_loop` is the same sum
written as loops over output positions, for checking and teaching. Pass
`flip=True` for the mathematical convolution (kernel rotated 180 degrees).
"""

import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

SHARPEN = np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], np.float32)
SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
SOBEL_Y = SOBEL_X.T.copy()

Padding = Union[str, int]


def _pad_amount(kernel_size: int, padding: Padding) -> int:
  if padding == "valid":
    return 0
  if padding == "same":
    return same_padding(kernel_size)
  if isinstance(padding, int) and padding >= 0:
    return padding
  raise ValueError(f"padding must be 'valid', 'same' or an int >= 0, got {padding!r}")


def _as_hwc(image, kernel):
  image = np.asarray(image, np.float32) if not isinstance(image, jax.Array) else image
  kernel = np.asarray(kernel, np.float32) if not isinstance(kernel, jax.Array) else kernel
  if image.ndim == 2:
    image = image[..., None]
  if kernel.ndim == 2:
    kernel = kernel[..., None]
  if kernel.shape[-1] != image.shape[-1]:
    raise ValueError(f"kernel has {kernel.shape[-1]} channels, image {image.shape[-1]}")
  return image, kernel


def conv2d(image, kernel, stride: int = 1, padding: Padding = "valid", flip: bool = False):
  """One kernel over an image: (H, W[, C]) x (k, k[, C]) -> (H', W'), zero padding."""
  image, kernel = _as_hwc(image, kernel)
  if flip:
    kernel = kernel[::-1, ::-1]
  p = _pad_amount(kernel.shape[0], padding)
  out = jax.lax.conv_general_dilated(
    jnp.asarray(image, jnp.float32)[None],
    jnp.asarray(kernel, jnp.float32)[..., None],
    (stride, stride),
    ((p, p), (p, p)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST,
  )
  return out[0, ..., 0]


def conv2d_loop(image, kernel, stride: int = 1, padding: Padding = "valid", flip: bool = False):
  """`conv2d` as the notes write it: slide the kernel, multiply, sum (numpy, float64)."""
  image, kernel = _as_hwc(np.asarray(image, np.float64), np.asarray(kernel, np.float64))
  if flip:
    kernel = kernel[::-1, ::-1]
  k = kernel.shape[0]
  p = _pad_amount(k, padding)
  padded = np.pad(image, ((p, p), (p, p), (0, 0)))
  h, w = output_size(image.shape[0], k, p, stride), output_size(image.shape[1], k, p, stride)
  out = np.zeros((h, w))
  for i in range(h):
    for j in range(w):
      patch = padded[i * stride : i * stride + k, j * stride : j * stride + k]
      out[i, j] = np.sum(patch * kernel)
  return out


def sobel(image):
  """(Gx, Gy, magnitude) of a grayscale image, 'same' size."""
  gx = conv2d(image, SOBEL_X, padding="same")
  gy = conv2d(image, SOBEL_Y, padding="same")
  return gx, gy, jnp.sqrt(gx**2 + gy**2)


def gabor_kernel(frequency: float, theta: float, sigma: float, offset: float = 0.0, size: int = 0) -> np.ndarray:
  """Real Gabor kernel: a cosine wave of `frequency` (cycles/pixel) travelling in direction
  `theta` (radians), under a Gaussian envelope of width `sigma` (pixels).

  Made zero-mean (a multiple of the envelope is subtracted), so that it answers
  to oriented structure and not to plain brightness.
  """
  half = size // 2 if size else int(math.ceil(3 * sigma))
  y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
  rotated = x * np.cos(theta) + y * np.sin(theta)
  envelope = np.exp(-(x**2 + y**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
  kernel = envelope * np.cos(2 * np.pi * frequency * rotated + offset)
  kernel -= envelope * kernel.sum() / envelope.sum()
  return kernel.astype(np.float32)


def gabor_bank(
  frequencies: Sequence[float] = (0.1, 0.25), thetas: int = 4, sigmas: Sequence[float] = (2.0, 4.0)
) -> list:
  """[(frequency, theta, sigma, kernel)] over a grid of parameters."""
  return [
    (f, t * np.pi / thetas, s, gabor_kernel(f, t * np.pi / thetas, s))
    for s in sigmas
    for f in frequencies
    for t in range(thetas)
  ]


# Conv arithmetic.
def output_size(size: int, kernel: int, padding: int = 0, stride: int = 1) -> int:
  """(W - K + 2P) / S + 1, rounded down as every framework does."""
  return (size - kernel + 2 * padding) // stride + 1


def same_padding(kernel: int) -> int:
  """Padding that keeps the size at stride 1: (K - 1) / 2 (odd K)."""
  if kernel % 2 == 0:
    raise ValueError(f"'same' padding is symmetric only for odd kernels, got {kernel}")
  return (kernel - 1) // 2


def conv_params(kernel: int, c_in: int, c_out: int, bias: bool = True) -> int:
  """(k*k*c_in + 1) * c_out."""
  return (kernel * kernel * c_in + int(bias)) * c_out


def receptive_field(layers: Sequence[tuple]) -> int:
  """Receptive field of stacked (kernel, stride) layers: r += (k - 1) * product of earlier strides."""
  r, jump = 1, 1
  for kernel, stride in layers:
    r += (kernel - 1) * jump
    jump *= stride
  return r


def size_chain(size: int, layers: Sequence[tuple]) -> list:
  """Spatial sizes through ('conv'|'pool', k) layers, 'valid' conv stride 1, pool stride k."""
  sizes = [size]
  for kind, k in layers:
    size = output_size(size, k) if kind == "conv" else size // k
    sizes.append(size)
  return sizes
