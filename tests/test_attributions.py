"""Attributions beyond the course's (convjax/viz/saliency.py) and the deletion and insertion
curves (convjax/viz/faithfulness.py), each against what it must give on a model where the
answer is known: a class score linear in the pixels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convjax.viz import faithfulness, saliency


class PixelLinear(nn.Module):
  """Two logits: sum(w * x) and 0. Class 0's score is linear in the pixels, its gradient w."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    w = self.param("w", nn.initializers.normal(1.0), x.shape[1:])
    return jnp.stack([jnp.sum(w * x, axis=(1, 2, 3)), jnp.zeros(x.shape[0])], -1)


@pytest.fixture(scope="module")
def linear():
  model = PixelLinear()
  x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 2))
  variables = model.init(jax.random.key(1), x)
  return model, variables, x, np.asarray(variables["params"]["w"])


def test_input_x_gradient_of_a_linear_score_is_each_pixels_contribution(linear):
  model, variables, x, w = linear
  np.testing.assert_allclose(saliency.input_x_gradient(model, variables, x, 0), w * np.asarray(x), rtol=1e-6)


def test_noise_tunnels_are_the_mean_the_mean_square_and_the_variance_over_noisy_copies():
  x = jax.random.uniform(jax.random.key(2), (2, 4, 4, 1))
  rng, samples, noise = jax.random.key(3), 8, 0.2
  sigma = noise * (x.max(axis=(1, 2, 3), keepdims=True) - x.min(axis=(1, 2, 3), keepdims=True))
  copies = np.asarray(x + sigma * jax.random.normal(rng, (samples, *x.shape)))  # the same draws
  got = {kind: saliency.noise_tunnel(lambda v: v, x, rng, samples, noise, kind) for kind in saliency.NOISE_TUNNELS}
  np.testing.assert_allclose(got["smoothgrad"], copies.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["smoothgrad_sq"], (copies**2).mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["vargrad"], copies.var(0), rtol=1e-3, atol=1e-6)
  with pytest.raises(ValueError, match="unknown noise tunnel 'smoothgrad2'"):
    saliency.noise_tunnel(lambda v: v, x, rng, kind="smoothgrad2")


def test_baselines_zeros_blurred_and_uniform():
  x = jax.random.uniform(jax.random.key(4), (2, 16, 16, 3))
  assert not np.asarray(saliency.baseline(x, "zeros")).any()
  blurred = np.asarray(saliency.baseline(x, "blurred", sigma=2.0))
  assert blurred.shape == x.shape and blurred.std() < 0.5 * np.asarray(x).std()
  np.testing.assert_allclose(saliency.baseline(jnp.full((1, 9, 9, 1), 0.7), "blurred"), 0.7, rtol=1e-5)
  noise = np.asarray(saliency.baseline(x, "uniform", jax.random.key(5)))
  low, high = np.asarray(x).min(axis=(1, 2, 3)), np.asarray(x).max(axis=(1, 2, 3))
  assert (noise.min(axis=(1, 2, 3)) >= low).all() and (noise.max(axis=(1, 2, 3)) <= high).all()
  with pytest.raises(ValueError, match="unknown baseline 'black'"):
    saliency.baseline(x, "black")


def test_gradient_shap_of_a_linear_score_is_w_times_the_distance_to_the_baseline(linear):
  """One baseline, no noise: every sample's gradient is w, so GradientSHAP = w (x - baseline);
  it sums to score(x) - score(baseline) (completeness)."""
  model, variables, x, w = linear
  base = jnp.full((1, *x.shape[1:]), 0.25)
  got = np.asarray(saliency.gradient_shap(model, variables, x, jax.random.key(6), base, 0, samples=5))
  np.testing.assert_allclose(got, w * (np.asarray(x) - 0.25), rtol=1e-5, atol=1e-6)
  scores = model.apply(variables, x)[:, 0] - model.apply(variables, jnp.broadcast_to(base, x.shape))[:, 0]
  np.testing.assert_allclose(got.sum(axis=(1, 2, 3)), scores, rtol=1e-4)


def test_a_faithful_map_deletes_faster_and_inserts_faster_than_a_random_one(linear):
  """Class 0's probability is sigmoid(sum w x): deleting the pixels of largest w * x first
  (the exact contributions) must lower it faster than a random order, and inserting them
  first raise it faster."""
  model, variables, x, w = linear
  perfect = jnp.sum(w * x, -1)
  shuffled = jax.random.uniform(jax.random.key(7), perfect.shape)
  classes = jnp.zeros(3, jnp.int32)
  area = {}
  for mode in faithfulness.MODES:
    for name, maps in (("perfect", perfect), ("random", shuffled)):
      area[mode, name], points = faithfulness.curve(model, variables, x, maps, classes, mode, steps=16)
      whole = jax.nn.sigmoid(model.apply(variables, x)[:, 0])
      empty = jnp.full(3, 0.5)  # sigmoid(0): every pixel at the zero baseline
      start, end = (whole, empty) if mode == "deletion" else (empty, whole)
      np.testing.assert_allclose(points[:, 0], start, rtol=1e-6)
      np.testing.assert_allclose(points[:, -1], end, rtol=1e-6)
  assert (area["deletion", "perfect"] < area["deletion", "random"]).all(), area
  assert (area["insertion", "perfect"] > area["insertion", "random"]).all(), area
  # A map at a coarser resolution (a CAM's) is upsampled to the image first.
  coarse, points = faithfulness.curve(model, variables, x, perfect[:, ::2, ::2], classes, "deletion", steps=16)
  assert points.shape == (3, 17) and (coarse < area["deletion", "random"]).all()


def test_pixel_ranks_order_the_map_most_relevant_first_with_ties_in_row_order():
  maps = jnp.asarray([[[0.1, 0.9], [0.5, 0.5]]])
  assert np.asarray(faithfulness.pixel_ranks(maps)).tolist() == [[[3, 0], [1, 2]]]
