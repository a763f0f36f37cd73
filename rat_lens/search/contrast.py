"""A layer's search weights with the target row's head candidates rescaled: how a foil scores
the first move out of the target (``rat_lens.lens`` computes the factors). Pure tensors."""

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import RatLensError

__all__ = ["TargetRowScale"]


class TargetRowScale(Tensor):
    """``weights`` (``[channel, query, key]``, dense or a bounded store; heads first, a stay
    channel after them where there is one) read as the search reads them, by rows
    (``scaled[:, rows]``), with the head channels of row ``target`` multiplied by ``factors``
    ``[head, key]``.

    Examples:
        >>> w = TargetRowScale(torch.ones(3, 2, 2), 1, torch.tensor([[0.5, 1.0], [0.0, 1.0]]))
        >>> w[:, torch.tensor([1])][:, 0].tolist()   # heads 0 and 1 scaled, the stay channel not
        [[0.5, 1.0], [0.0, 1.0], [1.0, 1.0]]
    """

    @staticmethod
    def __new__(cls, weights, target: int, factors: Float[Tensor, "head key"]):
        scaled = Tensor._make_wrapper_subclass(
            cls, tuple(weights.shape), dtype=weights.dtype, device=weights.device
        )
        scaled.weights, scaled.target, scaled.factors = weights, target, factors
        return scaled

    def __repr__(self) -> str:
        return f"TargetRowScale(shape={tuple(self.shape)}, target={self.target})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RatLensError(f"rescaled search weights are read by rows only, not by {func}")

    def __getitem__(self, index) -> Float[Tensor, "channel row key"]:
        rows = self.weights[index]
        picked = torch.as_tensor(index[1]).reshape(-1)
        hit = (picked == self.target).to(rows.device)
        if not bool(hit.any()):
            return rows
        rows = rows.clone()
        heads = self.factors.shape[0]
        factors = self.factors[:, None, :].to(rows.device, rows.dtype)
        rows[:heads, hit] = rows[:heads, hit] * factors
        return rows
