"""Attention in bounded memory: per (head, query) row, only what a trace can read of it.

A per-head trace of L layers × H heads over n tokens keeps L·H·n² weights when dense (2.4 GB at
2,048 tokens on GPT-2 small, ~38 GB at 8,192), yet a search step reads at most ``top_k + 1``
(head, key) pairs of a row. :class:`TopKeys` keeps, per (head, query) row of one layer:

* the ``keep`` strongest keys strictly before the query among those a search may pick
  (``key_ok``: not masked, not a sink left out by ``exclude_bos``), ties at the cut going to the
  earlier key (the set a stable sort by weight, descending, puts first);
* the diagonal ``A[q, q]`` (a layers-mode step may stay; ``residual="rollout"`` raises it);
* the sink columns (position 0, BOS positions), which a step's ``bos_mass`` sums whether or not
  they are candidates.

``store[:, rows]`` gives dense ``[head, row, key]`` rows with exactly these entries, 0 elsewhere, so
:func:`rat_lens.search.beam.beam_search` runs on a list of them unchanged, with the same beams,
weights and scores as on the dense patterns whenever ``keep >= top_k``: a step takes a row's
``top_k`` strongest (head, key) pairs in a stable sort's order (weight, then lower head, then
earlier key), and each of those is among its own head's first ``top_k`` in that order
(``min_attn`` and the rollout's ``0.5·A`` keep the order of the keys before the diagonal), which
are kept. (Not for reverse-attention's own tie order, a chain in one matrix: that depends on the
whole row.)

The store fills as a forward runs, block of query rows by block (:class:`TopKeysBuilder`); only
one block of a layer's dense pattern exists at a time. :class:`LayerMeanRows` likewise averages
each row over the traced layers as soon as every layer has delivered it (the token strip).
"""

from collections.abc import Sequence
from typing import Optional

import torch
from einops import reduce
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import RatLensError
from .pattern import RowsOnly, at_least_float32

__all__ = [
    "STORE_KEYS",
    "TopKeys",
    "TopKeysBuilder",
    "LayerMeanRows",
    "CausalRows",
    "stack_rows",
    "stable_top_keys",
    "layer_mean",
    "head_mean",
]

# Keys per (head, query) row the bounded store keeps when top_k is smaller: enough for the
# page's heatmap of each traced row (rat_lens.assemble.HEAD_ROW_KEYS, which must not exceed it).
# Each kept key costs 6 bytes per row: 32 keys are 0.1 GB of a 2,048-token trace of 30 x 9 heads.
STORE_KEYS = 32


def stable_top_keys(values: Float[Tensor, "row key"], k: int) -> Int[Tensor, "row kept"]:
    """The ``k`` largest entries of each row (all of them if the row is shorter), where equal
    values straddle the cut the earlier keys: the set a stable sort puts first (except among
    -inf, which marks keys left out). Order within a row unspecified. One ``topk`` of ``k + 1``
    finds the rows whose cut splits equal values; only those are redone by index.

    Examples:
        >>> sorted(stable_top_keys(torch.tensor([[0.1, 0.3, 0.3, 0.3, 0.0]]), 2)[0].tolist())
        [1, 2]
    """
    rows, n = values.shape
    if k >= n:
        return torch.arange(n, device=values.device).repeat(rows, 1)
    vals, idx = values.topk(k + 1)
    idx, cut = idx[:, :k], vals[:, k - 1]
    tied = ((cut == vals[:, k]) & (cut > -torch.inf)).nonzero()[:, 0]  # -inf: never read
    if len(tied):
        v, c = values[tied], cut[tied, None]
        above, at = v > c, v == c
        need = k - above.sum(-1, keepdim=True)
        keep = above | (at & (at.cumsum(-1) <= need))  # exactly k per row, in key order
        idx[tied] = keep.nonzero()[:, 1].view(len(tied), k)
    return idx


def layer_mean(parts: Sequence[Float[Tensor, "*rows key"]]) -> Float[Tensor, "*rows key"]:
    """``Σ parts / len(parts)``, summed in the order given (as :class:`LayerMeanRows` sums the
    layers as they arrive: the streamed strip and the dense one agree bit for bit), in at least
    float32.

    Examples:
        >>> layer_mean([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
        tensor([0.5000, 0.5000])
    """
    total = at_least_float32(parts[0]).clone()
    for part in parts[1:]:
        total += part
    return total / len(parts)


def head_mean(block: Float[Tensor, "batch head query key"]) -> Float[Tensor, "batch query key"]:
    """The mean over heads (the strip's and the rollout's attention), taken the same way by the
    dense and the bounded paths, in at least float32 whatever the model's dtype.

    Examples:
        >>> head_mean(torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]]))
        tensor([[[0.5000, 0.5000]]])
        >>> head_mean(torch.ones(1, 4, 1, 1, dtype=torch.float16)).dtype
        torch.float32
    """
    return reduce(at_least_float32(block), "batch head query key -> batch query key", "mean")


class TopKeys(RowsOnly):
    """One layer's attention of one prompt in bounded memory (see the module docstring); reads as
    the dense ``[head, query, key]`` tensor by rows only: ``store[:, rows]`` (``rows`` a slice or
    positions) gives dense rows. Memory: ``head · query · (keep + sinks + 1)`` weights.

    Examples:
        >>> A = torch.tensor([[[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0],
        ...                    [0.1, 0.6, 0.1, 0.2]]])            # [head 1, query 4, key 4]
        >>> builder = TopKeysBuilder(4, keep=1, key_ok=torch.ones(1, 4, dtype=torch.bool),
        ...                          sink_keys=[0])
        >>> _ = builder.add(A[None])                              # returns the kept keys
        >>> store = builder.build()[0]
        >>> store.shape, store[:, [3]]                           # key 2 (0.1) was not kept
        (torch.Size([1, 4, 4]), tensor([[[0.1000, 0.6000, 0.0000, 0.2000]]]))
    """

    kept_keys: Int[Tensor, "head query keep"]
    kept_weights: Float[Tensor, "head query keep"]
    self_weights: Float[Tensor, "head query"]
    sink_keys: Int[Tensor, " sink"]
    sink_weights: Float[Tensor, "head query sink"]

    @staticmethod
    def __new__(cls, kept_keys, kept_weights, self_weights, sink_keys, sink_weights):
        head, query, _ = kept_weights.shape
        store = Tensor._make_wrapper_subclass(
            cls, (head, query, query), dtype=kept_weights.dtype, device=kept_weights.device
        )
        store.kept_keys, store.kept_weights = kept_keys, kept_weights
        store.self_weights = self_weights
        store.sink_keys, store.sink_weights = sink_keys, sink_weights
        return store

    def __repr__(self) -> str:
        head, query, _ = self.shape
        keep = self.kept_keys.shape[-1]
        return f"TopKeys(head={head}, query={query}, keep={keep}, sinks={len(self.sink_keys)})"

    HOLDS = "TopKeys stores (each row's strongest keys)"

    def __getitem__(self, index) -> Float[Tensor, "head row key"]:
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)):
            raise RatLensError(
                f"a TopKeys store is read by rows only (store[:, rows]), got index {index!r}"
            )
        rows = index[1]
        if isinstance(rows, slice):
            rows = torch.arange(self.shape[1])[rows]
        return self._dense_rows(torch.as_tensor(rows, dtype=torch.long).cpu().reshape(-1))

    def _dense_rows(self, rows: Int[Tensor, " row"]) -> Float[Tensor, "head row key"]:
        head, _, n = self.shape
        out = self.kept_weights.new_zeros(head, len(rows), n)
        # Unused kept slots point at the diagonal, which is written last.
        out.scatter_(-1, self.kept_keys[:, rows].long(), self.kept_weights[:, rows])
        out[:, :, self.sink_keys] = self.sink_weights[:, rows]
        out[:, torch.arange(len(rows)), rows] = self.self_weights[:, rows]
        return out

    def row(self, head: int, query: int) -> tuple[Int[Tensor, " key"], Float[Tensor, " key"]]:
        """The keys ``<= query`` this store holds for one (head, query) row and their weights,
        by key.

        Examples:
            >>> builder = TopKeysBuilder(3, keep=1, key_ok=torch.ones(1, 3, dtype=torch.bool),
            ...                          sink_keys=[0])
            >>> _ = builder.add(torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]]]))
            >>> builder.build()[0].row(0, 2)
            (tensor([0, 1, 2]), tensor([0.2000, 0.3000, 0.5000]))
        """
        keys = torch.cat(
            [
                self.kept_keys[head, query].long(),
                self.sink_keys[self.sink_keys <= query],
                torch.tensor([query]),
            ]
        ).unique()
        return keys, self[:, [query]][head, 0, keys]


class TopKeysBuilder:
    """Fills one layer's :class:`TopKeys` for every prompt of a batch from blocks of query rows
    as a forward delivers them: the whole ``[batch, head, seq, seq]`` at once, or, over a KV
    cache, ``[batch, head, chunk, keys so far]`` blocks in order. The work is done on the
    blocks' device; what is kept moves to the CPU.

    ``key_ok[b, k]``: whether key ``k`` of prompt ``b`` may be a candidate (unmasked, and not a
    sink when sinks are excluded); ``sink_keys``: every prompt's sink positions (their union).
    """

    def __init__(
        self, seq: int, keep: int, key_ok: Bool[Tensor, "batch seq"], sink_keys: Sequence[int]
    ):
        self.seq, self.keep, self.key_ok = seq, keep, key_ok.bool()
        self.sink_keys = torch.tensor(sorted({0, *sink_keys}), dtype=torch.long)
        self.rows = 0  # query rows received so far
        self.kept: Optional[tuple[Tensor, ...]] = None  # (keys, weights, diagonal, sinks)

    def add(
        self,
        block: Float[Tensor, "batch head query key"],
        stay: Optional[Float[Tensor, "batch query"]] = None,
        also: Optional[Int[Tensor, "batch head query extra"]] = None,
    ) -> Int[Tensor, "batch head query keep"]:
        """Keep a block of query rows; returns each row's kept keys (on the block's device).

        ``stay``: a residual channel appended after the heads, its rows' diagonal (0 off it),
        as value-norm shares have. ``also``: keys to keep besides each row's strongest (the
        same number for every row; another store's choice, e.g. the shares' top keys, so
        this store holds the attention of every edge a search on those can pick).
        """
        batch, head, queries, keys = block.shape
        first = keys - queries  # the block continues the rows received so far
        if first != self.rows or keys > self.seq:
            raise RatLensError(
                f"a block of {queries} query rows over {keys} keys cannot follow the "
                f"{self.rows} rows received (a prompt of {self.seq} tokens): the model did "
                f"not continue its KV cache"
            )
        block = block.detach().float()
        query = torch.arange(first, keys, device=block.device)
        idx, weights = self._strongest(block, query)
        kept = idx
        if also is not None:
            idx = torch.cat([idx, also], dim=-1)
            weights = torch.cat([weights, block.gather(-1, also)], dim=-1)
        sinks = block.new_zeros(batch, head, queries, len(self.sink_keys))
        inside = self.sink_keys < keys
        sinks[..., inside] = block[..., self.sink_keys[inside].to(block.device)]
        diagonal = block.diagonal(offset=first, dim1=-2, dim2=-1)
        if stay is not None:  # kept slots all unused (at the diagonal), no sink of its own
            idx = torch.cat([idx, query[:, None].expand_as(idx[:, :1])], dim=1)
            weights, sinks = (
                torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 1)) for t in (weights, sinks)
            )
            diagonal = torch.cat([diagonal, stay[:, None].float()], dim=1)
        self._write(first, (idx, weights, diagonal, sinks))
        self.rows = keys
        return kept

    def _write(self, first: int, parts: tuple[Tensor, ...]) -> None:
        """Copy a block's parts into the layer's CPU tensors, allocated by the first block for
        every row (no blocks held beside their concatenation; the block itself is freed).
        Keys are int16 where positions fit it: a third of the store at 2,048 tokens."""
        if self.kept is None:
            index = torch.int16 if self.seq <= torch.iinfo(torch.int16).max else torch.int32
            self.kept = tuple(
                torch.empty(
                    *t.shape[:2], self.seq, *t.shape[3:], dtype=index if i == 0 else t.dtype
                )
                for i, t in enumerate(parts)
            )
        for whole, part in zip(self.kept, parts):
            whole[:, :, first : first + part.shape[2]].copy_(part)

    def _strongest(
        self, block: Float[Tensor, "batch head query key"], query: Int[Tensor, " query"]
    ) -> tuple[Int[Tensor, "batch head query keep"], Float[Tensor, "batch head query keep"]]:
        """Each row's ``keep`` strongest candidate keys and their weights; slots beyond the
        row's candidates point at the diagonal with weight 0 (overwritten by it when read)."""
        batch, head, queries, keys = block.shape
        device = block.device
        allowed = self.key_ok[:, None, None, :keys].to(device) & (
            torch.arange(keys, device=device) < query[:, None]
        )
        values = block.masked_fill(~allowed, -torch.inf)
        idx = stable_top_keys(values.view(-1, keys), self.keep).view(batch, head, queries, -1)
        weights = values.gather(-1, idx)
        unused = weights == -torch.inf  # fewer allowed keys than keep
        idx = torch.where(unused, query[:, None], idx)
        weights = weights.masked_fill(unused, 0.0)
        if idx.shape[-1] < self.keep:  # fewer keys so far than keep: the rest likewise
            fill = self.keep - idx.shape[-1]
            idx = torch.cat([idx, query[:, None].expand(batch, head, queries, fill)], dim=-1)
            weights = torch.nn.functional.pad(weights, (0, fill))
        return idx, weights

    def build(self) -> list[TopKeys]:
        """One store per prompt, once every row has arrived (the blocks are freed)."""
        if self.rows != self.seq:
            raise RatLensError(f"{self.rows} of {self.seq} query rows were received")
        keys, weights, diagonal, sinks = self.kept
        self.kept = None
        return [
            TopKeys(keys[b], weights[b], diagonal[b], self.sink_keys, sinks[b])
            for b in range(keys.shape[0])
        ]


class CausalRows:
    """One layer's causal ``[batch, seq, seq]`` matrix (a head-mean) kept as the blocks of query
    rows a forward delivers, each over the keys seen so far: exactly the values, and over a KV
    cache in chunks of ``C`` rows about half the square's memory (``seq · (seq + C) / 2``; the
    rollout reads every traced layer's head-mean: 0.26 GB instead of 0.5 at 2,048 tokens on 30
    layers). Read by prompt, one dense matrix at a time.

    Examples:
        >>> rows = CausalRows()
        >>> rows.add(torch.tensor([[[1.0]]]))                           # row 0 (keys so far: 1)
        >>> rows.add(torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]))  # rows 1 and 2
        >>> rows[0]
        tensor([[1.0000, 0.0000, 0.0000],
                [0.5000, 0.5000, 0.0000],
                [0.2000, 0.3000, 0.5000]])
    """

    def __init__(self):
        self.blocks: list[Tensor] = []

    def add(self, block: Float[Tensor, "batch query key"]) -> None:
        """Rows ``key - query ..< key`` (each over the keys seen so far, ``key``)."""
        self.blocks.append(block)

    def __getitem__(self, b: int) -> Float[Tensor, "seq seq"]:
        """Prompt ``b``'s dense matrix (zero above the diagonal), as a dense ``[batch, seq,
        seq]`` tensor reads."""
        return stack_rows([block[b] for block in self.blocks])


def stack_rows(blocks: list[Tensor]) -> Float[Tensor, "*lead seq seq"]:
    """Row blocks of a causal matrix, in order, each over the keys seen so far, as one dense
    ``[..., seq, seq]`` (zero above the diagonal; a single block is returned as it is).

    Examples:
        >>> stack_rows([torch.tensor([[1.0]]), torch.tensor([[0.5, 0.5]])])
        tensor([[1.0000, 0.0000],
                [0.5000, 0.5000]])
    """
    if len(blocks) == 1:
        return blocks[0]
    seq = blocks[-1].shape[-1]
    out = blocks[0].new_zeros(*blocks[0].shape[:-2], seq, seq)
    for block in blocks:
        queries, keys = block.shape[-2:]
        out[..., keys - queries : keys, :keys] = block
    return out


class LayerMeanRows:
    """Each query row's head-mean attention averaged over ``n_layers`` layers
    (:func:`layer_mean`, in the order the layers arrive), handed back as soon as every layer has
    delivered the row, so only the rows in flight are held (one query chunk over a KV cache).

    Examples:
        >>> rows = LayerMeanRows(n_layers=2, seq=3)
        >>> rows.add(torch.tensor([[[1.0, 0.0]]]))   # layer 0, row 1 of 3 (keys so far: 2)
        >>> rows.add(torch.tensor([[[0.0, 1.0]]]))   # layer 1, the same row: done
        (1, tensor([[[0.5000, 0.5000, 0.0000]]]))
    """

    def __init__(self, n_layers: int, seq: int):
        self.n_layers, self.seq = n_layers, seq
        self.pending: dict[int, list] = {}  # first row -> [running sum, layers added]

    def add(
        self, rows: Float[Tensor, "batch query key"]
    ) -> Optional[tuple[int, Float[Tensor, "batch query seq"]]]:
        queries, keys = rows.shape[-2:]
        first = keys - queries
        rows = at_least_float32(rows)
        if first not in self.pending:
            total = rows.new_zeros(*rows.shape[:-1], self.seq)
            total[..., :keys] = rows
            self.pending[first] = [total, 1]
        else:
            self.pending[first][0][..., :keys] += rows
            self.pending[first][1] += 1
        total, added = self.pending[first]
        if added < self.n_layers:
            return None
        del self.pending[first]
        return first, total / self.n_layers
