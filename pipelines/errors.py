"""User-facing errors: the CLI prints them as one line and exits non-zero, never with a traceback."""


class DetopsError(Exception):
    """A problem the user can fix (bad input, bad config, missing file). The message names it."""

    exit_code = 1


class DataValidationError(DetopsError):
    """The dataset failed its expectations (exit code 1, like any failed check)."""


class DriftDetected(DetopsError):
    """The drift report found drift: a distinct exit code so that a scheduler can act on it."""

    exit_code = 3
