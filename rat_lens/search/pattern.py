"""Attention patterns as TransformerLens gives them: head aggregation and value checks.

One axis vocabulary for the whole package: ``hook_pattern`` is ``[batch, head, query, key]``;
after head aggregation the head axis is kept with length 1, so ``cache["pattern", l]`` is always
4-D and the search sees ``[head, query, key]`` per prompt whether heads were aggregated or not.
"""

import torch
from einops import reduce
from jaxtyping import Float
from torch import Tensor

from ..errors import RatLensError, check_choice
from ..options import AGG_HEADS

__all__ = ["Pattern", "aggregate_heads", "check_pattern_values"]

Pattern = Float[Tensor, "batch head query key"]


def aggregate_heads(
    pattern: Float[Tensor, "*batch head query key"], agg_heads: str
) -> Float[Tensor, "*batch agg query key"]:
    """Reduce the head axis to length 1 by ``mean`` or ``max``; ``none`` keeps every head.

    Examples:
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


def check_pattern_values(pattern: Tensor, where: str) -> None:
    """Attention must be finite: a NaN would silently become 'no candidate' in the search."""
    if not torch.is_floating_point(pattern):
        raise RatLensError(
            f"{where}: attention must be a floating tensor, got dtype {pattern.dtype}"
        )
    # One reduction finds a NaN/inf (they propagate through the sum) without a mask the size of
    # the pattern; only then is the offending entry located.
    if not torch.isfinite(pattern.sum()):
        bad = (~torch.isfinite(pattern)).nonzero()
        if len(bad):
            raise RatLensError(
                f"{where}: attention contains NaN or inf (first at index {bad[0].tolist()})"
            )
