"""Attention patterns as TransformerLens gives them, and the checks on trace options.

One axis vocabulary for the whole package: ``hook_pattern`` is ``[batch, head, query, key]``;
after head aggregation the head axis is kept with length 1, so ``cache["pattern", l]`` is always
4-D and the tracer sees ``[head, query, key]`` per prompt whether heads were aggregated or not.
"""

import math
from typing import Optional

import torch
from einops import reduce
from jaxtyping import Float
from torch import Tensor

from ._errors import RatLensError

Pattern = Float[Tensor, "batch head query key"]

AGG_HEADS = ("mean", "max", "none")
LENGTH_NORMS = ("none", "avg_logprob", "sqrt", "pow:<alpha>")
RESIDUALS = ("none", "rollout")


def aggregate_heads(pattern: Float[Tensor, "*batch head query key"], agg_heads: str
                    ) -> Float[Tensor, "*batch agg query key"]:
    """Reduce the head axis to length 1 by ``mean`` or ``max``; ``none`` keeps every head.

    >>> p = torch.tensor([[[[1.0, 0.0], [0.2, 0.8]], [[1.0, 0.0], [0.6, 0.4]]]])
    >>> aggregate_heads(p, "mean").shape
    torch.Size([1, 1, 2, 2])
    >>> aggregate_heads(p, "max")[0, 0, 1].tolist()
    [0.6000000238418579, 0.800000011920929]
    >>> aggregate_heads(p, "none").shape
    torch.Size([1, 2, 2, 2])
    """
    check_choice("agg_heads", agg_heads, AGG_HEADS)
    if agg_heads == "none":
        return pattern
    return reduce(pattern, "... head query key -> ... 1 query key", agg_heads)


def check_choice(name: str, value, choices) -> None:
    """Raise RatLensError naming ``value`` and the accepted ``choices`` unless it is one of them."""
    if not isinstance(value, str) or value not in choices:
        raise RatLensError(f"{name}={value!r} not in {{{', '.join(map(repr, choices))}}}")


def length_norm_denominator(length_norm: str, n_edges: int) -> float:
    """What a path's summed log-attention is divided by, as reverse-attention computes it.

    Python floats on purpose: the score order must match the peer's bit for bit.

    >>> [length_norm_denominator(m, 4) for m in ("none", "avg_logprob", "sqrt", "pow:0.5")]
    [1.0, 4.0, 2.0, 2.0]
    """
    if n_edges == 0 or length_norm == "none":
        return 1.0
    if length_norm == "avg_logprob":
        return float(n_edges)
    if length_norm == "sqrt":
        return math.sqrt(n_edges)
    return n_edges ** parse_pow(length_norm)


def check_length_norm(length_norm: str) -> None:
    """Raise RatLensError unless ``length_norm`` is ``none``, ``avg_logprob``, ``sqrt`` or ``pow:α``."""
    if isinstance(length_norm, str) and length_norm.startswith("pow:"):
        parse_pow(length_norm)
        return
    check_choice("length_norm", length_norm, LENGTH_NORMS)


def parse_pow(length_norm: str) -> float:
    try:
        alpha = float(length_norm[len("pow:"):])
    except ValueError:
        alpha = math.nan
    if not math.isfinite(alpha):
        raise RatLensError(
            f"length_norm={length_norm!r} is malformed: expected 'pow:<alpha>' with a finite "
            "number, e.g. 'pow:0.7'")
    return alpha


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise RatLensError(f"{name} must be >= 1, got {value}")
    return value


def resolve_index(name: str, index, size: int, what: str) -> int:
    """Resolve a Python-style (possibly negative) index into ``range(size)`` or raise."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"{name} must be an int, got {index!r} ({type(index).__name__})")
    resolved = index + size if index < 0 else index
    if not 0 <= resolved < size:
        raise RatLensError(f"{name}={index} out of range for {what} {size}")
    return resolved


def check_pattern_values(pattern: Tensor, where: str) -> None:
    """Attention must be finite: a NaN would silently become 'no candidate' in the search."""
    if not torch.is_floating_point(pattern):
        raise TypeError(f"{where}: attention must be a floating tensor, got dtype {pattern.dtype}")
    # One reduction finds a NaN/inf (they propagate through the sum) without a mask the size of
    # the pattern; only then is the offending entry located.
    if not torch.isfinite(pattern.sum()):
        bad = (~torch.isfinite(pattern)).nonzero()
        if len(bad):
            raise RatLensError(f"{where}: attention contains NaN or inf (first at index "
                               f"{bad[0].tolist()})")


def check_residual(residual: Optional[str]) -> str:
    residual = "none" if residual is None else residual
    check_choice("residual", residual, RESIDUALS)
    return residual


def check_search_options(*, chain: bool, top_beam, top_k, min_attn, length_norm,
                         residual: Optional[str]) -> str:
    """Every beam-search option at once (the tracer calls this before its forward, so a typo
    costs nothing); returns ``residual`` resolved (None → ``"none"``)."""
    check_positive_int("top_beam", top_beam)
    check_positive_int("top_k", top_k)
    check_length_norm(length_norm)
    if isinstance(min_attn, bool) or not isinstance(min_attn, (int, float)) or min_attn != min_attn:
        raise RatLensError(f"min_attn must be a number, got {min_attn!r}")
    residual = check_residual(residual)
    if chain and residual != "none":
        raise RatLensError(f"residual={residual!r} needs layers mode (layers=(lo, hi)): a chain "
                           "stays in one layer")
    return residual
