"""Attributions beyond the course's (convjax/viz/saliency.py) and the deletion and insertion
curves (convjax/viz/faithfulness.py), each against what it must give on a model where the
answer is known: a class score linear in the pixels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convjax.viz import affine, faithfulness, saliency


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


class SkipFromPixels(nn.Module):
  """Normalised pixels, padded (jnp.pad, a jitted function) and convolved, and the
  normalised pixels again after the ReLU (a skip): the affine start ends at two values the
  rest reads."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    z = (x - 0.5) / 0.25
    h = jax.nn.relu(nn.Conv(2, (3, 3), padding="VALID")(jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0))))) + z
    return nn.Dense(3)(jnp.tanh(h).reshape(x.shape[0], -1))


class SquareFirst(nn.Module):
  """Not affine from its first operation: no affine start."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3)((x * x).reshape(x.shape[0], -1))


@pytest.mark.parametrize(
  "model, klass, cut_shapes",
  [
    (SkipFromPixels(), 1, [(3, 8, 8, 2), (3, 8, 8, 2)]),
    (SquareFirst(), 1, None),
    (PixelLinear(), 0, [(3, 2)]),  # affine all through: the rest is the identity
  ],
  ids=["conv and skip", "square first", "linear"],
)
def test_integrated_gradients_and_smoothgrad_through_the_affine_start_equal_their_point_by_point_sums(
  model, klass, cut_shapes
):
  """The two methods run the model's affine start (affine.py) once, not once a point:
  exactly the sums of gradients at every point of the path, or of the noisy copies."""
  x = jax.random.uniform(jax.random.key(10), (3, 8, 8, 2))
  variables = model.init(jax.random.key(11), x)
  start = affine.split(lambda v: model.apply(variables, v), x)
  np.testing.assert_allclose(start.rest(start.head(x)), model.apply(variables, x), rtol=1e-6)
  assert [h.shape for h in start.head(x)] == (cut_shapes or [x.shape])
  if cut_shapes is None:  # no affine start: the head is the identity
    np.testing.assert_array_equal(start.head(x)[0], x)

  grad = jax.grad(lambda v: jnp.sum(model.apply(variables, v)[:, klass]))
  reference, steps = jax.random.uniform(jax.random.key(12), x.shape), 8
  weights = np.full(steps + 1, 1 / steps)
  weights[[0, steps]] /= 2
  path = sum(
    w * grad(reference + a * (x - reference)) for a, w in zip(np.linspace(0, 1, steps + 1), weights, strict=True)
  )
  got = saliency.integrated_gradients(model, variables, x, klass, reference, steps)
  np.testing.assert_allclose(got, (x - reference) * path, rtol=1e-4, atol=1e-6)

  rng = jax.random.key(13)
  got = jax.jit(lambda v: saliency.smoothgrad(model, variables, v, rng, klass, samples=4))(x)
  np.testing.assert_allclose(got, saliency.noise_tunnel(grad, x, rng, samples=4), rtol=1e-4, atol=1e-6)


def test_the_mnist_convnets_affine_start_is_its_first_convolution_and_its_bias():
  from convjax.models import get_model, init_variables

  model = get_model("mnist_convnet")
  variables = init_variables(model, jax.random.key(0), (28, 28, 1))
  x = jax.random.uniform(jax.random.key(14), (2, 28, 28, 1))
  (head,) = affine.split(lambda v: model.apply(variables, v), x).head(x)
  conv = variables["params"]["features"]["conv2d"]
  expected = jax.lax.conv_general_dilated(
    x, conv["kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(head, expected + conv["bias"], rtol=1e-5, atol=1e-6)


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


class Hidden(nn.Module):
  """Not convjax's layers: flax's Dense and a ReLU written as jnp.maximum, the way a
  researcher's own model may write it."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(16, name="hidden")(x.reshape(x.shape[0], -1))
    return nn.Dense(3, name="out")(jnp.maximum(h, 0.0))


@pytest.fixture(scope="module")
def hidden():
  model = Hidden()
  x = jax.random.normal(jax.random.key(6), (2, 5, 1, 1))
  variables = model.init(jax.random.key(7), x)
  p = variables["params"]
  return model, variables, x, p["hidden"]["kernel"], p["hidden"]["bias"], p["out"]["kernel"]


def test_guided_backprop_rewrites_the_relus_of_any_model(hidden):
  """One hidden ReLU: guided gradient = W1 @ (g * [h > 0] * [g > 0]) with g = W2[:, c]."""
  model, variables, x, w1, b1, w2 = hidden
  h = x.reshape(2, -1) @ w1 + b1
  g = w2[:, 2]
  guided = saliency.guided_backprop(model, variables, x, class_index=2).reshape(2, -1)
  np.testing.assert_allclose(guided, (g * (h > 0) * (g > 0)) @ w1.T, atol=1e-6)
  plain = saliency.vanilla_gradient(model, variables, x, class_index=2).reshape(2, -1)
  assert not np.allclose(guided, plain)  # some negative g: the rule changed the backward pass


def test_deeplift_rescales_each_relu_by_its_difference_quotient_and_sums_to_delta(hidden):
  model, variables, x, w1, b1, w2 = hidden
  reference = jax.random.normal(jax.random.key(8), x.shape)
  h, hr = x.reshape(2, -1) @ w1 + b1, reference.reshape(2, -1) @ w1 + b1
  multiplier = (jax.nn.relu(h) - jax.nn.relu(hr)) / (h - hr)
  expected = ((w2[:, 1] * multiplier) @ w1.T) * (x - reference).reshape(2, -1)
  got = saliency.deeplift(model, variables, x, class_index=1, baseline=reference)
  np.testing.assert_allclose(got.reshape(2, -1), expected, rtol=1e-5, atol=1e-6)
  delta = model.apply(variables, x)[:, 1] - model.apply(variables, reference)[:, 1]
  np.testing.assert_allclose(got.sum(axis=(1, 2, 3)), delta, rtol=1e-5)


def test_deeplift_sums_to_delta_through_relus_and_max_pools_of_the_mnist_convnet():
  """captum's rules for ReLU and max pool keep summation to delta in a real convnet; the rule
  runs under jit. (From a zero baseline a network with zero biases, as initialised, has
  all-zero reference units, and DeepLIFT is Input x Gradient: the baseline here is grey.)"""
  from convjax.models import get_model, init_variables

  model = get_model("mnist_convnet")
  variables = init_variables(model, jax.random.key(0), (28, 28, 1))
  x = jax.random.uniform(jax.random.key(9), (4, 28, 28, 1))
  grey = jnp.full_like(x, 0.5)
  got = jax.jit(lambda v: saliency.deeplift(model, variables, v, class_index=3, baseline=grey))(x)
  delta = jax.jit(lambda v: model.apply(variables, v)[:, 3] - model.apply(variables, grey)[:, 3])(x)
  np.testing.assert_allclose(got.sum(axis=(1, 2, 3)), delta, rtol=1e-4)
  gradient_times_delta = (x - grey) * jax.jit(lambda v: saliency.vanilla_gradient(model, variables, v, 3))(x)
  assert not np.allclose(gradient_times_delta.sum(axis=(1, 2, 3)), delta, rtol=1e-2)  # the rules matter


class NoRelu(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3)(jnp.tanh(nn.Dense(4)(x.reshape(x.shape[0], -1))))


class ScannedRelu(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(3)(x.reshape(x.shape[0], -1))
    return jax.lax.scan(lambda c, _: (jax.nn.relu(c), None), h, None, length=2)[0]


@pytest.mark.parametrize(
  "model, message",
  [(NoRelu(), "has no ReLU"), (ScannedRelu(), "has ReLUs inside scan, which it cannot rewrite")],
  ids=["no relu", "relu in a scan"],
)
def test_a_model_the_relu_rules_cannot_rewrite_is_refused_by_name(model, message):
  from convjax.errors import UserError

  x = jnp.ones((1, 4, 1, 1))
  variables = model.init(jax.random.key(0), x)
  for method, name in ((saliency.guided_backprop, "guided backprop"), (saliency.deeplift, "DeepLIFT")):
    with pytest.raises(
      UserError, match=f"{name} rewrites the backward pass of ReLU, and the model {type(model).__name__} {message}"
    ):
      method(model, variables, x, 0)


def test_feature_ablation_of_a_linear_score_is_each_segments_contribution(linear):
  """Segments of 3x3 over 8x8 images (the last row and column of squares cut to 2): each
  pixel gets its segment's sum of w * (x - baseline), in every channel."""
  from convjax.viz import occlusion

  model, variables, x, w = linear
  segments = np.asarray(occlusion.grid_segments(8, 8, 3))
  assert segments.max() == 8 and (segments[6:, 6:] == 8).all() and (segments[:3, 3:6] == 1).all()
  got = np.asarray(
    jax.jit(lambda v: occlusion.feature_ablation(model, variables, v, 0, patch=3, baseline=0.25, batch=4))(x)
  )
  contribution = (w * (np.asarray(x) - 0.25)).sum(-1)  # (N, 8, 8)
  per_segment = np.stack([[contribution[n][segments == s].sum() for s in range(9)] for n in range(3)])
  np.testing.assert_allclose(got, np.broadcast_to(per_segment[:, segments][..., None], x.shape), rtol=1e-5, atol=1e-5)


def test_noisy_linear_imputation_keeps_a_plane_and_solves_the_neighbour_mean_system():
  """Each removed pixel is the weighted mean of its neighbours: a plane comes back exactly
  inside a removed block, and on a random mask the equations hold (noise 0)."""
  rows, cols = np.mgrid[0:12, 0:12].astype(np.float32)
  plane = jnp.asarray((0.3 * rows - 0.2 * cols + 1.0)[None, ..., None])
  block = jnp.zeros((1, 12, 12), bool).at[0, 3:9, 4:10].set(True)
  impute = jax.jit(lambda x, removed, rng: faithfulness.impute(x, removed, rng, noise=0.0))  # as road runs it
  np.testing.assert_allclose(impute(plane, block, jax.random.key(0)), plane, atol=1e-4)

  x = jax.random.uniform(jax.random.key(1), (2, 9, 9, 3))
  removed = jax.random.uniform(jax.random.key(2), (2, 9, 9)) < 0.5
  got = np.pad(np.asarray(impute(x, removed, jax.random.key(3))), ((0, 0), (1, 1), (1, 1), (0, 0)))
  weights = {
    (dy, dx): 1 / 6 if 0 in (dy, dx) else 1 / 12 for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
  }
  inside = np.pad(np.ones((9, 9)), 1)
  for n, i, j in zip(*np.nonzero(np.asarray(removed)), strict=True):
    total = sum(w * got[n, i + 1 + dy, j + 1 + dx] for (dy, dx), w in weights.items())
    mass = sum(w * inside[i + 1 + dy, j + 1 + dx] for (dy, dx), w in weights.items())
    np.testing.assert_allclose(got[n, i + 1, j + 1], total / mass, atol=1e-4)
  np.testing.assert_array_equal(got[:, 1:-1, 1:-1][~np.asarray(removed)], np.asarray(x)[~np.asarray(removed)])


def test_road_ranks_a_faithful_map_above_a_random_one(linear):
  """Score = the sum of the pixels of dark images with ~15% bright pixels: the faithful map
  is the image itself; removing its bright pixels (imputed from dark neighbours) drops the
  score, removing the dark ones keeps it."""
  model = linear[0]
  variables = {"params": {"w": jnp.ones((8, 8, 2))}}
  x = (jax.random.uniform(jax.random.key(3), (3, 8, 8, 1)) < 0.15).astype(jnp.float32).repeat(2, -1)
  classes = jnp.zeros(3, jnp.int32)
  faithful = x[..., 0]
  random = jax.random.uniform(jax.random.key(4), faithful.shape)
  road = jax.jit(lambda m: faithfulness.road(model, variables, x, m, classes, jax.random.key(5)))
  good, bad = road(faithful), road(random)
  assert (good["most"] < bad["most"]).all() and (good["least"] > bad["least"]).all(), (good, bad)
  assert (good["combined"] > bad["combined"]).all()


def test_infidelity_of_the_gradient_of_a_linear_score_is_zero_and_normalising_removes_scale(linear):
  model, variables, x, w = linear
  classes, rng = jnp.zeros(3, jnp.int32), jax.random.key(6)
  exact = faithfulness.infidelity(model, variables, x, jnp.broadcast_to(w, x.shape), classes, rng)
  doubled = faithfulness.infidelity(model, variables, x, 2 * jnp.broadcast_to(w, x.shape), classes, rng)
  rescaled = faithfulness.infidelity(
    model, variables, x, 2 * jnp.broadcast_to(w, x.shape), classes, rng, normalize=True
  )
  assert np.asarray(exact).max() < 1e-9 and np.asarray(rescaled).max() < 1e-9 and np.asarray(doubled).min() > 1e-6


def test_max_sensitivity_of_a_constant_gradient_is_zero_and_of_input_x_gradient_bounded_by_the_radius(linear):
  model, variables, x, w = linear
  gradient = faithfulness.max_sensitivity(
    lambda v: saliency.vanilla_gradient(model, variables, v, 0), x, jax.random.key(7)
  )
  assert np.asarray(gradient).max() < 1e-6
  got = faithfulness.max_sensitivity(lambda v: saliency.input_x_gradient(model, variables, v, 0), x, jax.random.key(7))
  bound = 0.02 * np.sqrt((w**2).sum()) / np.sqrt(((w * np.asarray(x)) ** 2).sum(axis=(1, 2, 3)))
  assert (np.asarray(got) > 0).all() and (np.asarray(got) <= bound + 1e-6).all()
