"""Data parallelism on CPU: 8 fake devices, two processes over gloo, checkpoints across device counts.

Each run is a subprocess, since the device count is fixed when JAX starts
(XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import (
  history,
  REPO,
  binary_argv,
  binary_env,
  kill_after_first_checkpoint,
  mnist_arrays_args,
  restore_state,
  run_binary,
)

pytestmark = pytest.mark.usefixtures("mnist_arrays")

EPOCHS = 3
ARGS = [
  "--config=configs/mnist.py",
  f"--config.num_epochs={EPOCHS}",
  "--config.steps_per_epoch=10",
  *mnist_arrays_args("train2048", "test500"),
  "--config.data.validation_size=512",
  "--config.eval_batch_size=128",
  "--config.model_kwargs.dropout_rate=0.25",
  "--config.optimizer=sgd",
  "--config.learning_rate=0.01",
]
# Runs on different device counts differ only by float reduction order. RMSprop's
# 1/sqrt(v) early in training amplifies that noise (to ~4e-4 over 30 steps with
# dropout), so these runs use SGD; dropout stays on to check that masks do not depend on
# the device count. Measured, 1 against 8 devices in convjax's default XLA setting: at most
# 2.4e-7 in any history value or state leaf, the same with XLA's code limited to AVX2
# (--xla_cpu_max_isa=AVX2), so TOL keeps a 40x margin. Dropout masks that depend on the
# device count move train_loss by 2.6e-3 after one epoch (tried once: fails).
TOL = 1e-5


def devices_env(n):
  """N host-platform devices, in the XLA setting users get (convjax/xla_defaults.py)."""
  return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}


def train(workdir, devices_visible, *extra):
  result = run_binary("experiments.train", *ARGS, f"--workdir={workdir}", *extra, env=devices_env(devices_visible))
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def assert_same_run(a, b):
  ha, hb = history(a), history(b)
  assert [sorted(r) for r in ha] == [sorted(r) for r in hb]
  for ra, rb in zip(ha, hb, strict=True):
    for key in ra:
      assert abs(ra[key] - rb[key]) <= TOL, (key, ra, rb)
  pa, pb = restore_state(a, EPOCHS), restore_state(b, EPOCHS)
  assert pa.keys() == pb.keys()
  worst = max(float(np.max(np.abs(pa[k].astype(np.float64) - pb[k].astype(np.float64)))) for k in pa)
  assert worst <= TOL, worst


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device")
  train(workdir, 1)
  return workdir


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path, one_device_run):
  result = train(tmp_path, 8)
  assert "mesh: 8 x cpu" in result.stderr
  assert_same_run(one_device_run, tmp_path)


@pytest.mark.slow
def test_num_devices_limits_the_mesh_and_batch_must_divide(tmp_path):
  result = run_binary("experiments.train", *ARGS, f"--workdir={tmp_path}", "--config.batch_size=60", env=devices_env(8))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
    "error: config.batch_size=60 is not divisible by the 8 devices in use; change it or set --config.num_devices"
  )
  result = run_binary(
    "experiments.train",
    *ARGS,
    f"--workdir={tmp_path}",
    "--config.batch_size=60",
    "--config.num_devices=4",
    "--config.eval_batch_size=100",
    env=devices_env(8),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh: 4 x cpu" in result.stderr


SINGLE_PROGRAM = """
import jax, jax.numpy as jnp, optax
from convjax.models import get_model
from convjax import parallel
from convjax.train.steps import jit_steps
from convjax.train.state import create_train_state
mesh = parallel.make_mesh()
model, tx = get_model("mnist_convnet"), optax.rmsprop(1e-3)
state = jax.jit(lambda: create_train_state(model, tx, (28, 28, 1), jax.random.key(0)),
                out_shardings=parallel.replicated(mesh))()
train_step, _ = jit_steps(model, tx, lambda x: x / 255, mesh)
batch = {"image": jax.ShapeDtypeStruct((64, 28, 28, 1), jnp.uint8, sharding=parallel.sharded(mesh)),
         "label": jax.ShapeDtypeStruct((64,), jnp.int32, sharding=parallel.sharded(mesh)),
         "mask": jax.ShapeDtypeStruct((64,), jnp.float32, sharding=parallel.sharded(mesh))}
from convjax.train.steps import zero_metrics
sums = parallel.put_replicated_tree(mesh, zero_metrics())
compiled = train_step.lower(state, batch, jax.random.key(1), sums).compile()
text = compiled.as_text()
header = next(l for l in text.splitlines() if l.startswith("HloModule "))
print("modules", text.count("HloModule "), "partitions", header.split("num_partitions=")[1].split(",")[0],
      "all-reduce", "all-reduce" in text,
      "param_sharding", compiled.input_shardings[0][0].params["features"]["conv2d"]["kernel"].spec)
"""


def test_compiled_step_is_one_spmd_program():
  result = subprocess.run(
    [sys.executable, "-c", SINGLE_PROGRAM],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=binary_env(devices_env(8)),
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  line = result.stdout.strip().splitlines()[-1]
  # One module for all 8 devices, gradients all-reduced inside it, params replicated.
  assert line == "modules 1 partitions 8 all-reduce True param_sharding P()", line


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, one_device_run):
  port = _free_port()
  procs = [
    subprocess.Popen(
      binary_argv(
        "experiments.train",
        *ARGS,
        f"--workdir={tmp_path}",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cwd=REPO,
      env=binary_env(devices_env(2)),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[1] for p in procs]
  for p, err in zip(procs, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert "mesh: 4 x cpu over 2 process(es)" in outputs[0]
  checksums = [re.search(r"process (\d) params checksum (\w+)", err).groups() for err in outputs]
  assert [c[0] for c in checksums] == ["0", "1"] and checksums[0][1] == checksums[1][1]
  assert_same_run(one_device_run, tmp_path)


@pytest.mark.slow
def test_checkpoint_from_eight_devices_resumes_on_one(tmp_path, one_device_run):
  done = kill_after_first_checkpoint(tmp_path, *ARGS, env=devices_env(8))
  assert 1 <= max(done) < EPOCHS, "no mid-run checkpoint to resume from"
  result = train(tmp_path, 1)
  assert "resumed from the checkpoint of step" in result.stderr and "mesh: 1 x cpu" in result.stderr
  assert_same_run(one_device_run, tmp_path)


@pytest.mark.slow
def test_batch_norm_statistics_are_global_over_eight_devices(tmp_path):
  """ResNet-18's BatchNorm on 8 devices (8 images each) equals 1 device with all 64.

  Per-device statistics would normalise each 8-image shard by its own mean and
  variance; the SPMD step computes them over the global batch. One step, so that float
  reduction-order noise (amplified by BatchNorm over many steps) stays far below the
  tolerance: each leaf of the state (params, the step's gradient as SGD's momentum trace,
  the BatchNorm statistics) within 1e-4 of the leaf's largest magnitude. Measured in
  convjax's default XLA setting: at most 4.5e-6 (4.6e-7 for the statistics), the same with
  --xla_cpu_max_isa=AVX2; with statistics per device's shard (tried once) the gradients
  move by up to 3.2x and the statistics by 9.4e-2. (With CONVJAX_XLA_DEFAULTS=0, jaxlib's
  YNNPACK convolutions, the gradients move by up to 8.8e-2 with the per-device batch: see
  docs/scaling-out.md.)
  """
  args = [
    "--config=configs/mnist.py",
    "--config.model=resnet18",
    "--config.data.image_size=(32, 32)",
    "--config.num_epochs=1",
    "--config.steps_per_epoch=1",
    *mnist_arrays_args("train2048", ""),
    "--config.data.validation_size=256",
    "--config.eval_batch_size=128",
    "--config.optimizer=sgd",
    "--config.learning_rate=0.01",
  ]
  runs = {}
  for n in (1, 8):
    result = run_binary("experiments.train", *args, f"--workdir={tmp_path / str(n)}", env=devices_env(n))
    assert result.returncode == 0, result.stderr[-3000:]
    runs[n] = restore_state(tmp_path / str(n), 1)
  stats = [k for k in runs[1] if "batch_stats" in k]
  assert len(stats) == 2 * 20  # mean and var of ResNet-18's 20 BatchNorm layers
  for k in runs[1]:
    one, eight = runs[1][k].astype(np.float64), runs[8][k].astype(np.float64)
    assert np.max(np.abs(eight - one)) <= 1e-4 * np.max(np.abs(one)), (
      k,
      np.max(np.abs(eight - one)),
      np.max(np.abs(one)),
    )
