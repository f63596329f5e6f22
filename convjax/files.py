"""Writing files: a write that fails is one UserError naming the path and the cause, and
JSON is written atomically (a reader, or a kill, never sees half a file)."""

import contextlib
import errno
import json
import os

from convjax.errors import UserError

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


@contextlib.contextmanager
def writing(what: str):
  """Turns a failed write of `what` (a path) into one UserError naming the path and the cause:
  OSError, and orbax's own errors for a full or read-only disk (tensorstore reports them as text)."""
  try:
    yield
  except OSError as e:
    cause = _CAUSES.get(e.errno, e.strerror or type(e).__name__)
    raise UserError(f"cannot write {e.filename or what}: {cause}") from None
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types; only known causes are caught)
    text = str(e)
    for marker, cause in (
      ("No space left", "the disk is full"),
      ("RESOURCE_EXHAUSTED", "the disk is full"),
      ("Read-only file system", "the file system is read-only"),
      ("Permission denied", "permission denied"),
    ):
      if marker in text:
        raise UserError(f"cannot write {what}: {cause}") from None
    raise


def write_json(path: str, value) -> None:
  """Atomic: a reader (or a kill) never sees half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)
