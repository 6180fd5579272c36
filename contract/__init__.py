"""The contract between the operator and the worker: the spec's types and parsing, errors and exit codes. Both sides
import it; it imports neither."""
