"""What convnets learn: correctness of Grad-CAM, saliency, occlusion and filter maximisation."""

import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import spearmanr

from convjax.data import tfds as tfds_data
from convjax.models import get_model
from convjax.models.layers import Conv2D
from convjax.train.state import create_train_state
from convjax.train.steps import make_train_step
from convjax.viz import activations, cam, filters, layers, occlusion, saliency


class ConvGapLinear(nn.Module):
  """conv (relu) -> global average pool -> linear: Grad-CAM's map is known exactly."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = Conv2D(4, (3, 3), padding="SAME", activation=nn.relu, name="conv")(x)
    return nn.Dense(3, name="linear")(jnp.mean(a, axis=(1, 2)))


def conv2d_same(x, kernel, padding="SAME"):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_grad_cam_equals_the_class_weighted_feature_map():
  model = ConvGapLinear()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  variables = model.init(jax.random.key(1), x)
  heat, classes = cam.grad_cam(model, variables, x, ("conv",), class_index=2)
  conv = variables["params"]["conv"]  # the layer's output, computed here by hand
  a = jax.nn.relu(conv2d_same(x, conv["kernel"]) + conv["bias"])
  w = variables["params"]["linear"]["kernel"][:, 2]
  expected = jax.nn.relu(jnp.einsum("nhwk,k->nhw", a, w))
  expected = expected / expected.max(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(heat, expected, atol=1e-5)
  assert classes.tolist() == [2, 2]


@pytest.fixture(scope="module")
def trained_mnist():
  """The MNIST convnet after 300 real steps (test accuracy ~0.95), its init, and test images."""
  builder = tfds_data.get_builder("mnist", download=False)
  train = tfds_data.read_rows(builder, tfds_data.RowRange("train", 0, 300 * 32))
  test = tfds_data.read_rows(builder, tfds_data.RowRange("test", 0, 64))
  model = get_model("mnist_convnet")
  tx = optax.adam(1e-3)
  state = create_train_state(model, tx, (28, 28, 1), jax.random.key(0))
  fresh = {"params": state.params}
  step = jax.jit(make_train_step(model, tx, lambda x: x / 255))
  for i in range(300):
    batch = {
      "image": train["image"][i * 32 : (i + 1) * 32],
      "label": train["label"][i * 32 : (i + 1) * 32],
      "mask": jnp.ones(32),
    }
    state, _ = step(state, batch, jax.random.key(1))
  x = test["image"].astype(np.float32) / 255
  variables = {"params": state.params}
  accuracy = float(np.mean(np.argmax(model.apply(variables, x), -1) == test["label"]))
  assert accuracy > 0.85
  return model, variables, fresh, x, test["label"]


def test_integrated_gradients_are_complete(trained_mnist):
  model, variables, _, x, labels = trained_mnist
  attributions = saliency.integrated_gradients(model, variables, x[:4], steps=128)
  classes = layers.predicted_class(model.apply(variables, x[:4]))
  gap = layers.class_score(model.apply(variables, x[:4]), classes) - layers.class_score(
    model.apply(variables, jnp.zeros_like(x[:4])), classes
  )
  np.testing.assert_allclose(attributions.sum(axis=(1, 2, 3)), gap, rtol=0.01)


def _rank_correlation(a, b):
  """Spearman's rho; 0 when a map is constant (it ranks nothing, so it carries no trace of the other)."""
  a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
  if a.min() == a.max() or b.min() == b.max():
    return 0.0
  return float(spearmanr(a, b).statistic)


@pytest.mark.slow
def test_maps_of_a_randomised_model_decorrelate(trained_mnist):
  """Adebayo et al. 2018: a method whose maps survive re-initialising the weights explains nothing.

  Gradient saliency is compared as the raw (signed) gradient, and as |gradient| on the
  interior 20x20: with 'valid' 3x3 convolutions the outer pixels feed fewer windows, so any
  model, trained or not, ranks them low, which alone correlates whole-image |gradient| maps.
  """
  model, trained, fresh, x, labels = trained_mnist
  layer = layers.last_conv(model, (28, 28, 1))
  methods = {
    "gradient": lambda v, xi, c: saliency.vanilla_gradient(model, v, xi, c),
    "|gradient| interior": lambda v, xi, c: saliency.saliency_map(saliency.vanilla_gradient(model, v, xi, c))[
      :, 4:24, 4:24
    ],
    "grad-cam": lambda v, xi, c: cam.grad_cam(model, v, xi, layer, c)[0],
  }
  maps = jax.jit(lambda v, xs, cs: {name: method(v, xs, cs) for name, method in methods.items()})  # a batch at once
  ours, theirs = maps(trained, x, labels), maps(fresh, x, labels)
  for name in methods:
    pairs = [(np.asarray(t), np.asarray(f)) for t, f in zip(ours[name], theirs[name], strict=True)]
    # Only pairs of maps that vary: a constant map (a fresh model's Grad-CAM is often all
    # zero after its ReLU) would score 0 and pass vacuously.
    rhos = [_rank_correlation(t, f) for t, f in pairs if t.min() < t.max() and f.min() < f.max()]
    assert len(rhos) >= 8 and np.mean(rhos) < 0.5, (name, rhos)
  # The check can fail: the trained model with its weights moved by 1% of their spread keeps
  # its maps (mean rank correlation > 0.8; seen: 0.97 for Grad-CAM's 3x3 maps), where the
  # re-initialised one does not.
  leaves, structure = jax.tree_util.tree_flatten(trained)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  moved = [p + 0.01 * jnp.std(p) * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
  nearby = maps(jax.tree_util.tree_unflatten(structure, moved), x, labels)
  for name in methods:
    rhos = [_rank_correlation(ours[name][i], nearby[name][i]) for i in range(4)]
    assert np.mean(rhos) > 0.8, (name, rhos)


def test_occluding_the_grad_cam_region_hurts_more_than_a_random_region(trained_mnist):
  model, variables, _, x, labels = trained_mnist
  layer = layers.last_conv(model, (28, 28, 1))
  drops_cam, drops_random = [], []
  rng = np.random.default_rng(0)
  heats, bases = jax.jit(
    lambda x, c: (
      cam.grad_cam(model, variables, x, layer, c)[0],
      layers.class_probability(model.apply(variables, x), c),
    )
  )(x[:16], labels[:16])
  for i in range(16):
    cls = int(labels[i])
    heat = np.asarray(heats[i])
    occ = occlusion.occlusion_map(model, variables, x[i], cls, patch=10, stride=2, fill=0.0)
    probs = occ.probability
    base = float(bases[i])
    # The occluder position over the Grad-CAM peak (map cells scaled to pixels), vs random ones.
    r, c = np.unravel_index(np.argmax(heat), heat.shape)
    scale = 28 / heat.shape[0]
    top = int(np.clip((r + 0.5) * scale - 5, 0, 18)) // 2
    left = int(np.clip((c + 0.5) * scale - 5, 0, 18)) // 2
    drops_cam.append(base - probs[top, left])
    drops_random.append(base - probs[rng.integers(0, probs.shape[0]), rng.integers(0, probs.shape[1])])
  assert np.mean(drops_cam) > np.mean(drops_random) + 0.05, (np.mean(drops_cam), np.mean(drops_random))
  # One position by hand: the patch at rows 6-15, columns 12-21 (map cell (3, 6)).
  occluded = np.array(x[15:16])
  occluded[:, 6:16, 12:22] = 0.0
  logits = model.apply(variables, occluded)
  assert occ.class_index == cls and occ.score.shape == probs.shape == (10, 10)
  np.testing.assert_allclose(occ.score[3, 6], layers.class_score(logits, cls)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(probs[3, 6], layers.class_probability(logits, cls)[0], rtol=1e-5, atol=1e-6)


def test_smoothgrad_is_a_seeded_average_of_noisy_gradients(trained_mnist):
  model, variables, _, x, _ = trained_mnist
  smoothgrad = jax.jit(functools.partial(saliency.smoothgrad, model, variables), static_argnames=("samples", "noise"))
  smooth = smoothgrad(x[:2], jax.random.key(0), samples=8)
  again = smoothgrad(x[:2], jax.random.key(0), samples=8)
  assert smooth.shape == x[:2].shape and np.array_equal(smooth, again)
  no_noise = smoothgrad(x[:2], jax.random.key(0), samples=2, noise=0.0)
  np.testing.assert_allclose(
    no_noise, jax.jit(lambda x: saliency.vanilla_gradient(model, variables, x))(x[:2]), atol=1e-6
  )
  assert not np.allclose(smooth, no_noise)


def test_guided_backprop_matches_the_hand_computed_rule():
  """One hidden ReLU layer: guided gradient = W1 @ (g * [h > 0] * [g > 0]) with g = W2[:, c]."""
  model = get_model("mlp", hidden=(16,), num_classes=3)
  x = jax.random.normal(jax.random.key(0), (1, 5, 1, 1))
  variables = model.init(jax.random.key(1), x)
  w1, b1 = variables["params"]["head"]["dense"]["kernel"], variables["params"]["head"]["dense"]["bias"]
  w2 = variables["params"]["head"]["dense_1"]["kernel"]
  h = x.reshape(1, -1) @ w1 + b1
  g = w2[:, 2]
  guided = saliency.guided_backprop(model, variables, x, class_index=2)
  np.testing.assert_allclose(guided.reshape(-1), w1 @ (g * (h[0] > 0) * (g > 0)), atol=1e-6)
  plain = saliency.vanilla_gradient(model, variables, x, class_index=2)
  np.testing.assert_allclose(plain.reshape(-1), w1 @ (g * (h[0] > 0)), atol=1e-6)


def test_filter_maximisation_raises_activation_and_is_deterministic(trained_mnist):
  model, variables, _, _, _ = trained_mnist
  layer = ("features", "conv2d_2")
  kwargs = dict(size=28, channels=1, steps=40, step_size=10.0, prepare=lambda x: x / 255)
  images, start, end = filters.maximize_filters(model, variables, layer, range(8), seed=3, **kwargs)
  start, end = np.asarray(start), np.asarray(end)
  assert images.shape == (8, 28, 28, 1)
  alive = start > 0  # a filter silent on the grey start image has no gradient to climb
  assert alive.sum() >= 4 and np.all(end[alive] > 5 * start[alive]) and np.all(end >= start), (start, end)
  again, _, _ = filters.maximize_filters(model, variables, layer, range(8), seed=3, **kwargs)
  np.testing.assert_array_equal(images, again)
  other, _, _ = filters.maximize_filters(model, variables, layer, range(8), seed=4, **kwargs)
  assert not np.allclose(images, other)
  _, start_reg, end_reg = filters.maximize_filters(
    model, variables, layer, range(8), seed=3, jitter=1, blur_sigma=0.5, l2=1e-4, tv=1e-2, **kwargs
  )
  live_reg = np.asarray(start_reg) > 0
  assert live_reg.sum() >= 4 and np.all(np.asarray(end_reg)[live_reg] > np.asarray(start_reg)[live_reg])
  assert filters.deprocess(images[0]).dtype == np.uint8
  octave_images, start_oct, end_oct = filters.maximize_filters(
    model, variables, layer, range(8), seed=3, octaves=3, octave_scale=1.15, **kwargs
  )
  live = np.asarray(start_oct) > 0  # measured on the first octave's 21x21 grey image
  assert octave_images.shape == (8, 28, 28, 1) and live.sum() >= 4
  assert np.all(np.asarray(end_oct)[live] > 5 * np.asarray(start_oct)[live]), (start_oct, end_oct)


def test_constant_maps_and_zero_gradients_give_zero_heatmaps_not_nan():
  model = ConvGapLinear()
  x = jnp.zeros((1, 8, 8, 1))
  variables = jax.tree_util.tree_map(jnp.zeros_like, model.init(jax.random.key(1), x))
  for plus_plus in (False, True):
    heat, _ = cam.grad_cam(model, variables, x, ("conv",), class_index=0, plus_plus=plus_plus)
    assert np.all(np.asarray(heat) == 0)
  sal = saliency.saliency_map(saliency.vanilla_gradient(model, variables, x, 0))
  assert np.all(np.asarray(sal) == 0)
  assert np.all(activations.channel_grid(np.ones((4, 4, 3)))[:, :12] == 128)  # 3 flat grey tiles
  overlay = cam.superimpose(np.zeros((16, 16, 3), np.uint8), np.zeros((4, 4)))
  assert overlay.shape == (16, 16, 3) and np.isfinite(overlay).all()


def test_activation_grid_and_top_images(trained_mnist):
  model, variables, _, x, _ = trained_mnist
  paths = layers.layer_paths(model, (28, 28, 1))
  acts = layers.layer_outputs(model, variables, x[:1], paths)
  assert [acts[p].shape[1:] for p in paths] == [(26, 26, 32), (13, 13, 32), (11, 11, 64), (5, 5, 64), (3, 3, 64)]
  grid = activations.channel_grid(acts[paths[0]][0])
  assert grid.shape == (2 * 26, 16 * 26) and grid.dtype == np.uint8
  images = (x * 255).astype(np.uint8)
  order, scores = activations.top_images(model, variables, images, paths[0], channel=3, k=5, prepare=lambda v: v / 255)
  assert len(order) == 5 and np.all(np.diff(scores) <= 0)
  first = variables["params"]["features"]["conv2d"]  # channel 3 of the first conv, by hand
  channel = jax.nn.relu(conv2d_same(x, first["kernel"][..., 3:4], "VALID") + first["bias"][3])
  means = np.asarray(jnp.mean(channel, axis=(1, 2, 3)))
  np.testing.assert_array_equal(order, np.argsort(-means, kind="stable")[:5])
  np.testing.assert_allclose(scores, means[order], rtol=1e-5)


@pytest.mark.slow
def test_visualize_binary_writes_every_figure(tmp_path, import_binary):
  """A short real MNIST run, then every method of experiments.visualize on a test digit."""
  from PIL import Image

  from tests.conftest import loop_probabilities, run_binary

  workdir = tmp_path / "run"
  trained = run_binary(
    "experiments.train",
    "--config=configs/mnist.py",
    f"--workdir={workdir}",
    "--config.num_epochs=1",
    "--config.steps_per_epoch=100",
    "--config.data.train_split=train[:8192]",
    "--config.data.validation_size=1024",
    "--config.data.test_split=",
  )
  assert trained.returncode == 0, trained.stderr[-3000:]
  builder = tfds_data.get_builder("mnist", download=False)
  digit = tfds_data.read_rows(builder, tfds_data.RowRange("test", 0, 1))["image"][0, ..., 0]
  Image.fromarray(digit).save(tmp_path / "digit.png")
  result = run_binary(
    "experiments.visualize",
    f"--workdir={workdir}",
    f"--image={tmp_path / 'digit.png'}",
    "--config.viz.filters.size=28",
    "--config.viz.filters.num_filters=8",
    "--config.viz.filters.steps=10",
    "--config.viz.filters.step_size=10",
    "--config.viz.occlusion.patch=6",
    "--config.viz.occlusion.stride=3",
    "--config.viz.saliency.smoothgrad_samples=4",
    "--config.viz.saliency.ig_steps=8",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Metadata file does not exist" not in result.stderr  # the run's checkpoint read cleanly
  viz = workdir / "viz"
  expected = {
    "activations_conv2d.png",
    "activations_conv2d_1.png",
    "activations_conv2d_2.png",
    "activations_max_pooling2d.png",
    "activations_max_pooling2d_1.png",
    "first_layer_filters.png",
    "filters_conv2d.png",
    "filters_conv2d_2.png",
    "top_images_conv2d_2.png",
    "gradcam.png",
    "saliency.png",
    "occlusion.png",
    "timings.json",
  }
  assert {p.name for p in viz.iterdir()} == expected
  timings = json.loads((viz / "timings.json").read_text())
  # The class explained is the one the run's model predicts for the digit (the run's one checkpoint).
  assert timings["class"] == int(np.argmax(loop_probabilities(workdir, 1, digit[None, ..., None])))
  assert set(timings["seconds"]) == {
    "activations",
    "first_layer",
    "filters",
    "top_images",
    "gradcam",
    "saliency",
    "occlusion",
  }
  bad = run_binary(
    "experiments.visualize",
    f"--workdir={workdir}",
    f"--image={tmp_path / 'digit.png'}",
    "--config.viz.methods=gradcam,dreams",
  )
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
    "error: unknown config.viz.methods ['dreams']; valid: activations, first_layer, filters, top_images, "
    "gradcam, saliency, occlusion"
  )
  # The binary's other checks, in this process (each a run of the binary would only add start-up time).
  from configs.visualize import get_config
  from convjax.errors import UserError

  visualize = import_binary("visualize")

  model, variables, prepare, _, (size, channels), config = visualize.trained(str(workdir))
  image = np.asarray(Image.open(tmp_path / "digit.png"))[..., None]
  from convjax.viz import figures

  subject = figures.Subject(model, variables, image, prepare(jnp.asarray(image, jnp.float32)[None]), None, prepare)
  for field, value, message in (
    ("layers", "conv2d,conv9", "no Conv2D or MaxPooling2D layer named ['conv9']"),
    ("gradcam.layer", "max_pooling2d", "gradcam.layer='max_pooling2d' is not a Conv2D layer"),
    ("class_index", 10, "config.viz.class_index=10: mnist_convnet has 10 classes"),
    ("saliency.ig_steps", 0, "config.viz.saliency.ig_steps must be >= 1, got 0"),
    ("occlusion.patch", 40, "occlusion.patch=40 is larger than the 28x28 input"),
    ("top_images.split", "train2", "config.viz.top_images.split='train2': the run has"),
  ):
    viz = get_config().viz
    *group, key = field.split(".")
    (viz[group[0]] if group else viz)[key] = value
    with pytest.raises(UserError, match=re.escape(message)):
      methods = visualize.check_options(viz)
      _, _, draw = visualize.figure_functions(
        viz, methods, subject, config.model, True, config.data, str(tmp_path / "checks")
      )
      draw["top_images"]()


@pytest.mark.slow
def test_visualize_binary_on_the_imagenet_vgg16_base(tmp_path):
  """--config.viz.model=vgg16_base: the real notop ImageNet weights (../shared/weights),
  activations and filter patterns of chosen layers; class methods are refused for a base."""
  from tests.conftest import SHARED, run_binary

  image = SHARED / "datasets" / "images" / "skimage_chelsea_cat.png"
  common = [f"--workdir={tmp_path}", f"--image={image}", "--config.viz.model=vgg16_base", "--config.viz.image_size=32"]
  result = run_binary(
    "experiments.visualize",
    *common,
    "--config.viz.methods=activations,first_layer,filters",
    "--config.viz.layers=block1_conv1,block3_pool,block5_conv1",
    "--config.viz.filters.num_filters=4",
    "--config.viz.filters.size=32",
    "--config.viz.filters.steps=5",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert {p.name for p in (tmp_path / "viz").iterdir()} == {
    "activations_block1_conv1.png",
    "activations_block3_pool.png",
    "activations_block5_conv1.png",
    "first_layer_filters.png",
    "filters_block1_conv1.png",
    "filters_block5_conv1.png",
    "timings.json",
    "model.png",
  }  # the pretrained model's diagram
  assert "block5_conv1: mean activation" in result.stderr
  record = json.loads((tmp_path / "viz" / "timings.json").read_text())
  assert record["class"] is None and record["probability"] is None  # a conv base has no classes
  refused = run_binary("experiments.visualize", *common, "--config.viz.methods=activations,gradcam")
  assert refused.returncode == 1
  assert refused.stderr.strip().splitlines()[-1] == (
    "error: config.viz.methods ['gradcam'] need a classifier and a run's data; vgg16_base is a conv base: "
    "use activations, first_layer, filters"
  )
  with_top = run_binary(
    "experiments.visualize",
    *common[:3],
    "--config.viz.model=vgg16",
    "--config.viz.image_size=150",
    "--config.viz.methods=gradcam",
  )
  assert with_top.returncode == 1 and "vgg16 with its top takes 224x224 images" in with_top.stderr
  no_run = run_binary("experiments.visualize", *common[:2], "--config.viz.model=vgg16")  # default methods
  assert no_run.returncode == 1 and no_run.stderr.strip().splitlines()[-1] == (
    "error: config.viz.methods: top_images needs a training run's images; vgg16 has none "
    "(--config.viz.methods=activations,first_layer,filters,gradcam,saliency,occlusion)"
  )
