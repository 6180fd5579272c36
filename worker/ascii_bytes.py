"""Text work on Arrow string columns by byte lookups where a row is pure ASCII (most model output), the Unicode regex
on the other rows. A UTF-8 multi-byte sequence never contains an ASCII byte, so counts and maps of ASCII byte classes
are exact on pure-ASCII rows; the QC filters and the dedup key use this (each tested equal to its regex on random
Unicode texts)."""

from __future__ import annotations

from typing import Any

import numpy as np

BYTE = np.arange(256)
ALNUM = np.isin(BYTE, list(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))  # ASCII [\pL\pN]


def string_bytes(col: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(UTF-8 data, row offsets into it) of a string array, or None when it is not a plain string array."""
    import pyarrow as pa

    if not isinstance(col, pa.StringArray) or len(col) == 0:
        return None
    _, offs, data = col.buffers()
    off = np.frombuffer(offs, np.int32, len(col) + 1, col.offset * 4).astype(np.int64)
    return (np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)), off


def non_ascii(col: Any) -> Any:
    """Per row, whether it holds any non-ASCII character (a null row: no)."""
    import pyarrow.compute as pc

    return pc.invert(pc.fill_null(pc.string_is_ascii(col), True))


def regex_on_non_ascii(col: Any, fast: Any, pattern: str, replacement: str, lower: bool = False) -> Any:
    """`fast` (the byte-map result for every row) with its non-ASCII rows replaced by
    pc.replace_substring_regex(row, pattern, replacement); `lower`: of the row in lower case (pc.utf8_lower)."""
    import pyarrow.compute as pc

    other = non_ascii(col)
    if not pc.any(other).as_py():
        return fast
    sub = col.filter(other)
    sub = pc.utf8_lower(sub) if lower else sub
    return pc.replace_with_mask(fast, other, pc.replace_substring_regex(sub, pattern, replacement))
