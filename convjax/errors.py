"""The one exception type for bad user input (config, data, files)."""


class UserError(ValueError):
  """Bad input from the user; its message is one line naming the culprit.

  Binaries print it as a single `error: ...` line and exit 1, before any
  compilation and without touching earlier results.
  """
