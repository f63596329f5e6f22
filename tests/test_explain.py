"""experiments.explain over part of a run's split: every row's map, the metrics table, the
same maps on 1 and 8 devices, and the maps equal the library's functions."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_binary

ARGS = [
  "--rows=0:128",
  "--batch_size=64",
  "--methods=gradcam,integrated_gradients,deeplift,feature_ablation",
  "--metrics=deletion,insertion,road,randomisation",
  "--ig_steps=8",
]


def _explain(workdir, out, devices, *extra):
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
  result = run_binary("experiments.explain", f"--workdir={workdir}", f"--output={out}", *ARGS, *extra, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"explained 128 images with 4 methods on {devices} device(s)" in result.stdout
  return out


@pytest.mark.slow
def test_explain_writes_every_rows_maps_and_metrics_and_eight_devices_equal_one(tiny_mnist_run, tmp_path):
  from convjax import inference, run
  from convjax.data.splits import open_source
  from convjax.viz import cam, layers

  one = _explain(tiny_mnist_run, tmp_path / "one", 1)
  eight = _explain(tiny_mnist_run, tmp_path / "eight", 8, "--metrics=")  # the maps: the metrics read them
  shapes = {"gradcam": (128, 3, 3), "integrated_gradients": (128, 28, 28), "deeplift": (128, 28, 28)}
  shapes["feature_ablation"] = (128, 28, 28)
  for method, shape in shapes.items():
    a, b = np.load(one / f"{method}.npy"), np.load(eight / f"{method}.npy")
    assert a.shape == shape and a.dtype == np.float16 and np.isfinite(a).all(), method
    scale = np.abs(a.astype(np.float32)).max()
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3 * scale, err_msg=method)
    assert (one / f"{method}.png").stat().st_size > 10_000
  report = json.loads((one / "metrics.json").read_text())
  assert report["devices"] == 1 and json.loads((eight / "metrics.json").read_text())["devices"] == 8
  for method in shapes:
    row = report["methods"][method]
    assert row["images"] == 128 and row["images_per_second"] > 0
    assert {"deletion", "insertion", "road", "randomisation"} <= row.keys()
    assert 0 <= row["deletion"]["mean"] <= 1 and 0 <= row["insertion"]["mean"] <= 1
  rows = json.loads((one / "rows.json").read_text())
  assert rows["rows"][:2] == ["test[0]", "test[1]"] and len(rows["classes_explained"]) == 128
  assert (one / "metrics.csv").read_text().count("\n") == 5 and (one / "metrics.png").stat().st_size > 10_000
  with Image.open(one / "methods.png") as grid:  # the first 8 rows (--examples) under the 4 methods
    assert grid.size[1] > 500 and grid.size[0] == pytest.approx(4 / 8 * grid.size[1], rel=0.2), grid.size

  # The binary's Grad-CAM of rows 0:8 is the library's on the same images.
  classifier = inference.from_run(str(tiny_mnist_run))
  images = open_source(run.read_config(str(tiny_mnist_run)).data).splits()["test"].read(0, 8)["image"]
  x = classifier.prepare(jnp.asarray(images, jnp.float32))
  model, variables = classifier.model, classifier.variables["model"]
  layer = layers.last_conv(model, classifier.image_shape)
  expected = cam.cam(model, variables, x, layer, "gradcam")[0]
  assert rows["classes_explained"][:8] == [int(c) for c in jax.numpy.argmax(model.apply(variables, x), -1)]
  np.testing.assert_allclose(np.load(one / "gradcam.npy")[:8].astype(np.float32), expected, atol=1e-3)


def test_explain_names_a_bad_method_metric_or_rows_in_one_line(tiny_mnist_run, tmp_path):
  for flag, message in (
    ("--methods=gradcam,lime", "--methods='gradcam,lime': unknown ['lime']; valid: gradcam, gradcam++"),
    ("--rows=0:100000", "--rows='0:100000': the split has rows 0:500"),
  ):
    result = run_binary("experiments.explain", f"--workdir={tiny_mnist_run}", f"--output={tmp_path}", flag)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), (
      result.stderr[-2000:]
    )


def test_the_benchmark_times_explanations_per_method(tmp_path):
  """--config.modes=explain: a row per method, its maps of a batch timed as the other rows are."""
  result = run_binary(
    "experiments.benchmark",
    f"--workdir={tmp_path}",
    "--config.models=mnist_convnet@28x28x1",
    "--config.batch_sizes=(16,)",
    "--config.precisions=('float32',)",
    "--config.modes=('explain',)",
    "--config.explain_methods=gradcam,deeplift,feature_ablation,smoothgrad",
    "--config.warmup=1",
    "--config.peers=",
    "--config.pipeline=",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
  assert [(r["mode"], r["method"], r["steps_timed"]) for r in rows] == [
    ("explain", "gradcam", 20),
    ("explain", "deeplift", 20),
    ("explain", "feature_ablation", 20),
    ("explain", "smoothgrad", 20),
  ]
  assert all(r["images_per_second"] > 0 and r["compile_seconds"] > 0 for r in rows)
  # Feature ablation loops over its segments (lax.map), whose body XLA's cost analysis counts
  # once: no FLOP count, rather than the count of one pass of the loop. SmoothGrad's only loop
  # draws its noise's random bits: its count stands (16 samples' passes, more than Grad-CAM's).
  assert rows[0]["flops_per_image"] > 0 and rows[2]["flops_per_image"] is None
  assert rows[3]["flops_per_image"] > 10 * rows[0]["flops_per_image"]
  assert "| mnist_convnet | 28x28x1 | 16 | float32 | explain deeplift |" in (tmp_path / "benchmark.md").read_text()
  bad = run_binary(
    "experiments.benchmark", f"--workdir={tmp_path}", "--config.modes=('explain',)", "--config.explain_methods=lime"
  )
  assert bad.returncode == 1 and "error: config.explain_methods='lime': unknown ['lime']" in bad.stderr


def test_every_method_by_name_gives_a_map_or_input_shaped_attributions():
  """explain.explain dispatches each of METHODS (traced only: jax.eval_shape): CAMs at the
  layer's resolution, the fused LayerCAM at the input's, attributions shaped like the input."""
  from convjax.models import get_model
  from convjax.viz import cam, explain

  model = get_model("mnist_convnet")
  x = jnp.zeros((2, 28, 28, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  convs = explain.conv_layers(model, (28, 28, 1))
  options = explain.Options(layer=convs[-1], fused_layers=tuple(convs))
  shapes = {
    method: jax.eval_shape(
      lambda v, x, method=method: explain.explain(
        model, v, x, jnp.zeros(2, jnp.int32), method, options, jax.random.key(1)
      ),
      variables,
      x,
    ).shape
    for method in explain.METHODS
  }
  assert {shapes[m] for m in cam.CAMS} == {(2, 3, 3)} and shapes.pop("layercam_fused") == (2, 28, 28), shapes
  assert {shapes[m] for m in shapes if m not in cam.CAMS} == {x.shape}, shapes


def test_predicted_classes_come_from_the_methods_own_forward_pass_and_explain_the_same():
  """explain_classes with classes=None: each image's predicted class (several per batch
  here), and the result equal to explaining those classes given; the ONE_PASS methods'
  programs hold one forward pass fewer than predicting first (their convolutions counted)."""
  import jax.extend.core as jex

  from convjax.models import get_model
  from convjax.viz import explain, layers

  model = get_model("mnist_convnet")
  x = jax.random.uniform(jax.random.key(0), (6, 28, 28, 1))
  variables = jax.jit(model.init)(jax.random.key(1), x[:1])
  convs = explain.conv_layers(model, (28, 28, 1))
  options = explain.Options(layer=convs[-1], fused_layers=tuple(convs))
  key = jax.random.key(2)

  def predict_first(method):
    return lambda v: explain.explain(
      model, variables, v, layers.predicted_class(model.apply(variables, v)), method, options, key
    )

  def shared(method):
    return lambda v: explain.explain_classes(model, variables, v, None, method, options, key)

  predicted = layers.predicted_class(jax.jit(model.apply)(variables, x))
  assert len(set(np.asarray(predicted).tolist())) > 1
  for method in ("gradient", "guided_backprop", "gradcam", "guided_gradcam", "layercam_fused"):
    result, classes = jax.jit(shared(method))(x)
    np.testing.assert_array_equal(classes, predicted)
    np.testing.assert_allclose(result, jax.jit(predict_first(method))(x), rtol=1e-5, atol=1e-6, err_msg=method)

  def wide_convolutions(jaxpr):  # the one-channel first layer's is another program inside explanations
    return sum(
      (eqn.primitive.name == "conv_general_dilated" and eqn.invars[0].aval.shape[-1] > 1)
      + sum(wide_convolutions(sub) for sub in jex.jaxprs_in_params(eqn.params))
      for eqn in jaxpr.eqns
    )

  for method in (*explain.ONE_PASS, "eigencam"):
    convolutions = [wide_convolutions(jax.make_jaxpr(f(method))(x).jaxpr) for f in (shared, predict_first)]
    assert convolutions[0] == convolutions[1] - 2 * (method in explain.ONE_PASS), (method, convolutions)
