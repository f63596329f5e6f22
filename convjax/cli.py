"""What every convjax binary shares: one-line errors and quiet library logs."""
import logging as py_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TFDS imports TensorFlow: keep its banner out

from absl import app, flags, logging

from convjax.errors import UserError

QUIET_LIBRARIES = ("/orbax/", "/etils/", "/tensorflow_datasets/", "/clu/", "/jax/_src/xla_bridge.py")


class _LibraryInfoFilter(py_logging.Filter):

  def filter(self, record):
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
    _one_line_error(f"bad config override: {e.args[0] if e.args else e}")


def run(main) -> None:
  """`app.run(main)`; a UserError from main ends the binary with one `error: ...` line, exit 1."""

  def guarded(argv):
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    try:
      main(argv)
    except UserError as e:
      _one_line_error(e)

  app.run(guarded, flags_parser=_parse_flags)
