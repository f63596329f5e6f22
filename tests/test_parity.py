"""convjax's maps equal pytorch-grad-cam's and captum's on a PyTorch copy of the same
network with the same weights (the MNIST and cats-vs-dogs convnets; He-normal weights from
tests/parity/weights.py's seed) and the same images: the references were made once by
tests/parity/make_references.py, so these tests need no PyTorch.

Each pair is compared per image after one normalisation of both (CAMs: ReLU, then min-max,
at the layer's resolution; attributions, summed over channels: divided by the reference's
largest magnitude): correlation >= 0.999 and largest difference <= 1e-3. Both sides compute
in float64 (the references were made so, and these tests run under jax.enable_x64): float32
gradients of the cats-vs-dogs convnet differ from float64 ones by up to 9% of the largest
value (DeepLIFT; 6% the gradient), and by CPU (AVX2-only against AVX-512), since ReLUs whose
inputs are near 0 switch; a definition's parity is what is tested here. Score-CAM, forward
passes only, runs in float32 (PyTorch's float32 Score-CAM was within 4e-7 of its float64
one), and so does feature ablation (within 2.6e-6 of the reference's largest value on the
cats-vs-dogs convnet; 2.7 s against 21 s in float64, compilation included). Each map is
computed by one jitted program, as the binaries compute it. Where the definitions differ,
the test says how: Eigen-CAM's and EigenGrad-CAM's singular vector takes LAPACK's arbitrary
sign in pytorch-grad-cam (convjax signs it to correlate with the summed activation), so
convjax's map equals pytorch-grad-cam's or its negation's; Ablation-CAM is not compared
(pytorch-grad-cam sets a channel to min - 1e7, the paper and convjax to 0).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convjax.models import get_model
from convjax.viz import cam, explain, layers
from tests.parity.weights import he_weights, nested, paths

FIXTURES = pathlib.Path(__file__).parent / "parity"
SHAPES = {"mnist_convnet": (28, 28, 1), "cats_dogs_convnet": (150, 150, 3)}


# The cats-vs-dogs convnet's 150x150 maps are the costlier half: the full suite's.
@pytest.fixture(scope="module", params=["mnist_convnet", pytest.param("cats_dogs_convnet", marks=pytest.mark.slow)])
def case(request):
  return load_case(request.param)


def load_case(name):
  """(name, model, float64 variables, float64 images, classes, the references) of a network."""
  shape = SHAPES[name]
  ref = dict(np.load(FIXTURES / f"{name}.npz"))
  model = get_model(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))["params"]
  weights = he_weights({p: tuple(a.shape) for p, a in paths(shapes)}, int(ref["seed"]))
  with jax.enable_x64(True):
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), nested(weights))
    x = jnp.asarray(ref["images"], jnp.float64) / 255.0
  return name, model, {"params": params}, x, jnp.asarray(ref["classes"], jnp.int32), ref


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def _jitted(fn, variables, x, float32: bool = False):
  """fn(variables, x) as one jitted program; in float32 where `float32` (methods of forward
  passes only: see the module's docstring)."""
  if not float32:
    return np.asarray(jax.jit(fn)(variables, x))
  with jax.enable_x64(False):
    return np.asarray(jax.jit(fn)(*jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), (variables, x))))


def _min_max(m):
  m = np.maximum(np.asarray(m, np.float64), 0)
  low, high = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
  return (m - low) / np.where(high > low, high - low, 1.0)


def _assert_same(ours, theirs, what):
  for i, (a, b) in enumerate(zip(np.asarray(ours, np.float64), np.asarray(theirs, np.float64), strict=True)):
    rho = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    worst = np.abs(a - b).max()
    assert rho >= 0.999 and worst <= 1e-3, f"{what} image {i}: correlation {rho:.6f}, largest difference {worst:.2e}"


def test_the_torch_copy_is_the_same_network(case):
  """The same logits; the classes explained: the predicted digit, the cats-vs-dogs logit (class 1)."""
  name, model, variables, x, classes, ref = case
  logits = np.asarray(model.apply(variables, x))
  assert logits.dtype == np.float64
  np.testing.assert_allclose(logits, ref["logits"], rtol=1e-6, atol=1e-6 * np.abs(ref["logits"]).max())
  np.testing.assert_array_equal(classes, np.argmax(logits, -1) if logits.shape[-1] > 1 else 1)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "scorecam"])
def test_cams_equal_pytorch_grad_cams(case, method):
  name, model, variables, x, classes, ref = case
  layer = layers.last_conv(model, x.shape[1:])
  ours = _jitted(lambda v, x: cam.cam(model, v, x, layer, method, classes)[0], variables, x, method == "scorecam")
  _assert_same(_min_max(ours), _min_max(ref[f"cam/{method}"]), f"{name} {method}")


def test_layercam_fused_over_every_conv_layer_equals_pytorch_grad_cams(case):
  """pytorch-grad-cam's LayerCAM with every conv layer as a target layer: compared at the
  input's size, since resizing each layer's map there is part of the fusion (cv2's bilinear
  resize against jax.image.resize's, both with half-pixel centres)."""
  name, model, variables, x, classes, ref = case
  convs = explain.conv_layers(model, x.shape[1:])
  ours = _jitted(lambda v, x: cam.fused(model, v, x, convs, "layercam", classes)[0], variables, x)
  assert ours.shape == ref["cam/layercam_fused"].shape == x.shape[:3] and len(convs) >= 3
  _assert_same(ours, ref["cam/layercam_fused"], f"{name} layercam_fused")


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
def test_eigen_cams_equal_pytorch_grad_cams_up_to_the_singular_vectors_sign(case, method):
  name, model, variables, x, classes, ref = case
  layer = layers.last_conv(model, x.shape[1:])
  ours = _min_max(_jitted(lambda v, x: cam.cam(model, v, x, layer, method, classes)[0], variables, x))
  theirs = ref[f"cam/{method}"]
  for i in range(len(x)):
    same, flipped = _min_max(theirs[i : i + 1]), _min_max(-theirs[i : i + 1])
    best = min((same, flipped), key=lambda t: np.abs(t - ours[i : i + 1]).max())
    _assert_same(ours[i : i + 1], best, f"{name} {method} image {i}")


ATTRIBUTIONS = ["gradient", "input_x_gradient", "integrated_gradients", "deeplift", "guided_backprop"]


@pytest.mark.parametrize("method", [*ATTRIBUTIONS, "feature_ablation", "guided_gradcam"])
def test_attributions_equal_captums_and_guided_grad_cam_pytorch_grad_cams(case, method):
  _assert_same(*attribution_pair(case, method), f"{case[0]} {method}")


def attribution_pair(case, method):
  """(convjax's map, the reference), summed over channels, each divided by the reference's
  largest magnitude per image."""
  name, model, variables, x, classes, ref = case
  options = explain.Options(
    layer=layers.last_conv(model, x.shape[1:]), ig_steps=int(ref["ig_steps"]), patch=int(ref["patch"])
  )
  if method == "deeplift":  # captum's DeepLift from a grey baseline
    from convjax.viz import saliency

    baseline = float(ref["deeplift_baseline"])
    ours = _jitted(lambda v, x: saliency.deeplift(model, v, x, classes, baseline), variables, x)
  else:
    forward_only = method == "feature_ablation"
    ours = _jitted(
      lambda v, x: explain.explain(model, v, x, classes, method, options, jax.random.key(0)), variables, x, forward_only
    )
  theirs = ref[f"attr/{method}"].astype(np.float64)
  if method == "integrated_gradients":  # captum's riemann_trapezoid weights sum to n / (n + 1), ours to 1
    theirs *= (ref["ig_steps"] + 1) / ref["ig_steps"]
  scale = np.abs(theirs).max(axis=(1, 2), keepdims=True)
  return np.asarray(explain.as_map(ours), np.float64) / scale, theirs / scale
