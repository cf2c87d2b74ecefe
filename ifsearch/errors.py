"""One exception family for every user-facing error, so callers can catch ``IfsearchError``.

Messages follow one rule: say the rule that was broken, name the file/key/value involved, and say
how to fix it.
"""


class IfsearchError(Exception):
    """Base class of all errors ifsearch raises on purpose."""


class ConfigError(IfsearchError, ValueError):
    """A configuration file, override or search space is invalid."""


class DataError(IfsearchError):
    """A dataset is missing, malformed or inconsistent."""


class CheckpointError(IfsearchError):
    """A checkpoint cannot be read or does not match the configuration."""


class DivergenceError(IfsearchError):
    """Training produced a non-finite loss at ``epoch``, ``step``.

    ``python -m ifsearch.train`` stops with it (exit 2). In a sweep it is not raised through
    Ray (Train and Tune retry every error, each retry reproducing the same NaN from the same
    checkpoint): the Train worker turns it into a final result flagged ``diverged``, so the
    trial fails once, without retries (see ``trainables/worker.py``).
    """

    def __init__(self, message: str, epoch: int | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step
