"""Pure train and eval steps, and `jit_steps`: both jitted once over the mesh.

A batch is {'image': uint8 or float (B, H, W, C), 'label': int (B,),
'mask': float (B,)}: mask 0 marks padding rows, which add nothing to the loss,
the gradient or the metrics. Metrics are sums (loss_sum, correct, count, and for
training grad_norm_sum and nonfinite) so they add up exactly across batches;
first_nonfinite is the first step whose loss or gradient was not finite.

Mixed precision (`compute_dtype=bfloat16`): the params are cast to bfloat16 for
the forward and backward pass and the images enter in bfloat16; the params, the
optimizer state and the gradients they receive stay float32, and the logits, the
loss and the softmax are float32. BatchNorm computes its statistics and running
averages in float32 (convjax.models.layers.BatchNorm).
"""

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from convjax import parallel
from convjax.models.layers import frozen_batch_norm
from convjax.train.state import TrainState, eval_params

NO_STEP = jnp.iinfo(jnp.int32).max  # first_nonfinite while every step was finite


def loss_and_correct(logits, labels, label_smoothing: float = 0.0):
  """Per-example loss and correctness; one logit means a sigmoid binary head. The loss is
  computed in float32 whatever the logits' dtype."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    logits = logits[..., 0]
    targets = labels.astype(jnp.float32)
    if label_smoothing:
      targets = targets * (1 - label_smoothing) + 0.5 * label_smoothing
    loss = optax.sigmoid_binary_cross_entropy(logits, targets)
    correct = (logits > 0) == (labels > 0)
  else:
    if label_smoothing:
      targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
      loss = optax.softmax_cross_entropy(logits, targets)
    else:
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = jnp.argmax(logits, -1) == labels
  return loss, correct.astype(jnp.float32)


def _metrics(loss, correct, mask):
  return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


def cast_floats(tree, dtype):
  """Every floating leaf of `tree` as `dtype` (params for the compute dtype)."""
  return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  prepare: Callable,
  augment: Optional[Callable] = None,
  compute_dtype=jnp.float32,
  label_smoothing: float = 0.0,
  ema_decay: float = 0.0,
  frozen: Sequence[tuple] = (),
  trainable=None,
):
  """`train_step(state, batch, rng) -> (state, metrics)`.

  `prepare(x)` maps float pixels to the model's input (rescaling, ImageNet
  preprocessing). The step's key is `rng` folded with state.step: dropout uses
  it, and `augment(key, images)` (convjax.data.augment, on pixels before
  `prepare`) uses it folded with 1. `frozen`: paths of BatchNorm layers whose params
  do not train; they run in inference mode, as Keras runs a frozen BatchNormalization.
  `trainable`: the params' mask of config.trainable (None: all train); the gradient norm
  covers the trained params only, so frozen ones' gradients are never computed.
  A step whose loss or gradient is not finite changes neither params nor statistics
  (optax.apply_if_finite in tx) and is recorded in the metrics.
  """

  def train_step(state: TrainState, batch, rng):
    step_rng = jax.random.fold_in(rng, state.step)
    x = batch["image"].astype(jnp.float32)
    if augment is not None:
      x = augment(jax.random.fold_in(step_rng, 1), x)
    x = prepare(x).astype(compute_dtype)
    mask = batch["mask"]
    mutable = list(state.model_state)

    def loss_fn(params):
      variables = {"params": cast_floats(params, compute_dtype), **state.model_state}
      with frozen_batch_norm(frozen):
        logits, new_model_state = model.apply(variables, x, train=True, rngs={"dropout": step_rng}, mutable=mutable)
      loss, correct = loss_and_correct(logits, batch["label"], label_smoothing)
      return jnp.sum(loss * mask) / jnp.maximum(jnp.sum(mask), 1.0), (loss, correct, new_model_state)

    (mean_loss, (loss, correct, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    trained = (
      jax.tree_util.tree_leaves(grads)
      if trainable is None
      else [g for g, t in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(trainable), strict=True) if t]
    )
    grad_norm = optax.global_norm(trained)
    finite = jnp.isfinite(mean_loss) & jnp.isfinite(grad_norm)
    model_state = jax.tree_util.tree_map(
      lambda new, old: jnp.where(finite, new, old), dict(new_model_state), state.model_state
    )
    ema = state.ema_params
    if ema is not None:  # after each optimizer update (every micro-step's without accumulation)
      updated = optax.MultiSteps.has_updated(opt_state) if isinstance(tx, optax.MultiSteps) else True
      ema = jax.tree_util.tree_map(
        lambda e, n: jnp.where(updated & finite, e, n), optax.incremental_update(params, ema, 1 - ema_decay), ema
      )
    new_state = state.replace(
      step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state, ema_params=ema
    )
    metrics = {
      **_metrics(loss, correct, mask),
      "grad_norm_sum": jnp.where(finite, grad_norm, 0.0),
      "nonfinite": 1.0 - finite.astype(jnp.float32),
      "first_nonfinite": jnp.where(finite, NO_STEP, state.step),
    }
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, prepare: Callable, compute_dtype=jnp.float32):
  """`eval_step(state, batch) -> metrics` in inference mode (no dropout, BN running stats),
  with the EMA params where the state keeps them."""

  def eval_step(state: TrainState, batch):
    x = prepare(batch["image"].astype(jnp.float32)).astype(compute_dtype)
    variables = {"params": cast_floats(eval_params(state), compute_dtype), **state.model_state}
    logits = model.apply(variables, x, train=False)
    loss, correct = loss_and_correct(logits, batch["label"])
    return _metrics(loss, correct, batch["mask"])

  return eval_step


def zero_metrics(train: bool = True) -> dict:
  """Metric sums before the first batch."""
  sums = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct", "count")}
  if train:
    sums.update(
      grad_norm_sum=jnp.zeros((), jnp.float32),
      nonfinite=jnp.zeros((), jnp.float32),
      first_nonfinite=jnp.asarray(NO_STEP, jnp.int32),
    )
  return sums


def add_metrics(sums: dict, metrics: dict) -> dict:
  """Running sums plus a step's metrics (first_nonfinite: the earliest)."""
  return {k: jnp.minimum(v, metrics[k]) if k == "first_nonfinite" else v + metrics[k] for k, v in sums.items()}


def jit_steps(model, tx, prepare, mesh, augment=None, take=lambda feed: feed, **options):
  """`train_step(state, feed, rng, sums) -> (state, sums)` and `eval_step(state, feed, sums)
  -> sums`, each one SPMD program over the whole mesh.

  Each takes a feed of the input pipeline and makes its batch inside the program
  (`take`: convjax.data.pipeline), and adds its metrics to the running sums it is
  given, so a step is one program with its collectives and one dispatch. State and
  sums are replicated, batches sharded over 'data'; XLA inserts the gradient
  all-reduce. The state is donated: the step updates it in place. `options`:
  make_train_step's (compute_dtype, label_smoothing, ema_decay, frozen, trainable).
  """
  repl = parallel.replicated(mesh)
  train = make_train_step(model, tx, prepare, augment, **options)
  evaluate = make_eval_step(model, prepare, options.get("compute_dtype", jnp.float32))

  def train_step(state, feed, rng, sums):
    state, metrics = train(state, take(feed), rng)
    return state, add_metrics(sums, metrics)

  def eval_step(state, feed, sums):
    return add_metrics(sums, evaluate(state, take(feed)))

  return (jax.jit(train_step, out_shardings=(repl, repl), donate_argnums=0), jax.jit(eval_step, out_shardings=repl))
