r"""Throughput of convjax's jitted steps: models x batch sizes x precisions x modes.

  python -m experiments.benchmark --config=configs/benchmark.py --workdir=/tmp/bench
  python -m experiments.benchmark --compare a/benchmark.json b/benchmark.json

Writes <workdir>/benchmark.json (rows + environment; rewritten after each row, so an
interrupted grid keeps what it measured), benchmark.md (a table) and
benchmark.png (images/s per row). Run it on an otherwise idle machine: other
processes on the same cores make every number wrong. --compare prints, per row
present in both files, the ratio of images/s (b / a): two devices, two versions.
"""

import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Optional

from absl import app, flags, logging
from ml_collections import config_flags

from configs import benchmark as benchmark_config
from convjax import benchmark, cli, files
from convjax.data.splits import open_source
from convjax.errors import UserError
from convjax.viz.plots import bar_chart
from convjax.viz import explain

config_flags.DEFINE_config_file("config", "configs/benchmark.py", "Benchmark grid.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where benchmark.json/.md/.png go.")
flags.DEFINE_list("compare", None, "Two benchmark.json files: print per-row ratios and exit.")

KEY = ("model", "input", "batch", "precision", "mode", "method")
PEERS = {
  "keras_jax": ["--framework=keras"],
  "keras_tensorflow": ["--framework=keras"],
  "torch_eager": ["--framework=torch"],
  "torch_compile": ["--framework=torch", "--compile"],
}
KERAS_BACKENDS = {"keras_jax": "jax", "keras_tensorflow": "tensorflow"}


class Peer:
  """A peer's process (`convjax.peers --serve`, one framework import for the whole grid) that
  measures a row's steps when asked; `args` replaces the command (tests). It starts here and
  imports its framework before the binary times a step of its own."""

  def __init__(self, peer: str, args: Optional[list] = None):
    self.stderr = tempfile.TemporaryFile("w+")
    self.process = subprocess.Popen(
      args or [sys.executable, "-m", "convjax.peers", *PEERS[peer], "--serve"],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.stderr,
      text=True,
      env={**os.environ, "KERAS_BACKEND": KERAS_BACKENDS.get(peer, "jax")},
    )
    self.error = None if self.process.stdout.readline().startswith('{"ready"') else self._died()

  def _died(self) -> str:
    """The process's last line on stderr, once it has ended."""
    self.process.kill()
    self.process.wait()
    self.stderr.seek(0)
    return (self.stderr.read().strip().splitlines() or ["no output"])[-1][:200]

  def measure(self, row: dict, steps: int, warmup: int) -> dict:
    """{"times": [...], params, backend...} of `steps` steps of `row`, or {"error": ...}: the
    row's own, or the process's last line where it died."""
    if self.error:
      return {"error": self.error}
    spec = {k: "x".join(map(str, row[k])) if k == "input" else row.get(k, "") for k in KEY}
    try:
      self.process.stdin.write(json.dumps({"row": spec, "steps": steps, "warmup": warmup}) + "\n")
      self.process.stdin.flush()
      line = self.process.stdout.readline()
    except BrokenPipeError:
      line = ""
    if line.startswith("{"):
      return json.loads(line)
    self.error = self._died()
    return {"error": self.error}

  def close(self) -> None:
    """Ends the process (its input closed) and closes its pipes and stderr file."""
    with contextlib.suppress(BrokenPipeError):  # a process that died unread
      self.process.stdin.close()
    self.process.wait()
    self.process.stdout.close()
    self.stderr.close()


def peer_result(row: dict, convjax_rounds: list, peer_rounds: list) -> dict:
  """A peer's measurement of `row` from the step times of both sides, round by round: its
  images/s (median of all its steps) and convjax's images/s over its as the median of the
  rounds' ratios, so that a machine whose speed drifts moves both sides of each ratio."""
  failed = next((r for r in peer_rounds if "error" in r), None)
  if failed:
    return {"error": failed["error"]}
  times = [t for r in peer_rounds for t in r["times"]]
  ratios = [
    statistics.median(p["times"]) / statistics.median(c) for c, p in zip(convjax_rounds, peer_rounds, strict=True)
  ]
  facts = {k: v for k, v in peer_rounds[-1].items() if k != "times"}
  return {
    **facts,
    "images_per_second": row["batch"] / statistics.median(times),
    "step_seconds_median": statistics.median(times),
    "ratio": statistics.median(ratios),
    "round_ratios": ratios,
  }


def run_input_readers(config) -> list:
  """Each reader's images/s on each of config.input, one process per reader; with convjax's
  rate over tf.data's where both read the data."""
  from convjax import input_readers

  specs = [s.strip() for s in config.input.split(",") if s.strip()]
  for reader in config.input_readers:
    input_readers.reader_name(reader)
  for spec in specs:
    input_readers.parse(spec)
  rows = []
  for reader in config.input_readers:
    args = [sys.executable, "-m", "convjax.input_readers", f"--reader={reader}", *(f"--data={s}" for s in specs)]
    args += [f"--batch={config.batch_sizes[0]}", f"--batches={config.input_batches}"]
    result = subprocess.run(args, capture_output=True, text=True)
    lines = {r["data"]: r for r in (json.loads(x) for x in result.stdout.splitlines() if x.startswith("{"))}
    error = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
    for spec in specs:
      rows.append(lines.get(spec, {"data": spec, "reader": reader, "error": error}))
      logging.info("input %s by %s: %s", spec, reader, rows[-1].get("images_per_second", rows[-1].get("error")))
  tf_data = {r["data"]: r["images_per_second"] for r in rows if r["reader"] == "tf.data" and "error" not in r}
  for r in rows:
    if "error" not in r and r["data"] in tf_data:
      r["vs_tf_data"] = r["images_per_second"] / tf_data[r["data"]]
  return rows


def _key(row):
  return tuple(tuple(row[k]) if isinstance(row.get(k), list) else row.get(k, "") for k in KEY)


def _label(row):
  mode = f"{row['mode']} {row['method']}" if row.get("method") else row["mode"]
  return f"{row['model']} {'x'.join(map(str, row['input'][:2]))} b{row['batch']} {row['precision']} {mode}"


def parse_models(spec: str) -> list:
  """'name@HxWxC,...' -> [(name, (H, W, C)), ...]; an unknown name or bad shape is a UserError.
  A name is any model name (convjax.models), a researcher's own included: mynet:TinyNet@28x28x1."""
  from convjax.models import factory_of

  out = []
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    name, _, shape = item.partition("@")
    try:
      dims = tuple(int(d) for d in shape.split("x"))
    except ValueError:
      dims = ()
    if len(dims) != 3 or min(dims) <= 0:
      raise UserError(f"config.models entry {item!r}: expected NAME@HxWxC, e.g. mnist_convnet@28x28x1")
    try:
      factory_of(name)
    except UserError as e:
      raise UserError(f"config.models entry {item!r}: {e}") from None
    out.append((name, dims))
  return out


def markdown(result: dict) -> str:
  env = result["environment"]
  lines = [
    f"{env['device_kind']} x{env['device_count']}, jax {env['jax']}, jaxlib {env['jaxlib']}, "
    f"f32 matmul precision: {env['matmul_precision']}"
    + (f", XLA_FLAGS: `{env['xla_flags']}`" if env.get("xla_flags") else "")
    + (f", measured sgemm peak {env['cpu_peak_tflops']:.3f} TFLOP/s" if env.get("cpu_peak_tflops") else ""),
    "",
    "| model | input | batch | precision | mode | compile s | step ms (median) | IQR ms | images/s "
    "| GFLOP/image | TFLOP/s | % of peak | peers: images/s (convjax / peer) |",
    "|" + "---|" * 13,
  ]
  for r in result["rows"]:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines.append(
      f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['batch']} | {r['precision']} | "
      f"{r['mode']}{' ' + r['method'] if r.get('method') else ''} | {r['compile_seconds']:.1f} | {1e3 * r['step_seconds_median']:.2f} | "
      f"{1e3 * r['step_seconds_iqr'][0]:.2f}-{1e3 * r['step_seconds_iqr'][1]:.2f} | "
      f"{r['images_per_second']:.1f} | {fmt(r['flops_per_image'] and r['flops_per_image'] / 1e9, '.3f')} | "
      f"{fmt(r['tflops_per_second'], '.3f')} | {fmt(r['percent_of_peak'], '.1f')} | "
      + "; ".join(
        f"{p} {v['images_per_second']:.1f} ({v['ratio']:.2f}x)"
        if "ratio" in v
        else f"{p}: {v['error'].replace('|', '/')}"
        for p, v in r.get("peers", {}).items()
      )
      + " |"
    )
  if result.get("pipeline"):
    lines += [
      "",
      "Input pipeline (a train step fed by the real input path vs on a batch already on the devices; "
      "input: the streamed batches alone):",
      "",
      "| model | data | pipeline | workers | batch | real step ms | synthetic step ms | overhead | input images/s |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
      f"| {p['model']} | {p['data']} | {p['pipeline']} | {p['workers']} | {p['batch']} | "
      f"{1e3 * p['real_step_seconds_median']:.2f} | {1e3 * p['synthetic_step_seconds_median']:.2f} | "
      f"{p['overhead_percent']:.1f}% | "
      f"{'-' if p['input_images_per_second'] is None else format(p['input_images_per_second'], ',.0f')} |"
      for p in result["pipeline"]
    ]
  if result.get("input"):
    lines += [
      "",
      f"Input readers (images/s of training batches of {result['input_batch']}, each reader in its own process):",
      "",
      "| data | reader | images/s | vs tf.data |",
      "|---|---|---|---|",
    ]
    lines += [
      f"| {r['data']} | {r['reader']} | "
      + (f"{r['images_per_second']:,.0f}" if "error" not in r else "- (" + r["error"].replace("|", "/") + ")")
      + f" | {format(r['vs_tf_data'], '.2f') + 'x' if 'vs_tf_data' in r else '-'} |"
      for r in result["input"]
    ]
  return "\n".join(lines) + "\n"


def write_profile(path: str, label: str, row: dict) -> None:
  """A row's op_profile as a markdown table."""
  p = row["profile"]
  lines = [
    f"# {label}: where the step's time goes",
    "",
    f"{p['step_ms']:.2f} ms a step while traced ({1e3 * row['step_seconds_median']:.2f} ms untraced "
    f"median); {p['traced_ms']:.2f} ms in traced HLO instructions, {p['untraced_ms']:.2f} ms in none "
    "(library calls such as XLA:CPU's Eigen convolutions, and waiting).",
    "",
    "| HLO instruction | kind | ms a step | % of step | calls a step | JAX op |",
    "|---|---|---|---|---|---|",
  ]
  lines += [
    f"| {o['op']} | {o['kind']} | {o['ms']:.2f} | {100 * o['ms'] / p['step_ms']:.1f} | {o['calls']:g} | "
    f"{o['source'] or '- (made by an XLA rewrite)'} |"
    for o in p["ops"]
  ]
  files.write_text(path, "\n".join(lines) + "\n")
  logging.info("profile of %s: %s", label, path)


def compare(path_a: str, path_b: str) -> list:
  runs = []
  for path in (path_a, path_b):
    try:
      with open(path) as f:
        runs.append(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"cannot read benchmark file {path!r}: {e}") from None
  a = {_key(r): r for r in runs[0]["rows"]}
  out = []
  for row in runs[1]["rows"]:
    if _key(row) in a:
      out.append((_label(row), a[_key(row)]["images_per_second"], row["images_per_second"]))
  if not out:
    raise UserError(f"{path_a!r} and {path_b!r} have no row in common")
  print(f"a: {runs[0]['environment']['device_kind']}  b: {runs[1]['environment']['device_kind']}")
  for label, ia, ib in out:
    print(f"{label:<60} {ia:10.1f} {ib:10.1f} img/s  b/a {ib / ia:6.2f}x")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.compare:
    if len(f.compare) != 2:
      raise UserError(f"--compare takes two benchmark.json files, got {len(f.compare)}")
    compare(*f.compare)
    return
  if not f.workdir:
    raise UserError("--workdir is required (or --compare a.json,b.json)")
  config = f.config
  env = benchmark.environment()
  try:
    env["preset"] = benchmark_config.resolve(config, env["platform"])
  except ValueError as e:
    raise UserError(f"config.preset: {e}") from None
  logging.info(
    "grid: the %s preset (%s)",
    env["preset"],
    ", ".join(f"{k}={config[k]!r}" for k in benchmark_config.PRESETS[env["preset"]]),
  )
  cpu_peak = benchmark.measured_cpu_peak() if env["platform"] == "cpu" else None
  if cpu_peak:
    env["cpu_peak_tflops"] = cpu_peak / 1e12
  models = parse_models(config.models)
  if not models and not config.pipeline.strip() and not config.input.strip():
    raise UserError("config.models, config.pipeline and config.input are all empty: nothing to measure")
  for precision in config.precisions:
    if precision not in ("float32", "bfloat16"):
      raise UserError(f"unknown precision {precision!r}; valid: float32, bfloat16")
  for mode in config.modes:
    if mode not in ("train", "inference", "explain"):
      raise UserError(f"unknown mode {mode!r}; valid: train, inference, explain")
  methods = [m.strip() for m in config.explain_methods.split(",") if m.strip()]
  unknown = sorted(set(methods) - set(explain.METHODS))
  if unknown or ("explain" in config.modes and not methods):
    raise UserError(
      f"config.explain_methods={config.explain_methods!r}: unknown {unknown}; valid: {', '.join(explain.METHODS)}"
    )
  for kind in config.pipeline_modes:
    if kind not in ("device", "stream"):
      raise UserError(f"unknown config.pipeline_modes entry {kind!r}; valid: device, stream")
  if config.steps < 20:
    raise UserError(f"config.steps={config.steps}: time at least 20 steps")
  if not 1 <= config.rounds <= config.steps:
    raise UserError(f"config.rounds={config.rounds}: between 1 and config.steps ({config.steps})")
  if config.profile_steps < 0:
    raise UserError(f"config.profile_steps={config.profile_steps}: 0 (no profile) or a number of steps to trace")
  peers = [p.strip() for p in config.peers.split(",") if p.strip()]
  unknown = sorted(set(peers) - set(PEERS))
  if unknown:
    raise UserError(f"unknown config.peers {unknown}; valid: {', '.join(PEERS)}")
  sources = []  # the pipeline rows' data, opened before the grid: a missing dataset is an error now, not after it
  for item in (s.strip() for s in config.pipeline.split(",") if s.strip()):
    model_name, _, spec = item.partition(":")
    if not spec:
      raise UserError(
        f"config.pipeline entry {item!r}: expected MODEL:DATA (DATA: a TFDS name, NAME@DIR, or folder:PATH[@HxW])"
      )
    sources.append((item, model_name, spec, open_source(benchmark.data_config(spec)).streams))
  rows, pipeline = [], []
  result = {"environment": env, "rows": rows, "pipeline": pipeline}
  files.make_dir(f.workdir)
  eligible = lambda mode: [p for p in peers if mode != "explain" or p == "torch_eager"]  # noqa: E731
  # One process per peer measures every row it can (one import of its framework).
  processes = {p: Peer(p) for p in peers if any(p in eligible(mode) for mode in config.modes)}
  per_round = -(-config.steps // config.rounds)
  grid = itertools.product(
    models,
    config.batch_sizes,
    config.precisions,
    [(m, x) for m in config.modes for x in (methods if m == "explain" else [""])],
  )
  try:
    for (name, input_shape), batch, precision, (mode, method) in grid:
      label = f"{name}_{'x'.join(map(str, input_shape))}_b{batch}_{precision}_{mode}{method and '_' + method}"
      timer = benchmark.Row(name, {}, input_shape, batch, precision, mode, method)
      times, peer_rounds = [], {p: [] for p in eligible(mode)}
      for r in range(config.rounds):  # the rounds alternate: a drifting machine moves both sides
        warmup = config.warmup if r == 0 else 1
        times.append(timer.time(per_round, warmup))
        for p in peer_rounds:
          peer_rounds[p].append(processes[p].measure(timer.key, per_round, warmup))
      row = timer.result(
        [t for r in times for t in r], cpu_peak, config.profile_steps, os.path.join(f.workdir, "profile", label)
      )
      del timer
      if "profile" in row:
        write_profile(os.path.join(f.workdir, "profile", label + ".md"), _label(row), row)
      row["peers"] = {p: peer_result(row, times, rounds) for p, rounds in peer_rounds.items()}
      rows.append(row)
      files.write_json(os.path.join(f.workdir, "benchmark.json"), result)  # a long grid keeps its rows
      logging.info(
        "%s: %.1f images/s (compile %.1fs)%s",
        _label(row),
        row["images_per_second"],
        row["compile_seconds"],
        "".join(
          f"; {p} {v['images_per_second']:.1f} (x{v['ratio']:.2f})" if "ratio" in v else f"; {p}: {v['error']}"
          for p, v in row["peers"].items()
        ),
      )
  finally:
    for process in processes.values():
      process.close()
  for item, model_name, spec, streams in sources:
    for kind in config.pipeline_modes:
      if kind == "stream" and not streams:
        logging.info("pipeline %s: %s cannot stream (its file format reads only in row ranges); skipped", item, spec)
        continue
      for workers in config.workers if kind == "stream" else (0,):
        for batch in config.batch_sizes:
          pipeline.append(
            benchmark.pipeline_overhead(model_name, spec, kind, workers, batch, config.steps, config.warmup)
          )
          files.write_json(os.path.join(f.workdir, "benchmark.json"), result)
          logging.info(
            "pipeline %s %s (%d workers) b%d: overhead %.1f%%",
            item,
            kind,
            workers,
            batch,
            pipeline[-1]["overhead_percent"],
          )
  if config.input.strip():
    result["input"], result["input_batch"] = run_input_readers(config), config.batch_sizes[0]
  files.write_json(os.path.join(f.workdir, "benchmark.json"), result)
  files.write_text(os.path.join(f.workdir, "benchmark.md"), markdown(result))
  if rows:
    bar_chart(
      [_label(r) for r in rows],
      [r["images_per_second"] for r in rows],
      os.path.join(f.workdir, "benchmark.png"),
      ylabel="images/s",
      title=env["device_kind"],
    )
  print(markdown(result))


if __name__ == "__main__":
  cli.run(main)
