"""Throughput measurement of jitted train and inference steps.

For one (model, input, batch, precision, mode): compile once (timed), warm up,
then time >= `steps` steps one by one with `block_until_ready`; report the
median and spread of the step time, images/s, the FLOPs per image from XLA's
cost analysis of the compiled step, achieved TFLOP/s and the share of the
device's peak. A train row times the train binary's own step (convjax.train.steps:
what `experiments.train` runs, with its optimizer wrapping and metric sums), so
precision 'bfloat16' is `config.compute_dtype=bfloat16`: bfloat16 compute with
float32 params, optimizer state, loss and BatchNorm statistics.
"""

import glob
import gzip
import json
import os
import re
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from convjax import parallel, timing
from convjax.errors import UserError
from convjax.models import RUN_ONCE, get_model
from convjax.train.loop import abstract_params
from convjax.train.optim import make_optimizer
from convjax.train.state import create_train_state, eval_params
from convjax.train.steps import cast_floats, jit_steps, zero_metrics

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
  return 2 * n**3 / best


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


def make_step(model, tx, mode: str, precision: str, mesh, method: str = "", input_shape: tuple = ()):
  """The step a row times. train: the train binary's own step (convjax.train.steps.jit_steps:
  uint8 images rescaled inside it, the compute dtype, optax.apply_if_finite, the metric sums),
  `(state, batch, rng, sums) -> (state, sums)`; inference: the model's forward pass in the
  compute dtype, `(state, batch) -> logits`; explain: `method`'s maps of the predicted
  classes (convjax.viz.explain, its default options: the last conv layer (layercam_fused:
  every conv layer), 32 IG intervals, 16 noise samples), `(state, batch) -> maps`."""
  dtype = jnp.dtype(precision)
  if mode == "train":
    return jit_steps(model, tx, lambda x: x / 255, mesh, compute_dtype=dtype)[0]
  if mode == "explain":
    from convjax.viz import explain

    convs = explain.conv_layers(model, input_shape)
    options = explain.Options(layer=(convs or [()])[-1], fused_layers=tuple(convs))

    def explain_step(state, batch):
      variables = cast_floats({"params": eval_params(state), **state.model_state}, dtype)
      x = (batch["image"].astype(jnp.float32) / 255).astype(dtype)
      return explain.explain_classes(model, variables, x, None, method, options, jax.random.key(0))[0]

    return jax.jit(explain_step)

  def infer(state, batch):
    variables = {"params": cast_floats(eval_params(state), dtype), **state.model_state}
    return model.apply(variables, (batch["image"].astype(jnp.float32) / 255).astype(dtype)).astype(jnp.float32)

  return jax.jit(infer)


def _instructions(hlo_text: str) -> dict:
  """{instruction name (dots as underscores): (its opcode, the JAX op it came from)} of an HLO
  module's text; a fusion gets its computation root's opcode and source (or the last source
  in it). Instructions XLA's own rewrites made carry no source."""
  roots, out, computation = {}, {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"(?:ENTRY )?%([\w.-]+) ", line)
    if header and line.rstrip().endswith("{"):
      computation = roots.setdefault(header.group(1), ["", ""])
      continue
    match = re.match(r"\s*(ROOT )?%([\w.-]+) = (\([^)]*\)|\S+) ([\w-]+)\(", line)
    if not match or computation is None:
      continue
    source = re.search(r'op_name="([^"]*)"', line)
    source = source.group(1) if source else ""
    called = re.search(r"calls=%([\w.-]+)", line)
    out[match.group(2).replace(".", "_")] = (match.group(4), source, called.group(1) if called else "")
    if source:
      computation[1] = source
    if match.group(1):
      computation[0] = match.group(4)
  result = {}
  for name, (opcode, source, called) in out.items():
    root_opcode, last_source = roots.get(called, ("", ""))
    result[name] = (f"{opcode}({root_opcode})" if root_opcode else opcode, source or last_source)
  return result


def _loop_multiplies(hlo_text: str) -> bool:
  """Whether a while loop of an HLO module's text runs a convolution or a dot, in its body or
  in a computation the body calls (a fusion, a nested loop)."""
  calls, multiplies, bodies, name = {}, set(), [], None
  for line in hlo_text.splitlines():
    header = re.match(r"(?:ENTRY )?%([\w.-]+) ", line)
    if header and line.rstrip().endswith("{"):
      name = header.group(1)
      continue
    if name is None:
      continue
    calls.setdefault(name, set()).update(re.findall(r"(?:calls|body|condition|to_apply)=%([\w.-]+)", line))
    if re.search(r" (?:convolution|dot)\(", line):
      multiplies.add(name)
    if " while(" in line:
      bodies += re.findall(r"body=%([\w.-]+)", line)
  seen = set()
  while bodies:
    name = bodies.pop()
    if name not in seen:
      seen.add(name)
      if name in multiplies:
        return True
      bodies += calls.get(name, ())
  return False


def op_profile(run, state, steps: int, hlo_text: str, directory: str, top: int = 30) -> dict:
  """Where a step's time goes: `steps` calls of run(state) under jax.profiler (the trace is
  left in `directory` for TensorBoard or Perfetto), its events matched to the compiled
  step's HLO instructions. {'step_ms': wall per step while tracing, 'ops': the `top`
  instructions by time per step [{'op', 'kind' (opcode; a fusion's with its root's), 'ms',
  'calls', 'source' (the JAX op, '' where an XLA rewrite made it)}], 'traced_ms',
  'untraced_ms': wall minus all traced instructions (on CPU the work XLA hands to a library,
  e.g. Eigen's convolutions, and waiting; instructions on concurrent threads overlap, so a
  lower bound)}."""
  instructions = _instructions(hlo_text)
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    t = time.perf_counter()
    for _ in range(steps):
      state = run(state)
    wall = (time.perf_counter() - t) / steps
  traces = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
  with gzip.open(max(traces, key=os.path.getmtime)) as f:
    events = json.load(f)["traceEvents"]
  total, calls = {}, {}
  for event in events:
    name = str(event.get("name", "")).replace(".", "_")
    if event.get("ph") == "X" and name in instructions:
      total[name] = total.get(name, 0.0) + event["dur"] / 1e3 / steps
      calls[name] = calls.get(name, 0) + 1
  traced = sum(total.values())
  ops = [
    {"op": name, "kind": instructions[name][0], "ms": ms, "calls": calls[name] / steps, "source": instructions[name][1]}
    for name, ms in sorted(total.items(), key=lambda kv: -kv[1])[:top]
  ]
  return {"step_ms": 1e3 * wall, "traced_ms": traced, "untraced_ms": max(0.0, 1e3 * wall - traced), "ops": ops}


def fresh_state(model, tx, input_shape: tuple, mesh):
  """A new train state (params drawn from key 0) replicated over `mesh`, its init compiled as
  RUN_ONCE, as the training loop's."""
  init = jax.jit(
    lambda: create_train_state(model, tx, input_shape, jax.random.key(0)),
    out_shardings=parallel.replicated(mesh),
    compiler_options=RUN_ONCE,
  )
  return init()


class Row:
  """One (model, input, batch, precision, mode[, method]) compiled once (timed): its steps are
  timed in as many calls of `time` as the caller makes (the benchmark binary alternates them
  with a peer's), and `result` reports them."""

  def __init__(
    self,
    model_name: str,
    model_kwargs: dict,
    input_shape: tuple,
    batch: int,
    precision: str,
    mode: str,
    method: str = "",
  ):
    from convjax.config import default_config

    config = default_config()
    config.learning_rate = 1e-4  # RMSprop, as the peers train
    model = get_model(model_name, **model_kwargs)
    mesh = parallel.make_mesh(1)
    tx, _ = make_optimizer(config, 1, abstract_params(model, input_shape, model_name))
    self.state = fresh_state(model, tx, input_shape, mesh)
    images = jax.random.randint(jax.random.key(1), (batch, *input_shape), 0, 256).astype(jnp.uint8)
    outputs = jax.eval_shape(
      lambda v: model.apply(v, images / 255.0), {"params": self.state.params, **self.state.model_state}
    ).shape[-1]
    labels = jax.random.randint(jax.random.key(2), (batch,), 0, max(outputs, 2))
    data = {"image": images, "label": labels, "mask": jnp.ones((batch,), jnp.float32)}
    self.args = (
      (data, jax.random.key(3), parallel.put_replicated_tree(mesh, zero_metrics())) if mode == "train" else (data,)
    )
    step = make_step(model, tx, mode, precision, mesh, method, input_shape)
    t0 = time.perf_counter()
    self.compiled = step.lower(self.state, *self.args).compile()
    self.compile_seconds = time.perf_counter() - t0
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA's cost analysis counts a loop's body once: a program whose loop runs convolutions or
    # matrix products (feature ablation's lax.map over segments) gets no FLOP count rather than a
    # wrong one; a loop of elementwise work (the random bits of SmoothGrad's noise) costs ~none.
    self.flops = float(cost.get("flops", 0.0)) if cost and not _loop_multiplies(self.compiled.as_text()) else 0.0
    self.key = {
      "model": model_name,
      "input": list(input_shape),
      "batch": batch,
      "precision": precision,
      "mode": mode,
      **({"method": method} if mode == "explain" else {}),
    }

  def _run(self, state):
    out = self.compiled(state, *self.args)
    jax.block_until_ready(out)
    return out[0] if self.key["mode"] == "train" else state

  def time(self, steps: int, warmup: int) -> list:
    """Seconds of each of `steps` steps, one at a time, after `warmup` untimed ones."""

    def step():
      self.state = self._run(self.state)

    return timing.step_times(step, steps, warmup)

  def result(
    self, times: list, cpu_peak: Optional[float] = None, profile_steps: int = 0, profile_dir: str = ""
  ) -> dict:
    """The row's numbers from its step `times`; with `profile_steps`, where a step's time goes
    (op_profile, traced into `profile_dir`)."""
    median = statistics.median(times)
    device = jax.devices()[0]
    peak = cpu_peak if device.platform == "cpu" else peak_flops(device, self.key["precision"])
    achieved = self.flops / median if self.flops else None
    q1, q3 = np.percentile(times, [25, 75])
    profile = (
      op_profile(self._run, self.state, profile_steps, self.compiled.as_text(), profile_dir) if profile_steps else None
    )
    batch = self.key["batch"]
    return {
      **self.key,
      "compile_seconds": self.compile_seconds,
      "step_seconds_median": median,
      "step_seconds_iqr": [float(q1), float(q3)],
      "step_seconds_min": min(times),
      "steps_timed": len(times),
      "images_per_second": batch / median,
      "flops_per_image": self.flops / batch if self.flops else None,
      "tflops_per_second": achieved / 1e12 if achieved else None,
      "percent_of_peak": 100 * achieved / peak if achieved and peak else None,
      **({"profile": profile} if profile else {}),
    }


def environment() -> dict:
  device = jax.devices()[0]
  return {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "device_count": jax.device_count(),
    "jax": jax.__version__,
    "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else __import__("jaxlib").__version__,
    "matmul_precision": matmul_precision_in_force(device),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "cpu_count": os.cpu_count(),
  }


def data_config(spec: str):
  """config.data for a benchmark source: 'NAME' or 'NAME@DIR' (TFDS, TFDS_DATA_DIR or DIR), or
  'folder:PATH[@HxW]' (a folder of class folders, resized to HxW)."""
  from convjax.config import default_config

  data = default_config().data
  data.train_split, data.validation_split, data.test_split, data.validation_size = "train", "", "", 1
  kind, _, rest = spec.rpartition(":") if spec.startswith("folder:") else ("", "", spec)
  where, _, extra = rest.partition("@")
  if kind == "folder":
    data.folder, data.train_split = where, ""
    data.test_size = 0
    if extra:
      try:
        data.image_size = tuple(int(d) for d in extra.split("x"))
      except ValueError:
        raise UserError(f"data {spec!r}: the image size is HxW, e.g. folder:PATH@150x150") from None
  else:
    data.dataset, data.data_dir, data.download = where, extra, False
  return data


def pipeline_overhead(
  model_name: str, spec: str, pipeline: str, workers: int, batch: int, steps: int = 20, warmup: int = 3
) -> dict:
  """A train step fed by the training loop's real input path against one on a batch already
  on the devices, and what the input path alone delivers.

  Real: each step takes its feed from the pipeline (convjax.data.pipeline: 'device'
  gathers the batch from the dataset's rows on the devices inside the step; 'stream'
  decodes it with grain, `workers` processes, and puts it on the devices ahead), exactly
  as `train_and_evaluate` does. Synthetic: the same step without the gather, on one fixed
  batch. Both block on every step; overhead = real / synthetic - 1. Input: images/s of
  the pipeline's batches alone, each waited for (streaming only).
  """
  from convjax.data import pipeline as pipelines
  from convjax.data.splits import fit_for, open_source

  mesh = parallel.make_mesh()
  data_cfg = data_config(spec)
  source = open_source(data_cfg)
  train = {"train": source.splits(stream=pipeline == "stream")["train"]}
  args = (train, mesh, 0, batch, batch, warmup + steps)
  data = (
    pipelines.Stream(*args, source.image_shape, fit_for(data_cfg), workers)
    if pipeline == "stream"
    else pipelines.OnDevice(*args)
  )
  model = get_model(model_name)
  tx = optax.rmsprop(1e-3)
  state = fresh_state(model, tx, source.image_shape, mesh)
  gathering, _ = jit_steps(model, tx, lambda x: x / 255, mesh, take=data.take)
  given, _ = jit_steps(model, tx, lambda x: x / 255, mesh)
  rng = jax.random.key(1)
  fixed = jax.jit(data.take)(next(data.train_batches(1)))
  sums = parallel.put_replicated_tree(mesh, zero_metrics())

  def timed(train_step, feeds, state):
    def step():
      nonlocal state
      state, metrics = train_step(state, next(feeds), rng, sums)
      jax.block_until_ready((state, metrics))

    return statistics.median(timing.step_times(step, steps, warmup)), state

  synthetic, state = timed(given, iter(lambda: fixed, None), state)
  feeds = data.train_batches(1)
  real, state = timed(gathering, feeds, state)
  feeds.close()  # stops reading ahead (streaming), so the next measurement runs alone
  input_rate = None
  if pipeline == "stream":
    t, n = time.perf_counter(), 0
    for feed in data.train_batches(2):
      jax.block_until_ready(feed)
      n += 1
    input_rate = n * batch / (time.perf_counter() - t)
  data.close()
  return {
    "model": model_name,
    "data": spec,
    "pipeline": pipeline,
    "workers": workers,
    "batch": batch,
    "steps_timed": steps,
    "real_step_seconds_median": real,
    "synthetic_step_seconds_median": synthetic,
    "overhead_percent": 100 * (real / synthetic - 1),
    "input_images_per_second": input_rate,
  }
