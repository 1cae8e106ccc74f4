"""User-facing errors.

Every problem caused by the user's input (a bad path, an unknown scheme, a corrupt file) is raised as a
:class:`QDiffuseError`. The command line prints its message on one line and exits non-zero; anything else that
escapes is a bug in qdiffuse and keeps its traceback.
"""


class QDiffuseError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


class ConfigError(QDiffuseError):
    """An invalid quantization setting (unknown scheme, bits out of range, ...)."""


class ModelLoadError(QDiffuseError):
    """A model folder that is missing, malformed or holds corrupt weights."""


class DataError(QDiffuseError):
    """Input data that cannot be used (NaN/inf values, wrong shapes, empty sets)."""


class OutputError(QDiffuseError):
    """An output path that exists, cannot be written, or would overwrite the user's files."""


class QDiffuseWarning(UserWarning):
    """Something the user should know that does not stop the run; the command line prints it on one line."""
