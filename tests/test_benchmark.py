"""The benchmark binary's contract (not its speed: timings are never asserted)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

from tests.conftest import link_cats_dogs_subset, run_binary

# mnist_convnet forward multiply-adds: conv 26*26*32*9 + 11*11*64*288 + 3*3*64*576, dense 576*64 + 64*10.
MNIST_FORWARD_FLOPS = 2 * (26 * 26 * 32 * 9 + 11 * 11 * 64 * 288 + 3 * 3 * 64 * 576 + 576 * 64 + 64 * 10)


def test_benchmark_grid_writes_json_table_chart_and_compares(tmp_path):
  result = run_binary(
    "experiments.benchmark",
    f"--workdir={tmp_path}",
    "--config.models=mnist_convnet@28x28x1",
    "--config.batch_sizes=(8,)",
    "--config.precisions=('float32', 'bfloat16')",
    "--config.warmup=1",
    "--config.peers=keras_jax",
    "--config.profile_steps=2",
  )
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
  for row in data["rows"]:
    assert row["steps_timed"] == 20 and row["step_seconds_iqr"][0] <= row["step_seconds_median"]
    assert row["images_per_second"] == 8 / row["step_seconds_median"]
    peer = row["peers"]["keras_jax"]  # the same network in Keras 3 on JAX, same batch and precision
    assert peer["params"] == 93_322 and peer["backend"] == "jax"
    assert peer["ratio"] == row["images_per_second"] / peer["images_per_second"]
  inference = data["rows"][1]["flops_per_image"]
  # XLA's count: the convolutions and matmuls, plus a little elementwise work (bias, ReLU, pooling).
  assert MNIST_FORWARD_FLOPS <= inference <= 1.1 * MNIST_FORWARD_FLOPS, inference
  assert data["rows"][0]["flops_per_image"] > 2.5 * inference  # backward pass ~2x forward
  (pipeline,) = data["pipeline"]  # the training loop's input path on the real MNIST, batch 8 (TFRecord: no stream)
  assert (pipeline["model"], pipeline["data"], pipeline["pipeline"], pipeline["batch"]) == (
    "mnist_convnet",
    "mnist",
    "device",
    8,
  )
  assert pipeline["overhead_percent"] == 100 * (
    pipeline["real_step_seconds_median"] / pipeline["synthetic_step_seconds_median"] - 1
  )
  assert "| mnist_convnet | 28x28x1 | 8 | float32 | train |" in (tmp_path / "benchmark.md").read_text()
  assert "| mnist_convnet | mnist | device | 0 | 8 |" in (tmp_path / "benchmark.md").read_text()
  assert (tmp_path / "benchmark.png").read_bytes()[:4] == b"\x89PNG"

  # Where a step's time goes: the traced HLO instructions, each named with the JAX op it came from.
  profile = data["rows"][0]["profile"]
  assert profile["ops"] and all(o["ms"] > 0 and o["calls"] > 0 for o in profile["ops"])
  assert sum(o["ms"] for o in profile["ops"]) <= profile["traced_ms"] * (1 + 1e-9)
  assert any("transpose(jvp(SmallConvNet))" in o["source"] for o in profile["ops"])  # the backward pass
  table = (tmp_path / "profile" / "mnist_convnet_28x28x1_b8_float32_train.md").read_text()
  assert "| HLO instruction | kind | ms a step |" in table and profile["ops"][0]["op"] in table
  assert len(list((tmp_path / "profile").glob("*.md"))) == 4

  path = tmp_path / "benchmark.json"
  compared = run_binary("experiments.benchmark", f"--compare={path},{path}")
  assert compared.returncode == 0 and compared.stdout.count("b/a   1.00x") == 4, compared.stdout
  bad = run_binary("experiments.benchmark", f"--workdir={tmp_path}", "--config.models=mnist_convnet@28x28")
  assert bad.returncode == 1 and "error: config.models entry 'mnist_convnet@28x28'" in bad.stderr
  bad = run_binary("experiments.benchmark", f"--workdir={tmp_path}", "--config.peers=caffe")
  assert bad.returncode == 1 and "error: unknown config.peers ['caffe']" in bad.stderr


def test_peers_build_the_same_networks():
  """Each peer's network has convjax's parameter count (PyTorch only where installed)."""
  cases = [("keras", "mnist_convnet", "28x28x1", 93_322), ("keras", "vgg16_base", "32x32x3", 14_714_688)]
  if importlib.util.find_spec("torch"):
    cases += [
      ("torch", "mnist_convnet", "28x28x1", 93_322),
      ("torch", "cats_dogs_convnet", "150x150x3", 3_453_121),
      ("torch", "vgg16_base", "32x32x3", 14_714_688),
    ]
  for framework, model, shape, params in cases:
    out = subprocess.run(
      [
        sys.executable,
        "-m",
        "convjax.peers",
        f"--framework={framework}",
        f"--model={model}",
        f"--input={shape}",
        "--batch=2",
        "--precision=float32",
        "--mode=inference",
        "--steps=2",
        "--warmup=1",
      ],
      capture_output=True,
      text=True,
      env={**os.environ, "KERAS_BACKEND": "jax"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["params"] == params, (framework, model)


def test_the_accelerator_check_runs_tiny_without_tensorflow(tmp_path):
  """The device machine has no TensorFlow: the check's every part (benchmark, MNIST from .npz,
  cats-vs-dogs JPEGs streamed) runs with tensorflow and tensorflow_datasets unimportable."""
  from convjax.data import tfds as tfds_data

  builder = tfds_data.get_builder("mnist", None, False)
  (tmp_path / "data" / "mnist").mkdir(parents=True)
  for split, spec in (("train", "train[:2000]"), ("test", "test[:500]")):
    rows = tfds_data.read_rows(builder, tfds_data.row_range(builder, spec))
    np.savez(tmp_path / "data" / "mnist" / f"{split}.npz", image=rows["image"], label=rows["label"])
  link_cats_dogs_subset(tmp_path / "data" / "cats_and_dogs_small", {"train": 40, "validation": 10})
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
  assert check["mnist"]["epochs"] == 1 and check["mnist"]["history"][-1]["test_epoch"] == 1
  assert {r["bound"] for r in check["cats"]["rows"]} <= {"input-bound", "step-bound"} and check["cats"]["rows"]
  assert "MNIST to test accuracy 0.5" in (tmp_path / "check" / "check.md").read_text()
