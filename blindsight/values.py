"""Checks of values read from users and files (profiles, thresholds, layer lists), shared by their parsers.

Python's ``True == 1`` and ``int(2.7) == 2`` would silently turn a wrong value into a plausible one; these
helpers refuse bools and fractions instead, and cut a huge wrong value short in an error message.
"""

from __future__ import annotations

import numbers
import operator

__all__ = ["is_int", "is_int_in", "is_number", "as_integer", "show"]


def is_int(v) -> bool:
    """An integer in the JSON sense: ``True == 1`` in Python, but a bool in a size or version field is a mistake."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_int_in(v, low: int, high: int) -> bool:
    """An integer (not a bool) with ``low <= v <= high``: a size, an id or a count within what a model can have."""
    return is_int(v) and low <= v <= high


def is_number(v) -> bool:
    """A real number, not a bool (``True`` would be taken as 1.0)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def as_integer(v) -> int | None:
    """``v`` as an int if it is an integer (int, numpy int, or a float such as 2.0), else None. Not bools."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return int(v) if isinstance(v, float) and v.is_integer() else None


def show(v, limit: int = 60) -> str:
    """``repr(v)`` cut short: error messages stay one readable line even for a huge wrong value."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."
