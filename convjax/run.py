"""A run on disk: its files (config.json, identity, history, TensorBoard) and `read_run`,
the one reader of a trained run.

  <workdir>/config.json    the resolved config (model_kwargs include num_classes)
            history.json   one record per epoch, then the test record
            model_source/  where the model came from (convjax/models/own.py)
            summary.txt, model.png, plots/, tensorboard/, features/, eval/ (experiments.evaluate)
            checkpoints/   convjax/checkpoints.py

Everything that reads a trained run (init_from, visualisation, predict, evaluate, export)
goes through `read_run(workdir, weights)`, which verifies what it reads; the trainer
resuming a run reads its checkpoints with checkpoints.restore_latest.
"""

import json
import os
import shutil
import socket
import time
from typing import NamedTuple

import jax
from absl import logging
from ml_collections import ConfigDict

from convjax import config as config_lib
from convjax.data import tfds as tfds_data
from convjax.checkpoints import best_kept, first_line, kept, read_verified
from convjax.errors import UserError
from convjax import files
from convjax.models import factory_of, get_model, how_named, own, with_num_classes

# What a run owns in its workdir; `overwrite` removes exactly these.
RUN_FILES = (
  "config.json",
  "history.json",
  "summary.txt",
  "model.png",
  "checkpoints",
  "plots",
  "tensorboard",
  "features",
  "eval",
  "model_source",
)


def check_identity(workdir: str, config: ConfigDict) -> list:
  """The fields in which the run in `workdir` differs from `config` ([] for none or no run).

  Read-only and cheap: set-up calls it before reading any data. A difference is
  a UserError unless config.overwrite.
  """
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    diff = config_lib.differences(config_lib.read_stored(config_path), config_lib.to_dict(config))
  elif os.path.exists(os.path.join(workdir, "checkpoints")):
    diff = ["<no config.json beside checkpoints/>"]
  else:
    diff = []
  if diff and not config.overwrite:
    raise UserError(
      f"{workdir} holds a run of a different config (differs in: {', '.join(diff)}); "
      "use another --workdir, or --config.overwrite=True to replace that run"
    )
  return diff


def claim(workdir: str, config: ConfigDict) -> None:
  """Makes `workdir` this config's run: removes another config's run files (checked to be
  allowed by check_identity), writes config.json. Process 0 writes; all call it."""
  replace = check_identity(workdir, config)
  if jax.process_index() == 0:
    with files.writing(workdir):
      if replace:  # overwrite=True: remove the old run, nothing else in the workdir
        for name in RUN_FILES:
          path = os.path.join(workdir, name)
          if os.path.isdir(path):
            shutil.rmtree(path)
          elif os.path.exists(path):
            os.remove(path)
    files.make_dir(os.path.join(workdir, "plots"))
    files.write_json(os.path.join(workdir, "config.json"), config_lib.to_dict(config))
    own.write_record(workdir, own.record(config.model, factory_of(config.model), how_named(config.model)))


def write_history(workdir: str, history: list) -> None:
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, "history.json"), history)


class TensorBoard:
  """Scalars for TensorBoard in <workdir>/tensorboard (process 0; elsewhere nothing), all on
  the global-step axis.

  One event file, opened only to append the records of each write_scalars call: tensorboardX's
  SummaryWriter writes from a thread of its own (a full disk there is a traceback, then a hang
  on its queue) and holds the file open for the whole run (a file system cannot become
  read-only under an open writer). The records are tensorboardX's Event protos in TFRecord
  framing (convjax.data.tfrecord.frame), which is all an event file is; no TensorFlow needed.
  """

  def __init__(self, workdir: str):
    self._file = None
    if jax.process_index() == 0:
      from tensorboardX.proto.event_pb2 import Event

      folder = files.make_dir(os.path.join(workdir, "tensorboard"))
      self._file = os.path.join(folder, f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}")
      self._append([Event(wall_time=time.time(), file_version="brain.Event:2")])

  def _append(self, events) -> None:
    from convjax.data.tfrecord import frame

    with files.writing(self._file), open(self._file, "ab") as f:
      f.write(b"".join(frame(event.SerializeToString()) for event in events))

  def write_scalars(self, step: int, scalars: dict) -> None:
    if self._file:
      from tensorboardX.proto.event_pb2 import Event
      from tensorboardX.summary import scalar

      now = time.time()
      self._append([Event(wall_time=now, step=step, summary=scalar(k, float(v))) for k, v in scalars.items()])


# Reading a run.


def read_config(workdir: str) -> ConfigDict:
  """The run's config.json as a ConfigDict (fields it predates take their defaults)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir!r} has no config.json: not a training run")
  config = config_lib.from_stored(config_lib.read_stored(path))
  config.data.data_dir = tfds_data.recorded_data_dir(config.data.data_dir)
  return config


# What `weights` name (predict, evaluate, export, visualize): the weights history.json's test
# record used (the EMA where the run kept one, as it evaluated), the latest checkpoint's or the
# best epoch end's trained params, or the latest EMA. config.init_from reads 'latest': the
# latest checkpoint's EMA where the run kept one, else its params.
WEIGHTS = ("tested", "last", "best", "ema")


def select_checkpoint(workdir: str, weights: str) -> tuple:
  """(step, what it holds, in words) of the checkpoint that `weights` (WEIGHTS) names."""
  steps = kept(workdir)
  if weights not in (*WEIGHTS, "latest"):
    raise UserError(f"unknown --weights={weights!r}; valid: {', '.join(WEIGHTS)}")
  if not steps:
    raise UserError(f"{workdir} has no checkpoints")
  if weights in ("last", "ema", "latest"):
    step = max(steps)
    return step, f"the latest checkpoint (step {step}, {steps[step].get('epochs', '?')} epochs)"
  if weights == "best":
    best = best_kept(workdir)
    if best is None:
      raise UserError(f"--workdir={workdir} keeps no epoch-end checkpoint with a validation score")
    return best[0], f"the best epoch end (epoch {best[1]}, step {best[0]})"
  history = read_history(workdir)
  tested = [r["test_epoch"] for r in history if "test_epoch" in r]
  if not tested:
    step = max(steps)
    return step, f"the latest checkpoint (step {step}; the run has no test record)"
  ends = [s for s, p in steps.items() if p.get("epoch_end") and p.get("epochs") == tested[-1]]
  if not ends:
    raise UserError(
      f"the weights the run tested (epoch {tested[-1]}) are no longer kept in {workdir}/checkpoints;"
      " use --weights=last or --weights=best"
    )
  return ends[-1], f"the weights the run tested (epoch {tested[-1]}, step {ends[-1]})"


def read_history(workdir: str) -> list:
  path = os.path.join(workdir, "history.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return []
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path}: {first_line(e)}") from None


def run_variables(workdir: str, weights: str = "tested") -> tuple:
  """(step, {'params': ..., **model_state} as numpy, what they are in words) of the run's
  checkpoint that `weights` names (WEIGHTS, or 'latest'), verified."""
  step, what = select_checkpoint(workdir, weights)
  state = read_verified(workdir, step)
  ema = state.get("ema_params")
  if weights == "ema" and not ema:
    raise UserError(f"--weights=ema: the run in {workdir} kept no EMA (config.ema_decay was 0)")
  use_ema = ema and weights in ("tested", "ema", "latest")
  params = ema if use_ema else state["params"]
  what += ", its EMA" if use_ema else ""
  logging.info("weights: %s", what)
  return step, jax.device_get({"params": params, **(state["model_state"] or {})}), what


class Run(NamedTuple):
  """A trained run as every reader sees it (read_run)."""

  config: ConfigDict
  model: object  # the Linen module it trained
  variables: dict  # {'params': ..., **model_state}, numpy
  step: int  # the checkpoint read
  weights: str  # which weights, in words


def read_run(workdir: str, weights: str = "tested") -> Run:
  """The one reader of a finished or running run (predict, evaluate, export, visualize,
  config.init_from): its config, its model found where the run recorded it, and the verified
  variables of the checkpoint `weights` names (run.WEIGHTS, or 'latest')."""
  config = read_config(workdir)
  model = model_of(config, workdir)
  step, variables, what = run_variables(workdir, weights)
  return Run(config, model, variables, step, what)


def model_of(config: ConfigDict, workdir: str):
  """The run's model as it trained: its config's model (found where the run recorded it:
  own.use_run_source) and model_kwargs (num_classes included; a run of an earlier convjax
  that did not record it takes its dataset's)."""
  own.use_run_source(workdir, config.model)
  kwargs = dict(config.model_kwargs)
  if "num_classes" not in kwargs:
    from convjax.data.splits import open_source

    kwargs = with_num_classes(config.model, kwargs, len(open_source(config.data).classes))
  return get_model(config.model, **kwargs)
