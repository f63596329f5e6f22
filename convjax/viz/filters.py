"""What a filter responds to: gradient ascent in input space (Chollet's recipe).

From a random grey image (128 + 20 * uniform noise), `steps` steps of gradient
ascent on the filter's mean activation, each gradient divided by its RMS
(L2-normalised), step size 1; then deprocessed to a uint8 image. All filters
of a layer run at once: the ascent is vmapped over filter indices and jitted.
Optional regularisers for cleaner patterns: random jitter (roll), Gaussian
blur every few steps, L2 decay, total variation, and octaves (ascend on a small
image first, then upscale and continue).
"""

import jax
import jax.numpy as jnp
import numpy as np

from convjax.viz import layers


def _blur(x, sigma: float):
  """Separable Gaussian blur of (H, W, C) over H and W."""
  radius = max(1, int(3 * sigma))
  t = jnp.arange(-radius, radius + 1, dtype=x.dtype)
  k = jnp.exp(-(t**2) / (2 * sigma**2))
  k = k / k.sum()

  def along(x, axis):
    moved = jnp.moveaxis(x, axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    out = jax.vmap(lambda v: jnp.convolve(v, k, mode="same"))(flat)
    return jnp.moveaxis(out.reshape(moved.shape), -1, axis)

  return along(along(x, 0), 1)


def deprocess(x):
  """Chollet's deprocess_image: standardise, std 0.1 around 0.5, clip, to 0-255 uint8."""
  x = x - x.mean()
  x = x / (x.std() + 1e-5) * 0.1 + 0.5
  return np.clip(np.asarray(x) * 255, 0, 255).astype(np.uint8)


def maximize_filters(
  model,
  variables,
  path,
  filters,
  size: int,
  channels: int = 3,
  steps: int = 40,
  step_size: float = 1.0,
  seed: int = 0,
  prepare=lambda x: x,
  jitter: int = 0,
  blur_sigma: float = 0.0,
  blur_every: int = 4,
  l2: float = 0.0,
  tv: float = 0.0,
  octaves: int = 1,
  octave_scale: float = 1.4,
):
  """(raw images (F, size, size, C), start and end mean activations (F,)) for `filters` at `path`.

  `prepare` maps the 0-255 image to the model's input (rescale / ImageNet preprocessing).
  With `octaves` > 1 the ascent starts on a smaller image (size / octave_scale**(octaves-1))
  and runs `steps` steps at each scale, upscaling the image (bilinear) in between:
  coarse structure first, then detail. `start` is measured on the first scale's random
  image, `end` on the final image.
  """
  path = tuple(path)
  filters = jnp.asarray(filters)
  if octaves < 1:
    raise ValueError(f"octaves must be >= 1, got {octaves}")
  sizes = [max(1, round(size / octave_scale**k)) for k in reversed(range(octaves))]

  def objective(image, f):
    act = layers.layer_output(model, variables, prepare(image[None]), path)[0]
    return jnp.mean(act[..., f])

  def penalty(image):
    out = 0.0
    if l2:
      out += l2 * jnp.mean((image - 128.0) ** 2)
    if tv:
      out += tv * (jnp.mean(jnp.abs(jnp.diff(image, axis=0))) + jnp.mean(jnp.abs(jnp.diff(image, axis=1))))
    return out

  def ascend(jitter_key, image, f, first_step):
    def step(i, image):
      if jitter:
        shifts = jax.random.randint(jax.random.fold_in(jitter_key, first_step + i), (2,), -jitter, jitter + 1)
        image = jnp.roll(image, shifts, axis=(0, 1))
      grads = jax.grad(lambda im: objective(im, f) - penalty(im))(image)
      grads = grads / (jnp.sqrt(jnp.mean(grads**2)) + 1e-5)
      image = image + step_size * grads
      if jitter:  # shifted back: the pattern stays in place, the shift only decorrelates steps
        image = jnp.roll(image, -shifts, axis=(0, 1))
      if blur_sigma:
        # Blurred around mid-grey: the zero padding then fades the borders to grey, not black.
        image = jnp.where((i + 1) % blur_every == 0, 128.0 + _blur(image - 128.0, blur_sigma), image)
      return image

    return jax.lax.fori_loop(0, steps, step, image)

  keys = jax.vmap(jax.random.split)(jax.random.split(jax.random.key(seed), len(filters)))
  images = jax.vmap(lambda k: 128.0 + 20.0 * jax.random.uniform(k, (sizes[0], sizes[0], channels)))(keys[:, 0])
  measure = jax.jit(jax.vmap(objective))
  start = measure(images, filters)
  run = jax.jit(jax.vmap(ascend, in_axes=(0, 0, 0, None)))
  for octave, side in enumerate(sizes):
    if images.shape[1] != side:
      images = jax.image.resize(images, (len(filters), side, side, channels), "bilinear")
    images = run(keys[:, 1], images, filters, octave * steps)
  return images, start, measure(images, filters)
