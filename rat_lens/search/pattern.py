"""Attention patterns as TransformerLens gives them: head aggregation and value checks.

One axis vocabulary for the whole package: ``hook_pattern`` is ``[batch, head, query, key]``;
after head aggregation the head axis is kept with length 1, so ``cache["pattern", l]`` is always
4-D and the search sees ``[head, query, key]`` per prompt whether heads were aggregated or not.

One dtype rule too: a half-precision model (float16, bfloat16) gives half-precision patterns, but
every reduction, share and sum over them, and the search itself, runs in float32
(:func:`at_least_float32`): a bfloat16 mean of four heads has 8 bits of mantissa, enough to tie
rows that float32 tells apart, and a float16 sum overflows to inf past 65,504.
"""

import torch
from einops import reduce
from jaxtyping import Float
from torch import Tensor

from ..errors import RatLensError, check_choice
from ..options import AGG_HEADS

__all__ = ["aggregate_heads", "at_least_float32", "check_pattern_values"]



def at_least_float32(x: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """``x`` in float32 when its dtype is narrower (float16, bfloat16), else ``x`` itself
    (float32 and float64 are left alone: no copy).

    Examples:
        >>> at_least_float32(torch.ones(2, dtype=torch.bfloat16)).dtype
        torch.float32
        >>> at_least_float32(torch.ones(2, dtype=torch.float64)).dtype
        torch.float64
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))


def aggregate_heads(
    pattern: Float[Tensor, "*batch head query key"], agg_heads: str
) -> Float[Tensor, "*batch agg query key"]:
    """Reduce the head axis to length 1 by ``mean`` or ``max``; ``none`` keeps every head. The
    result is at least float32 (:func:`at_least_float32`), whatever the model's dtype: the mean is
    taken after the upcast, so it does not round in half precision.

    Examples:
        >>> p = torch.tensor([[[[1.0, 0.0], [0.2, 0.8]], [[1.0, 0.0], [0.6, 0.4]]]])
        >>> aggregate_heads(p, "mean").shape
        torch.Size([1, 1, 2, 2])
        >>> aggregate_heads(p, "max")[0, 0, 1].tolist()
        [0.6000000238418579, 0.800000011920929]
        >>> aggregate_heads(p, "none").shape
        torch.Size([1, 2, 2, 2])
        >>> aggregate_heads(p.bfloat16(), "mean").dtype
        torch.float32
    """
    check_choice("agg_heads", agg_heads, AGG_HEADS)
    pattern = at_least_float32(pattern)
    if agg_heads == "none":
        return pattern
    return reduce(pattern, "... head query key -> ... 1 query key", agg_heads)


def check_pattern_values(pattern: Tensor, where: str) -> None:
    """Attention must be finite: a NaN would silently become 'no candidate' in the search."""
    if not torch.is_floating_point(pattern):
        raise RatLensError(
            f"{where}: attention must be a floating tensor, got dtype {pattern.dtype}"
        )
    # One reduction finds a NaN/inf (they propagate through the sum) without a mask the size of
    # the pattern; only then is the offending entry located. Summed into float32: a float16 sum
    # overflows to inf once batch x heads x queries rows of 1 pass 65,504.
    if not torch.isfinite(pattern.sum(dtype=torch.float32)):
        bad = (~torch.isfinite(pattern)).nonzero()
        if len(bad):
            raise RatLensError(
                f"{where}: attention contains NaN or inf (first at index {bad[0].tolist()})"
            )
