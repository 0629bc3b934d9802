"""Errors a user can cause, and how the command line reports them.

Anything derived from :class:`TightfitError` is a user mistake or a missing piece of the
environment: the CLI prints its message on one line and exits with ``exit_code`` (2 by default)
instead of showing a traceback.
"""


class TightfitError(Exception):
    """A problem the user can fix: bad input, a missing file, a missing extra."""

    exit_code = 2


class ConfigError(TightfitError):
    """A configuration value is unknown, of the wrong type, or out of range."""


class SpecError(TightfitError):
    """A model, input, device or memory specification cannot be understood."""


class MissingExtraError(TightfitError):
    """An optional dependency is not installed; the message names the extra to install."""


class DistributedRunError(TightfitError):
    """A multi-process run lost one of its processes (killed, crashed, or silent past the timeout)."""

    exit_code = 1
