"""Head roles (previous-token, duplicate-token, induction) by TransformerLens's own head detector.

TL's ``detect_head(model, seq, name, cache=...)`` takes strings and re-tokenizes them, so it
needs a tokenizer and cannot score a padded batch or token ids. The scores here are TL's, from
token ids: its detection patterns (``get_previous_token_head_detection_pattern(tokens)`` and
friends) and its scoring function (``compute_head_attention_similarity_score``) applied to each
head's pattern, padding cut out first, then averaged over prompts as ``detect_head`` does for a
list of prompts. Patterns are copied before scoring: some TL versions write into them.
"""

from collections.abc import Sequence
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import head_detector

from .capture import capture_patterns, hook_name, input_device, pattern_layers
from .errors import RatLensError, check_choice, checked_call
from .result import HeadTable

__all__ = ["ROLE_NAMES", "ERROR_MEASURES", "detection_patterns", "role_scores", "head_roles"]

ROLE_NAMES = ("previous_token_head", "duplicate_token_head", "induction_head")
ERROR_MEASURES = ("mul", "abs")


def detection_patterns(
    tokens: Int[Tensor, " seq"], names: Sequence[str] = ROLE_NAMES
) -> dict[str, Float[Tensor, "seq seq"]]:
    """TL's ideal ``[query, key]`` pattern of each role for these token ids.

    Examples:
        >>> pats = detection_patterns(torch.tensor([0, 5, 6, 5, 6]))
        >>> pats["previous_token_head"][3].tolist(), pats["induction_head"][3].tolist()
        ([0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0])
        >>> pats["duplicate_token_head"][4].tolist()
        [0.0, 0.0, 1.0, 0.0, 0.0]
    """
    _check_names(names)
    tokens = tokens.detach().cpu()
    return {
        name: getattr(head_detector, f"get_{name}_detection_pattern")(tokens).float()
        for name in names
    }


def role_scores(
    pattern: Float[Tensor, "batch head query key"],
    tokens: Int[Tensor, "batch seq"],
    *,
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
    names: Sequence[str] = ROLE_NAMES,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
) -> dict[str, Float[Tensor, "batch head"]]:
    """TL's detector score of every head of one layer, for every prompt of a batch.

    Pure tensors in and out, so it can run inside a ``hook_pattern`` hook on the full pattern.
    Masked (padding) positions are cut out of each prompt before scoring.

    Examples:
        >>> tokens = torch.tensor([[0, 5, 6, 5, 6]])
        >>> previous = torch.eye(5).roll(-1, dims=1).tril()                  # q reads q - 1
        >>> previous[0, 0] = 1.0
        >>> scores = role_scores(torch.stack([previous, torch.eye(5)])[None], tokens)
        >>> [round(s, 2) for s in scores["previous_token_head"][0].tolist()]  # head 0, head 1
        [0.8, 0.0]
    """
    _check_names(names)
    check_choice("error_measure", error_measure, ERROR_MEASURES)
    if pattern.ndim != 4 or tokens.shape != (pattern.shape[0], pattern.shape[-1]):
        raise RatLensError(
            f"pattern {tuple(pattern.shape)} and tokens {tuple(tokens.shape)} "
            "must be [batch, head, seq, seq] and [batch, seq]"
        )
    out = {name: torch.empty(pattern.shape[:2], dtype=torch.float64) for name in names}
    for b in range(pattern.shape[0]):
        keep = (
            torch.arange(tokens.shape[1])
            if attention_mask is None
            else attention_mask[b].detach().cpu().nonzero().flatten()
        )
        if len(keep) < 2:
            raise RatLensError(f"prompt {b} has {len(keep)} unmasked tokens; head roles need 2")
        ideal = detection_patterns(tokens[b].detach().cpu()[keep], names)
        rows = pattern[b].detach().float().cpu()[:, keep][:, :, keep]
        for head in range(rows.shape[0]):
            for name in names:
                out[name][b, head] = head_detector.compute_head_attention_similarity_score(
                    rows[head].clone(),
                    ideal[name],
                    exclude_bos=exclude_bos,
                    exclude_current_token=exclude_current_token,
                    error_measure=error_measure,
                )
    return out


@checked_call
def head_roles(
    model,
    inputs: Union[str, Sequence[str], Tensor],
    *,
    layers: Optional[Sequence[int]] = None,
    cache=None,
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
    names: Sequence[str] = ROLE_NAMES,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
) -> HeadTable:
    """Every head's TL detector score for each role, averaged over the prompts of ``inputs``.

    ``inputs`` is text, a list of texts (each tokenized alone with ``model.to_tokens``) or token
    ids ``[seq]`` / ``[batch, seq]`` (no tokenizer needed; give ``attention_mask`` for padding).
    Without ``cache`` one forward runs, stopped after the highest layer of ``layers`` (default:
    all). A ``cache`` must hold the full per-head patterns (``run_with_cache``); it is not written.
    On one text this gives ``detect_head(model, text, name, ...)``'s numbers.

    Examples:
        >>> from rat_lens.models import load, repeated_tokens
        >>> roles = head_roles(load("induction-2l"), repeated_tokens(4, 20, 12, seed=0))
        >>> roles.layers, sorted(roles.scores), roles.n_heads
        ([0, 1], ['duplicate_token_head', 'induction_head', 'previous_token_head'], 4)
    """
    _check_names(names)
    check_choice("error_measure", error_measure, ERROR_MEASURES)
    layer_ids = _layer_ids(model, layers)
    # TL's detector settings, the same for every prompt and layer.
    detector = dict(
        names=names,
        exclude_bos=exclude_bos,
        exclude_current_token=exclude_current_token,
        error_measure=error_measure,
    )
    if isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs) and inputs:
        if cache is not None:
            raise RatLensError(
                "one cache holds one batch of tokens: pass token ids with it, or texts without it"
            )
        return _mean_over_texts(model, inputs, layer_ids, detector)
    tokens = _token_batch(model, inputs)
    if cache is None:
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
        cache = capture_patterns(
            model, tokens.to(input_device(model)), layer_ids, agg_heads="none", attention_mask=mask
        )
    scores = {name: [] for name in names}
    for layer in layer_ids:
        pattern = _cached_pattern(cache, layer)
        per_prompt = role_scores(pattern, tokens, attention_mask=attention_mask, **detector)
        for name in names:
            scores[name].append(per_prompt[name].mean(0))
    return HeadTable.from_tensors(layer_ids, {n: torch.stack(s) for n, s in scores.items()})


def _layer_ids(model, layers: Optional[Sequence[int]]) -> list[int]:
    """``layers`` as sorted distinct non-negative ids (negative ones count from the top);
    None: every layer."""
    n_layers = pattern_layers(model)
    if layers is None:
        return list(range(n_layers))
    return sorted({_resolve_layer(layer, n_layers) for layer in layers})


def _mean_over_texts(model, texts: Sequence[str], layer_ids: list[int], detector: dict):
    """Each text tokenized and scored alone (texts of different lengths need no padding),
    then the scores averaged, as ``detect_head`` averages a list of prompts."""
    tables = [head_roles(model, text, layers=layer_ids, **detector) for text in texts]
    return HeadTable.from_tensors(
        layer_ids,
        {
            name: torch.stack(
                [torch.tensor(t.scores[name], dtype=torch.float64) for t in tables]
            ).mean(0)
            for name in detector["names"]
        },
    )


def _token_batch(model, inputs) -> Tensor:
    """``inputs`` (one text, or token ids ``[seq]`` / ``[batch, seq]``) as ids
    ``[batch, seq]`` on the CPU, where the detection patterns are built."""
    tokens = model.to_tokens(inputs) if isinstance(inputs, str) else inputs
    if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point:
        raise RatLensError(
            f"inputs must be text, a list of texts or a tensor of token ids, got "
            f"{type(inputs).__name__}"
        )
    return (tokens.unsqueeze(0) if tokens.ndim == 1 else tokens).cpu()


def _cached_pattern(cache, layer: int) -> Tensor:
    try:
        pattern = cache[hook_name(layer)]
    except KeyError:
        raise RatLensError(
            f"the cache has no {hook_name(layer)!r}: cache it with run_with_cache"
        ) from None
    # run_with_cache(..., remove_batch_dim=True), what detect_head expects, drops the batch axis.
    return pattern.unsqueeze(0) if pattern.ndim == 3 else pattern


def _check_names(names: Sequence[str]) -> None:
    if isinstance(names, str) or not names:
        raise RatLensError(f"names={names!r} must be a non-empty list of {ROLE_NAMES}")
    for name in names:
        check_choice("role name", name, ROLE_NAMES)


def _resolve_layer(layer: int, n_layers: int) -> int:
    resolved = layer + n_layers if layer < 0 else layer
    if not 0 <= resolved < n_layers:
        raise RatLensError(f"layer {layer} out of range for n_layers {n_layers}")
    return resolved
