"""reverse-attention's ``attn_extract``: one layer's attention from a model, and the mask.

A TransformerLens model is read through its ``blocks.{l}.attn.hook_pattern`` hooks
(:func:`rat_lens.capture.capture_patterns`: any attention implementation, the forward stops
after the layer). Any other model is called as the peer calls a Hugging Face model, with
``output_attentions=True``, and must return ``.attentions``.

Examples:
    >>> from rat_lens.models import load
    >>> model = load("induction-2l")
    >>> attn, layer = extract_attention(model, model.to_tokens("cat dog cat"), None, -1)
    >>> tuple(attn.shape), layer
    ((4, 4), 1)
"""

from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..capture import capture_patterns, model_session, pattern_layers
from ..errors import RatLensError, check_choice, resolve_index
from ..options import AGG_HEADS
from ..search.pattern import aggregate_heads

__all__ = ["extract_attention", "get_attention_mask", "is_transformer_lens"]


def extract_attention(
    model,
    input_ids: Int[Tensor, "batch seq"],
    attention_mask: Optional[Int[Tensor, "batch seq"]],
    layer: int,
    agg_heads: str = "mean",
) -> tuple[Float[Tensor, "*head seq seq"], int]:
    """Layer ``layer``'s attention (negative counts from the last) for the first prompt, on
    CPU: ``[query, key]`` with heads reduced by ``mean`` / ``max``, ``[head, query, key]``
    for ``none``; and the layer's non-negative index."""
    try:
        check_choice("agg_heads", agg_heads, AGG_HEADS)
    except RatLensError as err:  # the peer's words first: its users match on them
        raise RatLensError(f"Unknown agg_heads mode: {err}") from None
    if is_transformer_lens(model):
        resolved = resolve_index("layer", layer, pattern_layers(model), "n_layers")
        cache = capture_patterns(
            model, input_ids, [resolved], agg_heads=agg_heads, attention_mask=attention_mask
        )
        pattern = cache["pattern", resolved][0]
    else:
        attentions = _hf_attentions(model, input_ids, attention_mask)
        resolved = resolve_index("layer", layer, len(attentions), "n_layers")
        pattern = aggregate_heads(attentions[resolved][0], agg_heads)
    return (pattern if agg_heads == "none" else pattern[0]).cpu(), resolved


def is_transformer_lens(model) -> bool:
    """Whether ``model`` has TransformerLens's ``hook_pattern`` hook points."""
    try:
        pattern_layers(model)
    except RatLensError:
        return False
    return True


def _hf_attentions(model, input_ids: Tensor, attention_mask: Optional[Tensor]) -> tuple:
    """Every layer's ``[batch, head, query, key]`` attention from a Hugging Face style forward."""
    parameters = model.parameters() if hasattr(model, "parameters") else iter(())
    first = next(iter(parameters), None)
    device = first.device if isinstance(first, Tensor) else torch.device("cpu")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    with torch.no_grad():
        if isinstance(model, torch.nn.Module):
            with model_session(model):  # eval mode, every module's own mode put back after
                out = _call(model, input_ids.to(device), attention_mask)
        else:
            out = _call(model, input_ids.to(device), attention_mask)
    attentions = tuple(getattr(out, "attentions", None) or ())
    if not attentions or any(a is None for a in attentions):
        raise RatLensError(
            f"{type(model).__name__} returned no attentions with output_attentions=True (a "
            "Hugging Face model under sdpa attention does not): load it with "
            "attn_implementation='eager', or pass a TransformerLens model"
        )
    return attentions


def _call(model, input_ids: Tensor, attention_mask: Optional[Tensor]):
    return model(
        input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False
    )


def get_attention_mask(
    input_ids: Int[Tensor, "batch seq"], tokenizer, attention_mask=None
) -> Int[Tensor, "batch seq"]:
    """``attention_mask`` as integers when given; else 0 where ``input_ids`` holds the
    tokenizer's pad id, 1 elsewhere (all 1 without a pad id). Where the pad id is also the BOS
    id (GPT-2 style tokenizers) this masks BOS: :class:`ReverseAttentionTracer` does not call
    it for TransformerLens models (docs/migration.md)."""
    if attention_mask is not None:
        return torch.as_tensor(attention_mask).long()
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        return torch.ones_like(input_ids)
    return (input_ids != pad).long()
