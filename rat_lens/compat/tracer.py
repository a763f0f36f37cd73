"""A drop-in for reverse-attention users: ``rat_lens.ReverseAttentionTracer``.

reverse-attention 0.1.0's ``ReverseAttentionTracer(model, tokenizer, device=None, dtype=None)``
takes a Hugging Face model; this one takes that or any TransformerLens model, and keeps the
peer's API: ``trace`` (same argument order and defaults, ``target_pos=None`` = last token),
``trace_text``, ``render_html(result, out_dir, open_browser=False)``. Every difference is listed
in docs/migration.md. It sits on top of the package (it needs the tracer, the models and the
renderer); the tracer itself is :class:`rat_lens.tracer.Tracer`.

Examples:
    >>> from rat_lens.models import load
    >>> tracer = ReverseAttentionTracer(load("induction-2l"))
    >>> result = tracer.trace_text("cat dog red blue cat dog red", top_beam=2)
    >>> result.beams[0].positions[0], result.layer
    (7, 1)
"""

import warnings
from pathlib import Path
from typing import Union

import torch

from .capture import input_device
from .models import check_device
from .models._hf import wrap_hf_model
from .render import render_html
from .result import TraceResult
from .tracer import Tracer

__all__ = ["ReverseAttentionTracer"]


class ReverseAttentionTracer(Tracer):
    """Trace which earlier tokens, through which layers and heads, fed a target token.

    Args:
        model: a TransformerLens model (``TransformerBridge``, ``HookedTransformer``) or, as
            reverse-attention takes it, a Hugging Face ``PreTrainedModel``, which is wrapped in
            a ``TransformerBridge`` sharing its weights (the model is not changed).
        tokenizer: default: the model's own.
        device: reverse-attention's; as there, it is recorded (``tracer.device``, default:
            the model's) and nothing is moved. A device this machine does not have is refused.
        dtype: reverse-attention's; as there, it is recorded (``tracer.dtype``, default: the
            model's) and nothing is cast.
    """

    def __init__(self, model, tokenizer=None, device=None, dtype=None):
        from_hf = _is_hf_model(model)
        if from_hf:
            model = wrap_hf_model(model, tokenizer)
        super().__init__(model, tokenizer)
        params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
        first = next(iter(params), None)
        # the embedding's device: on a dispatched or offloaded model the first parameter may
        # be a meta placeholder
        self.device = check_device(device) if device is not None else str(input_device(model))
        self.dtype = dtype if dtype is not None else (first.dtype if first is not None else None)
        # Only where reverse-attention could have run (a Hugging Face model) is its pad mask
        # a difference worth a warning.
        self._told_pad_mask = not from_hf

    def _before_trace(self, input_ids, attention_mask) -> None:
        """Where the tokenizer's pad id appears in ``input_ids`` and no mask is given,
        reverse-attention would mask those positions; rat_lens does not, and says so once per
        tracer of a Hugging Face model (pass ``attention_mask`` to choose)."""
        if attention_mask is None and not self._told_pad_mask:
            self._told_pad_mask = _warn_pad_mask(input_ids, self.tokenizer)

    def render_html(
        self,
        trace_result: Union[TraceResult, list],
        out_dir: Union[str, Path],
        open_browser: bool = False,
    ) -> str:
        """reverse-attention's ``tracer.render_html``: :func:`rat_lens.render.render_html`."""
        return render_html(trace_result, out_dir, open_browser=open_browser)


def _is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _warn_pad_mask(input_ids, tokenizer) -> bool:
    """Warn (and return True) when reverse-attention would have masked pad-id positions."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None or not hasattr(input_ids, "eq"):
        return False
    positions = input_ids.reshape(-1).eq(pad).nonzero().reshape(-1).tolist()
    if positions:
        warnings.warn(
            f"positions {positions[:8]} hold the tokenizer's pad id {pad}: reverse-attention "
            f"would mask them (attention_mask = input_ids != pad_token_id); rat_lens traces "
            f"every token unless you pass attention_mask (see docs/migration.md)",
            UserWarning,
            stacklevel=3,
        )
    return bool(positions)
