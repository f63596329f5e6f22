"""The classic architectures: parameter counts against their references, shapes, training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from convjax.models import get_model, init_variables
from convjax.models.lenet import C3_TABLE, PartialConv
from convjax.models.summary import summary
from convjax.run import read_run
from convjax.train.state import starting_params
from tests.conftest import assert_onnx_export_gives_the_runs_probabilities, mnist_arrays_args, run_binary

# name, native input, params (trainable) at 1000 classes, other variables (BatchNorm
# statistics), and where the figure comes from.
REFERENCE = [
  ("lenet5", (32, 32, 1), 61_706, 0, "LeCun 1998 layout, full C3, 10 classes"),
  ("alexnet", (227, 227, 3), 62_378_344, 0, "Krizhevsky 2012, one tower"),
  ("vgg11", (224, 224, 3), 132_863_336, 0, "torchvision vgg11"),
  ("vgg13", (224, 224, 3), 133_047_848, 0, "torchvision vgg13"),
  ("vgg16", (224, 224, 3), 138_357_544, 0, "keras.applications.VGG16"),
  ("vgg19", (224, 224, 3), 143_667_240, 0, "keras.applications.VGG19"),
  ("googlenet", (224, 224, 3), 6_624_904, None, "torchvision googlenet, no aux heads"),
  ("resnet18", (224, 224, 3), 11_689_512, None, "torchvision resnet18"),
  ("resnet34", (224, 224, 3), 21_797_672, None, "torchvision resnet34"),
  ("resnet50", (224, 224, 3), 25_557_032, None, "torchvision resnet50"),
  ("mobilenet", (224, 224, 3), 4_231_976, 21_888, "keras.applications.MobileNet: 4,253,864 total"),
]


def _shapes(model, input_shape, batch=2):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape))))
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((batch, *input_shape))), variables)
  counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(v)) for k, v in variables.items()}
  return counts, logits.shape


@pytest.mark.parametrize("name,input_shape,params,others,source", REFERENCE, ids=[r[0] for r in REFERENCE])
def test_parameter_count_and_output_shape(name, input_shape, params, others, source):
  num_classes = 10 if name == "lenet5" else 1000
  counts, out = _shapes(get_model(name, num_classes=num_classes), input_shape)
  assert counts["params"] == params, source
  if others is not None:
    assert counts.get("batch_stats", 0) == others, source
  assert out == (2, num_classes)


def test_batch_norm_statistics_are_counted_as_keras_counts_them():
  text = summary(get_model("mobilenet"), (224, 224, 3), name="mobilenet")
  assert "Total params: 4,253,864" in text and "Non-trainable params: 21,888" in text


def test_lenet_partial_c3_has_1516_params_and_is_a_masked_convolution():
  full, _ = _shapes(get_model("lenet5"), (32, 32, 1))
  partial, _ = _shapes(get_model("lenet5", partial_c3=True), (32, 32, 1))
  assert full["params"] - partial["params"] == 2_416 - 1_516
  conv = PartialConv(C3_TABLE)
  x = jax.random.normal(jax.random.key(0), (2, 14, 14, 6))
  variables = conv.init(jax.random.key(1), x)
  assert sum(v.size for v in jax.tree_util.tree_leaves(variables)) == 1_516
  # The same as a dense 5x5 convolution whose kernel is zero off the table.
  weights, bias = variables["params"]["kernel"], variables["params"]["bias"]
  dense = np.zeros((5, 5, 6, 16), np.float32)
  n = 0
  for j, row in enumerate(C3_TABLE):
    for i in row:
      dense[:, :, i, j] = weights[:, :, n]
      n += 1
  expected = jax.lax.conv_general_dilated(x, dense, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
  np.testing.assert_allclose(conv.apply(variables, x), expected, atol=1e-5)
  # Map 0 sees S2 maps 0-2 only: changing map 5 leaves it alone, and changes map 3.
  y0 = conv.apply(variables, x)
  y1 = conv.apply(variables, x.at[..., 5].add(1.0))
  assert np.allclose(y0[..., 0], y1[..., 0]) and not np.allclose(y0[..., 3], y1[..., 3])


def test_separable_convolution_costs_what_the_formula_says():
  from convjax.models.mobilenet import SeparableConv2D

  x = jnp.zeros((1, 16, 16, 32))
  variables = SeparableConv2D(64, use_bias=False).init(jax.random.key(0), x)
  n = sum(v.size for v in jax.tree_util.tree_leaves(variables))
  assert n == 3 * 3 * 32 + 32 * 64  # depthwise k*k*c_in + pointwise c_in*c_out
  assert n < 3 * 3 * 32 * 64 / 7  # vs a full 3x3 convolution


@pytest.mark.parametrize(
  "name,input_shape,kwargs",
  [
    ("lenet5", (32, 32, 1), {"partial_c3": True}),
    ("alexnet", (227, 227, 3), {}),
    ("vgg11", (64, 64, 3), {}),
    pytest.param("googlenet", (96, 96, 3), {}, marks=pytest.mark.slow),
    pytest.param("resnet18", (64, 64, 3), {}, marks=pytest.mark.slow),
    pytest.param("resnet50", (64, 64, 3), {}, marks=pytest.mark.slow),
    pytest.param("mobilenet", (96, 96, 3), {}, marks=pytest.mark.slow),
    ("xception_small", (64, 64, 3), {}),
  ],
  ids=lambda v: v if isinstance(v, str) else None,
)
def test_any_class_count_and_features_head_split(name, input_shape, kwargs):
  """num_classes is free; features/head compose to the model (what transfer and viz rely on)."""
  from convjax.models import apply_features, apply_head

  model = get_model(name, num_classes=7, **kwargs)
  x = jax.random.uniform(jax.random.key(0), (2, *input_shape))
  variables = init_variables(model, jax.random.key(1), input_shape)

  @jax.jit
  def both(variables, x):
    split = apply_head(model, variables, apply_features(model, variables, x))
    return model.apply(variables, x), split

  logits, split = both(variables, x)
  assert logits.shape == (2, 7) and np.isfinite(logits).all()
  np.testing.assert_allclose(split, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_zoo_model_trains_on_mnist_with_the_dataset_class_count(tmp_path, mnist_arrays):
  """--config.model=<name> on the MNIST config: 10 classes from the dataset, BatchNorm updated;
  the run is read back (read_run, init_from, the visualisation binary, its ONNX export on 100
  test digits) with those 10 classes."""
  workdir = tmp_path / "run"
  result = run_binary(
    "experiments.train",
    "--config=configs/mnist.py",
    f"--workdir={workdir}",
    "--config.model=resnet18",
    "--config.data.image_size=(32, 32)",
    *mnist_arrays_args("train2048", "test500"),
    "--config.data.validation_size=512",
    "--config.num_epochs=2",
    "--config.steps_per_epoch=20",
    "--config.batch_size=32",
    "--config.optimizer=adam",
    "--config.eval_batch_size=256",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "num_classes 1000 -> 10" in result.stderr
  history = json.loads((workdir / "history.json").read_text())
  assert history[-1]["test_accuracy"] > 0.5, history  # 40 steps of 32 digits; seen 0.692
  assert "Non-trainable params: 9,600" in (workdir / "summary.txt").read_text()  # BN statistics
  assert (workdir / "model.png").stat().st_size > 50_000  # its diagram (tests/test_use.py checks the graph)

  # The run records the class count it trained with, so every reader rebuilds the same model.
  assert json.loads((workdir / "config.json").read_text())["model_kwargs"]["num_classes"] == 10
  config, model, variables = read_run(str(workdir), "latest")[:3]
  assert model.num_classes == 10 and config.model == "resnet18"
  assert jax.tree_util.tree_map(np.shape, variables) == jax.tree_util.tree_map(
    np.shape, dict(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1))))
  )
  config.init_from = str(workdir)
  fresh = init_variables(model, jax.random.key(1), (32, 32, 1))
  params, model_state = starting_params(config, fresh["params"], {"batch_stats": fresh["batch_stats"]})
  np.testing.assert_array_equal(params["head"]["fc"]["kernel"], variables["params"]["head"]["fc"]["kernel"])
  assert model_state.keys() == {"batch_stats"}
  digit = tmp_path / "digit.png"
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(digit)
  viz = run_binary(
    "experiments.visualize",
    f"--workdir={workdir}",
    f"--image={digit}",
    "--config.viz.methods=activations,gradcam,occlusion",  # saliency: tests/test_viz.py, any model
    "--config.viz.occlusion.patch=8",
    "--config.viz.occlusion.stride=8",
  )
  assert viz.returncode == 0, viz.stderr[-3000:]
  # Both read the run's latest checkpoint: the binary explains the class the model predicts for the (zero) digit.
  predicted = int(np.argmax(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.zeros((1, 32, 32, 1)))))
  assert json.loads((workdir / "viz" / "timings.json").read_text())["class"] == predicted
  assert {"gradcam.png", "occlusion.png"} <= {p.name for p in (workdir / "viz").iterdir()}
  digits = np.load(mnist_arrays / "test500.npz")["image"][:100]
  assert_onnx_export_gives_the_runs_probabilities(workdir, tmp_path / "served", digits=digits)


def test_notes_networks_have_the_notes_parameter_counts():
  """The sign-language CNN (64x64x1) and MLP from the notes, and the CIFAR-10 CNN (32x32x3)."""
  assert _shapes(get_model("notes_cnn"), (64, 64, 1))[0]["params"] == 4_970_122
  assert _shapes(get_model("notes_mlp"), (64, 64, 1))[0]["params"] == 2_097_664 + 262_656 + 5_130
  assert (
    _shapes(get_model("notes_cnn"), (32, 32, 3))[0]["params"] == 776_394
  )  # convs 240,832 + Dense 2*2*128 -> 1024: 525,312 + 10,250
