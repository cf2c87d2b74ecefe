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
    """Training produced a non-finite loss; the trial is failed, not retried into garbage."""
