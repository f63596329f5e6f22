import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convjax.errors import UserError
from convjax.models import get_model
from convjax.config import default_config
from convjax.train.optim import make_optimizer
from convjax.train.state import create_train_state
from convjax.train.steps import loss_and_correct, make_eval_step, make_train_step


def _batch(n=8, classes=10):
  rng = np.random.default_rng(0)
  return {
    "image": jnp.asarray(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)),
    "label": jnp.asarray(rng.integers(0, classes, n, dtype=np.int32)),
    "mask": jnp.ones(n, jnp.float32),
  }


def _setup(trainable=""):
  config = default_config()
  config.trainable = trainable
  model = get_model("mnist_convnet")
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))["params"]
  tx, _ = make_optimizer(config, 100, params)
  return model, tx, create_train_state(model, tx, (28, 28, 1), jax.random.key(0))


def test_frozen_params_stay_bit_identical_and_carry_no_optimizer_state():
  model, tx, state = _setup(trainable=r"head/.*")
  step = jax.jit(make_train_step(model, tx, lambda x: x / 255))
  new, _ = step(state, _batch(), jax.random.key(1))
  for a, b in zip(
    jax.tree_util.tree_leaves(state.params["features"]), jax.tree_util.tree_leaves(new.params["features"]), strict=True
  ):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(
    np.asarray(state.params["head"]["dense"]["kernel"]), np.asarray(new.params["head"]["dense"]["kernel"])
  )
  head_size = sum(x.size for x in jax.tree_util.tree_leaves(state.params["head"]))
  opt_size = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim)
  assert opt_size == head_size  # RMSprop's one accumulator per trainable value, none for the base


def test_trainable_that_matches_nothing_is_an_error():
  with pytest.raises(UserError, match="trainable='block9_.*' matches no parameter path"):
    _setup(trainable="block9_.*")


def test_masked_rows_add_nothing():
  model, tx, state = _setup()
  eval_step = jax.jit(make_eval_step(model, lambda x: x / 255))
  batch = _batch()
  full = eval_step(state, batch)
  half = eval_step(state, {**batch, "mask": jnp.asarray([1.0] * 4 + [0.0] * 4)})
  first = eval_step(state, {k: v[:4] for k, v in batch.items()})
  assert float(full["count"]) == 8 and float(half["count"]) == 4
  np.testing.assert_allclose(float(half["loss_sum"]), float(first["loss_sum"]), rtol=1e-6)
  assert float(half["correct"]) == float(first["correct"])


def test_losses_match_their_definitions():
  logits = jnp.asarray([[2.0, 0.0, -1.0]])
  loss, correct = loss_and_correct(logits, jnp.asarray([0]))
  expected = -np.log(np.exp(2.0) / (np.exp(2.0) + 1 + np.exp(-1.0)))
  np.testing.assert_allclose(float(loss[0]), expected, rtol=1e-6)
  assert float(correct[0]) == 1.0
  loss, correct = loss_and_correct(jnp.asarray([[0.5], [-0.5]]), jnp.asarray([1, 1]))
  np.testing.assert_allclose(np.asarray(loss), [np.log1p(np.exp(-0.5)), np.log1p(np.exp(0.5))], rtol=1e-6)
  assert np.asarray(correct).tolist() == [1.0, 0.0]
