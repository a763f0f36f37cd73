"""The one error rat_lens raises for bad input, and the checks that raise it.

Every bad value or bad type given to a rat_lens function raises :class:`RatLensError` (a
``ValueError``) with a message that names the argument, the value given and what is accepted.
``TypeError`` comes only from Python itself (an unknown keyword, a missing argument).
This module imports nothing (no torch), so every other module may use it.

Examples:
    >>> check_int("top_beam", "5")
    Traceback (most recent call last):
    ...
    rat_lens.errors.RatLensError: top_beam must be an int, got '5' (str)
    >>> check_choice("agg_heads", "sum", ("mean", "max", "none"))
    Traceback (most recent call last):
    ...
    rat_lens.errors.RatLensError: agg_heads='sum' not in {'mean', 'max', 'none'}
"""

import math
from collections.abc import Sequence

__all__ = [
    "RatLensError",
    "check_int",
    "check_choice",
    "check_number",
    "check_bool",
    "resolve_index",
]


class RatLensError(ValueError):
    """Bad input to rat_lens: the message names the offending value and the accepted ones."""


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; else RatLensError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RatLensError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise RatLensError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else RatLensError naming them all."""
    if not isinstance(value, str) or value not in choices:
        raise RatLensError(f"{name}={value!r} not in {{{', '.join(map(repr, choices))}}}")
    return value


def check_number(name: str, value) -> float:
    """``value`` as a float if it is a finite real number (not a bool); else RatLensError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RatLensError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise RatLensError(f"{name} must be True or False, got {value!r}")
    return value


def resolve_index(name: str, index, size: int, what: str) -> int:
    """Resolve a Python-style (possibly negative) index into ``range(size)`` or raise.

    Examples:
        >>> resolve_index("layer", -1, 12, "n_layers")
        11
    """
    if isinstance(index, bool) or not isinstance(index, int):
        raise RatLensError(f"{name} must be an int, got {index!r} ({type(index).__name__})")
    resolved = index + size if index < 0 else index
    if not 0 <= resolved < size:
        raise RatLensError(
            f"{name}={index} out of range for {what} {size} (valid: {-size}..{size - 1})"
        )
    return resolved
