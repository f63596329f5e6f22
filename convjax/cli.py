"""What every convjax binary shares: one-line errors and quiet library logs."""
import logging as py_logging
import sys

import jax
from absl import app, flags, logging

from convjax.config import RENAMED
from convjax.errors import UserError

# Multi-host: one process per host, all started with the same flags but their own process_id.
# Without --coordinator_address, jax.distributed is not started (one process, all local devices);
# on clusters JAX detects itself (SLURM, TPU pods, ...), pass --distributed alone there.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_bool("distributed", False, "Start jax.distributed with cluster auto-detection.")
flags.DEFINE_string("cpu_collectives", "gloo", "Collectives for multi-process CPU runs (gloo, mpi).")

QUIET_LIBRARIES = ("/orbax/", "/etils/", "/tensorflow_datasets/", "/grain/", "/jax/_src/xla_bridge.py")


# Library warnings that say nothing to a convjax user (TFDS suggests OpenCV for decoding).
QUIET_WARNINGS = ("OpenCV is not installed",)


class _LibraryInfoFilter(py_logging.Filter):

  def filter(self, record):
    if any(record.getMessage().startswith(w) for w in QUIET_WARNINGS):
      return False
    return record.levelno >= py_logging.WARNING or not any(s in record.pathname for s in QUIET_LIBRARIES)


def _one_line_error(message) -> None:
  logging.flush()
  sys.exit("error: " + " ".join(str(message).split()))


def _parse_flags(argv):
  """absl's parser, but a bad flag or config override (unknown key, wrong type) is one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _one_line_error(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by config_flags overrides
    while e.args and isinstance(e.args[0], BaseException):  # config_flags wraps a KeyError
      e = e.args[0]
    for arg in argv[1:]:  # a field that moved: name its new place
      key = arg.split("=", 1)[0].removeprefix("--config.")
      if arg.startswith("--config.") and key in RENAMED:
        _one_line_error(f"bad config override: config.{key} is now config.{RENAMED[key]} "
                        f"(--config.{RENAMED[key]}=...)")
    _one_line_error(f"bad config override: {e.args[0] if e.args else e}")


def initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime when the flags ask for it (before any JAX use)."""
  f = flags.FLAGS
  if not (f.coordinator_address or f.distributed):
    return
  jax.config.update("jax_cpu_collectives_implementation", f.cpu_collectives)
  jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def run(main) -> None:
  """`app.run(main)`; a UserError from main ends the binary with one `error: ...` line, exit 1."""

  def guarded(argv):
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    initialize_distributed()
    try:
      main(argv)
    except UserError as e:
      _one_line_error(e)

  app.run(guarded, flags_parser=_parse_flags)
