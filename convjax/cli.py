"""What every convjax binary shares: one-line errors and interrupts, quiet library logs, and the
command-line rules of a training config.

A training config's model fields are all settable, `--config.model_kwargs.NAME=VALUE`,
whatever the config file set (a locked ConfigDict would accept only those): values are
read as Python literals and checked against the model's fields. `--config.model=NAME`
naming another model than the file's drops the file's model_kwargs (they belong to its
model): the new model starts from its own defaults. `--config.help` lists every field
of the config with its value and meaning, and the model's fields, then exits.
"""

import ast
import dataclasses
import logging as py_logging
import os
import re
import signal
import sys
import threading
import traceback

import jax
from absl import app, flags, logging
from ml_collections import ConfigDict

from convjax import config as config_lib
from convjax import files
from convjax.config import RENAMED
from convjax.errors import Interrupted, UserError, closed_loop_leftover

# Multi-host: one process per host, all started with the same flags but their own process_id.
# Without --coordinator_address, jax.distributed is not started (one process, all local devices);
# on clusters JAX detects itself (SLURM, TPU pods, ...), pass --distributed alone there.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_bool("distributed", False, "Start jax.distributed with cluster auto-detection.")
flags.DEFINE_string("cpu_collectives", "gloo", "Collectives for multi-process CPU runs (gloo, mpi).")

QUIET_LIBRARIES = ("/orbax/", "/etils/", "/tensorflow_datasets/", "/grain/", "/jax/_src/xla_bridge.py")


# Library warnings that say nothing to a convjax user (TFDS suggests OpenCV for decoding;
# orbax notes a checkpoint saved without a metric: convjax's mid-epoch ones have none).
QUIET_WARNINGS = ("OpenCV is not installed", "Requested `tracked_metric`")


class _LibraryInfoFilter(py_logging.Filter):
  def filter(self, record):
    if any(record.getMessage().startswith(w) for w in QUIET_WARNINGS):
      return False
    return record.levelno >= py_logging.WARNING or not any(s in record.pathname for s in QUIET_LIBRARIES)


def _a_reported_failure(error) -> bool:
  """A failed write (reported once, as the binary's last line), or what it leaves behind:
  tensorstore completions that arrive after orbax closed their event loop."""
  return error is not None and (closed_loop_leftover(error) or files.write_cause(error) is not None)


class _ReportedFailureFilter(py_logging.Filter):
  """Drops a library's log of a failure the binary reports in one line: orbax logs a failed
  write from each of its threads with the traceback, asyncio a task's that nobody awaited."""

  def filter(self, record):
    library = "/convjax/" not in record.pathname and "/experiments/" not in record.pathname
    return not (library and record.exc_info and _a_reported_failure(record.exc_info[1]))


def _report_failures_once() -> None:
  """One line for a failed write, whichever thread meets it (see _ReportedFailureFilter);
  none of this with CONVJAX_TRACEBACK=1."""
  if os.environ.get(files.TRACEBACK_VARIABLE) == "1":
    return
  logging.get_absl_handler().addFilter(_ReportedFailureFilter())
  thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

  def quiet_thread_hook(args):
    if not _a_reported_failure(args.exc_value):
      thread_hook(args)

  def quiet_unraisable_hook(unraisable):
    if not _a_reported_failure(unraisable.exc_value):
      unraisable_hook(unraisable)

  threading.excepthook, sys.unraisablehook = quiet_thread_hook, quiet_unraisable_hook


def _one_line_error(message) -> None:
  """Prints `error: MESSAGE` as the last line and exits 1. Library threads still running
  (orbax's writers after a failed checkpoint wait minutes for a folder that was never made,
  then log) would print after it or keep the process alive: the process then ends at once."""
  logging.flush()
  line = "error: " + " ".join(str(message).split())
  if threading.active_count() > 1:
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
  sys.exit(line)


def _literal(raw: str, default):
  """A command-line value for a field whose default is `default`."""
  if raw.lower() in ("true", "false"):
    return raw.lower() == "true"
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return tuple(value) if isinstance(value, list) else value


def apply_model_arguments(config: ConfigDict, model, kwargs: dict) -> None:
  """--config.model and --config.model_kwargs.* (see the module docstring), applied to config."""
  if model is not None and model != config.model:
    if config.model_kwargs:
      logging.info(
        "--config.model=%s: the config's model_kwargs %s (for %s) are dropped",
        model,
        dict(config.model_kwargs),
        config.model,
      )
    config.model, config.model_kwargs = model, ConfigDict()
  from convjax.models import model_fields, own

  config.model = own.absolute(config.model)
  fields = model_fields(config.model)
  merged = dict(config.model_kwargs)
  for name, raw in kwargs.items():
    if name not in fields:
      raise UserError(
        f"model {config.model!r} has no field {name!r} (--config.model_kwargs.{name}); its fields: {', '.join(fields)}"
      )
    merged[name] = _literal(raw, fields[name])
  config.model_kwargs = ConfigDict(merged)


def _meanings() -> dict:
  """{dotted field: its comment} from convjax/config.py's default_config."""
  import inspect

  out, last = {}, None
  prefixes = {"c": "", "d": "data."}
  for line in inspect.getsource(config_lib.default_config).splitlines():
    match = re.match(r"\s*(c|d)\.([\w.]+) = [^#]*?(?:#\s*(.*))?$", line)
    if match:
      last = prefixes[match.group(1)] + match.group(2)
      if match.group(3):
        out[last] = match.group(3)
    elif last and re.match(r"\s{20,}#", line):  # a comment continued on the next line
      out[last] = out.get(last, "") + " " + line.strip().lstrip("# ")
    else:
      last = None
  return {k: v for k, v in out.items() if v}


def describe(config: ConfigDict) -> str:
  """Every field of a training config: value, default where it differs, meaning."""
  meanings, defaults = _meanings(), config_lib.to_dict(config_lib.default_config())
  lines = []

  def walk(values: dict, defaults: dict, prefix: str):
    for key, value in values.items():
      name = prefix + key
      if isinstance(value, dict) and key != "model_kwargs":
        walk(value, defaults.get(key, {}), name + ".")
        continue
      default = defaults.get(key, "<none>")
      note = "" if default == value else f" (default {default!r})"
      lines.append(f"{name} = {value!r}{note}" + (f"  # {meanings[name]}" if name in meanings else ""))

  walk(config_lib.to_dict(config), defaults, "")
  lines.append(f"\nmodel_kwargs: the fields of {config.model!r} (--config.model_kwargs.NAME=VALUE):")
  from convjax.models import model_fields

  fields = model_fields(config.model).items()
  lines += [f"  {k} = {'<required>' if v is dataclasses.MISSING else repr(v)}" for k, v in fields]
  return "\n".join(lines)


def _split_model_arguments(argv: list) -> tuple:
  """(argv without them, --config.model value or None, {model_kwargs field: raw value}, help?)."""
  rest, model, kwargs, wants_help = [], None, {}, False
  for arg in argv:
    key, _, value = arg.partition("=")
    if key == "--config.model":
      model = value
    elif key.startswith("--config.model_kwargs."):
      kwargs[key.removeprefix("--config.model_kwargs.")] = value
    elif key == "--config.help":
      wants_help = True
    else:
      rest.append(arg)
  return rest, model, kwargs, wants_help


def _is_training_config(config) -> bool:
  return isinstance(config, ConfigDict) and "model" in config and "model_kwargs" in config


def _parse_flags(argv):
  """absl's parser, but a bad flag or config override (unknown key, wrong type) is one line,
  and a training config takes the model arguments of the module docstring."""
  rest, model, kwargs, wants_help = _split_model_arguments(argv)
  if rest != argv and argv is sys.argv:
    sys.argv = rest  # config_flags reads its overrides from sys.argv
  try:
    parsed = flags.FLAGS(rest)
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if _is_training_config(config):
      apply_model_arguments(config, model, kwargs)
      if wants_help:
        print(describe(config))
        sys.exit(0)
    elif model is not None or kwargs or wants_help:  # not a training config: absl's own error
      sys.argv = argv
      return flags.FLAGS(argv)
    return parsed
  except UserError as e:
    _one_line_error(e)
  except flags.Error as e:
    _one_line_error(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by config_flags overrides
    while e.args and isinstance(e.args[0], BaseException):  # config_flags wraps a KeyError
      e = e.args[0]
    for arg in argv[1:]:  # a field that moved: name its new place
      key = arg.split("=", 1)[0].removeprefix("--config.")
      if arg.startswith("--config.") and key in RENAMED:
        _one_line_error(f"bad config override: config.{key} is now config.{RENAMED[key]} (--config.{RENAMED[key]}=...)")
    _one_line_error(f"bad config override: {e.args[0] if e.args else e}")


def initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime when the flags ask for it (before any JAX use)."""
  f = flags.FLAGS
  if not (f.coordinator_address or f.distributed):
    return
  jax.config.update("jax_cpu_collectives_implementation", f.cpu_collectives)
  jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  logging.info(
    "process %d of %d; %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def run(main) -> None:
  """`app.run(main)`; a UserError from main ends the binary with one `error: ...` line, exit 1,
  the last line of its output (CONVJAX_TRACEBACK=1 prints the traceback of the failure that
  caused it first); an Interrupted run with its line and 128 + the signal; a Ctrl-C with one line."""

  def guarded(argv):
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    _report_failures_once()
    initialize_distributed()
    try:
      main(argv)
    except UserError as e:
      if e.__cause__ is not None and os.environ.get(files.TRACEBACK_VARIABLE) == "1":
        traceback.print_exception(e.__cause__)
      _one_line_error(e)
    except Interrupted as e:  # saved; one line, and the signal's exit status
      logging.warning("%s", e)
      logging.flush()
      sys.exit(e.exit_code)
    except KeyboardInterrupt:  # a Ctrl-C outside training, or a second one inside
      logging.flush()
      print("error: interrupted (Ctrl-C); nothing was saved since the last checkpoint", file=sys.stderr)
      sys.exit(128 + signal.SIGINT)

  app.run(guarded, flags_parser=_parse_flags)
