"""The exceptions a binary turns into one line: bad user input, and an interrupted run."""


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
