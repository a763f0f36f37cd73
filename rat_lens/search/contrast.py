"""How a foil scores the first move out of the target: the rule (:func:`foil_weights`, from the
reads' direct contributions that ``rat_lens.lens`` computes) and a layer's search weights with
the target row's head candidates replaced by it (:class:`TargetRowWeights`). Pure tensors."""

import torch
from jaxtyping import Float
from torch import Tensor

from .pattern import RowsOnly

__all__ = ["TargetRowWeights", "foil_weights"]


def foil_weights(
    reads: list[Float[Tensor, "head key"]], target: int
) -> list[Float[Tensor, "head key"]]:
    """The foil's weight of every head read at the target row, per traced layer.

    ``reads[i][h, k]`` is head ``h``'s read of key ``k`` at the target as a direct contribution
    ``c`` to ``logit(T) - logit(F)``; summed over the keys it is the head's write's ``dla_diff``.
    A read weighs ``max(0, c)`` times its head's net share, ``max(0, Σ_k c) / Σ_k max(0, c)``:
    the head's ``dla_diff`` shared among the keys that push towards ``T``, so a head whose write
    favours the foil moves nothing and reads the head's other reads cancel count for less. The
    target's own key (a stay, not a move) gets 0; the largest weight over all layers is 1. All
    zeros where no head's write pushes towards ``T``.

    Examples:
        >>> reads = [torch.tensor([[3.0, -1.0, 0.0], [4.0, 0.0, 0.0]])]   # 1 layer, 2 heads
        >>> foil_weights(reads, 2)[0].tolist()    # head 0's 3 is cut to 2 by its -1
        [[0.5, 0.0, 0.0], [1.0, 0.0, 0.0]]
        >>> reads = [torch.tensor([[0.5, 0.0, 3.0], [1.0, 0.0, 0.0]])]
        >>> foil_weights(reads, 2)[0].tolist()    # head 0's read of the target is a stay
        [[0.5, 0.0, 0.0], [1.0, 0.0, 0.0]]
    """
    weights = []
    for c in reads:
        pushes = c.clamp_min(0)
        total = pushes.sum(-1, keepdim=True)
        net = c.sum(-1, keepdim=True).clamp_min(0)
        w = torch.where(total > 0, pushes * net / total.clamp_min(torch.finfo(c.dtype).tiny), 0.0)
        w[:, target] = 0.0
        weights.append(w)
    top = max(float(w.max()) for w in weights)
    return [w / top if top > 0 else w for w in weights]


class TargetRowWeights(RowsOnly):
    """``weights`` (``[channel, query, key]``, dense or a bounded store; heads first, a stay
    channel after them where there is one) read as the search reads them, by rows
    (``scaled[:, rows]``), with the head channels of row ``target`` replaced by ``head_weights``
    ``[head, key]``.

    Examples:
        >>> w = TargetRowWeights(torch.ones(3, 2, 2), 1, torch.tensor([[0.5, 1.0], [0.0, 0.2]]))
        >>> w[:, torch.tensor([1])][:, 0].tolist()   # heads 0 and 1 replaced, the stay channel not
        [[0.5, 1.0], [0.0, 0.20000000298023224], [1.0, 1.0]]
    """

    @staticmethod
    def __new__(cls, weights, target: int, head_weights: Float[Tensor, "head key"]):
        replaced = Tensor._make_wrapper_subclass(
            cls, tuple(weights.shape), dtype=weights.dtype, device=weights.device
        )
        replaced.weights, replaced.target, replaced.head_weights = weights, target, head_weights
        return replaced

    def __repr__(self) -> str:
        return f"TargetRowWeights(shape={tuple(self.shape)}, target={self.target})"

    HOLDS = "replaced search weights"

    def __getitem__(self, index) -> Float[Tensor, "channel row key"]:
        rows = self.weights[index]
        picked = torch.as_tensor(index[1]).reshape(-1)
        hit = (picked == self.target).to(rows.device)
        if not bool(hit.any()):
            return rows
        rows = rows.clone()
        heads = self.head_weights.shape[0]
        rows[:heads, hit] = self.head_weights[:, None, :].to(rows.device, rows.dtype)
        return rows
