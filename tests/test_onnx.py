"""The ONNX export (`experiments.predict --export_format=onnx`, convjax.inference.export) of the
runs users make: run by onnxruntime in a process without jax, the run's own probabilities.
The MNIST recipe's export through the binary is in tests/test_use.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convjax import inference
from convjax.data.folders import list_split
from convjax.errors import UserError
from convjax.models import get_model, init_variables
from tests.conftest import SHARED, link_cats_dogs_subset, mnist_arrays_args, run_binary, served_probabilities

WEIGHTS = SHARED / "weights"  # VGG16's ImageNet notop file


@pytest.mark.slow
def test_cats_dogs_resnet18_and_finetuned_vgg16_runs_export_to_onnx(tmp_path, mnist_arrays):
  """A cats-vs-dogs convnet run, a ResNet-18 run and a fine-tuned VGG16 run (one step each):
  their ONNX models give the runs' probabilities on 100 real images (test photos; test
  digits) within 1e-5."""
  data = link_cats_dogs_subset(tmp_path / "data", {"train": 4, "validation": 4, "test": 50})
  short = ["--config.num_epochs=1", "--config.steps_per_epoch=1", "--config.batch_size=4"]
  short += ["--config.eval_batch_size=8", "--config.data.test_split="]
  runs = {
    "cats_dogs": ["--config=configs/cats_dogs.py", f"--config.data.folder={data}", *short],
    "resnet18": [
      "--config=configs/mnist.py",
      "--config.model=resnet18",
      "--config.data.image_size=(32, 32)",
      *mnist_arrays_args("train2048", "test500"),
      "--config.data.validation_size=8",
      *short,
    ],
    # The fine-tuning recipe (block5 and the head trainable) from the ImageNet base, not from a
    # frozen-base run: the same model and weights' layout, one run fewer.
    "vgg16_finetune": [
      "--config=configs/cats_dogs_vgg16_finetune.py",
      f"--config.data.folder={data}",
      "--config.pretrained.weights=imagenet",
      *short,
    ],
  }
  for name, args in runs.items():
    result = run_binary(
      "experiments.train", f"--workdir={tmp_path / name}", *args, env={"CONVJAX_WEIGHTS_DIR": str(WEIGHTS)}
    )
    assert result.returncode == 0, (name, result.stderr[-3000:])

  photos = list(list_split(str(data), "test").files)
  digits = np.load(mnist_arrays / "test500.npz")["image"][:100]
  for name in ("cats_dogs", "resnet18", "vgg16_finetune"):
    classifier = inference.from_run(str(tmp_path / name), "last")
    if name == "resnet18":  # 100 test digits, fitted to the run's 32x32 as its data were
      images = np.stack([classifier.fit(digit) for digit in digits])
    else:  # 50 cat and 50 dog test photos
      images, read, _ = inference.read_images(photos, classifier)
      assert len(read) == 100
    ours = np.asarray(jax.jit(classifier.forward)(classifier.variables, images))
    folder = tmp_path / f"{name}_served"
    folder.mkdir()
    inference.export(classifier, str(folder / "export"), "last", "onnx")
    served = served_probabilities(str(folder / "export"), images, str(folder))
    assert served.shape == ours.shape == ((100, 10) if name == "resnet18" else (100, 1)), name
    np.testing.assert_allclose(served, ours, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_models_with_every_kind_of_pooling_export_and_one_that_cannot_is_one_error(tmp_path):
  """Built-in models whose pools jax2onnx replaces while it traces (LeNet-5's average pool,
  MobileNet's 'SAME' pool; ResNet-18's explicitly padded one is in the test above: see
  layers.max_pool) export and equal their jax outputs; a model with an operation jax2onnx has no conversion for (a
  2-D FFT) is one UserError naming the model and the reason, and writes nothing."""
  rng = np.random.default_rng(0)
  for name, shape in (("lenet5", (32, 32, 1)), ("mobilenet", (32, 32, 3))):
    model = get_model(name, num_classes=3)
    variables = init_variables(model, jax.random.key(0), shape)
    classifier = _classifier(name, model, variables, shape)
    images = rng.integers(0, 256, (4, *shape), np.uint8)
    ours = np.asarray(jax.jit(classifier.forward)(classifier.variables, images))
    (tmp_path / name).mkdir()
    inference.export(classifier, str(tmp_path / name / "export"), export_format="onnx")
    served = served_probabilities(str(tmp_path / name / "export"), images, str(tmp_path / name))
    np.testing.assert_allclose(served, ours, atol=1e-5, err_msg=name)

  class Spectral(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3)(jnp.abs(jnp.fft.fft2(x[..., 0])).reshape(x.shape[0], -1))

  model = Spectral()
  classifier = _classifier("spectral", model, model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))), (8, 8, 1))
  export = tmp_path / "spectral"
  with pytest.raises(
    UserError,
    match=r"^spectral: jax2onnx \S+ cannot convert this model to ONNX \(.*FFT.*\); --export_format=jax exports it$",
  ):
    inference.export(classifier, str(export), export_format="onnx")
  assert not list(export.iterdir())
  inference.export(classifier, str(export))  # jax.export takes any program
  assert (export / "model.jax").exists()


def _classifier(name, model, variables, shape):
  forward = inference.make_forward(model, lambda x: x / 255)
  return inference.Classifier(name, model, None, forward, {"model": variables}, shape, None, ("a", "b", "c"), False, {})
