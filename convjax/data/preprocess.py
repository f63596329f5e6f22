"""Pixel preprocessing: the host-side resize of decoding, and the model-input transform.

`resize_bilinear` is `tf.image.resize(method='bilinear')` (half-pixel centres,
no antialiasing): what Keras' `image_dataset_from_directory` does, written in
numpy so that loading folders needs no TensorFlow.

`input_transform(rescale, preprocess)` maps float pixels (0-255) to the model's
input inside the jitted steps: rescaling, and ImageNet VGG's 'caffe'
preprocessing (`preprocess_input`, as keras.applications.vgg16 does it).
"""
import jax.numpy as jnp
import numpy as np

# ImageNet channel means in BGR order, as Keras' 'caffe' mode subtracts them.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def _axis_weights(in_size: int, out_size: int):
  """Source indices (lo, hi) and the weight of hi for each output position."""
  scale = in_size / out_size
  pos = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  pos = np.clip(pos, 0.0, in_size - 1)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (pos - lo).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple) -> np.ndarray:
  """(H, W, C) -> float32 (h, w, C), bilinear like tf.image.resize."""
  h, w = size
  if image.shape[:2] == (h, w):
    return image.astype(np.float32)
  x = image.astype(np.float32)
  lo, hi, t = _axis_weights(x.shape[0], h)
  x = x[lo] * (1 - t)[:, None, None] + x[hi] * t[:, None, None]
  lo, hi, t = _axis_weights(x.shape[1], w)
  return x[:, lo] * (1 - t)[None, :, None] + x[:, hi] * t[None, :, None]


def to_uint8(image: np.ndarray) -> np.ndarray:
  """Rounds float pixels in [0, 255] to uint8 (half a grey level at most from the float)."""
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def preprocess_input(x):
  """ImageNet VGG's input ('caffe' mode): RGB pixels in [0, 255] -> BGR minus the channel means."""
  return x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, x.dtype)


def input_transform(rescale: float = 1 / 255, preprocess: str = ""):
  """float pixels (0-255) -> model input: x * rescale, then `preprocess` ('' or 'caffe')."""
  if preprocess == "caffe":
    return lambda x: preprocess_input(x * rescale)
  if preprocess:
    raise ValueError(f"unknown preprocess {preprocess!r}; valid: '', 'caffe'")
  return lambda x: x * rescale
