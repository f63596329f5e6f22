"""VGG16 with ImageNet weights: counts, HDF5 loading and its errors, Keras parity, transfer."""

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convjax.data.folders import decode_image
from convjax.data.preprocess import preprocess_input
from convjax.errors import UserError
from convjax.models import apply_features, get_model, init_variables
from convjax.models.summary import layer_table
from convjax.pretrained import fetch, imagenet, keras_h5
from tests.conftest import SHARED, link_cats_dogs_subset, run_binary

NOTOP = SHARED / "weights" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGES = [
  SHARED / "datasets" / "images" / n
  for n in ("creative_commons_elephant.jpg", "skimage_chelsea_cat.png", "dog.4999.jpg")
]
# The notes' conv_base.summary() at 150x150 (transcribed), then block5 as Keras prints it.
REFERENCE_150 = [
  ("block1_conv1", (150, 150, 64), 1792),
  ("block1_conv2", (150, 150, 64), 36928),
  ("block1_pool", (75, 75, 64), 0),
  ("block2_conv1", (75, 75, 128), 73856),
  ("block2_conv2", (75, 75, 128), 147584),
  ("block2_pool", (37, 37, 128), 0),
  ("block3_conv1", (37, 37, 256), 295168),
  ("block3_conv2", (37, 37, 256), 590080),
  ("block3_conv3", (37, 37, 256), 590080),
  ("block3_pool", (18, 18, 256), 0),
  ("block4_conv1", (18, 18, 512), 1180160),
  ("block4_conv2", (18, 18, 512), 2359808),
  ("block4_conv3", (18, 18, 512), 2359808),
  ("block4_pool", (9, 9, 512), 0),
  ("block5_conv1", (9, 9, 512), 2359808),
  ("block5_conv2", (9, 9, 512), 2359808),
  ("block5_conv3", (9, 9, 512), 2359808),
  ("block5_pool", (4, 4, 512), 0),
]


def _params(model, size):
  return init_variables(model, jax.random.key(0), (size, size, 3))["params"]


def test_vgg16_base_summary_equals_the_reference_table():
  rows = layer_table(get_model("vgg16", include_top=False), (150, 150, 3))
  assert [(r.path[-1], r.output_shape[1:], r.trainable) for r in rows] == REFERENCE_150
  assert sum(r.trainable for r in rows) == 14_714_688
  pooled = jax.eval_shape(
    lambda: get_model("vgg16", include_top=False, pooling="avg").init_with_output(
      jax.random.key(0), jnp.zeros((2, 150, 150, 3))
    )[0]
  )
  assert pooled.shape == (2, 512)


def test_good_file_loads_every_conv_layer():
  model = get_model("vgg16", include_top=False)
  params = keras_h5.load_into(_params(model, 32), str(NOTOP), under="features")
  weights = keras_h5.read(str(NOTOP))
  assert len(weights) == 13
  np.testing.assert_array_equal(params["features"]["block3_conv2"]["kernel"], weights["block3_conv2"]["kernel"])
  np.testing.assert_array_equal(params["features"]["block5_conv3"]["bias"], weights["block5_conv3"]["bias"])


def test_bad_files_give_one_error_naming_the_problem(tmp_path):
  model = get_model("vgg16", include_top=False)
  params = _params(model, 32)
  weights = keras_h5.read(str(NOTOP))
  # A layer missing and a layer with the wrong shape: both listed in one error.
  broken = dict(weights)
  del broken["block5_conv3"]
  broken["block1_conv1"] = {"kernel": np.zeros((5, 5, 3, 64), np.float32), "bias": weights["block1_conv1"]["bias"]}
  keras_h5.write(str(tmp_path / "broken.h5"), broken)
  with pytest.raises(UserError) as info:
    keras_h5.load_into(params, str(tmp_path / "broken.h5"), under="features")
  message = str(info.value)
  assert "missing in the file: features/block5_conv3" in message
  assert "block1_conv1/kernel: model (3, 3, 3, 64), file (5, 5, 3, 64)" in message
  # Layers the model does not have (a file with a top, loaded into the base).
  extra = dict(weights, fc1={"kernel": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)})
  keras_h5.write(str(tmp_path / "extra.h5"), extra)
  with pytest.raises(UserError, match="in the file but not in the model: fc1"):
    keras_h5.load_into(params, str(tmp_path / "extra.h5"), under="features")
  # A truncated download and a file that is not HDF5 at all.
  with open(NOTOP, "rb") as f:
    (tmp_path / "truncated.h5").write_bytes(f.read(1 << 20))
  with pytest.raises(UserError, match="cannot read Keras weights .*truncated.h5"):
    keras_h5.load_into(params, str(tmp_path / "truncated.h5"))
  (tmp_path / "json.h5").write_text("{}")
  with pytest.raises(UserError, match="cannot read Keras weights .*json.h5"):
    keras_h5.read(str(tmp_path / "json.h5"))


def _photos(size):
  return np.stack([decode_image(str(p), 3, (size, size)) for p in IMAGES]).astype(np.float32)


@pytest.fixture
def highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.mark.slow
@pytest.mark.parametrize("size", [150, 224])
def test_conv_base_equals_keras_on_real_images(size, highest_precision):
  keras = pytest.importorskip("keras")
  model = get_model("vgg16", include_top=False)
  params = keras_h5.load_into(_params(model, size), str(NOTOP), under="features")
  photos = _photos(size)
  ours = np.asarray(apply_features(model, {"params": params}, preprocess_input(jnp.asarray(photos))))
  reference = keras.applications.VGG16(weights=str(NOTOP), include_top=False, input_shape=(size, size, 3))
  theirs = reference.predict(keras.applications.vgg16.preprocess_input(photos.copy()), verbose=0)
  assert ours.shape == theirs.shape == (3, size // 32, size // 32, 512)
  assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
  np.testing.assert_allclose(
    preprocess_input(jnp.asarray(photos)), keras.applications.vgg16.preprocess_input(photos.copy()), atol=1e-4
  )


@pytest.mark.slow
def test_with_top_equals_keras_on_random_top_weights(tmp_path, highest_precision):
  """No offline copy of the ImageNet top exists: random fc weights in the full file layout."""
  keras = pytest.importorskip("keras")
  rng = np.random.default_rng(0)
  layers = keras_h5.read(str(NOTOP))
  for name, shape in (("fc1", (25088, 4096)), ("fc2", (4096, 4096)), ("predictions", (4096, 1000))):
    layers[name] = {}
    for leaf, leaf_shape in (("kernel", shape), ("bias", shape[1:])):
      value = rng.random(leaf_shape, np.float32)  # uniform in [-0.01, 0.01), in place: 120M
      value *= 0.02  # normal draws would take ~9 s
      value -= 0.01
      layers[name][leaf] = value
  full = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
  keras_h5.write(str(full), layers)
  model = get_model("vgg16")
  # Every leaf comes from the file: the model's param shapes suffice (initialising 138M takes ~7 s).
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
  params = keras_h5.load_into(shapes, str(full))
  assert all(isinstance(p, np.ndarray) for p in jax.tree_util.tree_leaves(params))
  photos = _photos(224)
  logits = model.apply({"params": params}, preprocess_input(jnp.asarray(photos)))
  ours = np.asarray(jax.nn.softmax(logits))
  theirs = keras.applications.VGG16(weights=str(full)).predict(
    keras.applications.vgg16.preprocess_input(photos.copy()), verbose=0
  )
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)
  decoded = imagenet.decode_predictions(ours, top=3, index_path=str(SHARED / "datasets" / "imagenet_class_index.json"))
  assert len(decoded) == 3 and all(len(d) == 3 for d in decoded)
  assert decoded[0][0][2] == pytest.approx(float(ours[0].max()))
  # The visualisation binary explains the same with-top model, by class index, from the file.
  result = run_binary(
    "experiments.visualize",
    f"--workdir={tmp_path}",
    "--config.viz.model=vgg16",
    f"--config.viz.weights={full}",
    "--config.viz.methods=gradcam",
    f"--image={IMAGES[0]}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  timings = json.loads((tmp_path / "viz" / "timings.json").read_text())
  assert (tmp_path / "viz" / "gradcam.png").stat().st_size > 0
  assert timings["class"] == int(np.argmax(ours[0]))  # the class the model predicts, explained
  # experiments.predict --model=vgg16 (no run): the same probabilities, named by ImageNet's index.
  os.symlink(SHARED / "datasets" / "imagenet_class_index.json", tmp_path / "imagenet_class_index.json")
  predicted = run_binary(
    "experiments.predict",
    "--model=vgg16",
    f"--images={IMAGES[0]}",
    "--top_k=3",
    f"--output={tmp_path / 'preds.json'}",
    env={"CONVJAX_WEIGHTS_DIR": str(tmp_path)},
  )
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  top = json.loads((tmp_path / "preds.json").read_text())["predictions"][0]["top"]
  assert [t["class"] for t in top] == [name for _, name, _ in decoded[0]]
  np.testing.assert_allclose([t["probability"] for t in top], [p for _, _, p in decoded[0]], atol=1e-4)


def test_decode_predictions_names_imagenet_classes():
  probs = np.zeros((1, 1000), np.float32)
  probs[0, 386], probs[0, 101], probs[0, 385] = 0.8, 0.15, 0.05
  top = imagenet.decode_predictions(probs, top=2, index_path=str(SHARED / "datasets" / "imagenet_class_index.json"))
  assert top == [[("n02504458", "African_elephant", pytest.approx(0.8)), ("n01871265", "tusker", pytest.approx(0.15))]]


def test_fetch_downloads_verifies_and_caches(tmp_path, monkeypatch):
  """The download path, exercised with a file:// URL: hash checked, nothing kept on mismatch."""
  monkeypatch.setenv("CONVJAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("CONVJAX_WEIGHTS_DIR", raising=False)
  source = tmp_path / "served.h5"
  shutil.copy(NOTOP, source)
  md5, sha = hashlib.md5(source.read_bytes()).hexdigest(), hashlib.sha256(source.read_bytes()).hexdigest()
  bad = fetch.Remote(source.as_uri(), "0" * 64)
  with pytest.raises(UserError, match="has hash .* expected 0000"):
    fetch.get_file("served.h5", remote=bad)
  assert not os.listdir(tmp_path / "cache" / "weights")  # nothing half-written or wrong left
  for digest in (md5, sha):
    path = fetch.get_file("served.h5", remote=fetch.Remote(source.as_uri(), digest))
    assert path == str(tmp_path / "cache" / "weights" / "served.h5")
    os.remove(path)
  missing = fetch.Remote((tmp_path / "nowhere.h5").as_uri(), md5)
  with pytest.raises(UserError, match="cannot download .*CONVJAX_WEIGHTS_DIR"):
    fetch.get_file("nowhere.h5", remote=missing)
  # A local weights directory comes first, the Keras URL is never tried.
  monkeypatch.setenv("CONVJAX_WEIGHTS_DIR", str(NOTOP.parent))
  assert fetch.get_file(NOTOP.name) == str(NOTOP)
  assert fetch.FILES[NOTOP.name].file_hash == "6d6bbae143d832006294945121d1f1fc"  # Keras' published MD5


@pytest.mark.slow
def test_frozen_base_stays_identical_and_has_no_optimizer_state(mnist_small):
  import optax
  from convjax.models.summary import trainable_mask
  from convjax.train.optim import make_optimizer
  from convjax.train.state import create_train_state
  from convjax.train.steps import make_train_step

  mnist_small.model = "vgg16_classifier"
  mnist_small.trainable = "head/.*"
  model = get_model("vgg16_classifier", num_classes=10)
  params_shape = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  tx, _ = make_optimizer(mnist_small, 10, params_shape)
  trainable = trainable_mask(params_shape, mnist_small.trainable)  # as the train loop passes it
  state = create_train_state(model, tx, (32, 32, 3), jax.random.key(0))
  before = jax.device_get(state.params)
  step = jax.jit(make_train_step(model, tx, lambda x: x / 255, trainable=trainable))
  rng = np.random.default_rng(0)
  batches = [
    {
      "image": jnp.asarray(rng.integers(0, 255, (8, 32, 32, 3), np.uint8)),
      "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
      "mask": jnp.ones(8),
    }
    for _ in range(3)
  ]
  for batch in batches:
    state, _ = step(state, batch, jax.random.key(1))
  after = jax.device_get(state.params)

  # The frozen base costs its forward pass only: its gradients feed nothing (set_to_zero), so
  # XLA drops them. 13 convolutions, against 13 + 12 + 13 when everything trains.
  def convolutions(tx, trainable):
    train_state = create_train_state(model, tx, (32, 32, 3), jax.random.key(0))
    hlo = (
      jax.jit(make_train_step(model, tx, lambda x: x / 255, trainable=trainable))
      .lower(train_state, batches[0], jax.random.key(1))
      .compile()
      .as_text()
    )
    return sum(" convolution(" in line for line in hlo.splitlines())

  assert (convolutions(tx, trainable), convolutions(optax.rmsprop(1e-3), None)) == (13, 38)
  for a, b in zip(
    jax.tree_util.tree_leaves(before["features"]), jax.tree_util.tree_leaves(after["features"]), strict=True
  ):
    assert np.array_equal(a, b)
  assert not np.array_equal(before["head"]["dense"]["kernel"], after["head"]["dense"]["kernel"])
  head_size = sum(x.size for x in jax.tree_util.tree_leaves(before["head"]))
  opt_size = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim)
  assert opt_size == head_size  # RMSprop: one accumulator per trainable weight, none for the base


@pytest.mark.slow
def test_feature_extraction_run_on_a_small_slice(tmp_path):
  """120 training photos through the ImageNet VGG16 base: the classifier clearly beats chance."""
  data = link_cats_dogs_subset(tmp_path / "data", {"train": 60, "validation": 50})
  workdir = tmp_path / "run"
  args = [
    "--config=configs/cats_dogs_vgg16_features.py",
    f"--workdir={workdir}",
    f"--config.data.folder={data}",
    "--config.data.test_split=",
    "--config.num_epochs=6",
    "--config.learning_rate=1e-4",
    "--config.eval_batch_size=20",
  ]
  env = {"CONVJAX_WEIGHTS_DIR": str(NOTOP.parent)}
  result = run_binary("experiments.train", *args, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  history = json.loads((workdir / "history.json").read_text())
  # 100 validation photos: chance is 0.5 +- 0.05.
  assert history[-1]["val_accuracy"] >= 0.8, history
  cached = sorted(p.name for p in (workdir / "features").iterdir())
  assert cached == ["train_0_120.npy", "validation_0_100.npy"]
  assert np.load(workdir / "features" / "train_0_120.npy").shape == (120, 4, 4, 512)
  # A rerun (resume of a finished run) reuses the cached features: no extraction logged.
  again = run_binary("experiments.train", *args, env=env)
  assert again.returncode == 0 and "extracting features" not in again.stderr


def test_frozen_recipe_starts_from_the_imagenet_notop_weights():
  """configs/cats_dogs_vgg16_frozen.py (model vgg16_classifier) loads Keras' VGG16 notop file
  under features/; the head keeps its fresh init."""
  from configs import cats_dogs_vgg16_frozen
  from convjax.pretrained import transfer
  from convjax.train.state import starting_params

  config = cats_dogs_vgg16_frozen.get_config()
  model = get_model(config.model, **config.model_kwargs)
  params = init_variables(model, jax.random.key(0), (150, 150, 3))["params"]
  loaded, _ = starting_params(config, params, {})
  stored = keras_h5.read(transfer.imagenet_weights("vgg16", include_top=False))
  for layer in ("block1_conv1", "block5_conv3"):
    np.testing.assert_array_equal(np.asarray(loaded["features"][layer]["kernel"]), stored[layer]["kernel"])
  for a, b in zip(jax.tree_util.tree_leaves(loaded["head"]), jax.tree_util.tree_leaves(params["head"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
