r"""The benchmark's architectures in Keras 3, timed the same way, for convjax/peer ratios.

Run as a subprocess (the Keras backend is fixed at import):

  KERAS_BACKEND=jax python -m convjax.peers --model=mnist_convnet --input=28x28x1 --batch=128 \
      --precision=float32 --mode=train --steps=20 --warmup=3

prints one JSON line: {"images_per_second", "step_seconds_median", "params"}. Train
steps are `train_on_batch` (forward, backward, RMSprop update) on arrays already
converted for the backend; inference is `predict_on_batch`. 'bfloat16' is Keras'
mixed_bfloat16 policy (float32 variables), as convjax's bfloat16 rows.
"""
import json
import os
import statistics
import sys
import time

import numpy as np


def build(keras, name: str, shape: tuple):
  layers = keras.layers
  if name == "mnist_convnet":
    return keras.Sequential([keras.Input(shape), layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(),
                             layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(),
                             layers.Conv2D(64, 3, activation="relu"), layers.Flatten(),
                             layers.Dense(64, activation="relu"), layers.Dense(10)])
  if name == "cats_dogs_convnet":
    stack = [keras.Input(shape)]
    for f in (32, 64, 128, 128):
      stack += [layers.Conv2D(f, 3, activation="relu"), layers.MaxPooling2D()]
    return keras.Sequential(stack + [layers.Flatten(), layers.Dense(512, activation="relu"), layers.Dense(1)])
  if name == "vgg16_base":
    return keras.applications.VGG16(weights=None, include_top=False, pooling="avg", input_shape=shape)
  if name == "vgg16":
    return keras.applications.VGG16(weights=None, input_shape=shape, classifier_activation=None)
  if name == "resnet50":  # Keras' ResNet50 is v1 (stride on the first 1x1, conv biases): 25,636,712 params
    return keras.applications.ResNet50(weights=None, input_shape=shape, classifier_activation=None)
  raise SystemExit(f"no Keras peer for model {name!r}")


def main(argv):
  args = dict(a.lstrip("-").split("=", 1) for a in argv[1:])
  import keras
  if args["precision"] == "bfloat16":
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
  shape = tuple(int(d) for d in args["input"].split("x"))
  batch, steps, warmup = int(args["batch"]), int(args["steps"]), int(args["warmup"])
  model = build(keras, args["model"], shape)
  outputs = model.output_shape[-1]
  loss = (keras.losses.BinaryCrossentropy(from_logits=True) if outputs == 1
          else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.compile(optimizer=keras.optimizers.RMSprop(1e-4), loss=loss)
  rng = np.random.default_rng(0)
  x = keras.ops.convert_to_tensor(rng.random((batch, *shape), np.float32))
  y = keras.ops.convert_to_tensor(rng.integers(0, max(outputs, 2), batch).astype(np.float32 if outputs == 1 else np.int32))
  step = (lambda: model.train_on_batch(x, y)) if args["mode"] == "train" else (lambda: model.predict_on_batch(x))
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    out = step()
    np.asarray(out)  # wait for the result
    times.append(time.perf_counter() - t)
  median = statistics.median(times)
  print(json.dumps({"images_per_second": batch / median, "step_seconds_median": median,
                    "params": int(model.count_params()), "backend": keras.backend.backend()}))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main(sys.argv)
