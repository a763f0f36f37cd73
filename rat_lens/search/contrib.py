"""What each head actually wrote: attention edges weighted by their contribution to the output.

An attention block's output at query ``q`` is a sum of parts (Ferrando & Voita 2024, the LLM
Transparency Tool's decomposition)::

    y_q = x_q + Σ_h Σ_{k ≤ q} A[h, q, k] · v_k[kv(h)] · W_O[h] + b_O

``x_q`` is the residual stream coming in (``hook_resid_pre``), ``v`` the values (``hook_v``; a
grouped-query model has fewer KV heads: query head ``h`` reads KV head ``h // (H / H_kv)``),
``W_O`` / ``b_O`` the output projection. The layer norm before attention is inside ``v`` (the
values are computed from the normalised stream) and the output lives in residual space, so no
normalisation is folded anywhere. ``b_O`` is in ``y`` but is no part: it writes the same vector
whatever was attended to.

Two weights per part, each a share of the parts of one row (they sum to 1 over the residual and
every (head, key) of the row):

- ``"contribution"``: proximity ``max(0, ‖y‖₁ − ‖y − part‖₁)``, renormalised over the parts
  (Ferrando & Voita 2024);
- ``"value_norm"``: ``‖part‖₂``, renormalised over the parts (Kobayashi et al. 2020): sinks
  whose value vectors are small carry little.

The result is a ``[head + 1, query, key]`` tensor: channels ``0..H-1`` are the heads' edges,
channel ``H`` the residual stream, which sits on the diagonal (``k = q``: the path stays at its
position). Value norms need no per-row vectors at all: ``‖A[h, q, k] · v_k W_O[h]‖ =
A[h, q, k] · ‖v_k W_O[h]‖`` (attention is never negative), one ``[head, key]`` tensor of norms
for every row. Proximity shares do need every ``[head, key, d_model]`` term of a row; they are
computed a block of query rows at a time, as many rows as ``budget`` bytes of working memory
hold (:data:`ROW_BLOCK_BYTES` by default; at least one row), so memory never grows with
``seq² × heads × d_model`` and a GPU gets blocks of many rows, not one small kernel per row.
Everything is computed in float32 whatever the model's dtype.

Examples:
    >>> import torch
    >>> A = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])          # one head, two positions
    >>> v = torch.tensor([[[1.0]], [[3.0]]])                  # [pos, kv_head, d_head]
    >>> W_O = torch.tensor([[[1.0, 0.0]]])                    # [head, d_head, d_model]
    >>> x = torch.tensor([[0.0, 1.0], [0.0, 2.0]])            # [pos, d_model]
    >>> w = edge_shares(A, v, W_O, x, None, "value_norm")
    >>> [round(t, 3) for t in w[:, 1].flatten().tolist()]     # row q=1: heads' k=0, k=1; residual
    [0.125, 0.375, 0.0, 0.5]
"""

import torch
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor

from ..errors import check_choice

__all__ = ["EDGE_WEIGHTS", "ROW_BLOCK_BYTES", "edge_shares", "row_block", "value_outputs"]

EDGE_WEIGHTS = ("attention", "value_norm", "contribution")
ROW_BLOCK_BYTES = 2**30  # working memory of one block of proximity rows (1 GiB)
_TERM_COPIES = 2  # a block's float32 [rows, head, key, d_model] terms, and y - terms beside them


def value_outputs(
    v: Float[Tensor, "key kv_head d_head"], W_O: Float[Tensor, "head d_head d_model"]
) -> Float[Tensor, "head key d_model"]:
    """``v_k[kv(h)] · W_O[h]`` for every head and key: what head ``h`` writes per unit of
    attention on ``k``. Grouped-query values are shared by ``head / kv_head`` query heads."""
    n_heads, n_kv = W_O.shape[0], v.shape[1]
    per_head = v.repeat_interleave(n_heads // n_kv, dim=1) if n_kv != n_heads else v
    return einsum(per_head, W_O, "key head d_head, head d_head d_model -> head key d_model")


def row_block(n_heads: int, n_keys: int, d_model: int, budget: int = ROW_BLOCK_BYTES) -> int:
    """How many query rows of proximity shares fit in ``budget`` bytes (at least one): a row
    holds its float32 terms ``[head, key, d_model]`` and one temporary as large.

    Examples:
        >>> row_block(12, 1024, 768)          # GPT-2 small at 1,024 tokens: 72 MiB a row
        14
        >>> row_block(12, 8192, 768, 2**20)   # never less than one row
        1
    """
    return max(1, budget // max(1, _TERM_COPIES * 4 * n_heads * n_keys * d_model))


def edge_shares(
    pattern: Float[Tensor, "head query key"],
    v: Float[Tensor, "key kv_head d_head"],
    W_O: Float[Tensor, "head d_head d_model"],
    x: Float[Tensor, "query d_model"],
    b_O,
    weight: str = "contribution",
    budget: int = ROW_BLOCK_BYTES,
) -> Float[Tensor, "part query key"]:
    """Each part's share of every row's block output: ``[head + 1, query, key]`` (the last
    channel is the residual stream, on the diagonal), in float32. ``b_O`` may be None;
    ``budget``: bytes of working memory for one block of proximity rows (:func:`row_block`)."""
    check_choice("weight", weight, EDGE_WEIGHTS[1:])
    n_heads, n_q, n_k = pattern.shape
    vo = value_outputs(v.float(), W_O.float())  # [head, key, d_model]
    pattern, x = pattern.float(), x.float()
    out = pattern.new_zeros(n_heads + 1, n_q, n_k)
    if weight == "value_norm":
        parts = pattern * vo.norm(dim=-1)[:, None, :]  # [head, query, key]
        _normalise(out, parts, x.norm(dim=-1), slice(0, n_q))
        return out
    rows = row_block(n_heads, n_k, vo.shape[-1], budget)
    for start in range(0, n_q, rows):
        block = slice(start, min(start + rows, n_q))
        terms = einsum(pattern[:, block], vo, "head q key, head key d -> q head key d")
        resid = x[block]
        y = resid + terms.sum(dim=(1, 2))
        if b_O is not None:
            y = y + b_O.float()
        size = y.abs().sum(-1)
        apart = (y[:, None, None] - terms).abs_().sum(-1)  # in place: one temporary, not two
        del terms
        parts = (size[:, None, None] - apart).clamp_min(0)
        stay = (size - (y - resid).abs().sum(-1)).clamp_min(0)
        _normalise(out, rearrange(parts, "q head key -> head q key"), stay, block)
    return out


def _normalise(
    out: Float[Tensor, "part query key"],
    parts: Float[Tensor, "head row key"],
    stay: Float[Tensor, " row"],
    block: slice,
) -> None:
    """Write rows ``block`` of ``out``: each head's parts and the stay over the row's total (a
    row with nothing in it stays 0)."""
    n_heads = parts.shape[0]
    total = parts.sum(dim=(0, 2)) + stay
    total = torch.where(total > 0, total, torch.ones_like(total))
    out[:n_heads, block] = parts / total[None, :, None]
    q = torch.arange(block.start, block.stop, device=out.device)
    out[n_heads, q, q] = stay / total
