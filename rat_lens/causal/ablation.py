"""Ablation arithmetic for :func:`rat_lens.verify`: pure tensor functions, no model in sight.

An *entry* is one weight of ``hook_pattern``, addressed ``(batch, head, query, key)``; an
*edge* of a trace is ``(layer, head, query, key)`` with ``head`` None when heads were aggregated
(the edge then stands for that entry in every head).
"""

import math
from collections.abc import Sequence
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import RatLensError, check_choice

__all__ = [
    "ABLATIONS",
    "ablate_pattern",
    "spearman",
    "curve_area",
    "random_path",
    "expand_heads",
    "row_entries",
]

ABLATIONS = ("renorm", "zero", "mean")

Edge = tuple[int, Optional[int], int, int]  # (layer, head or None, query, key)


def ablate_pattern(
    pattern: Float[Tensor, "batch head query key"],
    entries: Int[Tensor, "n 4"],
    ablation: str = "renorm",
) -> Float[Tensor, "batch head query key"]:
    """A copy of ``pattern`` with ``entries`` (rows of ``[batch, head, query, key]``) ablated.

    ``zero`` sets them to 0; ``renorm`` sets them to 0 and rescales the rest of each touched row
    so it sums to what it summed to before (a row with nothing left stays 0); ``mean`` sets each
    to the row's mean weight over the keys its query may see (``row sum / (query + 1)``, causal).

    Examples:
        >>> p = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.6, 0.2, 0.2]]]])
        >>> entries = torch.tensor([[0, 0, 2, 0]])                 # batch 0, head 0, query 2, key 0
        >>> ablate_pattern(p, entries, "renorm")[0, 0, 2].tolist()
        [0.0, 0.5, 0.5]
        >>> ablate_pattern(p, entries, "zero")[0, 0, 2].tolist()
        [0.0, 0.20000000298023224, 0.20000000298023224]
        >>> [round(w, 4) for w in ablate_pattern(p, entries, "mean")[0, 0, 2].tolist()]
        [0.3333, 0.2, 0.2]
    """
    check_choice("ablation", ablation, ABLATIONS)
    if entries.ndim != 2 or entries.shape[1] != 4:
        raise RatLensError(
            f"entries must be [n, 4] (batch, head, query, key), got shape {tuple(entries.shape)}"
        )
    return _ablate(pattern, entries, ablation)


def _ablate(pattern: Tensor, entries: Tensor, ablation: str) -> Tensor:
    """:func:`ablate_pattern` without checks (it runs inside hooks)."""
    out = pattern.clone()
    if entries.numel() == 0:
        return out
    b, h, q, k = entries.to(pattern.device).long().unbind(-1)
    before = pattern.sum(-1)  # [batch, head, query]
    if ablation == "mean":
        out[b, h, q, k] = before[b, h, q] / (q + 1).to(pattern.dtype)
        return out
    out[b, h, q, k] = 0.0
    if ablation == "renorm":
        touched = torch.zeros_like(before, dtype=torch.bool)
        touched[b, h, q] = True
        after = out.sum(-1).clamp(min=torch.finfo(pattern.dtype).tiny)
        out = out * torch.where(touched, before / after, torch.ones_like(before)).unsqueeze(-1)
    return out


def expand_heads(edges: Sequence[Edge], n_heads: int) -> dict[int, Int[Tensor, "n 3"]]:
    """Per layer, the ``[head, query, key]`` entries of ``edges`` (a None head means every head).

    >>> expand_heads([(1, None, 4, 2), (0, 3, 2, 1)], n_heads=2)
    {1: tensor([[0, 4, 2],
            [1, 4, 2]]), 0: tensor([[3, 2, 1]])}
    """
    out: dict[int, list] = {}
    for layer, head, query, key in edges:
        heads = range(n_heads) if head is None else [head]
        out.setdefault(layer, []).extend((h, query, key) for h in heads)
    return {
        layer: torch.tensor(rows, dtype=torch.long).reshape(-1, 3) for layer, rows in out.items()
    }


def row_entries(
    layer_rows: dict[int, Sequence[int]], n_heads: int, keep: dict[int, Tensor]
) -> dict[int, Int[Tensor, "n 3"]]:
    """Every causal entry ``[head, query, key <= query]`` of the given rows, minus ``keep``.

    >>> row_entries({0: [1]}, n_heads=1, keep={0: torch.tensor([[0, 1, 0]])})
    {0: tensor([[0, 1, 1]])}
    """
    out = {}
    for layer, queries in layer_rows.items():
        blocks = [
            torch.stack(
                torch.meshgrid(
                    torch.arange(n_heads), torch.tensor([q]), torch.arange(q + 1), indexing="ij"
                ),
                -1,
            ).reshape(-1, 3)
            for q in sorted(set(queries))
        ]
        entries = torch.cat(blocks) if blocks else torch.zeros(0, 3, dtype=torch.long)
        kept = keep.get(layer)
        if kept is not None and len(kept):
            size = max(int(entries.max()), int(kept.max())) + 1
            entries = entries[~torch.isin(_code(entries, size), _code(kept, size))]
        out[layer] = entries
    return out


def _code(entries: Tensor, size: int) -> Tensor:
    """One integer per ``[head, query, key]`` row, for set operations."""
    return (entries[:, 0] * size + entries[:, 1]) * size + entries[:, 2]


def random_path(
    target: int, n_edges: int, *, chain: bool, generator: torch.Generator, exclude_bos: bool = False
) -> list[int]:
    """Positions of a random path of ``n_edges`` edges backward from ``target``.

    Each step draws a key uniformly from the keys its query may read: ``k <= q`` in layers mode,
    ``k < q`` in chain mode (leaving room for the steps still to come); position 0 is left out
    when ``exclude_bos``, as the tracer leaves it out of the candidates.

    >>> g = torch.Generator().manual_seed(0)
    >>> path = random_path(9, 2, chain=False, generator=g)
    >>> len(path), path[0], path[0] >= path[1] >= path[2]
    (3, 9, True)
    >>> random_path(3, 3, chain=True, generator=g)
    [3, 2, 1, 0]
    """
    path = [target]
    for step in range(n_edges):
        query = path[-1]
        lo = int(exclude_bos) + (n_edges - step - 1 if chain else 0)
        hi = query if chain else query + 1  # keys lo .. hi - 1
        if hi <= lo:
            raise RatLensError(
                f"no key for step {step} of a random path of {n_edges} edges "
                f"from target {target} (query {query}, chain={chain})"
            )
        path.append(int(torch.randint(lo, hi, (1,), generator=generator)))
    return path


def spearman(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> Optional[float]:
    """Spearman's rank correlation (ties get their average rank); None when either is constant.

    Examples:
        >>> spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 40.0, 30.0]))
        0.8
        >>> spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([3.0, 2.0, 1.0]))
        -0.866...
    """
    if x.shape != y.shape or x.ndim != 1:
        raise RatLensError(
            f"spearman needs two vectors of one length, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    rx, ry = _ranks(x.double()), _ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float((rx.square().sum() * ry.square().sum()).sqrt())
    if len(x) < 2 or denom == 0.0:
        return None
    return round(float((rx * ry).sum()) / denom, 12)


def _ranks(v: Tensor) -> Tensor:
    """1-based ranks, ties averaged: #smaller + (#equal + 1) / 2."""
    smaller = (v[None, :] < v[:, None]).sum(1).double()
    equal = (v[None, :] == v[:, None]).sum(1).double()
    return smaller + (equal + 1) / 2


def curve_area(percents: Sequence[float], values: Sequence[Optional[float]]) -> Optional[float]:
    """Area under a faithfulness curve over the kept fraction, from (0, 0) to (1, f(100%)),
    by the trapezoid rule (nothing kept is all ablated: faithfulness 0 by definition).

    >>> curve_area([50.0, 100.0], [1.0, 1.0])
    0.75
    """
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    xs = [0.0] + [p / 100 for p in percents]
    ys = [0.0] + list(values)
    return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
