"""Attention rows recomputed from a layer's queries and keys, only for the rows a search reads.

Proximity shares (:mod:`rat_lens.search.contrib`) read a visited row's whole attention
``A[h, q, :]``. Keeping every traced head's whole pattern costs ``layers · heads · seq²``
floats (4.5 GB for SmolLM2's 30 layers of 9 heads at 2,048 tokens); the queries and keys that
make it cost ``layers · seq · (heads + kv_heads) · d_head`` (0.19 GB there), and any row comes
back from them exactly::

    A[h, q, k] = softmax_k(scale · q_q[h] · k_k[kv(h)])   over keys k ≤ q that are not padding

with the post-rotary queries and keys (``hook_rot_q`` / ``hook_rot_k`` where a model has them,
else ``hook_q`` / ``hook_k``), and grouped-query heads reading KV head ``h // (H / H_kv)``.
The scale is measured, not assumed: :func:`fit_scale` reads it off rows of the forward's own
attention (``1/√d_head`` in most models, whatever a model folds into its queries). A model
whose attention is something else (ALiBi, soft-capping, a sliding window, hooks that show
other tensors) is caught by :func:`check_rows`, which compares recomputed rows with the
forward's: probe rows of every block as the forward runs, and every row read against the
entries a bounded store kept of it (:class:`AttentionRows`). Computed in float32.

Examples:
    >>> q = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])          # [query, head, d_head]
    >>> k = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])          # [key, kv_head, d_head]
    >>> A = attention_rows(q, k, 0.5, torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool))
    >>> A                                                     # row 1: softmax([0, 1])
    tensor([[[1.0000, 0.0000],
             [0.2689, 0.7311]]])
    >>> round(fit_scale(A, q, k, torch.tensor([0, 1])), 6)    # measured back from the rows
    0.5
"""

from typing import Optional

import torch
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import RatLensError
from .pattern import RowsOnly

__all__ = [
    "ROW_ATOL",
    "CHECKED_KEYS",
    "attention_rows",
    "fit_scale",
    "row_error",
    "check_rows",
    "AttentionRows",
]

# How far a recomputed attention weight may be from the forward's own (float32: the two sum
# the same products in another order, ~1e-7 apart; a different formula is off by far more).
ROW_ATOL = 1e-4
# Keys per row a bounded store keeps to check recomputed rows against (besides the diagonal and
# the sinks): the search and the page read the recomputed rows, so a few strongest suffice, and
# a store of 32 costs 3x as much to fill (its top-k).
CHECKED_KEYS = 4
_FIT_FLOOR = 1e-30  # weights below this carry no usable log (float32 underflow is ~1e-38)


def _scores(
    q: Float[Tensor, "row head d_head"], k: Float[Tensor, "key kv_head d_head"]
) -> Float[Tensor, "head row key"]:
    """``q_q[h] · k_k[kv(h)]`` for every head, row and key, in float32."""
    group = q.shape[1] // k.shape[1]
    q = rearrange(q.float(), "row (kv group) d -> row kv group d", group=group)
    s = einsum(q, k.float(), "row kv group d, key kv d -> kv group row key")
    return rearrange(s, "kv group row key -> (kv group) row key")


def _allowed(rows: Int[Tensor, " row"], key_ok: Bool[Tensor, " key"]) -> Bool[Tensor, "row key"]:
    """The keys each row attends over: not after it, not padding."""
    keys = torch.arange(len(key_ok), device=key_ok.device)
    return (keys[None] <= rows[:, None].to(key_ok.device)) & key_ok[None]


def attention_rows(
    q: Float[Tensor, "row head d_head"],
    k: Float[Tensor, "key kv_head d_head"],
    scale: float,
    rows: Int[Tensor, " row"],
    key_ok: Bool[Tensor, " key"],
) -> Float[Tensor, "head row key"]:
    """``softmax(scale · q Kᵀ)`` of query rows ``rows`` (``q`` holds theirs) over the keys not
    after them where ``key_ok``; a row with no such key is all zero."""
    allowed = _allowed(rows, key_ok.to(q.device))
    s = (_scores(q, k) * scale).masked_fill(~allowed, -torch.inf)
    return s.softmax(-1).nan_to_num(0.0)


def fit_scale(
    pattern: Float[Tensor, "head row key"],
    q: Float[Tensor, "row head d_head"],
    k: Float[Tensor, "key kv_head d_head"],
    rows: Int[Tensor, " row"],
) -> float:
    """The scale with ``pattern ≈ softmax(scale · q Kᵀ)``, from the rows given: within a
    (head, row), ``log A[k] = scale · q·k_k - log Z``, so it is the least-squares slope of the
    logs on the scores, each (head, row) centred on its own means (which removes ``log Z``).
    Entries of 0 (masked, underflowed) are left out. ``1/√d_head`` where the rows hold no
    slope at all (each row one key): every scale gives them alike."""
    s = _scores(q, k).double()
    real = torch.ones(k.shape[0], dtype=torch.bool, device=pattern.device)
    ok = (pattern > _FIT_FLOOR) & _allowed(rows, real)[None]
    logs = pattern.double().clamp_min(_FIT_FLOOR).log()
    n = ok.sum(-1, keepdim=True).clamp_min(1)
    centred_s = torch.where(ok, s - (s * ok).sum(-1, keepdim=True) / n, 0.0)
    centred_log = torch.where(ok, logs - (logs * ok).sum(-1, keepdim=True) / n, 0.0)
    spread = float((centred_s * centred_s).sum())
    if spread == 0.0:
        return q.shape[-1] ** -0.5
    return float((centred_s * centred_log).sum()) / spread


def row_error(
    exact: Float[Tensor, "head row key"],
    forward: Float[Tensor, "head row key"],
    where: Optional[Bool[Tensor, "head row key"]] = None,
) -> float:
    """The largest ``|exact - forward|`` (where ``where``; everywhere without it)."""
    gap = (exact.float().cpu() - forward.float().cpu()).abs()
    if where is not None:
        gap = gap[where.cpu()]
    return float(gap.max()) if gap.numel() else 0.0


def check_rows(error: float, name: str, rows: Tensor, what: str) -> None:
    """Raise the one error for recomputed rows ``rows`` of ``name`` that are ``error`` away
    from the forward's attention (``what``: which of it they were compared with)."""
    if error <= ROW_ATOL:
        return
    shown = rows.flatten()[:4].tolist()
    raise RatLensError(
        f"{name}: attention recomputed as softmax(scale · q·kᵀ) over causal, unpadded keys "
        f"differs from {what} by {error:.2g} (> {ROW_ATOL}) at rows {shown}: this model's "
        "attention is not that formula (ALiBi, soft-capping, a sliding window, or query/key "
        "hooks that show other tensors). Contribution edges past rat_lens.options."
        "PATTERN_BUDGET (and with store='bounded') need it: trace fewer layers or a shorter "
        "prompt (the patterns are then kept whole), or use edge_weight='value_norm'"
    )


class AttentionRows(RowsOnly):
    """One layer's attention of one prompt, recomputed for the rows read only: reads as the
    dense ``[head, query, key]`` pattern by rows (``A[:, rows]``) or one row (``A[h, q, :]``),
    as the search and the page read a :class:`~rat_lens.search.store.TopKeys`. Holds the
    layer's queries ``[query, head, d_head]`` and keys ``[key, kv_head, d_head]``, the
    scale, which keys are real (``key_ok``), and ``store``, what the forward's own attention
    kept of each row (a ``TopKeys``, or None): every row read is checked against it.

    Examples:
        >>> q, k = torch.randn(3, 2, 4), torch.randn(3, 1, 4)       # 2 heads read 1 KV head
        >>> A = AttentionRows(q, k, 0.5, torch.ones(3, dtype=torch.bool))
        >>> A
        AttentionRows(head=2, query=3)
        >>> torch.equal(A[1, 2, :], A[:, [2]][1, 0])
        True
    """

    q: Float[Tensor, "query head d_head"]
    k: Float[Tensor, "key kv_head d_head"]
    key_ok: Bool[Tensor, " key"]

    @staticmethod
    def __new__(cls, q, k, scale: float, key_ok, store=None, name: str = "attention"):
        query, head, _ = q.shape
        rows = Tensor._make_wrapper_subclass(
            cls, (head, query, k.shape[0]), dtype=torch.float32, device=q.device
        )
        rows.q, rows.k, rows.scale, rows.key_ok = q, k, scale, key_ok.bool()
        rows.store, rows.hook = store, name
        return rows

    def __repr__(self) -> str:
        return f"AttentionRows(head={self.shape[0]}, query={self.shape[1]})"

    HOLDS = "recomputed attention rows (A[h, q, :] also reads one)"

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None):
            wanted = index[1].cpu() if isinstance(index[1], Tensor) else index[1]
            rows = torch.arange(self.shape[1])[wanted]
            return self.rows(torch.as_tensor(rows).reshape(-1))
        if isinstance(index, tuple) and len(index) == 3 and isinstance(index[2], slice):
            return self.rows(torch.tensor([int(index[1])]))[int(index[0]), 0, index[2]]
        raise RatLensError(
            f"recomputed attention is read by rows only (A[:, rows] or A[h, q, :]), got {index!r}"
        )

    def rows(self, rows: Int[Tensor, " row"]) -> Float[Tensor, "head row key"]:
        """The attention of query rows ``rows``, checked against the store's entries."""
        rows = rows.long().cpu()
        device = self.q.device
        exact = attention_rows(
            self.q[rows.to(device)], self.k, self.scale, rows.to(device), self.key_ok
        )
        if self.store is not None:
            kept = self.store[:, rows]  # the forward's own weights where it kept them
            error = row_error(exact, kept, kept > 0)
            check_rows(error, self.hook, rows, "the forward's attention kept for them")
        return exact
