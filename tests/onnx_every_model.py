"""Exports every built-in model (random weights, its usual input size) to ONNX with
convjax.inference.export and compares onnxruntime's probabilities with jax's on 2 random
images; a model jax2onnx cannot convert prints its one error. The table in
docs/using-a-run.md is its output:

  python tests/onnx_every_model.py     # with convjax[onnx] installed; ~2 minutes on 2 cores
"""

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort

from convjax import inference
from convjax.errors import UserError
from convjax.models import MODELS, get_model

SIZES = {"alexnet": (227, 227, 3), "cats_dogs_convnet": (150, 150, 3), "vgg16_classifier": (150, 150, 3)}
SIZES |= {
  name: (28, 28, 1) for name in ("small_convnet", "mnist_convnet", "notes_cnn", "mlp", "mnist_dense", "notes_mlp")
}
SIZES["lenet5"] = (32, 32, 1)

for name in MODELS:
  shape = SIZES.get(name, (224, 224, 3))
  model = get_model(name)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *shape)))
  forward = inference.make_forward(model, lambda x: x / 255)
  classifier = inference.Classifier(name, model, None, forward, {"model": variables}, shape, None, (), False, {})
  folder = tempfile.mkdtemp()
  start = time.time()
  try:
    inference.export(classifier, folder, export_format="onnx")
  except UserError as e:
    print(f"| {name} | {shape} | error: {e} |", flush=True)
    continue
  seconds = time.time() - start
  images = np.random.default_rng(0).integers(0, 256, (2, *shape), np.uint8)
  served = ort.InferenceSession(os.path.join(folder, "model.onnx")).run(["probabilities"], {"images": images})[0]
  ours = np.asarray(jax.jit(forward)(classifier.variables, images))
  print(f"| {name} | {shape} | {seconds:.1f} s | {np.abs(served - ours).max():.1e} |", flush=True)
