"""The project's error classes: what a run explains to its user, by type, not by wording.

`main.py` prints an `ExplainedError` as `error: <the whole message>` (every line of it) and exits
1, with no traceback; anything else is a bug and keeps its traceback. Raise the most specific
class; each also derives from the builtin that callers and tests already catch (ValueError,
FileNotFoundError, OSError, RuntimeError).
"""


class ExplainedError(Exception):
    """A fault whose message says all the user needs: what, where (field, file, folder), and
    what to do. Printed whole, without a traceback."""


class InputError(ExplainedError, ValueError):
    """Bad input: a config field (named as `config.a.b`), a flag, a data file or folder, a
    setting the data cannot satisfy. Raised before any long compile or training."""


class MissingInputError(ExplainedError, FileNotFoundError):
    """A file, folder, dataset or split that the input names does not exist."""


class WriteError(ExplainedError, OSError):
    """A result or checkpoint could not be written (disk full, permissions, read-only file
    system); the message names the path and the system's reason."""
