"""The CAM family (convjax/viz/cam.py): each method against its closed form on models where
it is known exactly, and every method batched and jitted on the MNIST convnet."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convjax.models import get_model, init_variables
from convjax.models.layers import Conv2D
from convjax.viz import cam, layers, saliency


class ConvGapLinear(nn.Module):
  """conv (relu) -> global average pool -> linear: dy/dA_k = w_k / (h w) at every position."""

  features: int = 4
  kernel: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = Conv2D(self.features, (self.kernel, self.kernel), padding="SAME", activation=nn.relu, name="conv")(x)
    return nn.Dense(3, name="linear")(jnp.mean(a, axis=(1, 2)))


def _conv_output(variables, x):
  """ConvGapLinear's conv layer output A, computed here by hand."""
  conv = variables["params"]["conv"]
  dims = ("NHWC", "HWIO", "NHWC")
  return jax.nn.relu(
    jax.lax.conv_general_dilated(x, conv["kernel"], (1, 1), "SAME", dimension_numbers=dims) + conv["bias"]
  )


def _normalised(m):
  m = np.maximum(np.asarray(m), 0)
  return m / m.max(axis=(1, 2), keepdims=True)


@pytest.fixture(scope="module")
def linear_head():
  """ConvGapLinear, two random inputs, and the layer's output A and class 2's weights w by hand."""
  model = ConvGapLinear()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  a = _conv_output(variables, x)
  return model, variables, x, np.asarray(a), np.asarray(variables["params"]["linear"]["kernel"][:, 2])


def _nnx_conv_gap_linear():
  """ConvGapLinear as an NNX model after a 1x1 nnx.Conv stem, its conv a subclass of
  nnx.Conv calling the parent's __call__ (one layer: its output is shifted once, not at
  both calls)."""
  from flax import nnx

  from convjax.models import own

  class ReluConv(nnx.Conv):
    def __call__(self, x):
      return jax.nn.relu(super().__call__(x))

  class NnxConvGapLinear(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.stem = nnx.Conv(1, 1, (1, 1), use_bias=False, rngs=rngs)
      self.conv = ReluConv(1, 4, (3, 3), padding="SAME", rngs=rngs)
      self.linear = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.linear(jnp.mean(self.conv(self.stem(x)), axis=(1, 2)))

  return own.build(NnxConvGapLinear, "NnxConvGapLinear", {})


def test_an_nnx_layer_calling_its_parents_call_gives_the_closed_form_grad_cam():
  model = _nnx_conv_gap_linear()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  stem = x * variables["params"]["stem"]["kernel"][0, 0, 0, 0]
  a, w = _conv_output(variables, stem), variables["params"]["linear"]["kernel"][:, 2]
  for method in ("gradcam", "hirescam"):
    got, _ = cam.cam(model, variables, x, ("conv",), method, class_index=2)
    np.testing.assert_allclose(got, _normalised(np.einsum("nhwk,k->nhw", a, w)), atol=1e-5, err_msg=method)


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "xgradcam"])
def test_with_constant_gradients_these_cams_are_the_class_weighted_feature_map(linear_head, method):
  """dy/dA constant over positions: the mean gradient (Grad-CAM), the element-wise product
  (HiResCAM) and the activation-weighted gradient (XGrad-CAM) all give relu(sum_k w_k A_k)."""
  model, variables, x, a, w = linear_head
  got, classes = cam.cam(model, variables, x, ("conv",), method, class_index=2)
  np.testing.assert_allclose(got, _normalised(np.einsum("nhwk,k->nhw", a, w)), atol=1e-5)
  assert classes.tolist() == [2, 2]


def test_layercam_keeps_only_the_channels_with_positive_gradients(linear_head):
  model, variables, x, a, w = linear_head
  got, _ = cam.cam(model, variables, x, ("conv",), "layercam", class_index=2)
  assert (w < 0).any() and (w > 0).any()  # the closed form differs from Grad-CAM's here
  np.testing.assert_allclose(got, _normalised(np.einsum("nhwk,k->nhw", a, np.maximum(w, 0))), atol=1e-5)


def _min_max(m):
  """pytorch-grad-cam's scale_cam_image, per map."""
  low, high = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
  return (m - low) / (high - low + 1e-7)


def test_layercam_fused_over_layers_is_the_mean_of_the_scaled_maps(linear_head):
  """One layer at the input's size: its closed-form LayerCAM, min-max scaled. Two layers of the
  MNIST convnet (26x26 and 11x11): each map scaled and resized to 28x28, their mean scaled."""
  model, variables, x, a, w = linear_head
  got, _ = cam.fused(model, variables, x, [("conv",)], "layercam", class_index=2)
  np.testing.assert_allclose(got, _min_max(_normalised(np.einsum("nhwk,k->nhw", a, np.maximum(w, 0)))), atol=1e-5)
  mnist = get_model("mnist_convnet")
  digits = jax.random.uniform(jax.random.key(3), (2, 28, 28, 1))
  weights = init_variables(mnist, jax.random.key(4), (28, 28, 1))
  convs = layers.layer_paths(mnist, (28, 28, 1), types=("Conv2D",))[:2]
  fused, classes = jax.jit(lambda v, d: cam.fused(mnist, v, d, convs))(weights, digits)
  maps = [jax.jit(lambda v, d, c=c: cam.cam(mnist, v, d, c, "layercam", classes)[0])(weights, digits) for c in convs]
  assert [m.shape[1] for m in maps] == [26, 11]
  each = [jax.image.resize(_min_max(np.asarray(m)), (2, 28, 28), "bilinear") for m in maps]
  np.testing.assert_allclose(fused, _min_max(np.mean(np.stack(each), 0)), atol=1e-6)
  # Grad-CAM++'s alphas are not scale-free in the gradient: one pass gives each layer's own
  # (convjax's Conv2D calls nn.Conv's __call__ inside its own; the layer's output is the outer)
  fused = cam.fused(mnist, weights, digits, convs, "gradcam++", classes)[0]
  maps = [cam.cam(mnist, weights, digits, c, "gradcam++", classes)[0] for c in convs]
  each = [jax.image.resize(_min_max(np.asarray(m)), (2, 28, 28), "bilinear") for m in maps]
  np.testing.assert_allclose(fused, _min_max(np.mean(np.stack(each), 0)), atol=1e-5)


def test_ablation_cam_weighs_each_channel_by_the_score_it_carries(linear_head):
  """Ablating channel k of a linear head lowers y by w_k mean(A_k): weights w_k mean(A_k) / y."""
  model, variables, x, a, w = linear_head
  bias = np.asarray(variables["params"]["linear"]["bias"][2])
  contributions = w * a.mean(axis=(1, 2))  # (N, K)
  y = contributions.sum(-1) + bias
  expected = np.einsum("nhwk,nk->nhw", a, contributions / y[:, None])
  got, _ = cam.cam(model, variables, x, ["conv"], "ablationcam", class_index=2, channel_batch=3)  # a path as a list
  np.testing.assert_allclose(got, _normalised(expected), atol=1e-5)


def test_score_cam_of_a_one_channel_layer_is_its_normalised_activation():
  model = ConvGapLinear(features=1)
  x = jax.random.normal(jax.random.key(2), (3, 10, 10, 1))
  variables = model.init(jax.random.key(3), x)
  got, _ = cam.cam(model, variables, x, ("conv",), "scorecam")
  np.testing.assert_allclose(got, _normalised(_conv_output(variables, x)[..., 0]), atol=1e-5)


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
def test_eigen_cams_of_rank_one_activations_are_the_centred_spatial_factor(method):
  """A 1x1 conv with positive kernel and no bias on a positive one-channel image: A = u v^T
  with u the image; the first principal component of A (and of dy/dA * A) is u - mean(u)."""
  model = ConvGapLinear(kernel=1)
  x = jax.random.uniform(jax.random.key(4), (2, 6, 6, 1), minval=0.1)
  variables = model.init(jax.random.key(5), x)
  params = variables["params"]
  conv = {"kernel": jnp.abs(params["conv"]["kernel"]) + 0.1, "bias": jnp.zeros_like(params["conv"]["bias"])}
  variables = {"params": {**params, "conv": conv}}
  got, _ = cam.cam(model, variables, x, ("conv",), method, class_index=0)
  u = np.asarray(x[..., 0])
  np.testing.assert_allclose(got, _normalised(u - u.mean(axis=(1, 2), keepdims=True)), atol=1e-4)


def test_aligned_upsampling_keeps_corners_and_interpolates_linearly():
  maps = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])[None, :, :, None]
  up = np.asarray(cam.upsample_aligned(maps, (3, 5)))[0, :, :, 0]
  assert up[0, 0] == 1 and up[0, -1] == 2 and up[-1, 0] == 3 and up[-1, -1] == 4
  np.testing.assert_allclose(up[1, 2], 2.5)  # the centre: the mean of the four
  np.testing.assert_allclose(up[0], [1, 1.25, 1.5, 1.75, 2])


def test_every_cam_runs_batched_and_jitted_on_the_mnist_convnet():
  model = get_model("mnist_convnet")
  x = jax.random.uniform(jax.random.key(6), (4, 28, 28, 1))
  variables = init_variables(model, jax.random.key(7), (28, 28, 1))
  layer = layers.last_conv(model, (28, 28, 1))
  for method in cam.CAMS:
    run = jax.jit(lambda v, x, method=method: cam.cam(model, v, x, layer, method)[0])
    got = np.asarray(run(variables, x))
    assert got.ndim == 3 and got.shape[0] == 4 and np.isfinite(got).all(), method
    assert got.min() >= 0 and got.max() <= 1 + 1e-6 and got.max(axis=(1, 2)).min() > 0.99, method
  with pytest.raises(ValueError, match="unknown CAM method 'gradcam-pp'"):
    cam.cam(model, variables, x, layer, "gradcam-pp")
  # Guided Grad-CAM: guided backprop times the map, min-max scaled, resized to the input.
  guided, classes = jax.jit(lambda v, x: cam.guided_grad_cam(model, v, x, layer))(variables, x)
  maps, backprop = jax.jit(
    lambda v, x: (cam.cam(model, v, x, layer, "gradcam", classes)[0], saliency.guided_backprop(model, v, x, classes))
  )(variables, x)
  resized = _min_max(jax.image.resize(_min_max(maps), (4, 28, 28), "bilinear"))[..., None]
  np.testing.assert_allclose(guided, backprop * resized, atol=1e-6)
  assert guided.shape == x.shape and np.abs(guided).max() > 0
