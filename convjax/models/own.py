"""A researcher's own model: named by import path or file, Linen or NNX, and found again by a run.

`--config.model` takes, besides convjax's names (and those added by `register` or by an
installed package's `convjax.models` entry point):

  package.module:Class     imported from sys.path (PYTHONPATH included)
  path/to/file.py:Class    loaded from the file

A run records where its model came from in <workdir>/model_source/: source.json (the name,
how it was found, the module or the file's absolute path and SHA-256) and, for a file, a
copy of it, so that a moved or copied run still loads. A Linen module class is used as it
is; a `flax.nnx.Module` class becomes a Linen module through Flax's bridge (`NNXModel`),
and from there every binary takes one code path.
"""

import contextvars
import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import sys

import flax.linen as nn
import jax
from absl import logging
from flax.core import FrozenDict

from convjax.errors import UserError

GROUP = "convjax.models"  # the entry-point group of installed packages' models
SOURCE_DIR = "model_source"  # <workdir>/model_source/{source.json, <the file's copy>}
GUIDE = "docs/your-own-model.md"

# Models loaded from a run's copy of their file, by the name the run recorded.
_FROM_RUN = {}


def is_path(name: str) -> bool:
  """Whether `name` names a class by import path or file (has a ':')."""
  return ":" in name


def is_nnx(factory) -> bool:
  """Whether `factory` is a flax.nnx.Module class. flax.nnx is imported only by programs that
  use it (~0.3 s a process): a class of it exists only once it was."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(factory, type) and issubclass(factory, nnx.Module)


def is_nnx_model(model) -> bool:
  """Whether `model` is an NNX model adapted by `nnx_model_class()`."""
  return "flax.nnx" in sys.modules and isinstance(model, nnx_model_class())


def _python_path() -> str:
  return f"PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}"


def file_and_class(name: str) -> tuple:
  where, _, cls = name.rpartition(":")
  if not where or not cls.isidentifier():
    raise UserError(f"config.model={name!r}: expected package.module:Class or path/to/file.py:Class")
  return where, cls


def is_file_name(where: str) -> bool:
  return where.endswith(".py") or os.sep in where


def digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


@functools.cache
def _load_file(path: str, sha: str):
  """The module of the file at `path` (whose content has digest `sha`), executed once per
  content: a class keeps one identity in a process, whatever reads it."""
  module_name = f"convjax_own_{os.path.splitext(os.path.basename(path))[0]}_{sha[:12]}"
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module  # dataclasses and Linen look modules up there
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    del sys.modules[module_name]
    raise UserError(f"cannot load the model file {path}: {type(e).__name__}: {e}") from None
  return module


def _import(module_name: str, name: str, was: str = ""):
  """The module `module_name`; one that cannot be imported is one UserError naming it, where
  the run found it (`was`) and the path it was looked for on."""
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):  # the module itself, not one it imports
      raise UserError(
        f"config.model={name!r}: no module named {module_name!r} on the path "
        + (f"(the run imported it from {was}; " if was else "(")
        + f"{_python_path()}; the working directory {os.getcwd()!r})"
      ) from None
    raise UserError(f"config.model={name!r}: importing {module_name!r} failed: {e}") from None
  except Exception as e:
    raise UserError(f"config.model={name!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None


def _class_of(module, cls: str, name: str, where: str):
  if not hasattr(module, cls):
    raise UserError(f"config.model={name!r}: {where} has no {cls!r}")
  factory = getattr(module, cls)
  if not callable(factory):
    raise UserError(f"config.model={name!r}: {where}:{cls} is not a class")
  return factory


def resolve_path(name: str):
  """The class that `package.module:Class` or `path/to/file.py:Class` names."""
  if name in _FROM_RUN:
    return _FROM_RUN[name]
  where, cls = file_and_class(name)
  if is_file_name(where):
    path = os.path.abspath(where)
    if not os.path.isfile(path):
      raise UserError(f"config.model={name!r}: no file {path}")
    return _class_of(_load_file(path, digest(path)), cls, name, path)
  return _class_of(_import(where, name), cls, name, f"module {where!r}")


def entry_points() -> dict:
  """{name: entry point} of installed packages' models (group convjax.models)."""
  return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def load_entry_point(name: str):
  point = entry_points()[name]
  try:
    return point.load()
  except Exception as e:
    raise UserError(f"config.model={name!r}: its entry point {point.value!r} ({GROUP}) fails to load: {e}") from None


def absolute(name: str) -> str:
  """`name` with a file path made absolute (what a run records in config.json)."""
  if not is_path(name):
    return name
  where, cls = file_and_class(name)
  return f"{os.path.abspath(where)}:{cls}" if is_file_name(where) else name


def fields(factory) -> dict:
  """{field: default} a model takes as model_kwargs (dataclasses.MISSING: no default): a Linen
  dataclass's fields, a partial's presets over them, an NNX class's (or a function's)
  keyword parameters other than rngs."""
  presets = {}
  while isinstance(factory, functools.partial):
    presets = {**factory.keywords, **presets}
    factory = factory.func
  if dataclasses.is_dataclass(factory) and not is_nnx(factory):
    out = {f.name: f.default for f in dataclasses.fields(factory) if f.init and f.name not in ("parent", "name")}
  else:
    signature = inspect.signature(factory.__init__ if isinstance(factory, type) else factory)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    out = {
      p.name: (dataclasses.MISSING if p.default is inspect.Parameter.empty else p.default)
      for p in signature.parameters.values()
      if p.kind in kinds and p.name not in ("self", "rngs")
    }
  return {**out, **{k: v for k, v in presets.items() if k in out}}


# NNX layer outputs for convjax.viz: Linen's capture_intermediates and intercept_methods see
# only the bridge, so the outputs of an NNX model's submodules are read (and shifted) by
# wrapping their classes' __call__ for the length of one call, as nnx.capture wraps methods
# to sow them; nnx.capture itself only records outputs, and the gradient CAMs also shift them.
_HOOK = contextvars.ContextVar("convjax_nnx_hook", default=None)


class LayerHook:
  """While active (`with hook:`), an NNX model's call records the output of each submodule
  (path: tuple of str) in `outputs`, in call order, and returns the output plus `shift[path]`
  where given."""

  def __init__(self, shift: dict = None):
    self.shift, self.outputs, self.types = dict(shift or {}), {}, {}
    self.depth = {}

  def around(self, path: tuple, call, type_name: str):
    """call() as the layer at `path`, recorded and shifted at its outermost call only: a
    subclass calling its parent's __call__ (both hooked) is one layer."""
    self.depth[path] = self.depth.get(path, 0) + 1
    try:
      out = call()
    finally:
      self.depth[path] -= 1
    if self.depth[path]:
      return out
    self.outputs[path] = out
    self.types[path] = type_name
    return out + self.shift[path] if path in self.shift else out

  def __enter__(self):
    self._token = _HOOK.set(self)
    return self

  def __exit__(self, *exc):
    _HOOK.reset(self._token)


def _with_hook(module, call, hook: LayerHook):
  from flax import nnx

  submodules = [(path, m) for path, m in nnx.iter_modules(module) if path]
  paths = {id(m): tuple(str(p) for p in path) for path, m in submodules}
  classes = {type(m) for _, m in submodules}
  originals = {cls: cls.__dict__.get("__call__") for cls in classes}

  def wrap(cls):
    inner = cls.__call__

    def __call__(self, *args, **kwargs):
      path = paths.get(id(self))
      if path is None:
        return inner(self, *args, **kwargs)
      return hook.around(path, lambda: inner(self, *args, **kwargs), type(self).__name__)

    return __call__

  for cls in classes:
    cls.__call__ = wrap(cls)
  try:
    return call()
  finally:
    for cls, original in originals.items():
      if original is None:
        del cls.__call__
      else:
        cls.__call__ = original


def _run_nnx(module, x, train: bool):
  """One call of the NNX module in train or eval mode (eval: BatchNorm's running statistics,
  no dropout); `train=` is passed too where its __call__ takes it."""
  module.train() if train else module.eval()
  if "train" in inspect.signature(type(module).__call__).parameters:
    call = lambda: module(x, train=train)  # noqa: E731
  else:
    call = lambda: module(x)  # noqa: E731
  hook = _HOOK.get()
  return call() if hook is None else _with_hook(module, call, hook)


def _with_dropout(rngs) -> dict:
  rngs = dict(rngs) if isinstance(rngs, dict) else {"params": rngs}
  return {"dropout": jax.random.fold_in(rngs["params"], 1), **rngs}


@functools.cache
def nnx_model_class():
  """The Linen adapter of NNX classes (below), made on first use (it imports flax.nnx)."""
  from flax.nnx import bridge

  class NNXModel(bridge.ToLinen):
    """A `flax.nnx.Module` class as a Linen module, through Flax's `nnx.bridge.ToLinen`:
    its Param variables are the 'params' collection, BatchStat 'batch_stats', and its
    `rngs` the Linen rngs ('params' at init, 'dropout' in training). Two things the bridge
    leaves to its caller are done here: the module is put in train or eval mode on every
    call (`train=`), and variables are plain arrays (no NNX metadata boxes), as a Linen
    model's are."""

    def __call__(self, x, train: bool = False):
      return super().__call__(x, nnx_method=functools.partial(_run_nnx, train=train))

    # An NNX model takes every stream it uses when it is built (nnx.Dropout(rngs=rngs)), and the
    # bridge builds it from the Linen rngs: init gets a 'dropout' rng too.
    def init(self, rngs, *args, **kwargs):
      return super().init(_with_dropout(rngs), *args, **kwargs)

    def init_with_output(self, rngs, *args, **kwargs):
      return super().init_with_output(_with_dropout(rngs), *args, **kwargs)

  NNXModel.__module__, NNXModel.__qualname__ = __name__, "NNXModel"
  return NNXModel


def build(factory, name: str, overrides: dict):
  """The Linen module of `factory` with `overrides` (checked against its fields)."""
  known = fields(factory)
  unknown = sorted(set(overrides) - set(known))
  if unknown:
    raise UserError(
      f"model {name!r} has no field {unknown[0]!r} (config.model_kwargs.{unknown[0]}); its fields: {', '.join(known)}"
    )
  if is_nnx(factory):
    kwargs = {k: v for k, v in known.items() if v is not dataclasses.MISSING} | dict(overrides)
    missing = sorted(set(known) - set(kwargs))
    if missing:
      raise UserError(f"model {name!r}: its field {missing[0]!r} has no default; set config.model_kwargs.{missing[0]}")
    return nnx_model_class()(factory, kwargs=FrozenDict(kwargs), metadata_fn=None)
  try:
    model = factory(**overrides)
  except TypeError as e:
    raise UserError(f"model {name!r}: bad model_kwargs {sorted(overrides)}: {e}") from None
  if not isinstance(model, nn.Module):
    raise UserError(f"model {name!r} is not a flax.linen.Module nor a flax.nnx.Module class ({type(model).__name__})")
  return model


# What a run records.


def record(name: str, factory, how: str) -> dict:
  """Where the model `name` came from (source.json's content); `how`: builtin, registered,
  entry_point, import or file."""
  out = {"model": name, "how": how, "flax": "nnx" if is_nnx(factory) else "linen"}
  module = getattr(factory, "__module__", None) or getattr(getattr(factory, "func", None), "__module__", None)
  if how in ("registered", "import", "entry_point"):
    out["module"] = module
    out["module_file"] = getattr(sys.modules.get(module), "__file__", None)
  if how == "entry_point":
    out["entry_point"] = entry_points()[name].value
  if how == "file":
    path = file_and_class(name)[0]
    out |= {"file": path, "sha256": digest(path), "copy": os.path.basename(path)}
  return out


def write_record(workdir: str, source: dict) -> None:
  """<workdir>/model_source/: source.json and, for a file, its copy (atomically, process 0)."""
  from convjax import files

  folder = os.path.join(workdir, SOURCE_DIR)
  files.make_dir(folder)
  if "copy" in source:
    with open(source["file"], "rb") as f:
      files.write_bytes(os.path.join(folder, source["copy"]), f.read())
  files.write_json(os.path.join(folder, "source.json"), source)


def read_record(workdir: str):
  path = os.path.join(workdir, SOURCE_DIR, "source.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path}: {e}") from None


def warn_if_changed(workdir: str, name: str) -> None:
  """At a resume: a warning naming the model file if it changed since the run recorded it."""
  source = read_record(workdir)
  if source and source.get("how") == "file" and source.get("model") == name and os.path.isfile(source["file"]):
    if digest(source["file"]) != source["sha256"]:
      logging.warning(
        "the model file %s changed since the run in %s recorded it (its copy: %s)",
        source["file"],
        workdir,
        os.path.join(workdir, SOURCE_DIR, source["copy"]),
      )


def use_run_source(workdir: str, name: str) -> None:
  """Makes `name` (the run's config.model) resolve as the run trained it: a file model from
  the file if unchanged, else from the run's copy (a warning when the file changed); a
  registered model's module imported."""
  source = read_record(workdir)
  if not source or source.get("model") != name:
    return
  if source["how"] == "import":
    _import(file_and_class(name)[0], name, source.get("module_file") or "")
  elif source["how"] == "file":
    path, copy = source["file"], os.path.join(workdir, SOURCE_DIR, source["copy"])
    if os.path.isfile(path) and digest(path) == source["sha256"]:
      return
    if not os.path.isfile(copy):
      raise UserError(f"the run's model file {path} is {'changed' if os.path.isfile(path) else 'gone'} and {copy} too")
    if os.path.isfile(path):
      logging.warning("the model file %s changed since the run; reading the run's copy %s", path, copy)
    cls = file_and_class(name)[1]
    _FROM_RUN[name] = _class_of(_load_file(copy, digest(copy)), cls, name, copy)
  elif source["how"] == "registered":
    from convjax.models import MODELS

    if name not in MODELS:
      _import(source["module"], name, source.get("module_file") or "")
      if name not in MODELS:
        raise UserError(f"config.model={name!r}: importing {source['module']!r} did not register it")
