"""The step timing loop of the benchmark's rows (convjax.benchmark) and of its peers' processes
(convjax.peers): both sides' steps timed the same way."""

import time


def step_times(step, steps: int, warmup: int) -> list:
  """Seconds of each of `steps` calls of `step()` after `warmup` untimed ones; `step` waits for
  its result."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return times
