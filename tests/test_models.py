import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convjax.errors import UserError
from convjax.models import apply_features, apply_head, get_model, init_variables
from convjax.models.summary import layer_table, summary

# Keras' model.summary() for Chollet's MNIST convnet, from the reference notes.
MNIST_TABLE = [
  ("conv2d", "Conv2D", (None, 26, 26, 32), 320),
  ("max_pooling2d", "MaxPooling2D", (None, 13, 13, 32), 0),
  ("conv2d_1", "Conv2D", (None, 11, 11, 64), 18496),
  ("max_pooling2d_1", "MaxPooling2D", (None, 5, 5, 64), 0),
  ("conv2d_2", "Conv2D", (None, 3, 3, 64), 36928),
  ("flatten", "Flatten", (None, 576), 0),
  ("dense", "Dense", (None, 64), 36928),
  ("dense_1", "Dense", (None, 10), 650),
]

# Chollet's cats-vs-dogs convnet (Deep Learning with Python, 5.2).
CATS_DOGS_TABLE = [
  ("conv2d", "Conv2D", (None, 148, 148, 32), 896),
  ("max_pooling2d", "MaxPooling2D", (None, 74, 74, 32), 0),
  ("conv2d_1", "Conv2D", (None, 72, 72, 64), 18496),
  ("max_pooling2d_1", "MaxPooling2D", (None, 36, 36, 64), 0),
  ("conv2d_2", "Conv2D", (None, 34, 34, 128), 73856),
  ("max_pooling2d_2", "MaxPooling2D", (None, 17, 17, 128), 0),
  ("conv2d_3", "Conv2D", (None, 15, 15, 128), 147584),
  ("max_pooling2d_3", "MaxPooling2D", (None, 7, 7, 128), 0),
  ("flatten", "Flatten", (None, 6272), 0),
  ("dense", "Dense", (None, 512), 3211776),
  ("dense_1", "Dense", (None, 1), 513),
]


def _rows(model, shape):
  return [(r.path[-1], r.type_name, r.output_shape, r.trainable + r.non_trainable) for r in layer_table(model, shape)]


def test_mnist_convnet_matches_keras_summary():
  assert _rows(get_model("mnist_convnet"), (28, 28, 1)) == MNIST_TABLE
  text = summary(get_model("mnist_convnet"), (28, 28, 1), name="mnist_convnet")
  assert "Total params: 93,322" in text
  assert "Trainable params: 93,322" in text
  assert " conv2d (Conv2D)                (None, 26, 26, 32)         320" in text


def test_cats_dogs_convnet_matches_keras_summary():
  assert _rows(get_model("cats_dogs_convnet"), (150, 150, 3)) == CATS_DOGS_TABLE
  text = summary(get_model("cats_dogs_convnet"), (150, 150, 3))
  assert "Total params: 3,453,121" in text


def test_dropout_shows_as_a_layer_and_adds_no_params():
  rows = _rows(get_model("cats_dogs_convnet", dropout_rate=0.5), (150, 150, 3))
  assert ("dropout", "Dropout", (None, 6272), 0) in rows
  assert sum(r[3] for r in rows) == 3_453_121


def test_dense_baseline():
  assert _rows(get_model("mnist_dense"), (28, 28, 1)) == [
    ("flatten", "Flatten", (None, 784), 0),
    ("dense", "Dense", (None, 512), 401_920),
    ("dense_1", "Dense", (None, 10), 5_130),
  ]


def test_summary_counts_frozen_params_as_non_trainable():
  text = summary(get_model("mnist_convnet"), (28, 28, 1), trainable=r"head/.*")
  assert "Trainable params: 37,578" in text  # dense + dense_1
  assert "Non-trainable params: 55,744" in text  # the conv base, as in the notes' table


def test_features_and_head_compose_to_the_model():
  model = get_model("mnist_convnet")
  x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
  variables = model.init(jax.random.key(0), x)
  features = apply_features(model, variables, x)
  assert features.shape == (2, 3, 3, 64)
  assert float(features.min()) >= 0  # post-ReLU, as Keras' Conv2D(activation='relu')
  logits = model.apply(variables, x)
  via_head = apply_head(model, variables, features)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(via_head))


def test_conv_layer_is_keras_valid_convolution():
  """A Conv2D with a known kernel gives the hand-computed valid correlation."""
  model = get_model("mnist_convnet")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  params = jax.tree_util.tree_map(jnp.zeros_like, variables["params"])
  kernel = jnp.zeros((3, 3, 1, 32)).at[:, :, 0, 0].set(jnp.arange(9.0).reshape(3, 3))
  params["features"]["conv2d"]["kernel"] = kernel
  x = jnp.arange(28 * 28, dtype=jnp.float32).reshape(1, 28, 28, 1) / 1000
  _, state = model.apply({"params": params}, x, capture_intermediates=True, mutable=["intermediates"])
  out = state["intermediates"]["features"]["conv2d"]["__call__"][0]
  patch = np.asarray(x[0, :3, :3, 0])
  assert out.shape == (1, 26, 26, 32)
  np.testing.assert_allclose(float(out[0, 0, 0, 0]), float((patch * np.arange(9).reshape(3, 3)).sum()), rtol=1e-6)


@pytest.mark.parametrize("name, shape", [("mnist_convnet", (28, 28, 1)), ("cats_dogs_convnet", (64, 64, 3))])
def test_init_compiled_as_run_once_equals_the_default_compilation_bit_for_bit(name, shape):
  """init_variables compiles at a lighter backend optimisation level: the same bits (the
  truncated-normal and uniform initialisers' float code included) as the default level's."""
  model = get_model(name, num_classes=10)
  fast = init_variables(model, jax.random.key(3), shape)
  default = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, *shape)))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fast, default)


@pytest.mark.parametrize(
  "hw, kernel, strides, padding",
  [(2, 3, 1, 1), (1, 3, 1, 1), (2, 3, 2, 1), (2, 1, 2, 0), (2, 3, 1, "SAME"), (4, 3, 1, 1)],
)
def test_convolutions_of_tiny_maps_equal_xlas_with_their_gradients(hw, kernel, strides, padding):
  """layers.conv_general_dilated (ResNet's convolutions) computes a map of at most 2x2 as
  patches @ kernel, any other by lax: the outputs and both gradients equal lax's within
  float32 rounding (measured <= 7.1e-7 of the largest value)."""
  from convjax.models import layers

  x = jax.random.normal(jax.random.key(0), (8, hw, hw, 64))
  plain = nn.Conv(32, (kernel, kernel), strides, padding=padding, use_bias=False)
  ours = plain.clone(conv_general_dilated=layers.conv_general_dilated)
  variables = plain.init(jax.random.key(1), x)

  def outputs(conv):
    loss = lambda v, x: jnp.sum(jnp.sin(conv.apply(v, x)))
    return conv.apply(variables, x), *jax.grad(loss, argnums=(0, 1))(variables, x)

  for theirs, mine in zip(
    jax.tree_util.tree_leaves(outputs(plain)), jax.tree_util.tree_leaves(outputs(ours)), strict=True
  ):
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=3e-6 * float(jnp.abs(theirs).max()))


def test_unknown_model_lists_valid_names():
  with pytest.raises(UserError, match=r"unknown model 'resnet9000'; valid models: .*mnist_convnet"):
    get_model("resnet9000")


def test_max_pooling_equals_flax_max_pool_and_routes_gradients_to_the_maxima():
  """The reshape max pool is nn.max_pool(2x2, stride 2, VALID) forward (odd sizes floor), and
  without ties both send each output's gradient to its window's maximum."""
  import flax.linen as nn
  from convjax.models.layers import MaxPooling2D

  pool = MaxPooling2D()
  x = jax.random.normal(jax.random.key(0), (2, 11, 9, 3))  # continuous: no ties
  want = nn.max_pool(x, (2, 2), (2, 2), padding="VALID")
  got = pool.apply({}, x)
  assert got.shape == (2, 5, 4, 3)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  g = jax.random.normal(jax.random.key(1), got.shape)
  grad = jax.grad(lambda x: jnp.sum(pool.apply({}, x) * g))(x)
  want_grad = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), (2, 2), padding="VALID") * g))(x)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(want_grad))
  assert float(jnp.abs(grad[:, 10]).max()) == 0.0  # the floored-away row gets nothing
  # A tie: all of the gradient to the first maximum in row-major order, never shared or duplicated.
  tie = jax.grad(lambda x: jnp.sum(pool.apply({}, x)))(jnp.asarray([[0.0, 2.0], [2.0, 2.0]]).reshape(1, 2, 2, 1))
  np.testing.assert_array_equal(np.asarray(tie).ravel(), [0, 1, 0, 0])


@pytest.mark.parametrize("form", ["elementwise", "reduce"])
@pytest.mark.parametrize("shape, k", [((3, 28, 28, 4), 2), ((2, 7, 9, 3), 2), ((1, 9, 6, 2), 3)])
def test_max_pooling_gradient_on_ties_is_tensorflows(shape, k, form, monkeypatch):
  """Keras' semantics on tied inputs (half of MNIST's first-pool windows hold exact ties):
  the gradient equals TensorFlow's MaxPoolGrad, bit for bit, whichever form the forward
  max takes (by input size: an elementwise max of strided views, or a reduce; always the
  former inside elementwise_max_pools)."""
  tf = pytest.importorskip("tensorflow")
  from convjax.models import layers
  from convjax.models.layers import MaxPooling2D

  monkeypatch.setattr(layers, "_ELEMENTWISE_MAX_BYTES", 0)  # a reduce at every size, unless told otherwise
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, shape).astype(np.float32)  # three values: ties in most windows
  g = rng.normal(size=(shape[0], shape[1] // k, shape[2] // k, shape[3])).astype(np.float32)
  with layers.elementwise_max_pools() if form == "elementwise" else contextlib.nullcontext():
    y, vjp = jax.vjp(lambda x: MaxPooling2D(pool_size=k).apply({}, x), x)
    program = str(jax.make_jaxpr(lambda x: jax.vjp(lambda x: MaxPooling2D(pool_size=k).apply({}, x), x)[1](g))(x))
  assert ("reduce_max" in program) == (form == "reduce")
  xt = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xt)
    yt = tf.nn.max_pool2d(xt, k, k, "VALID")
  np.testing.assert_array_equal(np.asarray(y), yt.numpy())
  np.testing.assert_array_equal(np.asarray(vjp(g)[0]), tape.gradient(yt, xt, output_gradients=tf.constant(g)).numpy())


@pytest.mark.parametrize("channels, padding", [(1, "VALID"), (3, "VALID"), (3, "SAME"), (2, ((2, 0), (1, 3)))])
def test_narrow_convs_equal_xla_convolution_and_its_gradients(channels, padding):
  """Inside narrow_convs(), a Conv2D of at most 4 input channels (the one-channel forward
  pass as broadcast products, every input gradient as a transposed im2col) gives XLA's
  outputs and gradients for the input and the kernel, with any padding; outside it, and for
  wider inputs or strides, the program is XLA's convolution as before."""
  from convjax.models import layers

  conv = layers.Conv2D(8, (3, 3), padding=padding)
  x = jax.random.normal(jax.random.key(0), (2, 11, 9, channels))
  variables = conv.init(jax.random.key(1), x)
  g = jax.random.normal(jax.random.key(2), conv.apply(variables, x).shape)

  def outputs_and_gradients(x, variables):
    y, pull = jax.vjp(conv.apply, variables, x)
    return y, *pull(g)

  want = outputs_and_gradients(x, variables)
  program = lambda conv, x=x: str(jax.make_jaxpr(conv.init)(jax.random.key(1), x))  # noqa: E731
  with layers.narrow_convs():
    got = (conv.apply(variables, x), *outputs_and_gradients(x, variables))  # not differentiated, and differentiated
    assert "custom_vjp_call" in program(conv)
    assert "custom_vjp_call" not in program(layers.Conv2D(8, (3, 3), strides=2))
    assert "custom_vjp_call" not in program(conv, jnp.ones((2, 11, 9, 5)))
  assert "custom_vjp_call" not in program(conv)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves((want[0], *want)), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_xla_cpu_default_is_added_only_where_it_applies(monkeypatch):
  import importlib.metadata
  from convjax import xla_defaults

  flag = f"{xla_defaults.FLAG}={xla_defaults.VALUE}"
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_defaults.apply(env) and env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {flag}"
  assert not xla_defaults.apply(env) and env["XLA_FLAGS"].count(xla_defaults.FLAG) == 1  # idempotent
  user = {"XLA_FLAGS": f"{xla_defaults.FLAG}=dot,eltwise"}  # the user's own value wins
  assert not xla_defaults.apply(user) and user["XLA_FLAGS"] == f"{xla_defaults.FLAG}=dot,eltwise"
  off = {"CONVJAX_XLA_DEFAULTS": "0"}
  assert not xla_defaults.apply(off) and "XLA_FLAGS" not in off
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.0")  # not measured: untouched
  other = {}
  assert not xla_defaults.apply(other) and other == {}


@pytest.mark.parametrize("momentum,epsilon", [(0.9, 1e-5), (0.99, 1e-3)])
def test_batch_norm_equals_flax_batch_norm(momentum, epsilon):
  """convjax's BatchNorm (sums as matrix-vector products, its own backward) against
  nn.BatchNorm: the same variables, output, gradients and running statistics."""
  import flax.linen as nn

  from convjax.models.layers import BatchNorm

  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 5)) * 3 + 1
  ours, flax_bn = BatchNorm(momentum=momentum, epsilon=epsilon), nn.BatchNorm(momentum=momentum, epsilon=epsilon)
  init = ours.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(
    flax_bn.init(jax.random.key(0), x, use_running_average=False)
  )
  params = {"scale": jnp.arange(1.0, 6.0), "bias": jnp.arange(5.0) / 3}
  stats = {"mean": jnp.full(5, 0.5), "var": jnp.full(5, 2.0)}

  def run(module, p, x):
    y, new = module.apply({"params": p, "batch_stats": stats}, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y) * jnp.arange(5.0)), (y, new["batch_stats"])

  results = [
    jax.value_and_grad(lambda p, x, m=m: run(m, p, x), argnums=(0, 1), has_aux=True)(params, x) for m in (ours, flax_bn)
  ]
  (_, (y, new)), (d_params, dx) = results[0]
  (_, (y_ref, new_ref)), (d_params_ref, dx_ref) = results[1]
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(d_params[k], d_params_ref[k], rtol=1e-5, atol=1e-4)
  for k in ("mean", "var"):
    np.testing.assert_allclose(new[k], new_ref[k], rtol=1e-6)
    assert not np.allclose(new[k], stats[k])  # the running statistics moved
  variables = {"params": params, "batch_stats": stats}
  np.testing.assert_allclose(
    ours.apply(variables, x, use_running_average=True), flax_bn.apply(variables, x, use_running_average=True), rtol=1e-6
  )
