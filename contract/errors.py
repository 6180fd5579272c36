"""Errors and exit codes shared by the CLI and both backends: a leaf module, so neither imports the other for them."""

from __future__ import annotations

EXIT_RUN_FAILED = 3  # `genrun run`: the run ended Failed (budget, shards)
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code EXIT_USAGE."""


class Rejected(Exception):
    """A child the backend will never be able to start as written (the API server refused it, or it is too large):
    the run fails with `reason` and this message, and is not retried until the spec changes."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
