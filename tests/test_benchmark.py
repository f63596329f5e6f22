"""The benchmark binary's contract (not its speed: timings are never asserted)."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import run_binary

# mnist_convnet forward multiply-adds: conv 26*26*32*9 + 11*11*64*288 + 3*3*64*576, dense 576*64 + 64*10.
MNIST_FORWARD_FLOPS = 2 * (26 * 26 * 32 * 9 + 11 * 11 * 64 * 288 + 3 * 3 * 64 * 576 + 576 * 64 + 64 * 10)


@pytest.mark.slow
def test_benchmark_grid_writes_json_table_chart_and_compares(tmp_path):
  started = time.perf_counter()
  result = run_binary(
    "experiments.benchmark",
    f"--workdir={tmp_path}",
    "--config.models=mnist_convnet@28x28x1",
    "--config.batch_sizes=(8,)",
    "--config.precisions=('float32', 'bfloat16')",
    "--config.warmup=1",
    "--config.peers=keras_jax",
    "--config.rounds=2",
    "--config.profile_steps=2",
  )
  wall = time.perf_counter() - started
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads((tmp_path / "benchmark.json").read_text())
  env = data["environment"]
  assert env["platform"] == "cpu" and env["matmul_precision"] == "float32" and env["cpu_peak_tflops"] > 0
  assert [(r["precision"], r["mode"]) for r in data["rows"]] == [
    ("float32", "train"),
    ("float32", "inference"),
    ("bfloat16", "train"),
    ("bfloat16", "inference"),
  ]
  # Every timed step ran inside the binary's run: a clock in the wrong unit or a sum taken
  # for a median would break this bound, which this test measures itself.
  assert sum(r["steps_timed"] * r["step_seconds_min"] for r in data["rows"]) < wall
  for row in data["rows"]:
    assert row["steps_timed"] == 20
    peer = row["peers"]["keras_jax"]  # the same network in Keras 3 on JAX, same batch and precision
    assert peer["params"] == 93_322 and peer["backend"] == "jax" and peer["images_per_second"] > 0
    assert len(peer["round_ratios"]) == 2 and min(peer["round_ratios"]) <= peer["ratio"] <= max(peer["round_ratios"])
  assert len({r["peers"]["keras_jax"]["pid"] for r in data["rows"]}) == 1  # one peer process for the grid
  inference = data["rows"][1]["flops_per_image"]
  # XLA's count: the convolutions and matmuls, plus a little elementwise work (bias, ReLU, pooling).
  assert MNIST_FORWARD_FLOPS <= inference <= 1.1 * MNIST_FORWARD_FLOPS, inference
  assert data["rows"][0]["flops_per_image"] > 2.5 * inference  # backward pass ~2x forward
  # The training loop's input paths on the real MNIST (TFDS' TFRecord copy), batch 8.
  assert [(p["model"], p["data"], p["pipeline"], p["batch"]) for p in data["pipeline"]] == [
    ("mnist_convnet", "mnist", "device", 8),
    ("mnist_convnet", "mnist", "stream", 8),
  ]
  assert "| mnist_convnet | 28x28x1 | 8 | float32 | train |" in (tmp_path / "benchmark.md").read_text()
  assert "| mnist_convnet | mnist | device | 0 | 8 |" in (tmp_path / "benchmark.md").read_text()
  assert (tmp_path / "benchmark.png").read_bytes()[:4] == b"\x89PNG"

  # Where a step's time goes: the traced HLO instructions, each named with the JAX op it came from.
  profile = data["rows"][0]["profile"]
  assert profile["ops"] and all(o["ms"] > 0 and o["calls"] > 0 for o in profile["ops"])
  assert any("transpose(jvp(SmallConvNet))" in o["source"] for o in profile["ops"])  # the backward pass
  table = (tmp_path / "profile" / "mnist_convnet_28x28x1_b8_float32_train.md").read_text()
  assert "| HLO instruction | kind | ms a step |" in table and profile["ops"][0]["op"] in table
  assert len(list((tmp_path / "profile").glob("*.md"))) == 4

  # Another machine's file with every row 2.5x as fast: the ratio is b's images/s over a's.
  faster = {**data, "rows": [{**r, "images_per_second": 2.5 * r["images_per_second"]} for r in data["rows"]]}
  (tmp_path / "faster.json").write_text(json.dumps(faster))
  compared = run_binary("experiments.benchmark", f"--compare={tmp_path / 'benchmark.json'},{tmp_path / 'faster.json'}")
  assert compared.returncode == 0 and compared.stdout.count("b/a   2.50x") == 4, compared.stdout
  bad = run_binary("experiments.benchmark", f"--workdir={tmp_path}", "--config.models=mnist_convnet@28x28")
  assert bad.returncode == 1 and "error: config.models entry 'mnist_convnet@28x28'" in bad.stderr
  bad = run_binary("experiments.benchmark", f"--workdir={tmp_path}", "--config.peers=caffe")
  assert bad.returncode == 1 and "error: unknown config.peers ['caffe']" in bad.stderr
  bad = run_binary("experiments.benchmark", f"--workdir={tmp_path}", "--config.rounds=0")
  assert bad.returncode == 1 and "error: config.rounds=0: between 1 and config.steps (20)" in bad.stderr
  # A pipeline row's dataset that is not prepared is its error before the grid times a row.
  (tmp_path / "empty").mkdir()
  bad = run_binary(
    "experiments.benchmark",
    f"--workdir={tmp_path / 'no_data'}",
    "--config.models=mnist_convnet@28x28x1",
    "--config.peers=",
    f"--config.pipeline=mnist_convnet:mnist@{tmp_path / 'empty'}",
  )
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith(
    "error: dataset 'mnist' is not prepared"
  )
  assert "Traceback" not in bad.stderr and not (tmp_path / "no_data" / "benchmark.json").exists()


class Clock:
  """A stand-in for the time module whose perf_counter returns the sums of given increments:
  the timings a measurement sees are the test's own numbers."""

  def __init__(self, increments):
    self.now, self.increments = 0.0, iter(increments)

  def perf_counter(self):
    self.now += next(self.increments)
    return self.now


def test_a_rows_numbers_come_from_its_step_times(monkeypatch):
  """With the step times fixed by the test (1..5 x 1/64 s: exact in binary floating point),
  every derived number is the hand-computed one."""
  from convjax import benchmark, timing

  steps = [k / 64 for k in (4, 1, 5, 2, 3)]  # median 3/64, min 1/64, quartiles 2/64 and 4/64
  increments = [0.0, 0.5]  # the compilation: 0.5 s
  for step in steps:
    increments += [0.25, step]  # the gap between two timed steps, then the step
  clock = Clock(increments)  # the compilation's timing and the steps' (convjax.timing) read it in turn
  monkeypatch.setattr(benchmark, "time", clock)
  monkeypatch.setattr(timing, "time", clock)
  timer = benchmark.Row("mnist_convnet", {}, (28, 28, 1), 8, "float32", "inference")
  row = timer.result(timer.time(5, 1), cpu_peak=1e9)
  assert row["compile_seconds"] == 0.5
  assert (row["step_seconds_median"], row["step_seconds_min"], row["step_seconds_iqr"]) == (
    3 / 64,
    1 / 64,
    [2 / 64, 4 / 64],
  )
  assert row["images_per_second"] == 8 * 64 / 3
  flops = row["flops_per_image"] * 8
  assert row["tflops_per_second"] == pytest.approx(flops * 64 / 3 / 1e12, rel=1e-12)
  assert row["percent_of_peak"] == pytest.approx(100 * flops * 64 / 3 / 1e9, rel=1e-12)


def test_a_rows_step_time_is_the_steps_time_measured_apart(monkeypatch):
  """The row's fastest inference step against the same model's forward pass that this test
  jits and times itself: within 4x either way (the two measure the same computation back to
  back; a step timed without waiting for its result, or in the wrong unit, is 10-1000x off;
  the fastest of each, as a loaded machine moves medians by more than 4x)."""
  import jax

  from convjax import benchmark
  from convjax.models import get_model

  timer = benchmark.Row("mnist_convnet", {}, (28, 28, 1), 8, "float32", "inference")
  row = timer.result(timer.time(20, 3))
  model = get_model("mnist_convnet")
  images = np.zeros((8, 28, 28, 1), np.float32)
  variables = model.init(jax.random.key(0), images)
  forward = jax.jit(lambda v, x: model.apply(v, x / 255.0, train=False))
  jax.block_until_ready(forward(variables, images))
  times = []
  for _ in range(20):
    t = time.perf_counter()
    jax.block_until_ready(forward(variables, images))
    times.append(time.perf_counter() - t)
  mine = min(times)
  assert mine / 4 <= row["step_seconds_min"] <= 4 * mine, (row["step_seconds_min"], mine)


def test_the_input_overhead_and_a_peers_ratio_come_from_their_measurements(tmp_path, monkeypatch, import_binary):
  """pipeline_overhead with the test's step times (real 3/64 s, synthetic 2/64 s: +50%), and
  a peer's ratio from the test's step times of both sides, round by round."""
  from PIL import Image

  from convjax import benchmark, timing

  binary = import_binary("benchmark")
  for c in ("a", "b"):
    (tmp_path / c).mkdir()
    for i in range(4):
      Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
  increments = [0.25, 2 / 64] * 3 + [0.25, 3 / 64] * 3  # 3 synthetic steps, then 3 real ones
  monkeypatch.setattr(timing, "time", Clock(increments))
  row = benchmark.pipeline_overhead("mnist_convnet", f"folder:{tmp_path}@28x28", "device", 0, 4, steps=3, warmup=0)
  assert (row["synthetic_step_seconds_median"], row["real_step_seconds_median"]) == (2 / 64, 3 / 64)
  assert row["overhead_percent"] == 50.0

  # A peer's ratio is the median of the rounds' ratios: in round 2 convjax's steps ran on a
  # machine 4x slower (a shared VM's drift), which a ratio of the pooled medians would take
  # for a 0.625x row.
  row = {"model": "mnist_convnet", "input": [28, 28, 1], "batch": 8, "precision": "float32", "mode": "train"}
  convjax_rounds = [[0.01, 0.01], [0.04, 0.04], [0.04, 0.04]]
  peer_rounds = [{"times": [0.025, 0.025], "params": 5}, {"times": [0.025]}, {"times": [0.1], "params": 5}]
  measured = binary.peer_result(row, convjax_rounds, peer_rounds)
  assert measured["round_ratios"] == [2.5, 0.625, 2.5] and measured["ratio"] == 2.5
  assert measured["images_per_second"] == 8 / 0.025 and measured["params"] == 5

  # A real peer process that answers one request and then dies: the second row's measurement
  # is the process's last line, as is every later one, and a failed round fails the row.
  script = (
    "import json, sys\n"
    "print(json.dumps({'ready': 1}), flush=True)\n"
    "sys.stdin.readline(); print(json.dumps({'times': [0.1]}), flush=True)\n"
    "sys.stdin.readline(); sys.exit('RuntimeError: out of memory')\n"
  )
  peer = binary.Peer("keras_jax", args=[sys.executable, "-c", script])
  try:
    assert peer.measure(row, 1, 0) == {"times": [0.1]}
    assert peer.measure({**row, "batch": 16}, 1, 0) == {"error": "RuntimeError: out of memory"}
    assert peer.measure(row, 1, 0) == {"error": "RuntimeError: out of memory"}
  finally:
    peer.close()
  assert peer.process.stdin.closed and peer.process.stdout.closed and peer.stderr.closed
  assert binary.peer_result(row, [[0.01]] * 2, [{"times": [0.1]}, {"error": "E"}]) == {"error": "E"}
  # A peer that cannot start (its framework is not installed): each of its rows says so.
  peer = binary.Peer("keras_jax", args=[sys.executable, "-c", "import keras_not_installed"])
  assert peer.measure(row, 1, 0) == {"error": "ModuleNotFoundError: No module named 'keras_not_installed'"}
  peer.close()


@pytest.mark.slow
def test_peers_build_the_same_networks():
  """Each peer's network has convjax's parameter count (PyTorch only where installed): the
  rows of a framework measured in one process (--rows), one JSON line each, in order."""
  cases = {"keras": [("mnist_convnet", "28x28x1", 93_322), ("vgg16_base", "32x32x3", 14_714_688)]}
  if importlib.util.find_spec("torch"):
    cases["torch"] = [
      ("mnist_convnet", "28x28x1", 93_322),
      ("cats_dogs_convnet", "150x150x3", 3_453_121),
      ("vgg16_base", "32x32x3", 14_714_688),
    ]
  for framework, rows in cases.items():
    spec = [{"model": m, "input": shape, "batch": 2, "mode": "inference"} for m, shape, _ in rows]
    out = subprocess.run(
      [sys.executable, "-m", "convjax.peers", f"--framework={framework}", f"--rows={json.dumps(spec)}"]
      + ["--steps=2", "--warmup=1"],
      capture_output=True,
      text=True,
      env={**os.environ, "KERAS_BACKEND": "jax"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [line["params"] for line in lines] == [params for _, _, params in rows], framework
  # The binary's --serve process: a row it has no network for is that row's error, and the
  # process goes on to the next row.
  requests = [
    {"row": {"model": m, "input": "28x28x1", "batch": 2, "mode": "inference"}, "steps": 2, "warmup": 1}
    for m in ("lenet5", "mnist_convnet")
  ]
  out = subprocess.run(
    [sys.executable, "-m", "convjax.peers", "--framework=keras", "--serve"],
    input="".join(json.dumps(r) + "\n" for r in requests),
    capture_output=True,
    text=True,
    env={**os.environ, "KERAS_BACKEND": "jax"},
  )
  assert out.returncode == 0, out.stderr[-2000:]
  ready, first, second = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert first == {"error": "UserError: no Keras peer for model 'lenet5'"}
  assert second["pid"] == ready["ready"]
  assert len(second["times"]) == 2 and second["params"] == 93_322
  bad = subprocess.run(
    [sys.executable, "-m", "convjax.peers", '--rows=["mnist_convnet"]'], capture_output=True, text=True
  )
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: --rows='[\"mnist_convnet\"]'")


@pytest.mark.slow
def test_the_accelerator_check_runs_tiny_without_tensorflow(tmp_path):
  """The device machine has no TensorFlow: the check's every part (benchmark, explanation
  rows, MNIST from .npz, cats-vs-dogs JPEGs streamed) runs with tensorflow and
  tensorflow_datasets unimportable."""
  prepared = run_binary("experiments.accelerator_check", f"--prepare={tmp_path / 'data'}", "--cats_per_class=20")
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  with np.load(tmp_path / "data" / "mnist" / "test.npz") as test:
    assert test["image"].shape == (10_000, 28, 28, 1) and np.bincount(test["label"]).min() > 800
  assert len(list((tmp_path / "data" / "cats_and_dogs_small" / "validation" / "dogs").iterdir())) == 10
  blocked = tmp_path / "blocked"
  for name in ("tensorflow", "tensorflow_datasets"):
    (blocked / name).mkdir(parents=True)
    (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
  result = run_binary(
    "experiments.accelerator_check",
    f"--data={tmp_path / 'data'}",
    f"--workdir={tmp_path / 'check'}",
    "--tiny",
    env={"PYTHONPATH": str(blocked)},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  check = json.loads((tmp_path / "check" / "check.json").read_text())
  assert [r["model"] for r in check["benchmark"]["rows"]] == ["mnist_convnet"]
  assert [(r["method"], r["images_per_second"] > 0) for r in check["explain"]["rows"]] == [
    ("gradcam", True),
    ("gradient", True),
  ]
  assert "| mnist_convnet | 8 | gradient |" in (tmp_path / "check" / "check.md").read_text()
  assert check["mnist"]["epochs"] == 1 and check["mnist"]["history"][-1]["test_epoch"] == 1
  assert check["mnist"]["reached"]["test_accuracy"] >= 0.5  # 20 steps of RMSprop on MNIST
  assert "not reached" not in (tmp_path / "check" / "check.md").read_text()
  for row in check["cats"]["rows"]:  # a missing input rate would read as input-bound
    assert row["input_images_per_second"] > 0 and row["bound"] in ("input-bound", "step-bound")
  assert check["cats"]["rows"]


@pytest.mark.slow
def test_input_readers_row_per_reader_and_data_with_the_ratio_to_tf_data(tmp_path):
  """--config.input: convjax's stream, grain's DataLoader and tf.data each read a JPEG folder
  and the shared TFRecord MNIST in their own process; a reader that cannot read a format is
  its row's error (grain: TFRecord), and convjax's rate is over tf.data's on the same data."""
  from tests.conftest import link_cats_dogs_subset

  folder = link_cats_dogs_subset(tmp_path / "data", {"train": 16})
  specs = [f"folder:{folder}/train@48x40", "mnist@" + os.environ.get("TFDS_DATA_DIR", "../shared/datasets/tfds")]
  result = run_binary(
    "experiments.benchmark",
    f"--workdir={tmp_path / 'bench'}",
    "--config.models=",
    "--config.peers=",
    "--config.pipeline=",
    f"--config.input={','.join(specs)}",
    "--config.input_readers=('convjax','grain','tf.data')",
    "--config.batch_sizes=(8,)",
    "--config.input_batches=3",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {(r["data"], r["reader"]): r for r in json.loads((tmp_path / "bench" / "benchmark.json").read_text())["input"]}
  assert set(rows) == {(s, r) for s in specs for r in ("convjax", "grain", "tf.data")}
  assert "TFRECORD is not supported" in rows[(specs[1], "grain")]["error"]
  for spec in specs:
    convjax, tf_data = rows[(spec, "convjax")], rows[(spec, "tf.data")]
    assert convjax["images_per_second"] > 0 and tf_data["images_per_second"] > 0, (convjax, tf_data)
    assert convjax["vs_tf_data"] == pytest.approx(convjax["images_per_second"] / tf_data["images_per_second"])
  assert rows[(specs[0], "grain")]["images_per_second"] > 0
  table = (tmp_path / "bench" / "benchmark.md").read_text()
  assert "| data | reader | images/s | vs tf.data |" in table and "- (TFDS' as_data_source" in table
  bad = run_binary(
    "experiments.benchmark",
    f"--workdir={tmp_path / 'b2'}",
    "--config.models=",
    "--config.pipeline=",
    f"--config.input={specs[0]}",
    "--config.input_readers=('dali',)",
  )
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
    "error: unknown reader 'dali'; valid: convjax, convjax:N (grain workers), grain, tf.data"
  )


def test_input_reader_and_data_specs_that_do_not_parse_are_one_error_each():
  from convjax import input_readers
  from convjax.errors import UserError

  assert input_readers.reader_name("convjax:2") == ("convjax", 2)
  assert input_readers.parse("folder:/data/train@150x120") == ("folder", "/data/train", None, (150, 120))
  for reader in ("dali", "grain:2", "convjax:x"):
    with pytest.raises(UserError, match=f"unknown reader '{reader}'"):
      input_readers.reader_name(reader)
  with pytest.raises(UserError, match=r"the image size is HxW"):
    input_readers.parse("folder:/data/train@15ax150")
  with pytest.raises(UserError, match=r"a folder needs its image size"):
    input_readers.parse("folder:/data/train")
