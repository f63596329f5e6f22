"""Faults of the disk and the files: each is one `error:` line or a logged fallback to a checkpoint
that verifies, and nothing written earlier is damaged."""

import ast
import glob
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest
from PIL import Image

from convjax import checkpoints
from convjax.errors import UserError
from convjax.train.loop import train_and_evaluate
from tests.conftest import REPO, TINY_MNIST, binary_argv, history, run_binary

pytestmark = pytest.mark.usefixtures("mnist_arrays")

ARGS = TINY_MNIST


@pytest.fixture
def finished(tiny_mnist_run):
  return tiny_mnist_run


def _largest(pattern):
  return max(glob.glob(pattern), key=os.path.getsize)


def _garble(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(np.random.default_rng(0).bytes(1024))


FAULTS = {
  "garbled bytes in an array file": lambda d: _garble(_largest(f"{d}/state/ocdbt.process_0/d/*")),
  "truncated array file": lambda d: os.truncate(
    p := _largest(f"{d}/state/ocdbt.process_0/d/*"), os.path.getsize(p) // 2
  ),
  "state deleted": lambda d: shutil.rmtree(f"{d}/state"),
  "ocdbt.process_0 deleted": lambda d: shutil.rmtree(f"{d}/state/ocdbt.process_0"),
  "garbled state metadata": lambda d: open(f"{d}/state/_METADATA", "w").write("{not json"),
  "garbled history": lambda d: open(f"{d}/history/metadata", "w").write("[{not json"),
  # Reads cleanly, but they are checkpoint 20's arrays: only the digest can tell.
  "arrays of another checkpoint": lambda d: (
    shutil.rmtree(f"{d}/state"),
    shutil.copytree(f"{d}/../20/state", f"{d}/state"),
  ),
}
MESSAGES = {
  # Which check catches it depends on the bytes hit: zstd's frame checks (seen: 'corrupt', and
  # in one CI run 'Src size is incorrect') or the digest.
  "garbled bytes in an array file": (
    r"(cannot be read: .*(corrupt|ZSTD_decompressStream\(\) failed)|of its arrays differ from the digest saved with them)"
  ),
  "truncated array file": "cannot be read: OUT_OF_RANGE: Error reading",
  "state deleted": "its state is missing",
  "ocdbt.process_0 deleted": "cannot be read: ",
  "garbled state metadata": "cannot be read: Expecting property name",
  "garbled history": "cannot be read: Expecting property name",
  "arrays of another checkpoint": "of its arrays differ from the digest saved with them",
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_damaged_latest_checkpoint_is_named_and_the_run_falls_back_to_the_one_before(tmp_path, finished, fault):
  """The rerun of the finished run finds checkpoint 30 damaged, says what is wrong in one line,
  resumes from 20, retrains epoch 3 and ends with the same history and test record."""
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  FAULTS[fault](workdir / "checkpoints" / "30")
  result = run_binary("experiments.train", *ARGS, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]
  damaged = [line for line in result.stderr.splitlines() if "is damaged" in line]
  assert len(damaged) == 1 and f"checkpoint {workdir}/checkpoints/30 is damaged (" in damaged[0], result.stderr[-2000:]
  assert re.search(MESSAGES[fault], damaged[0]), damaged[0]
  assert "resumed from the checkpoint of step 20 (the end of epoch 2)" in result.stderr
  assert history(workdir) == history(finished)


@pytest.mark.slow
def test_when_no_checkpoint_verifies_the_run_stops_and_history_is_left_as_it_was(tmp_path, finished):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  before = (workdir / "history.json").read_text()
  for step in (20, 30):
    _garble(_largest(f"{workdir}/checkpoints/{step}/state/ocdbt.process_0/d/*"))
  result = run_binary("experiments.train", *ARGS, f"--workdir={workdir}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: no checkpoint in {workdir}/checkpoints can be restored: ") and "/30: " in last
  assert (workdir / "history.json").read_text() == before


@pytest.mark.slow
def test_an_unreadable_metrics_file_is_rewritten_from_the_checkpoint_history(tmp_path, finished):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  (workdir / "checkpoints" / "30" / "metrics" / "metrics").write_text("{garbage")
  result = run_binary("experiments.train", *ARGS, f"--workdir={workdir}")
  assert result.returncode == 0 and "had an unreadable metrics file: rewritten from its history" in result.stderr
  metrics = json.loads((workdir / "checkpoints" / "30" / "metrics" / "metrics").read_text())
  assert metrics == {"val_accuracy": history(finished)[2]["val_accuracy"], "epoch": 3}


@pytest.fixture
def mnist_run(mnist_small):
  mnist_small.num_epochs, mnist_small.steps_per_epoch = 3, 8
  return mnist_small


# Calls that may write a file (`open` only with a mode that writes), by the name they are called with.
WRITES = {"os.makedirs", "os.mkdir", "os.replace", "os.rename", "tempfile.mkstemp", "tempfile.mkdtemp", "SummaryWriter"}
WRITES |= {"shutil.copy", "shutil.copyfile", "shutil.copytree", "np.save", "np.savez", "np.savez_compressed"}
WRITE_METHODS = {"savefig", "write_text", "write_bytes"}  # of a figure, of a pathlib.Path


def _unguarded_writes(path) -> list:
  """The calls in a module that may write a file outside a `with files.writing(...)` or
  `with files.output(...)` block."""
  tree = ast.parse(pathlib.Path(path).read_text())
  guarded = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.With) and any(
      isinstance(item.context_expr, ast.Call) and ast.unparse(item.context_expr.func).endswith(("writing", "output"))
      for item in node.items
    ):
      guarded |= {id(n) for n in ast.walk(node)}  # its body, and the other items (an `open`)
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call) or id(node) in guarded:
      continue
    name = ast.unparse(node.func)
    if name.startswith("files."):
      continue
    if name in WRITES or name.rsplit(".", 1)[-1] in WRITE_METHODS or name == "open" and _mode_writes(node):
      found.append(f"{path}:{node.lineno}: {ast.unparse(node)[:80]}")
  return found


def _mode_writes(call) -> bool:
  mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
  return isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+")


def test_every_writer_goes_through_the_shared_writer():
  """convjax.files is the one way to write a file: anything else that writes (orbax's
  checkpoints, the TensorBoard event file, staging folders) is inside a files.writing block.
  The check itself finds a write that bypasses it."""
  sources = sorted(glob.glob(f"{REPO}/convjax/**/*.py", recursive=True) + glob.glob(f"{REPO}/experiments/*.py"))
  found = [w for p in sources if not p.endswith("convjax/files.py") for w in _unguarded_writes(p)]
  assert found == [], "\n".join(found)
  bad = pathlib.Path(REPO) / "tests" / "_bypass.py"
  try:
    bad.write_text('import numpy as np\nwith open("x", "w") as f:\n  np.save(f, 1)\n')
    assert len(_unguarded_writes(bad)) == 2
  finally:
    bad.unlink()


def test_tensorboard_reads_every_scalar_of_a_run_on_one_step_axis(finished):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  events = EventAccumulator(str(finished / "tensorboard"))
  events.Reload()
  steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
  assert {"train_loss", "val_accuracy", "test_accuracy"} <= set(steps), sorted(steps)
  assert steps["val_accuracy"] == [10, 20, 30]
  assert steps["test_accuracy"] == [20]  # the weights of epoch 2 (the best val_accuracy), at their step
  assert max(s for v in steps.values() for s in v) == 30


def test_plain_orbax_reads_a_checkpoints_state(finished):
  """Without convjax: orbax's CheckpointManager and StandardRestore, no target given."""
  import numpy as np
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(finished / "checkpoints") as manager:
    state = manager.restore(30, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  ours = checkpoints.read_verified(str(finished), 30)
  assert int(state["step"]) == 30
  for path, leaf in jax.tree_util.tree_leaves_with_path(ours["params"]):
    got = state["params"]
    for key in path:
      got = got[key.key]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf))


def test_a_workdir_that_is_a_file_is_one_error_and_the_file_is_left_alone(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("mine")
  result = run_binary("experiments.train", *ARGS, f"--workdir={path}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f"error: --workdir={path} is a file, not a directory"
  assert path.read_text() == "mine"


@pytest.mark.slow
def test_ctrl_c_during_training_saves_and_says_so_in_one_line(tmp_path):
  proc = subprocess.Popen(
    binary_argv(
      "experiments.train",
      "--config=configs/mnist.py",
      f"--workdir={tmp_path}",
      "--config.num_epochs=1",
      "--config.log_every_steps=50",
    ),
    cwd=REPO,
    stderr=subprocess.PIPE,
    text=True,
  )
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if "step 51/781" in line or "step 50/781" in line:
      proc.send_signal(signal.SIGINT)
      break
  lines += proc.stderr.readlines()
  proc.wait(timeout=300)
  text = "".join(lines)
  assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in text, text[-3000:]
  (said,) = [line for line in lines if "interrupted at step" in line]
  step = int(said.split("interrupted at step ")[1].split()[0])
  assert 50 <= step < 781 and max(checkpoints.kept(str(tmp_path))) == step, (said, checkpoints.kept(str(tmp_path)))


@pytest.mark.slow
def test_retention_keeps_the_latest_and_the_best_also_after_a_resume(tmp_path, mnist_run, validation_best_at_epoch_1):
  """Validation accuracy made to fall after epoch 1: checkpoints/ holds the best (epoch 1) and the
  latest, and after the run is extended and resumed still exactly those two."""
  mnist_run.num_epochs = 2
  train_and_evaluate(mnist_run, str(tmp_path))
  mnist_run.num_epochs = 4
  train_and_evaluate(mnist_run, str(tmp_path))
  kept = checkpoints.kept(str(tmp_path))
  history = {r["epoch"]: r["val_accuracy"] for r in json.loads((tmp_path / "history.json").read_text()) if "epoch" in r}
  assert max(history, key=history.get) == 1
  assert sorted((p["epochs"], p["epoch_end"]) for p in kept.values()) == [(1, True), (4, True)]


def test_16_bit_images_are_scaled_to_8_bits_and_float_images_are_refused(tmp_path):
  from convjax.data.folders import decode_image

  ramp = (np.arange(64 * 64) * 16).reshape(64, 64).astype(np.uint16)  # 0 .. 65520
  Image.fromarray(ramp).save(tmp_path / "ramp16.png")
  assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
  got = decode_image(str(tmp_path / "ramp16.png"), 1, None)[..., 0]
  np.testing.assert_array_equal(got, np.rint(ramp / 257.0).astype(np.uint8))
  assert np.mean(got == 255) < 0.01  # not saturated
  assert decode_image(str(tmp_path / "ramp16.png"), 3, None).shape == (64, 64, 3)
  Image.fromarray(ramp).save(tmp_path / "ramp16.tif")
  np.testing.assert_array_equal(decode_image(str(tmp_path / "ramp16.tif"), 1, None)[..., 0], got)
  Image.fromarray(ramp.astype(np.float32) / 3).save(tmp_path / "float.tif")
  with pytest.raises(UserError, match=r"float\.tif' has 32-bit float pixels"):
    decode_image(str(tmp_path / "float.tif"), 1, None)
