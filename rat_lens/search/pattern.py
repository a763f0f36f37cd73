"""Attention patterns as TransformerLens gives them: head aggregation and value checks.

One axis vocabulary for the whole package: ``hook_pattern`` is ``[batch, head, query, key]``;
after head aggregation the head axis is kept with length 1, so ``cache["pattern", l]`` is always
4-D and the search sees ``[head, query, key]`` per prompt whether heads were aggregated or not.

One dtype rule too: a half-precision model (float16, bfloat16) gives half-precision patterns, but
every reduction, share and sum over them, and the search itself, runs in float32
(:func:`at_least_float32`): a bfloat16 mean of four heads has 8 bits of mantissa, enough to tie
rows that float32 tells apart, and a float16 sum overflows to inf past 65,504.
"""

import operator
from collections.abc import Sequence
from typing import Optional

import torch
from einops import reduce
from jaxtyping import Float
from torch import Tensor

from ..errors import RatLensError, check_choice
from ..options import AGG_HEADS

__all__ = [
    "RowsOnly",
    "aggregate_heads",
    "at_least_float32",
    "check_pattern_values",
    "check_attention",
    "check_keys",
]


class RowsOnly(Tensor):
    """Base of the ``[channel, query, key]`` tensors the search reads by rows alone
    (``x[:, rows]``, a subclass's ``__getitem__``): a bounded store, shares computed for the rows
    read, recomputed attention, rescaled weights. They never hold the whole pattern, so any
    other use is one error naming what the subclass holds (``HOLDS``) instead of a wrong
    answer from an empty wrapper.
    """

    HOLDS = "these weights"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RatLensError(
            f"{cls.HOLDS} are read by rows only (x[:, rows]), not by {func}: they are never "
            "held for the whole pattern"
        )


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


def check_attention(attn, shares: bool = False) -> Float[Tensor, "*layer_head query key"]:
    """``attn`` as :func:`~rat_lens.search.beam.trace_attention` reads it, or one RatLensError.

    ``[query, key]``, ``[layer, query, key]`` or ``[layer, head, query, key]``, non-empty,
    floating, finite, holding numbers (not on ``meta``), with no negative weight and no row
    summing to more than 1 (a softmax row; with ``shares``, one row over every part and key),
    not all zero. Pre-softmax scores (``hook_attn_scores``) fail here rather than giving a
    trace. A tensor that requires grad is accepted and detached: the search reads numbers and
    never differentiates, and TransformerLens patterns of a forward with grad enabled are such.

    Examples:
        >>> check_attention(torch.tensor([[1.0, 0.0], [0.5, 0.6]]))
        Traceback (most recent call last):
        ...
        rat_lens.errors.RatLensError: trace_attention: attention rows must sum to at most 1 ...
    """
    if not isinstance(attn, Tensor):
        raise RatLensError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    if attn.ndim not in (2, 3, 4) or attn.shape[-1] != attn.shape[-2] or attn.numel() == 0:
        raise RatLensError(
            f"attn must be [query, key], [layer, query, key] or [layer, head, query, key] with "
            f"query == key > 0, got shape {tuple(attn.shape)}"
        )
    if attn.is_meta:
        raise RatLensError("attn is on the meta device, which holds no numbers: load it first")
    attn = attn.detach()
    check_pattern_values(attn, "trace_attention")
    if bool((attn < 0).any()):
        raise RatLensError(
            f"trace_attention: attention must be >= 0 (softmax weights, hook_pattern, not "
            f"hook_attn_scores), got {float(attn.min()):.4g} at {(attn < 0).nonzero()[0].tolist()}"
        )
    rows = attn.sum(-1, dtype=torch.float32)
    if shares and attn.ndim == 4:  # one row is every part's share of every key
        rows = rows.sum(-2)
    slack = 1e-3 if attn.element_size() >= 4 else 1e-2  # half precision rounds each weight
    if bool((rows > 1 + slack).any()):
        row = (rows > 1 + slack).nonzero()[0]
        raise RatLensError(
            f"trace_attention: attention rows must sum to at most 1 (softmax weights), but row "
            f"{row.tolist()} sums to {float(rows[tuple(row)]):.4g}"
        )
    if not bool(rows.any()):
        raise RatLensError("trace_attention: attention is all zero: there is nothing to trace")
    return attn


def check_keys(
    attention_mask, bos_positions, n: int, device: torch.device
) -> tuple[Optional[Tensor], list[int]]:
    """``trace_attention``'s key inputs checked against ``n`` keys: the mask as a ``[n]`` long
    tensor of 0 and 1 on ``device`` (a list is accepted; a tensor on another device is
    moved), and BOS positions as ints in ``0..n-1``; else one RatLensError.

    Examples:
        >>> check_keys([1, 0, 1], (0,), 3, torch.device("cpu"))
        (tensor([1, 0, 1]), [0])
        >>> check_keys(None, [1.5], 3, torch.device("cpu"))
        Traceback (most recent call last):
        ...
        rat_lens.errors.RatLensError: bos_positions must be a list of positions (ints in 0..2), ...
    """
    mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, (Tensor, list, tuple)):
            raise RatLensError(
                f"attention_mask must be a tensor (or list) of 0 and 1, got "
                f"{type(attention_mask).__name__}"
            )
        if isinstance(attention_mask, Tensor) and attention_mask.is_meta:
            raise RatLensError("attention_mask is on the meta device, which holds no numbers")
        mask = torch.as_tensor(attention_mask).detach()
        if mask.shape != (n,) or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise RatLensError(
                f"attention_mask has shape {tuple(mask.shape)} and dtype {mask.dtype}: it must "
                f"be [{n}] (the attention's key axis) holding only 0 and 1"
            )
        mask = mask.long().to(device)
    return mask, _bos_list(bos_positions, n)


def _bos_list(bos_positions, n: int) -> list[int]:
    bad = RatLensError(
        f"bos_positions must be a list of positions (ints in 0..{n - 1}), got {bos_positions!r}"
    )
    if isinstance(bos_positions, Tensor):
        bos_positions = bos_positions.tolist() if bos_positions.ndim == 1 else None
    if not isinstance(bos_positions, Sequence) or isinstance(bos_positions, str):
        raise bad
    positions = []
    for p in bos_positions:
        try:
            position = operator.index(p)
        except TypeError:
            raise bad from None
        if isinstance(p, bool) or not 0 <= position < n:
            raise bad
        positions.append(position)
    return positions
