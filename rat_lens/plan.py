"""The first step of a trace: everything decided before any forward runs.

:func:`make_plan` reads the options, the run inputs, the model's shape and the prompts once and
fixes what the other steps follow (:mod:`rat_lens.tracer` runs them): which layers, which
targets, which BOS positions, which edge weights (``TraceOptions.resolve``) and which capture
source (dense patterns, the bounded store, contribution shares). Every bad option is refused
here, before the forward: a typo costs nothing.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional, SupportsIndex, Union

import torch
from torch import Tensor

from . import options as budgets
from .capture import check_cache, check_tokens, pattern_layers
from .errors import RatLensError
from .options import DEFAULT_PREDICTIONS, TraceInputs, TraceOptions

__all__ = ["TracePlan", "make_plan", "resolve_targets", "is_position", "SOURCES"]

Targets = Union[SupportsIndex, Sequence[SupportsIndex], Tensor]
# Where a trace's weights come from: every head's whole pattern (or head-aggregated), each
# row's strongest keys as the forward runs, or each part's share of the block output (from
# whole patterns, or from rows recomputed beside the bounded store).
SOURCES = ("dense", "bounded", "contribution", "contribution_bounded")


@dataclass(frozen=True)
class TracePlan:
    """What one trace (of a batch of prompts) does, decided once.

    Attributes:
        options: the search options, resolved (no ``None`` left).
        inputs: the run's inputs (cache, predictions, query chunks, store, BOS id).
        layer_ids: the layers a path reads, top first.
        targets: per prompt, its target positions (non-negative, in the order given).
        bos: per prompt, its BOS positions (unmasked tokens equal to the BOS id).
        mask: ``[batch, seq]`` 1 for real tokens.
        source: one of ``SOURCES``.
        keep: keys per row the bounded store keeps (``source="bounded"``).
    """

    options: TraceOptions
    inputs: TraceInputs
    layer_ids: list[int]
    targets: list[list[int]]
    bos: list[list[int]]
    mask: Tensor
    source: str
    keep: int = 0

    @property
    def forward_mask(self) -> Optional[Tensor]:
        """The mask a forward takes: None for unpadded prompts."""
        return None if self.mask.all() else self.mask


def make_plan(
    model,
    tokens: Tensor,
    mask: Tensor,
    target_pos: Targets,
    options: TraceOptions,
    inputs: TraceInputs,
    bos_token_id: Optional[int],
    keep: int,
) -> TracePlan:
    """The plan for tracing ``tokens`` (``[batch, seq]``, ``mask`` 1 for real tokens) from
    ``target_pos``; ``bos_token_id`` is the BOS id when ``inputs`` gives none, ``keep`` the
    bounded store's width."""
    layer_ids = options.layer_ids(pattern_layers(model))
    targets = resolve_targets(target_pos, mask)
    deepest = max(t for row in targets for t in row) + 1
    options.check_budget(deepest if options.chain else len(layer_ids))
    if inputs.cache is None:
        check_tokens(model, tokens)
    else:
        check_cache(model, inputs.cache, tokens)
    resolved = options.resolve()
    bos_id = inputs.bos_token_id if inputs.bos_token_id is not None else bos_token_id
    bos = [
        [p for p, t in enumerate(row.tolist()) if t == bos_id and mask[b, p]]
        for b, row in enumerate(tokens)
    ]
    if inputs.predictions is None:  # the forward runs to the logits anyway at full depth
        inputs = replace(inputs, predictions=0 if inputs.cache is not None else DEFAULT_PREDICTIONS)
    source = _source(model, tokens, layer_ids, resolved, inputs)
    return TracePlan(resolved, inputs, layer_ids, targets, bos, mask, source, keep)


def _source(model, tokens, layer_ids, options: TraceOptions, inputs: TraceInputs) -> str:
    """Which capture source serves these options (``inputs.store``, see TraceInputs). Per-head
    edges of every weight stream into the bounded store at any length (contribution edges
    recompute the rows they read from queries and keys); none is ever swapped for another."""
    n_heads = getattr(getattr(model, "cfg", None), "n_heads", None) or 1
    if not options.per_head:
        why = f"agg_heads={options.agg_heads!r} keeps one matrix per layer"
    elif options.chain and n_heads == 1:
        why = "a chain through one head takes reverse-attention's order, from whole rows"
    else:
        why = None
    if inputs.store == "bounded" and why:
        raise RatLensError(
            f"store='bounded' is for per-head traces (agg_heads='none'), but {why}: use "
            "store='auto' or 'dense'"
        )
    if options.edge_weight == "contribution":
        return _contribution_source(tokens, layer_ids, n_heads, inputs)
    if inputs.store != "auto" or why:
        return "bounded" if inputs.store == "bounded" else "dense"
    if inputs.cache is not None and options.edge_weight == "attention":
        return "dense"  # the cache holds it all already
    dense = dense_bytes(tokens, layer_ids, n_heads)  # value-norm shares are read by rows
    return "bounded" if dense > budgets.PATTERN_BUDGET else "dense"


def _contribution_source(tokens, layer_ids, n_heads, inputs: TraceInputs) -> str:
    """Contribution edges read each visited row whole: from every traced head's pattern
    (``"contribution"``: ``store="dense"``, or ``"auto"`` where they fit PATTERN_BUDGET), else
    recomputed from the layer's queries and keys beside the bounded store
    (``"contribution_bounded"``), for models whose attention is ``softmax(scale · q·kᵀ)``
    (checked as it runs)."""
    if inputs.store == "auto":
        over = dense_bytes(tokens, layer_ids, n_heads) > budgets.PATTERN_BUDGET
        return "contribution_bounded" if over else "contribution"
    return "contribution_bounded" if inputs.store == "bounded" else "contribution"


def dense_bytes(tokens: Tensor, layer_ids: list[int], channels: int) -> int:
    """Bytes of float32 ``[layer, batch, channel, seq, seq]``: what a dense trace would hold."""
    batch, seq = tokens.shape
    return 4 * len(layer_ids) * batch * channels * seq * seq


def resolve_targets(target_pos: Targets, mask: Tensor) -> list[list[int]]:
    """Per prompt, ``target_pos`` as non-negative positions; negative targets count back from
    each prompt's last unmasked token. Python, NumPy and 0-d tensor integers are accepted.

    Examples:
        >>> resolve_targets([-1, 0], torch.tensor([[1, 1, 1, 0]]))
        [[2, 0]]
    """
    wanted = [target_pos] if is_position(target_pos) else target_pos
    if hasattr(wanted, "tolist") and getattr(wanted, "ndim", 0) == 1:  # NumPy / torch 1-D
        wanted = wanted.tolist()
    if isinstance(wanted, (str, bytes)) or not isinstance(wanted, Sequence):
        raise RatLensError(f"target_pos must be an int or a list of ints, got {target_pos!r}")
    wanted = list(wanted)
    if not wanted:
        raise RatLensError("target_pos is an empty list")
    out = []
    for row in mask:
        last = int(row.nonzero().max())
        resolved = []
        for t in wanted:
            if not is_position(t):
                raise RatLensError(f"target_pos must be ints, got {t!r}")
            p = last + 1 + int(t) if t < 0 else int(t)
            if not 0 <= p <= last or not row[p]:
                raise RatLensError(f"target_pos={t} out of range for a prompt of {last + 1} tokens")
            resolved.append(p)
        out.append(resolved)
    return out


def is_position(value) -> bool:
    """An integer of any of Python, NumPy (``np.int64``) or torch (a 0-d integer tensor)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, Tensor):
        return value.ndim == 0 and not value.dtype.is_floating_point and value.dtype != torch.bool
    return hasattr(value, "__index__") and not hasattr(value, "__len__")
