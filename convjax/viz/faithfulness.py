"""How faithful a map is to the model, and how robust; each batched over images, jittable.

- Deletion and insertion (Petsiuk et al. 2018): deletion replaces the pixels of an image by
  a baseline in the order of the map, most relevant first, and follows the class
  probability: a faithful map makes it fall fast (a low area under the curve). Insertion
  starts from the baseline and reveals the pixels in the same order: a faithful map makes
  the probability rise fast (a high area). Each point of a curve is one forward pass.
- ROAD (Rong et al. 2022), as pytorch-grad-cam computes it: the pixels at or above the
  map's p-th percentile (most relevant first) or below it (least relevant first, on the
  inverted map) are removed by noisy linear imputation, each the weighted mean of its 8
  neighbours (a linear system, solved here by conjugate gradients, then Gaussian noise), and
  the class score's change is averaged over p = 10, 20, ..., 90. Combined: (least - most) / 2,
  higher is more faithful.
- Infidelity (Yeh et al. 2019; captum's `infidelity`): the mean over perturbations I of
  (sum(I * attribution) - (score(x) - score(x - I)))^2, I Gaussian; lower is better.
- Max-sensitivity (captum's `sensitivity_max`): the largest relative change (Frobenius
  norm) of the attribution over uniform perturbations of x within a radius; lower is better.
"""

import jax
import jax.numpy as jnp

from convjax.viz import cam, layers

MODES = ("deletion", "insertion")


def pixel_ranks(maps):
  """(N, H, W) -> the rank of each pixel in its map, 0 for the most relevant (ties in
  row-major order, so the result is deterministic)."""
  n = maps.shape[0]
  order = jnp.argsort(-maps.reshape(n, -1), axis=1, stable=True)
  return jnp.argsort(order, axis=1).reshape(maps.shape)


def curve(model, variables, x, maps, classes, mode: str = "deletion", steps: int = 32, baseline=None):
  """(area under the curve (N,), the curve (N, steps + 1)): the probability of `classes` with
  0, 1/steps, ..., all of the pixels of x (N, H, W, C) deleted (replaced by `baseline`,
  default zeros) or inserted (into `baseline`), in the order of `maps` (N, h, w; upsampled
  to x's size as Score-CAM does where h, w differ, e.g. a CAM at its layer's resolution).
  The area is the trapezoid rule over the fraction of pixels, from 0 to 1."""
  if mode not in MODES:
    raise ValueError(f"unknown faithfulness curve {mode!r}; valid: {', '.join(MODES)}")
  if maps.shape[1:] != x.shape[1:3]:
    maps = cam.upsample_aligned(maps[..., None], x.shape[1:3])[..., 0]
  base = jnp.zeros_like(x) if baseline is None else jnp.broadcast_to(baseline, x.shape)
  ranks = pixel_ranks(maps)[..., None]
  pixels = maps.shape[1] * maps.shape[2]
  counts = jnp.round(jnp.linspace(0, pixels, steps + 1)).astype(jnp.int32)

  def probability(count):
    changed = ranks < count
    image = jnp.where(changed, base, x) if mode == "deletion" else jnp.where(changed, x, base)
    return layers.class_probability(model.apply(variables, image), classes)

  points = jax.lax.map(probability, counts).T  # (N, steps + 1)
  return (points[:, :-1] + points[:, 1:]).sum(1) / (2 * steps), points


# pytorch-grad-cam's NoisyLinearImputer: each removed pixel is the weighted mean of its
# neighbours (direct 1/6, diagonal 1/12; those outside the image drop out).
_NEIGHBOURS = {(dy, dx): (1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
_NEIGHBOURS.pop((0, 0))
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def _neighbour_sum(v):
  """(N, H, W, C) -> sum over the 8 neighbours of weight * value (zero outside the image)."""
  padded = jnp.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = v.shape[1:3]
  return sum(weight * padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for (dy, dx), weight in _NEIGHBOURS.items())


def impute(x, removed, rng, noise: float = 0.01, tolerance: float = 1e-6):
  """x (N, H, W, C) with the pixels where `removed` (N, H, W) is true replaced by noisy
  linear imputation: the solution of s_i u_i - sum_j w_ij u_j = sum_k w_ik x_k over the
  removed pixels i (j removed and k kept neighbours, s_i the weights inside the image),
  plus Gaussian noise of std `noise`. The system is symmetric positive definite wherever a
  removed region touches a kept pixel; conjugate gradients solve it to `tolerance`."""
  inside = _neighbour_sum(jnp.ones((1, *x.shape[1:3], 1), x.dtype))
  mask = removed[..., None]
  kept = jnp.where(mask, 0.0, x)

  def matvec(u):
    return jnp.where(mask, inside * u - _neighbour_sum(jnp.where(mask, u, 0.0)), u)

  solution, _ = jax.scipy.sparse.linalg.cg(matvec, jnp.where(mask, _neighbour_sum(kept), 0.0), tol=tolerance)
  return jnp.where(mask, solution + noise * jax.random.normal(rng, x.shape, x.dtype), x)


def road(model, variables, x, maps, classes, rng, percentiles=PERCENTILES, noise: float = 0.01):
  """{'most', 'least', 'combined'}: (N,) the class score's mean change over `percentiles`
  with the most relevant pixels removed, with the least relevant removed, and (least -
  most) / 2 (pytorch-grad-cam's ROADCombined). Maps are upsampled to x's size as `curve`."""
  if maps.shape[1:] != x.shape[1:3]:
    maps = cam.upsample_aligned(maps[..., None], x.shape[1:3])[..., 0]
  score = layers.class_score(model.apply(variables, x), classes)

  def change(args):
    p, key, most = args
    ranked = jnp.where(most, maps, 1.0 - maps)
    threshold = jnp.percentile(ranked, p, axis=(1, 2), keepdims=True)
    imputed = impute(x, ranked >= threshold, key, noise)
    return layers.class_score(model.apply(variables, imputed), classes) - score

  count = len(percentiles)
  ps = jnp.tile(jnp.asarray(percentiles, x.dtype), 2)
  most = jnp.arange(2 * count) < count
  changes = jax.lax.map(change, (ps, jax.random.split(rng, 2 * count), most))  # (2P, N)
  result = {"most": changes[:count].mean(0), "least": changes[count:].mean(0)}
  return {**result, "combined": (result["least"] - result["most"]) / 2}


def infidelity(
  model, variables, x, attributions, classes, rng, samples: int = 10, noise: float = 0.003, normalize=False
):
  """(N,) captum's infidelity with Gaussian perturbations I of std `noise` (its tutorial's
  perturbation): mean over `samples` of (sum(I * attribution) - (score(x) - score(x - I)))^2;
  `normalize` first scales the attributions by the least-squares factor beta."""
  score = layers.class_score(model.apply(variables, x), classes)

  def one(key):
    perturbation = noise * jax.random.normal(key, x.shape, x.dtype)
    explained = jnp.sum(perturbation * attributions, axis=tuple(range(1, x.ndim)))
    return explained, score - layers.class_score(model.apply(variables, x - perturbation), classes)

  a, b = jax.lax.map(one, jax.random.split(rng, samples))  # (samples, N) each
  if not normalize:
    return jnp.mean((a - b) ** 2, 0)
  aa, ab, bb = jnp.sum(a * a, 0), jnp.sum(a * b, 0), jnp.sum(b * b, 0)
  beta = jnp.where(aa != 0, ab / jnp.where(aa != 0, aa, 1.0), 0.0)
  return (beta * beta * aa - 2 * beta * ab + bb) / samples


def max_sensitivity(explain, x, rng, samples: int = 10, radius: float = 0.02):
  """(N,) captum's sensitivity_max of `explain` (x -> attributions, its classes fixed): the
  largest ||explain(x + d) - explain(x)|| / ||explain(x)|| (Frobenius norm; a zero norm
  counts as 1) over `samples` perturbations d uniform in [-radius, radius]."""
  reference = explain(x)
  axes = tuple(range(1, reference.ndim))
  norm = jnp.sqrt(jnp.sum(reference**2, axis=axes))
  norm = jnp.where(norm == 0, 1.0, norm)

  def one(key):
    moved = explain(x + jax.random.uniform(key, x.shape, x.dtype, -radius, radius))
    return jnp.sqrt(jnp.sum((moved - reference) ** 2, axis=axes)) / norm

  return jnp.max(jax.lax.map(one, jax.random.split(rng, samples)), axis=0)
