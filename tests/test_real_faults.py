"""Faults met for real, as a user meets them: a full, read-only or unwritable file system (a tmpfs
mounted for the test; the tests run as root in CI) and a run's folder deleted while it trains
(signals at each phase: test_signals.py). No test here patches a library, the file system or
`open`. Each fault ends in one line, the last of the output, with no traceback; what is on
disk stays consistent, and the rerun ends as the uninterrupted run."""

import contextlib
import os
import shutil
import subprocess

import pytest

from convjax import checkpoints
from tests.conftest import REPO, TINY_MNIST, binary_argv, binary_env, finish, history, paused, run_binary

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("mnist_arrays")]

HINT = "(CONVJAX_TRACEBACK=1 shows the traceback)"


@contextlib.contextmanager
def tmpfs(path, size="16m"):
  """A tmpfs of `size` mounted at `path` for the block."""
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  path.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path, options):
  subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def fill(path):
  """Fills the file system of `path` to the last byte."""
  with open(path / "filler", "wb") as f:
    with contextlib.suppress(OSError):
      while True:
        f.write(b"\0" * 65536)
        f.flush()
  assert shutil.disk_usage(path).free == 0


def assert_one_error(result, line):
  output = result.stdout + result.stderr
  assert result.returncode == 1, output[-3000:]
  assert "Traceback" not in output and "Exception ignored" not in output, output[-3000:]
  assert result.stderr.strip().splitlines()[-1] == line, output[-3000:]


def test_a_disk_that_fills_during_a_checkpoint_is_one_error_and_the_rerun_resumes(tmp_path, tiny_mnist_run):
  """1.5 MiB holds the first epoch's checkpoint (and the run's other files) but not the second:
  orbax's threads meet ENOSPC while writing it. After space is freed, the rerun resumes from
  epoch 1 and ends with the uninterrupted run's history."""
  with tmpfs(tmp_path / "disk", "1536k") as disk:
    workdir = disk / "run"
    result = run_binary("experiments.train", *TINY_MNIST, f"--workdir={workdir}")
    assert_one_error(result, f"error: cannot write {workdir}/checkpoints/20: the disk is full {HINT}")
    assert [r["epoch"] for r in history(workdir)] == [1]
    assert {s: p["epochs"] for s, p in checkpoints.kept(str(workdir)).items()} == {10: 1}
    remount(disk, "size=16m")
    result = run_binary("experiments.train", *TINY_MNIST, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from the checkpoint of step 10 (the end of epoch 1)" in result.stderr
    assert history(workdir) == history(tiny_mnist_run)
    assert sorted(checkpoints.kept(str(workdir))) == [20, 30]


@pytest.mark.parametrize("fault", ["the disk is full", "the file system is read-only", "permission denied"])
def test_a_workdir_that_cannot_be_written_is_one_error_at_the_first_write(tmp_path, fault):
  """Permission denied as root: the binary runs without CAP_DAC_OVERRIDE (setpriv), so the
  folder's mode 555 binds it as it binds any user."""
  with tmpfs(tmp_path / "disk") as disk:
    workdir, prefix = disk / "run", []
    if fault == "the disk is full":
      fill(disk)
      path = workdir / "config.json"  # tmpfs makes a folder without taking a block
    elif fault == "the file system is read-only":
      remount(disk, "ro")
      path = workdir
    else:
      disk.chmod(0o555)
      prefix, path = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"], workdir
    argv = [*prefix, *binary_argv("experiments.train", *TINY_MNIST, f"--workdir={workdir}")]
    result = subprocess.run(argv, cwd=REPO, env=binary_env(), capture_output=True, text=True, timeout=300)
    assert_one_error(result, f"error: cannot write {path}: {fault} {HINT}")
    assert not (workdir / "checkpoints").exists()


def test_the_traceback_switch_shows_what_the_one_line_error_hides(tmp_path):
  with tmpfs(tmp_path / "disk") as disk:
    remount(disk, "ro")
    result = run_binary("experiments.train", *TINY_MNIST, f"--workdir={disk}/run", env={"CONVJAX_TRACEBACK": "1"})
  assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
  assert "OSError: [Errno 30] Read-only file system" in result.stderr
  assert (
    result.stderr.strip().splitlines()[-1] == f"error: cannot write {disk}/run: the file system is read-only {HINT}"
  )


def test_every_binary_that_writes_into_a_read_only_run_is_one_error(tmp_path, tiny_mnist_run):
  """The finished run on a read-only file system: each reader that writes (evaluate, visualize,
  predict's table and export, explain, the benchmark) names the file it could not write, and
  the run's files are untouched."""
  images = tmp_path / "images"
  images.mkdir()
  from PIL import Image

  Image.new("L", (28, 28), 128).save(images / "grey.png")
  with tmpfs(tmp_path / "disk") as disk:
    workdir = disk / "run"
    shutil.copytree(tiny_mnist_run, workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    remount(disk, "ro")
    cases = {
      ("experiments.evaluate", f"--workdir={workdir}", "--split=test"): workdir / "eval",
      ("experiments.visualize", f"--workdir={workdir}", f"--image={images}/grey.png", "--config.viz.methods=gradcam"): (
        workdir / "viz"
      ),
      ("experiments.predict", f"--workdir={workdir}", f"--images={images}", f"--output={disk}/p.csv"): disk / "p.csv",
      ("experiments.predict", f"--workdir={workdir}", f"--export={disk}/export"): disk / "export",
      ("experiments.explain", f"--workdir={workdir}", "--rows=0:8", "--batch_size=8", "--metrics="): (
        workdir / "explain"
      ),
      (
        "experiments.benchmark",
        "--config.models=mnist_convnet@28x28x1",
        "--config.batch_sizes=(8,)",
        "--config.warmup=1",
        "--config.peers=",
        f"--workdir={disk}/bench",
      ): disk / "bench",
    }
    for (module, *args), path in cases.items():
      result = run_binary(module, *args)
      assert_one_error(result, f"error: cannot write {path}: the file system is read-only {HINT}")
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_a_run_folder_deleted_while_it_trains_is_one_error(tmp_path):
  """Without the check, orbax would make the deleted folders again for the next checkpoint."""
  workdir = tmp_path / "parent" / "run"
  proc, lines = paused(binary_argv("experiments.train", *TINY_MNIST, f"--workdir={workdir}"), "evaluate")
  shutil.rmtree(tmp_path / "parent")
  output = finish(proc, lines)
  assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
  assert output.strip().splitlines()[-1] == (
    f"error: cannot write {workdir}/checkpoints/10: the run's folder {workdir} was deleted or moved while it trained"
  )
  assert not (tmp_path / "parent").exists()


NO_DAC_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("fault", ["the disk is full", "the file system is read-only", "permission denied"])
def test_a_fault_that_comes_while_the_run_trains_fails_its_checkpoint_and_the_rerun_resumes(
  tmp_path, tiny_mnist_run, fault
):
  """The fault comes while the binary is paused before epoch 1's evaluation: the epoch's
  checkpoint (orbax's writes) fails; history.json does not list the epoch; once the fault is
  gone the rerun starts again and ends with the uninterrupted run's history."""
  with tmpfs(tmp_path / "disk") as disk:
    workdir = disk / "run"
    argv = [*NO_DAC_OVERRIDE, *binary_argv("experiments.train", *TINY_MNIST, f"--workdir={workdir}")]
    proc, lines = paused(argv, "evaluate")
    if fault == "the disk is full":
      fill(disk)
    elif fault == "the file system is read-only":
      remount(disk, "ro")
    else:
      (workdir / "checkpoints").chmod(0o555)
    output = finish(proc, lines)
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert output.strip().splitlines()[-1].startswith(f"error: cannot write {workdir}/checkpoints/10"), output[-3000:]
    assert output.strip().splitlines()[-1].endswith(f": {fault} {HINT}"), output[-3000:]
    assert checkpoints.kept(str(workdir)) == {} and not (workdir / "history.json").exists()
    if fault == "the disk is full":
      (disk / "filler").unlink()
    elif fault == "the file system is read-only":
      remount(disk, "rw")
    else:
      (workdir / "checkpoints").chmod(0o755)
    result = run_binary("experiments.train", *TINY_MNIST, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert history(workdir) == history(tiny_mnist_run)
