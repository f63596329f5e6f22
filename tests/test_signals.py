"""SIGTERM (a scheduler's preemption) and Ctrl-C sent for real to the train binary at each
phase of a run, reached with the binary's CONVJAX_PAUSE_AT pause points."""

import signal

import pytest

from convjax import checkpoints
from tests.conftest import TINY_MNIST, binary_argv, finish, history, paused, run_binary

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("mnist_arrays")]


PHASES = {  # each phase with one of the two signals a user sends
  "set_up": (signal.SIGTERM, "while the run was set up", None),
  "first_step": (signal.SIGINT, "at step 1 (epoch 1, step 1/10)", 1),
  "evaluate": (signal.SIGTERM, "during epoch 1's evaluation or checkpoint", 10),
  "checkpoint": (signal.SIGINT, "during epoch 1's evaluation or checkpoint", 10),
  "final_test": (signal.SIGTERM, "during the final test", 30),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_signal_at_each_phase_is_one_line_and_the_rerun_ends_as_the_uninterrupted_run(
  tmp_path, tiny_mnist_run, phase
):
  """The phase ends, what it made is saved, one line says so, exit 128 + the signal."""
  sig, said, latest = PHASES[phase]
  workdir = tmp_path / "run"
  proc, lines = paused(binary_argv("experiments.train", *TINY_MNIST, f"--workdir={workdir}"), phase)
  proc.send_signal(sig)
  output = finish(proc, lines)
  assert proc.returncode == 128 + sig and "Traceback" not in output, output[-3000:]
  last = output.strip().splitlines()[-1]
  assert f"interrupted {said}" in last or f"interrupted by {sig.name} {said}" in last, last
  assert max(checkpoints.kept(str(workdir)), default=None) == latest
  result = run_binary("experiments.train", *TINY_MNIST, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert history(workdir) == history(tiny_mnist_run)
