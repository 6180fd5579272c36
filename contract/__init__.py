"""The contract between the operator and the worker: the spec's types and parsing, errors and exit codes. Both sides
import it; it imports neither."""

__version__ = "0.1.0"  # the one place: pyproject reads it, the operator and the worker import it
