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
from tests.conftest import (
  SHARED,
  assert_onnx_export_gives_the_runs_probabilities,
  link_cats_dogs_subset,
  run_binary,
  served_probabilities,
)

WEIGHTS = SHARED / "weights"  # VGG16's ImageNet notop file


@pytest.mark.slow
def test_a_finetuned_vgg16_run_exports_to_onnx(tmp_path):
  """A fine-tuned VGG16 run (one step): its ONNX model gives the run's probabilities on 100
  real test photos within 1e-5. (The cats-vs-dogs convnet's and ResNet-18's exports are
  checked on the runs of tests/test_cats_dogs.py and tests/test_zoo.py.)"""
  data = link_cats_dogs_subset(tmp_path / "data", {"train": 4, "validation": 4, "test": 50})
  # The fine-tuning recipe (block5 and the head trainable) from the ImageNet base, not from a
  # frozen-base run: the same model and weights' layout, one run fewer.
  result = run_binary(
    "experiments.train",
    f"--workdir={tmp_path / 'run'}",
    "--config=configs/cats_dogs_vgg16_finetune.py",
    f"--config.data.folder={data}",
    "--config.pretrained.weights=imagenet",
    "--config.num_epochs=1",
    "--config.steps_per_epoch=1",
    "--config.batch_size=4",
    "--config.eval_batch_size=8",
    "--config.data.test_split=",
    env={"CONVJAX_WEIGHTS_DIR": str(WEIGHTS)},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  photos = list(list_split(str(data), "test").files)  # 50 cat and 50 dog test photos
  assert_onnx_export_gives_the_runs_probabilities(tmp_path / "run", tmp_path / "served", photos=photos)


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
