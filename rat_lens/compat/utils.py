"""reverse-attention's ``utils``: how an edge is scored and a path's score normalised.

Each is the rule rat_lens's own search applies (:mod:`rat_lens.search.beam`), exposed under the
peer's name and signature.

Examples:
    >>> round(safe_log(0.5), 4), normalize_score(-6.0, 3, "avg_logprob"), exp_normalize([0.0, 0.0])
    (-0.6931, -2.0, [0.5, 0.5])
"""

import math
import warnings

from ..options import check_length_norm, length_norm_denominator
from ..result import Beam, beam_weights

__all__ = ["safe_log", "normalize_score", "exp_normalize"]

LOG_FLOOR = 1e-12  # the search scores a weight below this as log(1e-12), as the peer does


def safe_log(x: float, eps: float = LOG_FLOOR) -> float:
    """``log(max(x, eps))``; a weight ``<= 0`` (never an edge of a search) is warned about."""
    if x <= 0:
        warnings.warn(f"attention weight {x} <= 0 scored as log({eps})", stacklevel=2)
    return math.log(max(x, eps))


def normalize_score(log_score: float, path_length: int, mode: str = "avg_logprob") -> float:
    """A path's summed log weight divided as ``length_norm=mode`` divides it (``none``,
    ``avg_logprob``, ``sqrt``, ``pow:α``); a path without edges keeps its score."""
    return log_score / length_norm_denominator(check_length_norm(mode), path_length)


def exp_normalize(scores: list[float]) -> list[float]:
    """softmax over ``scores``: the beam weights of the Sankey links
    (:func:`rat_lens.result.beam_weights` of beams with these scores)."""
    return beam_weights([Beam([0], [], [], [], [], score, score) for score in scores])
