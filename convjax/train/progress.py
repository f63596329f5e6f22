"""What a long run says while it trains, and how it is stopped.

`Progress` writes a line every `log_every_steps` steps or `log_every_seconds`
seconds, whichever comes first (step/total, loss, images/s, steps/s, learning
rate, ETA; the first line when the first step, compilation included, is done),
and the same as TensorBoard scalars. It reads the device's running metric sums
only at those points: the host never waits on a step just to report it.

`Interrupts` turns SIGTERM and SIGINT into a request the loop sees after the
step in flight: it saves and ends the run with `Interrupted`. A second SIGINT
aborts at once, as Python's default would.
"""

import os
import signal
import threading
import time

import jax
import numpy as np
from absl import logging

from convjax.errors import Interrupted


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  minutes, seconds = divmod(seconds, 60)
  return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
  """Progress lines and TensorBoard scalars of one epoch's training."""

  def __init__(self, t, epoch: int, start: int, sums, first: bool):
    """first: whether this epoch's first step is the run's (this process's) first: its line
    says when compilation is done."""
    self.t, self.epoch, self.config = t, epoch, t.config
    self.last_step, self.last_time = start, time.perf_counter()
    self.last_sums = jax.device_get(sums)
    self.first = first

  def due(self, step: int) -> bool:
    """Whether a line is due after `step` steps of this epoch (cheap: no device read)."""
    return (
      self.first
      or step - self.last_step >= self.config.log_every_steps
      or time.perf_counter() - self.last_time >= self.config.log_every_seconds
    )

  def report(self, step: int, sums) -> dict:
    """Reads the sums (waits for `step`), logs the interval since the last report, returns the sums."""
    now_sums, now = jax.device_get(sums), time.perf_counter()
    steps, seconds = step - self.last_step, now - self.last_time
    count = float(now_sums["count"] - self.last_sums["count"])
    loss = float(now_sums["loss_sum"] - self.last_sums["loss_sum"]) / max(count, 1.0)
    grad_norm = float(now_sums["grad_norm_sum"] - self.last_sums["grad_norm_sum"]) / max(steps, 1)
    spe, global_step = self.t.steps_per_epoch, (self.epoch - 1) * self.t.steps_per_epoch + step
    lr = float(self.t.schedule(global_step // self.config.grad_accum_steps))
    steps_per_second = steps / max(seconds, 1e-9)
    if self.first:
      logging.info(
        "epoch %d/%d step %d/%d: first step done in %.1fs (compilation included); loss %.4f",
        self.epoch,
        self.config.num_epochs,
        step,
        spe,
        seconds,
        loss,
      )
    else:
      left_epoch = (spe - step) / steps_per_second
      left_run = left_epoch + (self.config.num_epochs - self.epoch) * spe / steps_per_second
      logging.info(
        "epoch %d/%d step %d/%d  loss %.4f | %s images/s %.1f steps/s | lr %.3g | ETA epoch %s, run %s",
        self.epoch,
        self.config.num_epochs,
        step,
        spe,
        loss,
        f"{count / max(seconds, 1e-9):,.0f}",
        steps_per_second,
        lr,
        _duration(left_epoch),
        _duration(left_run),
      )
      self.t.writer.write_scalars(
        global_step,
        {
          "train/loss": loss,
          "train/learning_rate": lr,
          "train/grad_norm": grad_norm,
          "train/images_per_second": count / max(seconds, 1e-9),
        },
      )
    self.first, self.last_step, self.last_time, self.last_sums = False, step, now, now_sums
    return now_sums


class Interrupts:
  """SIGTERM / SIGINT -> `requested` (the signal), for the loop to save and stop at a step.

  In a multi-process run every process must stop at the same step, so the request is
  shared (an all-gather) every `every` steps; one process checks it at each step.
  """

  def __init__(self, every: int = 10):
    self.requested, self.every, self._previous = None, every, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def _handle(self, signum, frame):
    if self.requested == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: abort now
    self.requested = signum
    logging.warning(
      "%s received: finishing this step (or evaluation, checkpoint, set-up), then saving and stopping "
      "(Ctrl-C again aborts)",
      signal.Signals(signum).name,
    )

  def stop_at(self, step: int) -> bool:
    """Whether to stop after global step `step` (the same answer in every process)."""
    if jax.process_count() > 1 and step % self.every:
      return False
    return self.requested_anywhere()

  def requested_anywhere(self) -> bool:
    """Whether any process got a signal (all processes call this at the same point)."""
    if jax.process_count() == 1:
      return self.requested is not None
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(self.requested or 0))
    if self.requested is None and np.any(flags):
      self.requested = int(np.max(flags))
    return bool(np.any(flags))

  def stop_after(self, what: str, then: str) -> None:
    """Stops when a signal came during `what` (a phase outside the train steps, which is
    finished before the stop): `then` says what is on disk and what the rerun does."""
    if self.requested_anywhere():
      raise Interrupted(
        f"interrupted by {signal.Signals(self.requested).name} {what}; {then}", 128 + int(self.requested)
      )

  def stop(self, step: int, epoch: int, position: int, steps_per_epoch: int, where: str):
    raise Interrupted(
      f"interrupted at step {step} (epoch {epoch}, step {position}/{steps_per_epoch}); saved "
      f"{where}: rerun the same command to resume",
      128 + int(self.requested),
    )


PAUSE_VARIABLE = "CONVJAX_PAUSE_AT"
_paused = set()


def pause_point(phase: str) -> None:
  """A hook for tests (CONVJAX_PAUSE_AT=PHASE[,PHASE]): the first time this process reaches
  PHASE it logs `paused at PHASE` and stops itself (SIGSTOP) until a SIGCONT, so that a test
  meets a fault or sends a signal exactly then. The trainer's phases: set_up (data read,
  nothing compiled), first_step (before the first step's compilation), evaluate (before an
  epoch's validation), checkpoint (an epoch's checkpoint being written), final_test. A signal
  sent while it is stopped is handled before it goes on."""
  if phase in os.environ.get(PAUSE_VARIABLE, "").split(",") and phase not in _paused:
    _paused.add(phase)
    logging.warning("paused at %s (%s)", phase, PAUSE_VARIABLE)
    logging.flush()
    os.kill(os.getpid(), signal.SIGSTOP)
    # A signal sent while stopped may reach another thread first; its Python handler runs in
    # this thread at the next check, which this sleep makes sure comes before the phase goes on.
    time.sleep(0.1)
