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
position). It is computed a block of query rows at a time, so memory grows with
``rows × heads × seq × d_model`` for one block, never with ``seq² × heads × d_model``.

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

__all__ = ["EDGE_WEIGHTS", "edge_shares", "value_outputs", "ROW_BLOCK_FLOATS"]

EDGE_WEIGHTS = ("attention", "value_norm", "contribution")
ROW_BLOCK_FLOATS = 2**24  # floats of [rows, head, key, d_model] held at once (64 MB in float32)


def value_outputs(
    v: Float[Tensor, "key kv_head d_head"], W_O: Float[Tensor, "head d_head d_model"]
) -> Float[Tensor, "head key d_model"]:
    """``v_k[kv(h)] · W_O[h]`` for every head and key: what head ``h`` writes per unit of
    attention on ``k``. Grouped-query values are shared by ``head / kv_head`` query heads."""
    n_heads, n_kv = W_O.shape[0], v.shape[1]
    per_head = v.repeat_interleave(n_heads // n_kv, dim=1) if n_kv != n_heads else v
    return einsum(per_head, W_O, "key head d_head, head d_head d_model -> head key d_model")


def edge_shares(
    pattern: Float[Tensor, "head query key"],
    v: Float[Tensor, "key kv_head d_head"],
    W_O: Float[Tensor, "head d_head d_model"],
    x: Float[Tensor, "query d_model"],
    b_O,
    weight: str = "contribution",
) -> Float[Tensor, "part query key"]:
    """Each part's share of every row's block output: ``[head + 1, query, key]`` (the last
    channel is the residual stream, on the diagonal). ``b_O`` may be None."""
    check_choice("weight", weight, EDGE_WEIGHTS[1:])
    n_heads, n_q, n_k = pattern.shape
    vo = value_outputs(v.float(), W_O.float())  # [head, key, d_model]
    pattern, x = pattern.float(), x.float()
    out = pattern.new_zeros(n_heads + 1, n_q, n_k)
    rows = max(1, ROW_BLOCK_FLOATS // max(1, n_heads * n_k * vo.shape[-1]))
    for start in range(0, n_q, rows):
        block = slice(start, min(start + rows, n_q))
        terms = einsum(pattern[:, block], vo, "head q key, head key d -> q head key d")
        resid = x[block]
        if weight == "value_norm":
            parts = terms.norm(dim=-1)
            stay = resid.norm(dim=-1)
        else:
            y = resid + terms.sum(dim=(1, 2))
            if b_O is not None:
                y = y + b_O.float()
            size = y.abs().sum(-1)
            parts = (size[:, None, None] - (y[:, None, None] - terms).abs().sum(-1)).clamp_min(0)
            stay = (size - (y - resid).abs().sum(-1)).clamp_min(0)
        total = parts.sum(dim=(1, 2)) + stay
        total = torch.where(total > 0, total, torch.ones_like(total))
        out[:n_heads, block] = rearrange(parts / total[:, None, None], "q head key -> head q key")
        q = torch.arange(block.start, block.stop, device=out.device)
        out[n_heads, q, q] = stay / total
    return out
