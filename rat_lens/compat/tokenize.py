"""reverse-attention's ``tokenize``: token strings, BOS positions, beams with their tokens.

Each token is decoded alone with ``tokenizer.decode([id])`` (any tokenizer with ``decode``
will do), and a path reads as the peer prints it, earliest token first.

Examples:
    >>> import torch
    >>> from rat_lens.models import load
    >>> tok = load("induction-2l").tokenizer
    >>> ids = torch.tensor([[0, 5, 6, 0, 5]])
    >>> get_token_strings(ids, tok)[:3], get_bos_positions(ids, tok)
    (['<bos>', 'hen', 'fox'], [0, 3])
    >>> state = BeamState([4, 1, 0], [0.5, 0.25], -2.0794)
    >>> format_path_text(beam_state_to_path(state, ids, tok))
    '<bos> -> hen -> hen (score: -1.0397)'
"""

from typing import Optional

from jaxtyping import Int
from torch import Tensor

from ..result import BeamPath, path_text
from .beam import BeamState
from .utils import normalize_score

__all__ = ["get_token_strings", "get_bos_positions", "beam_state_to_path", "format_path_text"]


def _ids(input_ids: Int[Tensor, "*batch seq"]) -> list[int]:
    """The first prompt's ids (``[seq]`` or ``[batch, seq]``)."""
    return (input_ids[0] if input_ids.ndim == 2 else input_ids).tolist()


def get_token_strings(input_ids: Int[Tensor, "*batch seq"], tokenizer) -> list[str]:
    """Each token of the first prompt decoded alone."""
    return [tokenizer.decode([i]) for i in _ids(input_ids)]


def get_bos_positions(
    input_ids: Int[Tensor, "*batch seq"], tokenizer, bos_token_id: Optional[int] = None
) -> list[int]:
    """Where the first prompt holds ``bos_token_id`` (default: the tokenizer's; none without)."""
    if bos_token_id is None:
        bos_token_id = getattr(tokenizer, "bos_token_id", None)
    if bos_token_id is None:
        return []
    return [p for p, i in enumerate(_ids(input_ids)) if i == bos_token_id]


def beam_state_to_path(
    beam: BeamState,
    input_ids: Int[Tensor, "*batch seq"],
    tokenizer,
    length_norm: str = "avg_logprob",
) -> BeamPath:
    """A finished :class:`BeamState` as a :class:`BeamPath` with its tokens, ids and scores."""
    ids = _ids(input_ids)
    token_ids = [ids[p] for p in beam.positions]
    return BeamPath(
        beam.positions,
        [tokenizer.decode([i]) for i in token_ids],
        token_ids,
        beam.edge_attns,
        beam.log_score,
        normalize_score(beam.log_score, beam.num_edges, length_norm),
    )


def format_path_text(path: BeamPath, include_score: bool = True) -> str:
    """The path as the peer prints it, earliest token first: ``The -> " quick" -> fox (score:
    -0.7500)`` (newlines and tabs escaped, a token with a space or an empty one quoted). A
    path through several layers or heads, which the peer cannot trace, reads as
    :func:`rat_lens.result.path_text` writes it."""
    if len(set(path.layers)) > 1 or any(h is not None for h in path.heads):
        text = path_text(path)
        return text if include_score else text.rpartition(" (score: ")[0]
    text = " -> ".join(_shown(token) for token in reversed(path.tokens))
    return f"{text} (score: {path.score_norm:.4f})" if include_score else text


def _shown(token: str) -> str:
    token = token.replace("\n", "\\n").replace("\t", "\\t")
    return f'"{token}"' if " " in token or not token else token
