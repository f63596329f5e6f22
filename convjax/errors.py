"""The exceptions a binary turns into one line (bad user input, an interrupted run), and how
convjax reads an exception's chain."""


class UserError(ValueError):
  """Bad input from the user; its message is one line naming the culprit.

  Binaries print it as a single `error: ...` line and exit 1, before any
  compilation and without touching earlier results.
  """


class Interrupted(Exception):
  """A run stopped on SIGTERM/SIGINT after saving; binaries print its one line and exit
  with `exit_code` (128 + the signal, as a shell reports a process the signal ended)."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def chain(error):
  """`error`, then each exception it was raised from (__cause__, else __context__), once each."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def closed_loop_leftover(error) -> bool:
  """A tensorstore completion that arrived after orbax closed its event loop: what a failed
  checkpoint read or write leaves behind, reported once as that failure."""
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
