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

from typing import Optional

import torch
from einops import einsum, rearrange
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import RatLensError, check_choice
from ..options import EDGE_WEIGHTS
from .pattern import RowsOnly

__all__ = [
    "EDGE_WEIGHTS",
    "ROW_BLOCK_BYTES",
    "edge_shares",
    "key_norms",
    "norm_factor",
    "key_weighted",
    "row_totals",
    "head_shares",
    "value_norm_shares",
    "ValueNormRows",
    "proximity_rows",
    "proximity",
    "ShareRows",
    "row_block",
    "value_outputs",
]

# Working memory of one block of proximity rows (32 MiB): a GPU gets 10M-element kernels from
# one row of a 2,048-token prompt already, and a CPU pays a page fault per 4 KiB of a fresh block.
ROW_BLOCK_BYTES = 2**25
_TERM_COPIES = 2  # a block's float32 [rows, head, key, d_model] y - parts, and room as large


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
        1
        >>> row_block(12, 128, 768)           # at 128 tokens
        3
        >>> row_block(12, 8192, 768, 2**20)   # never less than one row
        1
    """
    return max(1, budget // max(1, _TERM_COPIES * 4 * n_heads * n_keys * d_model))


def norm_factor(W_O: Float[Tensor, "head d_head d_model"]) -> Float[Tensor, "head d_head out"]:
    """``F`` with ``‖x · F[h]‖ = ‖x · W_O[h]‖`` for every ``x``, as small as it gets:
    ``W_O[h] · W_O[h]ᵀ = L Lᵀ`` (Cholesky, in float64), so ``‖x W_O[h]‖² = ‖x L‖²`` and
    ``F[h] = L`` is ``[d_head, d_head]``. :func:`key_norms` through it does ``d_model /
    d_head`` times less work (9x on SmolLM2, 12x on GPT-2), to the same float32 accuracy as
    through ``W_O``. ``W_O`` itself (in float32) where some head's ``W_O[h]`` has rank below
    ``d_head`` (no smaller factor). Factoring costs about ``2 · d_head² · d_model``
    multiply-adds per head, which the tracer pays once per model (it keeps the factor).

    Examples:
        >>> W_O, x = torch.randn(2, 3, 8), torch.randn(5, 3)
        >>> F = norm_factor(W_O)
        >>> F.shape, torch.allclose((x @ W_O).norm(dim=-1), (x @ F).norm(dim=-1), rtol=1e-5)
        (torch.Size([2, 3, 3]), True)
    """
    W = W_O.detach().cpu().double()
    L, info = torch.linalg.cholesky_ex(W @ W.transpose(-1, -2))
    return W_O.float() if bool(info.any()) else L.float().to(W_O.device)


def key_norms(
    v: Float[Tensor, "batch key kv_head d_head"], W_O: Float[Tensor, "head d_head out"]
) -> Float[Tensor, "batch head key"]:
    """``‖v_k[kv(h)] · W_O[h]‖`` per prompt, head and key, in float32: all a value-norm share
    needs of the values (``‖A · v W_O‖ = A · ‖v W_O‖``). ``W_O`` may be its
    :func:`norm_factor` instead: the same norms (to float32 rounding), for less work.
    Computed a block of keys at a time, so the ``[head, key, out]`` outputs never exist for a
    whole long prompt at once; the prompts of a batch share the blocks (one product for many
    short prompts, not one each)."""
    n_heads, _, out_dim = W_O.shape
    batch = v.shape[0]
    flat, W_O = rearrange(v.float(), "batch key kv d -> (batch key) kv d"), W_O.float()
    out = flat.new_zeros(n_heads, len(flat))
    keys = row_block(n_heads, 1, out_dim, 2**26)  # keys per block: 64 MiB of outputs
    for start in range(0, len(flat), keys):
        block = slice(start, start + keys)
        out[:, block] = value_outputs(flat[block], W_O).norm(dim=-1)
    return rearrange(out, "head (batch key) -> batch head key", batch=batch).contiguous()


def key_weighted(
    pattern: Float[Tensor, "batch head query key"],
    norms: Float[Tensor, "batch head known"],
    out: Optional[Float[Tensor, "batch head query key"]] = None,
) -> Float[Tensor, "batch head query key"]:
    """``A[h, q, k] · ‖v_k W_O[h]‖``: each head's part of each row before normalising, in
    float32 (into ``out`` when given). ``norms``: :func:`key_norms` of at least the keys."""
    return torch.mul(pattern, norms[:, :, None, : pattern.shape[-1]], out=out)


def row_totals(
    pattern: Float[Tensor, "batch head query key"],
    norms: Float[Tensor, "batch head known"],
    resid_norms: Float[Tensor, "batch query"],
) -> Float[Tensor, "batch query"]:
    """What each value-norm share of a row is divided by: its :func:`key_weighted` parts
    summed over heads and keys, plus ``‖x_q‖`` (``resid_norms``); 1 where that is 0 (a row
    with nothing in it). One matrix-vector product per head, ``A[h] · ‖v W_O[h]‖``: the parts
    themselves are never formed. The dense and the bounded captures take it of the same blocks
    the same way, so their shares agree bit for bit.

    Examples:
        >>> A = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])       # [batch, head, query, key]
        >>> row_totals(A, torch.tensor([[[1.0, 3.0]]]), torch.tensor([[1.0, 2.0]]))
        tensor([[2., 4.]])
    """
    weighted = torch.matmul(pattern.float(), norms[:, :, : pattern.shape[-1], None])
    total = weighted[..., 0].sum(1) + resid_norms
    return torch.where(total > 0, total, torch.ones_like(total))


def head_shares(
    pattern: Float[Tensor, "batch head query key"],
    norms: Float[Tensor, "batch head known"],
    resid_norms: Float[Tensor, "batch query"],
    out: Optional[Float[Tensor, "batch head query key"]] = None,
) -> tuple[Float[Tensor, "batch head query key"], Float[Tensor, "batch query"]]:
    """Each head's value-norm shares of a block of rows (written into ``out`` when given: no
    other temporary the size of the block) and the rows' :func:`row_totals`."""
    totals = row_totals(pattern, norms, resid_norms)
    return key_weighted(pattern, norms, out).div_(totals[:, None, :, None]), totals


def value_norm_shares(
    pattern: Float[Tensor, "batch head query key"],
    norms: Float[Tensor, "batch head known"],
    resid_norms: Float[Tensor, "batch query"],
) -> Float[Tensor, "batch part query key"]:
    """Value-norm shares of a block of query rows (the last ``query`` rows over the keys so
    far, as a forward over a KV cache delivers them): each head's ``A · ‖v W_O‖`` and the
    residual stream's ``‖x_q‖`` (on the diagonal) over their row's sum, ``[batch, head + 1,
    query, key]`` in float32 (:func:`head_shares`, the stay channel after the heads).

    Examples:
        >>> A = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])       # [batch, head, query, key]
        >>> w = value_norm_shares(A, torch.tensor([[[1.0, 3.0]]]), torch.tensor([[1.0, 2.0]]))
        >>> [round(t, 3) for t in w[0, :, 1].flatten().tolist()]  # row 1: k=0, k=1; residual
        [0.125, 0.375, 0.0, 0.5]
    """
    batch, heads, queries, keys = pattern.shape
    out = torch.zeros(batch, heads + 1, queries, keys, device=pattern.device)
    _, totals = head_shares(pattern, norms, resid_norms, out=out[:, :heads])
    out[:, heads].diagonal(offset=keys - queries, dim1=-2, dim2=-1)[:] = resid_norms / totals
    return out


class _RowsOnly(RowsOnly):
    """A layer's ``[head + 1, query, key]`` shares of one prompt, computed from ``pattern``
    (``[head, query, key]``) and what a subclass holds, only for the rows read:
    ``shares[:, rows]`` calls the subclass's ``rows(positions)``; any other use is an error."""

    pattern: Float[Tensor, "head query key"]

    @staticmethod
    def __new__(cls, pattern):
        head, query, key = pattern.shape
        shares = Tensor._make_wrapper_subclass(
            cls, (head + 1, query, key), dtype=torch.float32, device=pattern.device
        )
        shares.pattern = pattern
        return shares

    def __repr__(self) -> str:
        return f"{type(self).__name__}(part={self.shape[0]}, query={self.shape[1]})"

    HOLDS = "shares"

    def __getitem__(self, index) -> Float[Tensor, "part row key"]:
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)):
            raise RatLensError(f"shares are read by rows only (weights[:, rows]), got {index!r}")
        return self.rows(
            torch.arange(self.shape[1], device=self.pattern.device)[index[1]].reshape(-1)
        )


class ValueNormRows(_RowsOnly):
    """One layer's value-norm shares of one prompt, computed only for the rows read: reads as
    :func:`value_norm_shares` of the whole pattern (``[head + 1, query, key]``) by rows only
    (``shares[:, rows]``), as the search reads a :class:`~rat_lens.search.store.TopKeys`. It
    holds the attention, each (head, key)'s ``‖v W_O‖``, each row's :func:`row_totals` and
    ``‖x_q‖``: the shares are a rescaling of the attention, never stored beside it.

    Examples:
        >>> A = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])           # [head, query, key]
        >>> norms, resid = torch.ones(1, 2), torch.ones(2)
        >>> totals = row_totals(A[None], norms[None], resid[None])[0]
        >>> ValueNormRows(A, norms, totals, resid)[:, [1]]          # head 0's keys, the stay
        tensor([[[0.2500, 0.2500]],
        <BLANKLINE>
                [[0.0000, 0.5000]]])
    """

    pattern: Float[Tensor, "head query key"]
    norms: Float[Tensor, "head key"]
    totals: Float[Tensor, " query"]
    resid_norms: Float[Tensor, " query"]

    @staticmethod
    def __new__(cls, pattern, norms, totals, resid_norms):
        rows = _RowsOnly.__new__(cls, pattern)
        rows.norms, rows.totals, rows.resid_norms = norms, totals, resid_norms
        return rows

    def rows(self, rows: Int[Tensor, " row"]) -> Float[Tensor, "part row key"]:
        heads, _, n = self.pattern.shape
        out = torch.zeros(heads + 1, len(rows), n, device=self.pattern.device)
        totals = self.totals[None, rows]
        parts = key_weighted(self.pattern[None, :, rows], self.norms[None], out[None, :heads])
        parts.div_(totals[:, None, :, None])  # as head_shares divides: the same numbers
        stay = self.resid_norms[rows] / totals[0]
        out[heads, torch.arange(len(rows), device=out.device), rows] = stay
        return out


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
    if weight == "value_norm":
        norms = key_norms(v[None], W_O)
        return value_norm_shares(pattern[None], norms, x.float().norm(dim=-1)[None])[0]
    rows = torch.arange(pattern.shape[1], device=pattern.device)
    return proximity_rows(pattern, rows, v, W_O, x, b_O, budget)


def proximity_rows(
    pattern: Float[Tensor, "head row key"],
    rows: Int[Tensor, " row"],
    v: Float[Tensor, "key kv_head d_head"],
    W_O: Float[Tensor, "head d_head d_model"],
    x: Float[Tensor, "row d_model"],
    b_O,
    budget: int = ROW_BLOCK_BYTES,
) -> Float[Tensor, "part row key"]:
    """Proximity shares of some query rows only, ``[head + 1, row, key]``: ``pattern`` and
    ``x`` hold those rows, ``rows`` their positions (where each one's residual stream sits),
    ``v`` every key's values. Over the keys up to the last row only (a causal row attends to
    none after it: their parts are 0), ``budget`` bytes of rows at a time.

    ``‖y‖₁ - ‖y - t‖₁`` is computed as :func:`proximity` does, without subtracting two sums
    of ``|y|`` (in float32 each near-zero part of a long row then carried ~1e-7 of ``‖y‖₁``
    as noise: 1e-4 of a SmolLM2 row's shares, summed over its thousands of parts). Each part
    ``t = A·vW_O`` needs its ``[d_model]`` vector once, in one pass over ``[head, key,
    d_model]`` per row; the rest are contractions."""
    n_heads, n_q, n_k = pattern.shape
    out = pattern.new_zeros(n_heads + 1, n_q, n_k, dtype=torch.float32)
    used = int(rows.max()) + 1 if len(rows) else 0
    vo = value_outputs(v[:used].float(), W_O.float())  # [head, key, d_model]
    pattern, x = pattern[..., :used].float().to(vo.device), x.float()
    y = x + einsum(pattern, vo, "head q key, head key d -> q d")
    if b_O is not None:
        y = y + b_O.float()
    sign, size = torch.where(y >= 0, 1.0, -1.0), y.abs()
    signed = sign * x
    stay = proximity(signed.sum(-1), (signed - size).relu_().sum(-1))
    along = einsum(vo, sign, "head key d, q d -> q head key")  # s·vW_O, times A below
    along.mul_(rearrange(pattern, "head q key -> q head key"))
    parts = pattern.new_empty(n_q, n_heads, used)
    step = min(n_q, row_block(n_heads, used, vo.shape[-1], budget))
    over = pattern.new_empty(step, n_heads, used, vo.shape[-1])  # reused per block
    for start in range(0, n_q, step):
        block = slice(start, min(start + step, n_q))
        n = block.stop - block.start
        torch.mul(vo, sign[block, None, None], out=over[:n])
        over[:n].mul_(rearrange(pattern[:, block], "head q key -> q head key")[..., None])
        parts[block] = proximity(
            along[block], over[:n].sub_(size[block, None, None]).relu_().sum(-1)
        )
    _normalise(out, rearrange(parts, "q head key -> head q key"), stay, slice(0, n_q), rows)
    return out


def proximity(
    along: Float[Tensor, "*part"], over: Float[Tensor, "*part"]
) -> Float[Tensor, "*part"]:
    """``max(0, ‖y‖₁ - ‖y - t‖₁)`` from ``along = s·t`` and ``over = Σ_d max(0, s_d t_d -
    |y_d|)``, ``s = sign(y)`` (1 at 0): per coordinate ``|y| - |y - t| = s·t`` while ``s·t ≤
    |y|``, else ``2|y| - s·t``, so the sum is ``along - 2·over``, exactly, with float error
    relative to ``t``, not to ``y``.

    Examples:
        >>> y, t = torch.tensor([3.0, -1.0]), torch.tensor([4.0, 0.5])
        >>> s = torch.where(y >= 0, 1.0, -1.0)
        >>> float(y.abs().sum() - (y - t).abs().sum())                 # 4 - 2.5
        1.5
        >>> float(proximity(s @ t, (s * t - y.abs()).relu().sum()))
        1.5
    """
    return (along - 2 * over).clamp_min(0)


class ShareRows(_RowsOnly):
    """One layer's proximity shares of one prompt, computed only for the rows read: reads as
    the dense ``[head + 1, query, key]`` tensor of :func:`edge_shares` by rows only
    (``weights[:, rows]``), as the search reads a :class:`~rat_lens.search.store.TopKeys`. It
    holds the layer's attention (whole, or an
    :class:`~rat_lens.search.recompute.AttentionRows` that recomputes the rows read from the
    layer's queries and keys), values and residual stream, never a ``[query, key, d_model]``
    term tensor; the search walks down one layer at a time and asks each for its live rows.

    Examples:
        >>> A = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
        >>> v, W_O = torch.tensor([[[1.0]], [[3.0]]]), torch.tensor([[[1.0, 0.0]]])
        >>> x = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
        >>> rows = ShareRows(A, v, W_O, x, None)
        >>> torch.equal(rows[:, [1]], edge_shares(A, v, W_O, x, None)[:, [1]])
        True
    """

    pattern: Float[Tensor, "head query key"]
    v: Float[Tensor, "key kv_head d_head"]
    W_O: Float[Tensor, "head d_head d_model"]
    x: Float[Tensor, "query d_model"]

    @staticmethod
    def __new__(cls, pattern, v, W_O, x, b_O):
        rows = _RowsOnly.__new__(cls, pattern)
        rows.v, rows.W_O, rows.x, rows.b_O = v, W_O, x, b_O
        return rows

    def rows(self, rows: Int[Tensor, " row"]) -> Float[Tensor, "part row key"]:
        # The attention may be held elsewhere than the activations (dense, on the CPU).
        pattern = self.pattern[:, rows.to(self.pattern.device)].to(self.x.device)
        rows = rows.to(self.x.device)
        return proximity_rows(pattern, rows, self.v, self.W_O, self.x[rows], self.b_O)


def _normalise(
    out: Float[Tensor, "part query key"],
    parts: Float[Tensor, "head row used"],
    stay: Float[Tensor, " row"],
    block: slice,
    positions: Int[Tensor, " row"],
) -> None:
    """Write rows ``block`` of ``out``: each head's parts and the stay (at each row's own
    position, ``positions``) over the row's total (a row with nothing in it stays 0)."""
    n_heads, _, used = parts.shape
    total = parts.sum(dim=(0, 2)) + stay
    total = torch.where(total > 0, total, torch.ones_like(total))
    out[:n_heads, block, :used] = parts / total[None, :, None]
    q = torch.arange(block.start, block.stop, device=out.device)
    out[n_heads, q, positions.to(out.device)] = stay / total
