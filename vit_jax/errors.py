"""The errors a user can fix: a config value, a data set, a missing file, a checkpoint or weights
file, an unsupported model variant. Their messages name what is wrong and how to fix it, and the
command lines (vit_jax.main, vit_jax.plan, vit_jax.predict) print them alone on one `error:` line
with exit status 2. Any other exception is a bug of ours and keeps its traceback.

Each is also the built-in type callers already catch (a ConfigError is a ValueError, a
MissingFileError a FileNotFoundError, ...).
"""


class UserError(Exception):
  """Something the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the key."""


class DataError(UserError, ValueError):
  """A data set that cannot be read as configured (an unknown name, a split, a folder layout)."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the run needs is not there (data, weights, a workdir's exports)."""


class CheckpointError(UserError, ValueError):
  """A checkpoint or weights file that is damaged or does not fit the model."""


class UnsupportedError(UserError, NotImplementedError):
  """A model variant or file layout that this project does not convert (yet)."""
