"""The one error rat_lens raises for bad input, and the checks that raise it.

Every bad value or bad type given to a rat_lens function raises :class:`RatLensError` (a
``ValueError``) with a message that names the argument, the value given and what is accepted.
A call the public functions cannot bind (an unknown keyword, a missing argument) is one
RatLensError too, with the closest parameter name (:func:`checked_call`); ``TypeError`` comes
only from Python itself elsewhere. This module imports no torch, so every other module may use it.

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

import difflib
import functools
import inspect
import math
from collections.abc import Sequence

__all__ = [
    "RatLensError",
    "check_int",
    "check_choice",
    "check_number",
    "check_bool",
    "resolve_index",
    "checked_call",
    "check_tokenizer",
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


def checked_call(function):
    """Decorator: a call Python cannot bind to ``function`` (an unknown keyword, a missing or
    surplus argument) raises one RatLensError naming the closest parameter and every one it
    takes, before the body runs; on a class, its ``__init__`` is wrapped. The signature stays
    the real one (``functools.wraps``: ``help``, ``inspect.signature`` and the docs see it), and
    a TypeError raised inside the body is left as it is.

    Examples:
        >>> @checked_call
        ... def scale(x, *, by=2):
        ...     return x * by
        >>> try:
        ...     scale(3, bye=4)
        ... except RatLensError as err:
        ...     print(err)
        scale() got an unknown keyword 'bye' (did you mean 'by'?); it takes (x, *, by)
        >>> str(inspect.signature(scale))
        '(x, *, by=2)'
    """
    if isinstance(function, type):
        function.__init__ = _checked(function.__init__, function.__name__, skip_self=True)
        return function
    return _checked(function, function.__qualname__, skip_self=False)


def _checked(function, name: str, skip_self: bool):
    signature = inspect.signature(function)
    shown = list(signature.parameters.values())[1 if skip_self else 0 :]

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except TypeError as err:
            try:  # binding failed only if the body never ran: Python binds before it
                signature.bind(*args, **kwargs)
            except TypeError:
                raise RatLensError(_binding_message(name, shown, kwargs, err)) from None
            raise

    return call


def _binding_message(name: str, parameters: list, kwargs: dict, err: TypeError) -> str:
    takes = f"it takes ({_parameter_names(parameters)})"
    names = [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [k for k in kwargs if k not in names]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in parameters):
        close = difflib.get_close_matches(unknown[0], names, n=1)
        close = close or [n for n in names if n.startswith(unknown[0])][:1]  # 'agg': agg_heads
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{name}() got an unknown keyword {unknown[0]!r}{hint}; {takes}"
    reason = str(err).split("() ", 1)[-1]  # Python's own words, after its "name() "
    return f"{name}() {reason}; {takes}"


def _parameter_names(parameters: list) -> str:
    """``model, result, *, token, ablation``: the names alone (annotations would fill lines)."""
    shown = []
    for p in parameters:
        if p.kind == p.KEYWORD_ONLY and not any(s.startswith("*") for s in shown):
            shown.append("*")
        stars = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        shown.append(stars + p.name)
    return ", ".join(shown)


def check_tokenizer(tokenizer):
    """``tokenizer`` if it can at least decode (``decode`` or ``batch_decode``: a trace of
    token ids needs nothing more; text needs it callable, checked when text comes) or is None;
    else RatLensError. Its ``bos_token_id`` must be an int or None: it marks the BOS
    positions of every trace."""
    if tokenizer is None:
        return None
    if not (hasattr(tokenizer, "decode") or hasattr(tokenizer, "batch_decode")):
        raise RatLensError(
            f"tokenizer must be a Hugging Face tokenizer (with decode or batch_decode; "
            f"callable on text to trace text), or None for the model's own, got "
            f"{type(tokenizer).__name__}"
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        check_int("tokenizer.bos_token_id", bos, minimum=0)
    return tokenizer
