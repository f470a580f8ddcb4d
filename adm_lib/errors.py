"""The error of a run or a setting that cannot work.

Foundation (hand-written). Every layer raises it with one line that names
the culprit (the setting, argument, file or folder); the `adm` command
prints that line and names its own flags.
"""

__all__ = ["TrainError", "with_article"]


class TrainError(RuntimeError):
    """A run cannot start or go on; the message names the culprit."""


def with_article(noun: str) -> str:
    """`noun` with its article, for messages: "a classifier", "an upsampler"."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"
