"""The one way convjax writes a file: `output` (and write_json, write_text, save_figure,
make_dir on it). A file is written to PATH.<pid>.tmp and renamed over PATH, so a reader (or a kill)
never sees half of it; a write that fails, here or in a library that writes for convjax
(orbax, tensorstore), is one UserError naming the path and the cause, which a binary prints
as its last line (convjax.cli). tests/test_faults.py checks that no other module writes."""

import contextlib
import errno
import json
import os

from convjax.errors import UserError, chain

# Set to 1 to see the traceback of a failure that a binary reports in one line.
TRACEBACK_VARIABLE = "CONVJAX_TRACEBACK"
HINT = f"({TRACEBACK_VARIABLE}=1 shows the traceback)"

_CAUSES = {
  errno.ENOSPC: "the disk is full",
  errno.EDQUOT: "the disk quota is exceeded",
  errno.EROFS: "the file system is read-only",
  errno.EACCES: "permission denied",
  errno.EPERM: "permission denied",
  errno.ENOTDIR: "a part of the path is a file, not a directory",
  errno.EISDIR: "it is a directory",
  errno.ENOENT: "a directory on the way does not exist",
}
# tensorstore (under orbax) reports a failed write as text.
_TEXT_CAUSES = (
  ("No space left", "the disk is full"),
  ("RESOURCE_EXHAUSTED", "the disk is full"),
  ("Read-only file system", "the file system is read-only"),
  ("Permission denied", "permission denied"),
  ("No such file or directory", "a directory on the way does not exist"),
)


def write_cause(error: BaseException):
  """Why `error`, or an exception it was raised from, failed to write (the disk is full, ...),
  or None when it is no failed write."""
  for e in chain(error):
    if isinstance(e, OSError) and e.errno in _CAUSES:
      return _CAUSES[e.errno]
    for marker, cause in _TEXT_CAUSES:
      if marker in str(e):
        return cause
  return None


@contextlib.contextmanager
def writing(what: str, name_what: bool = False):
  """Turns a failed write of `what` (a path) into one UserError naming the path (the failed
  call's own, unless name_what) and the cause."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types; only failed writes are caught)
    cause = write_cause(e)
    if cause is None:
      raise
    path = e.filename if isinstance(e, OSError) and e.filename and not name_what else what
    raise UserError(f"cannot write {path}: {cause} {HINT}") from e


@contextlib.contextmanager
def output(path: str, mode: str = "w", **open_kwargs):
  """An open file that becomes PATH when the block ends without an error; on an error PATH is
  left as it was. Its directory must exist (make_dir): a folder deleted while a run writes
  into it is an error, not made again."""
  path = os.fspath(path)
  tmp = f"{path}.{os.getpid()}.tmp"  # processes writing the same file do not share one
  with writing(path, name_what=True):
    try:
      with open(tmp, mode, **open_kwargs) as f:
        yield f
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise


def make_dir(path: str) -> str:
  with writing(path):
    os.makedirs(path, exist_ok=True)
  return path


def write_json(path: str, value) -> None:
  with output(path) as f:
    json.dump(value, f, indent=1)


def write_text(path: str, text: str) -> None:
  with output(path) as f:
    f.write(text)


def write_bytes(path: str, data: bytes) -> None:
  with output(path, "wb") as f:
    f.write(data)


def save_figure(fig, path: str, **savefig_kwargs) -> None:
  """A matplotlib figure as PATH (the format from its extension); the figure is closed."""
  import matplotlib.pyplot as plt

  try:
    with output(path, "wb") as f:
      fig.savefig(f, format=os.path.splitext(path)[1][1:] or "png", **savefig_kwargs)
  finally:
    plt.close(fig)
