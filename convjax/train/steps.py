"""Pure train and eval steps, and `jit_steps`: both jitted once over the mesh.

A batch is {'image': uint8 or float (B, H, W, C), 'label': int (B,),
'mask': float (B,)}: mask 0 marks padding rows, which add nothing to the loss,
the gradient or the metrics. Metrics are sums (loss_sum, correct, count) so
they add up exactly across batches.
"""
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from convjax import parallel
from convjax.train.state import TrainState


def loss_and_correct(logits, labels):
  """Per-example loss and correctness; one logit means a sigmoid binary head."""
  if logits.shape[-1] == 1:
    logits = logits[..., 0]
    loss = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
    correct = (logits > 0) == (labels > 0)
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
  return loss, correct.astype(jnp.float32)


def _metrics(loss, correct, mask):
  return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
          "count": jnp.sum(mask)}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, prepare: Callable,
                    augment: Optional[Callable] = None):
  """`train_step(state, batch, rng) -> (state, metrics)`.

  `prepare(x)` maps float pixels to the model's input (rescaling, ImageNet
  preprocessing). The step's key is `rng` folded with state.step: dropout uses
  it, and `augment(key, images)` (convjax.data.augment, on pixels before
  `prepare`) uses it folded with 1.
  """

  def train_step(state: TrainState, batch, rng):
    step_rng = jax.random.fold_in(rng, state.step)
    x = batch["image"].astype(jnp.float32)
    if augment is not None:
      x = augment(jax.random.fold_in(step_rng, 1), x)
    x = prepare(x)
    mask = batch["mask"]
    mutable = list(state.model_state)

    def loss_fn(params):
      variables = {"params": params, **state.model_state}
      rngs = {"dropout": step_rng}
      logits, new_model_state = model.apply(variables, x, train=True, rngs=rngs, mutable=mutable)
      loss, correct = loss_and_correct(logits, batch["label"])
      return jnp.sum(loss * mask) / jnp.maximum(jnp.sum(mask), 1.0), (loss, correct, new_model_state)

    grads, (loss, correct, new_model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              model_state=dict(new_model_state), opt_state=opt_state)
    return new_state, _metrics(loss, correct, mask)

  return train_step


def make_eval_step(model: nn.Module, prepare: Callable):
  """`eval_step(state, batch) -> metrics` in inference mode (no dropout, BN running stats)."""

  def eval_step(state: TrainState, batch):
    x = prepare(batch["image"].astype(jnp.float32))
    logits = model.apply({"params": state.params, **state.model_state}, x, train=False)
    loss, correct = loss_and_correct(logits, batch["label"])
    return _metrics(loss, correct, batch["mask"])

  return eval_step


def zero_metrics() -> dict:
  """Metric sums before the first batch."""
  return {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct", "count")}


def jit_steps(model, tx, prepare, mesh, augment=None, take=lambda feed: feed):
  """`train_step(state, feed, rng, sums) -> (state, sums)` and `eval_step(state, feed, sums)
  -> sums`, each one SPMD program over the whole mesh.

  Each takes a feed of the input pipeline and makes its batch inside the program
  (`take`: convjax.data.pipeline), and adds its metrics to the running sums it is
  given, so a step is one program with its collectives and one dispatch. State and
  sums are replicated, batches sharded over 'data'; XLA inserts the gradient
  all-reduce. The state is donated: the step updates it in place.
  """
  repl = parallel.replicated(mesh)
  train, evaluate = make_train_step(model, tx, prepare, augment), make_eval_step(model, prepare)
  add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)  # noqa: E731

  def train_step(state, feed, rng, sums):
    state, metrics = train(state, take(feed), rng)
    return state, add(sums, metrics)

  def eval_step(state, feed, sums):
    return add(sums, evaluate(state, take(feed)))

  return (jax.jit(train_step, out_shardings=(repl, repl), donate_argnums=0),
          jax.jit(eval_step, out_shardings=repl))
