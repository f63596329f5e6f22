"""Using a trained run: experiments.predict, experiments.evaluate, the export, the model diagram."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from convjax import checkpoints
from convjax.data import tfds as tfds_data
from convjax.models import get_model
from convjax.models.diagram import layer_graph
from convjax.models.summary import layer_labels, layer_table
from tests.conftest import loop_probabilities, run_binary, served_probabilities


@pytest.fixture
def mnist_run(tiny_mnist_run):
  return tiny_mnist_run


def mnist_test_images(n: int) -> dict:
  builder = tfds_data.get_builder("mnist", None, False)
  return tfds_data.read_rows(builder, tfds_data.row_range(builder, f"test[:{n}]"))


def test_evaluate_reproduces_the_runs_test_record_with_a_breakdown(mnist_run):
  result = run_binary("experiments.evaluate", f"--workdir={mnist_run}")
  assert result.returncode == 0, result.stderr[-3000:]
  test = json.loads((mnist_run / "history.json").read_text())[-1]
  metrics = json.loads((mnist_run / "eval" / "test" / "metrics.json").read_text())
  assert metrics["accuracy"] == pytest.approx(test["test_accuracy"], abs=1e-6)  # the same 500 predictions
  assert metrics["loss"] == pytest.approx(test["test_loss"], rel=1e-4)
  assert f"test (500 images): loss {metrics['loss']:.4f}  accuracy {test['test_accuracy']:.4f}" in result.stdout
  # The breakdown against the training loop's own predictions, counted here: rows true, columns predicted.
  images = mnist_test_images(500)
  predicted = np.argmax(loop_probabilities(mnist_run, test["test_epoch"], images["image"]), -1)
  expected = np.zeros((10, 10), int)
  np.add.at(expected, (images["label"], predicted), 1)
  np.testing.assert_array_equal(np.asarray(metrics["confusion_matrix"]), expected)
  for i, name in enumerate(map(str, range(10))):
    row = metrics["per_class"][name]
    assert row["support"] == np.sum(images["label"] == i)
    assert row["recall"] == pytest.approx(np.mean(predicted[images["label"] == i] == i))
    chosen = images["label"][predicted == i]  # a class never predicted has precision 0
    assert row["precision"] == pytest.approx(np.mean(chosen == i) if len(chosen) else 0.0)
  assert metrics["accuracy"] <= metrics["top5_accuracy"] <= 1
  for name in ("confusion_matrix.png", "misclassified.png", "predictions.csv"):
    assert (mnist_run / "eval" / "test" / name).stat().st_size > 0
  assert len((mnist_run / "eval" / "test" / "predictions.csv").read_text().splitlines()) == 501


def test_predict_gives_the_loops_labels_skips_a_corrupt_file_and_takes_any_size(mnist_run, tmp_path):
  digits = mnist_test_images(20)
  folder = tmp_path / "digits"
  files = []
  for i, image in enumerate(digits["image"]):
    path = folder / ("odd" if i % 2 else "") / f"digit_{i:02d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0]).save(path)
    files.append(str(path))
  Image.fromarray(digits["image"][0, ..., 0]).resize((56, 40)).save(folder / "resized.png")
  (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
  result = run_binary(
    "experiments.predict",
    f"--workdir={mnist_run}",
    f"--images={folder}",
    "--top_k=3",
    f"--output={tmp_path / 'preds.json'}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  table = json.loads((tmp_path / "preds.json").read_text())
  got = {p["file"]: p["top"] for p in table["predictions"]}
  assert len(got) == 21 and str(folder / "resized.png") in got
  assert [s["file"] for s in table["skipped"]] == [str(folder / "corrupt.png")]
  assert "21 images classified, 1 skipped (unreadable):" in result.stdout
  test_epoch = json.loads((mnist_run / "history.json").read_text())[-1]["test_epoch"]
  expected = loop_probabilities(mnist_run, test_epoch, digits["image"])
  assert [got[f][0]["index"] for f in files] == list(np.argmax(expected, -1))
  for f, row in zip(files, expected, strict=True):
    top = got[f]
    assert len(top) == 3 and top[0]["probability"] >= top[1]["probability"] >= top[2]["probability"]
    assert top[0]["class"] == str(top[0]["index"]) and top[0]["probability"] == pytest.approx(row.max(), abs=1e-5)


@pytest.mark.parametrize("export_format", ["jax", "onnx"])
def test_the_export_runs_without_convjax_and_gives_the_runs_probabilities(mnist_run, tmp_path, export_format):
  """--export: model.jax run by jax alone, or with --export_format=onnx model.onnx (symbolic
  batch) run by onnxruntime in a process without jax; both give the run's probabilities on
  100 real digits within 1e-5."""
  export = tmp_path / "export"
  result = run_binary(
    "experiments.predict", f"--workdir={mnist_run}", f"--export={export}", f"--export_format={export_format}"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "DEBUG" not in result.stdout  # jax2onnx's plugin noise
  meta = json.loads((export / "model.json").read_text())
  assert meta["format"] == export_format
  assert meta["input"] == {**meta["input"], "shape": [None, 28, 28, 1], "dtype": "uint8"}
  assert meta["classes"] == [str(i) for i in range(10)] and meta["output"]["shape"] == [None, 10]
  images = mnist_test_images(100)["image"]
  served = served_probabilities(str(export), images, str(tmp_path))
  test_epoch = json.loads((mnist_run / "history.json").read_text())[-1]["test_epoch"]
  np.testing.assert_allclose(served, loop_probabilities(mnist_run, test_epoch, images), atol=1e-5)
  if export_format == "onnx":
    import onnx

    assert meta["converter"].startswith("jax2onnx ")
    dims = onnx.load(str(export / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 28, 28, 1]


def test_the_onnx_export_without_jax2onnx_is_one_error_naming_the_extra(mnist_run, tmp_path):
  """jax2onnx absent (hidden from the path finder): one error line asking for the extra, no
  traceback, nothing written; the run is untouched."""
  from tests.test_pipeline import run_without_tensorflow

  before = (mnist_run / "history.json").read_bytes()
  export = tmp_path / "export"
  args = (f"--workdir={mnist_run}", f"--export={export}", "--export_format=onnx")
  result = run_without_tensorflow("experiments.predict", *args, hidden=("jax2onnx",))
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
    "error: --export_format=onnx needs jax2onnx: pip install 'convjax[onnx]'"
  )
  assert not export.exists() or not list(export.iterdir())
  assert (mnist_run / "history.json").read_bytes() == before


def test_a_damaged_checkpoint_is_refused_by_predict_in_one_line(mnist_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(mnist_run, workdir)
  step = max(checkpoints.kept(str(workdir)))
  shutil.rmtree(workdir / "checkpoints" / str(step) / "state")
  shutil.copytree(
    workdir / "checkpoints" / str(min(checkpoints.kept(str(workdir)))) / "state",
    workdir / "checkpoints" / str(step) / "state",
  )
  result = run_binary("experiments.evaluate", f"--workdir={workdir}", "--weights=last")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
    f"error: checkpoint {workdir}/checkpoints/{step} is damaged: its arrays differ from the digest saved with them"
  )


def test_a_run_has_its_model_diagram_and_resnet18s_shows_every_layer_and_its_branches(mnist_run):
  assert (mnist_run / "model.png").stat().st_size > 10_000
  model = get_model("resnet18", num_classes=10)
  nodes, edges = layer_graph(model, (32, 32, 1))
  names = [n.name for n in nodes]
  assert set(layer_labels(layer_table(model, (32, 32, 1)))) <= set(names)
  adds = [i for i, n in enumerate(nodes) if n.type_name == "Add"]
  assert len(adds) == 8 and all(sum(b == i for _, b in edges) == 2 for i in adds)  # the shortcut and the block
  conv1 = names.index("features/conv1")
  assert nodes[conv1].input_shapes == ((None, 32, 32, 1),) and nodes[conv1].output_shape == (None, 16, 16, 64)


def test_visualize_explains_a_folder_of_images_in_grids(mnist_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(mnist_run, workdir)
  folder = tmp_path / "digits" / "7"  # a folder named after a class: the true label
  folder.mkdir(parents=True)
  for i, image in enumerate(mnist_test_images(6)["image"]):
    Image.fromarray(image[..., 0]).save(folder / f"{i}.png")
  result = run_binary(
    "experiments.visualize",
    f"--workdir={workdir}",
    f"--images={tmp_path / 'digits'}",
    "--config.viz.methods=gradcam,saliency",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "gradcam and saliency of 6 images" in result.stderr
  for name in ("gradcam_images.png", "saliency_images.png"):
    assert (workdir / "viz" / name).stat().st_size > 10_000


def test_visualize_and_evaluate_read_the_same_weights(mnist_run, tmp_path):
  """One reader of a run: visualize explains the weights evaluate scores (the tested ones by
  default). The copy's test record names epoch 2 (step 20), so the latest checkpoint (step
  30), which visualize once read, differs from them."""
  workdir = tmp_path / "run"
  shutil.copytree(mnist_run, workdir)
  history = json.loads((workdir / "history.json").read_text())
  history[-1]["test_epoch"] = 2
  (workdir / "history.json").write_text(json.dumps(history))
  image = tmp_path / "digit.png"
  Image.fromarray(mnist_test_images(1)["image"][0, ..., 0]).save(image)
  evaluated = run_binary("experiments.evaluate", f"--workdir={workdir}")
  explained = run_binary(
    "experiments.visualize", f"--workdir={workdir}", f"--image={image}", "--config.viz.methods=gradcam"
  )
  lines = []
  for result in (evaluated, explained):
    assert result.returncode == 0, result.stderr[-3000:]
    lines.append([line.split("] ", 1)[1] for line in result.stderr.splitlines() if "] weights: " in line])
  assert lines[0] == lines[1] == ["weights: the weights the run tested (epoch 2, step 20)"]
