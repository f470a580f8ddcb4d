"""The error of a run or a setting that cannot work.

Foundation (hand-written). Every layer raises it with one line that names
the culprit (the setting, argument, file or folder); the `adm` command
prints that line and names its own flags.
"""

__all__ = ["TrainError"]


class TrainError(RuntimeError):
    """A run cannot start or go on; the message names the culprit."""
