"""Errors and exit codes shared by the CLI, both backends and the worker: a leaf module, so neither side imports the
other for them."""

from __future__ import annotations

# Exit codes of every genrun command. The worker's tell the operator whether a retry can help (the Jobs'
# podFailurePolicy and the planner's retry bound read them).
EXIT_OK = 0
EXIT_FAILED = 1  # retriable: a crash, an OOM kill, a storage hiccup
EXIT_USAGE = 2  # bad input or arguments: retrying cannot help
EXIT_RUN_FAILED = 3  # `genrun run`: the run ended Failed (budget, shards)
EXIT_STORAGE = 4  # storage unreachable or refusing: retriable (the store may come back)
EXIT_MODEL = 5  # the model cannot be found or loaded: retrying cannot help
EXIT_RESTART = 75  # an engine host stopped because its next job needs another engine: start a new host (EX_TEMPFAIL)
EXIT_INTERRUPTED = 130
NON_RETRIABLE_EXIT_CODES = (EXIT_USAGE, EXIT_MODEL)


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code EXIT_USAGE."""


class Rejected(Exception):
    """A child the backend will never be able to start as written (the API server refused it, or it is too large):
    the run fails with `reason` and this message, and is not retried until the spec changes."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
