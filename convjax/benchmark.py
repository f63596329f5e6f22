"""Throughput measurement of jitted train and inference steps.

For one (model, input, batch, precision, mode): compile once (timed), warm up,
then time >= `steps` steps one by one with `block_until_ready`; report the
median and spread of the step time, images/s, the FLOPs per image from XLA's
cost analysis of the compiled step, achieved TFLOP/s and the share of the
device's peak. Precision 'bfloat16' computes in bfloat16 with float32 params
(the optimizer updates float32 master weights).
"""
import os
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from convjax.models import get_model
from convjax.train.state import create_train_state
from convjax.train.steps import loss_and_correct

# Dense peak FLOP/s by device kind and compute precision (vendor data sheets, no sparsity).
# On NVIDIA GPUs JAX's default float32 matmul/conv precision runs as TF32 on tensor cores.
PEAKS = {
    "NVIDIA H100 80GB HBM3": {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12},
    "NVIDIA H100 PCIe": {"float32": 51e12, "tf32": 378e12, "bfloat16": 756e12},
    "NVIDIA H200": {"float32": 67e12, "tf32": 494.7e12, "bfloat16": 989.4e12},
    "NVIDIA A100-SXM4-80GB": {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12},
    "NVIDIA A100-SXM4-40GB": {"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12},
}


def measured_cpu_peak(n: int = 1024, repeats: int = 10) -> float:
  """This CPU's float32 matmul rate (FLOP/s): the best of `repeats` n x n x n sgemms."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def matmul_precision_in_force(device) -> str:
  """'tf32' on NVIDIA GPUs at JAX's default precision, else 'float32'."""
  default = jax.config.jax_default_matmul_precision
  if device.platform == "gpu" and default in (None, "default", "bfloat16_3x", "tensorfloat32"):
    return "tf32"
  return "float32"


def peak_flops(device, precision: str) -> Optional[float]:
  kind = device.device_kind
  if device.platform == "cpu":
    return None  # filled in by the caller from measured_cpu_peak
  table = PEAKS.get(kind)
  if table is None:
    return None
  key = "bfloat16" if precision == "bfloat16" else matmul_precision_in_force(device)
  return table[key]


def _cast(tree, dtype):
  return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_step(model, tx, mode: str, precision: str):
  dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32

  def forward(params, model_state, x, train, rng):
    variables = {"params": _cast(params, dtype), **model_state}
    mutable = list(model_state) if train else False
    out = model.apply(variables, x.astype(dtype), train=train, rngs={"dropout": rng}, mutable=mutable)
    logits, new_state = out if train else (out, model_state)
    return logits.astype(jnp.float32), new_state

  if mode == "inference":
    def infer(state, x, y, rng):
      return forward(state.params, state.model_state, x, False, rng)[0]
    return jax.jit(infer)

  def train(state, x, y, rng):
    def loss_fn(params):
      logits, new_state = forward(params, state.model_state, x, True, rng)
      return jnp.mean(loss_and_correct(logits, y)[0]), new_state
    grads, new_state = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         model_state=dict(new_state), opt_state=opt_state)
  return jax.jit(train, donate_argnums=0)


def benchmark_row(model_name: str, model_kwargs: dict, input_shape: tuple, batch: int, precision: str,
                  mode: str, steps: int = 20, warmup: int = 3, cpu_peak: Optional[float] = None) -> dict:
  model = get_model(model_name, **model_kwargs)
  tx = optax.rmsprop(1e-4)
  state = create_train_state(model, tx, input_shape, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (batch, *input_shape), jnp.float32)
  outputs = jax.eval_shape(lambda v: model.apply(v, x), {"params": state.params, **state.model_state}).shape[-1]
  y = jax.random.randint(jax.random.key(2), (batch,), 0, max(outputs, 2))
  rng = jax.random.key(3)
  step = make_step(model, tx, mode, precision)
  t0 = time.perf_counter()
  compiled = step.lower(state, x, y, rng).compile()
  compile_seconds = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0

  def run(state):
    out = compiled(state, x, y, rng)
    jax.block_until_ready(out)
    return out if mode == "train" else state

  for _ in range(warmup):
    state = run(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state = run(state)
    times.append(time.perf_counter() - t)
  median = statistics.median(times)
  device = jax.devices()[0]
  peak = cpu_peak if device.platform == "cpu" else peak_flops(device, precision)
  achieved = flops / median if flops else None
  q1, q3 = np.percentile(times, [25, 75])
  return {
      "model": model_name, "input": list(input_shape), "batch": batch, "precision": precision, "mode": mode,
      "compile_seconds": compile_seconds, "step_seconds_median": median,
      "step_seconds_iqr": [float(q1), float(q3)], "step_seconds_min": min(times), "steps_timed": steps,
      "images_per_second": batch / median, "flops_per_image": flops / batch if flops else None,
      "tflops_per_second": achieved / 1e12 if achieved else None,
      "percent_of_peak": 100 * achieved / peak if achieved and peak else None,
  }


def environment() -> dict:
  device = jax.devices()[0]
  return {"device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
          "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else
          __import__("jaxlib").__version__, "matmul_precision": matmul_precision_in_force(device),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpu_count": os.cpu_count()}


def pipeline_overhead(model_name: str, dataset: str, batch: int, steps: int = 20, warmup: int = 3) -> dict:
  """The training loop's real input path against a batch already on the device.

  Real: each step gathers its batch from the dataset's uint8 rows on the devices
  (convjax.data.pipeline.OnDevice) and runs the jitted train step, exactly as
  `train_and_evaluate` does. Synthetic: the same compiled step on one fixed
  batch. Both block on every step. Overhead = real / synthetic - 1.
  """
  from convjax import parallel
  from convjax.data import tfds as tfds_data
  from convjax.data.pipeline import OnDevice
  from convjax.data.splits import Split
  from convjax.train.steps import jit_steps

  mesh = parallel.make_mesh()
  builder = tfds_data.get_builder(dataset, download=False)
  rows = tfds_data.row_range(builder, "train")
  split = Split(rows.size, rows.spec(), lambda a, b: tfds_data.read_rows(builder, rows.sub(a, b)))
  data = OnDevice({"train": split}, mesh, seed=0, batch_size=batch, eval_batch_size=batch,
                  steps_per_epoch=warmup + steps)
  model = get_model(model_name)
  tx = optax.rmsprop(1e-3)
  input_shape = data.rows["train"]["image"].shape[1:]
  state = jax.jit(lambda: create_train_state(model, tx, input_shape, jax.random.key(0)),
                  out_shardings=parallel.replicated(mesh))()
  train_step, _ = jit_steps(model, tx, lambda x: x / 255, mesh)
  rng = jax.random.key(1)
  fixed = next(data.train_batches(1))
  batches = data.train_batches(1)

  def timed(make_batch, state):
    times = []
    for i in range(warmup + steps):
      t = time.perf_counter()
      state, metrics = train_step(state, make_batch(i), rng)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t)
    return statistics.median(times), state

  real, state = timed(lambda i: next(batches), state)
  synthetic, state = timed(lambda i: fixed, state)
  return {"model": model_name, "dataset": dataset, "batch": batch, "steps_timed": steps,
          "real_step_seconds_median": real, "synthetic_step_seconds_median": synthetic,
          "overhead_percent": 100 * (real / synthetic - 1)}
