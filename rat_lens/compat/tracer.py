"""reverse-attention's ``ReverseAttentionTracer``, on top of rat_lens's :class:`Tracer`.

reverse-attention 0.1.0's ``ReverseAttentionTracer(model, tokenizer, device=None, dtype=None)``
takes a Hugging Face model; this one takes that or any TransformerLens model, and keeps the
peer's API: ``trace`` (same argument order and defaults, ``target_pos=None`` = last token),
``trace_text``, ``render_html(result, out_dir, open_browser=False)``; tokens decoded one by
one with ``decode``, paths printed as the peer prints them, its warning when ``stop_at_bos``
finds no BOS. A model that is neither, but whose forward takes ``output_attentions`` as a
Hugging Face model's does, is traced the peer's way, through the attentions it returns. Every
difference is listed in docs/migration.md.

Examples:
    >>> from rat_lens.models import load
    >>> tracer = ReverseAttentionTracer(load("induction-2l"))
    >>> result = tracer.trace_text("cat dog red blue cat dog red", top_beam=2)
    >>> result.beams[0].positions[0], result.layer
    (7, 1)
"""

import inspect
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from ..capture import input_device
from ..errors import RatLensError
from ..models import check_device
from ..models._hf import wrap_hf_model
from ..options import TraceOptions
from ..plan import resolve_targets
from ..render import render_html
from ..result import BeamPath, TraceResult, build_sankey
from ..tracer import Tracer
from .attn_extract import extract_attention, get_attention_mask, is_transformer_lens
from .beam import search
from .tokenize import format_path_text, get_bos_positions, get_token_strings

__all__ = ["ReverseAttentionTracer"]

_DEFAULT = TraceOptions()  # Tracer.trace's defaults, so passing them on changes nothing
# reverse-attention's positional order after (input_ids, target_pos, attention_mask)
PEER_ORDER = ("layer", "top_beam", "top_k", "min_attn", "agg_heads", "length_norm", "stop_at_bos")


class ReverseAttentionTracer(Tracer):
    """Trace which earlier tokens, through which layers and heads, fed a target token.

    Args:
        model: a TransformerLens model (``TransformerBridge``, ``HookedTransformer``) or, as
            reverse-attention takes it, a Hugging Face ``PreTrainedModel``, which is wrapped in
            a ``TransformerBridge`` sharing its weights (the model is not changed). Any other
            model whose forward takes ``output_attentions`` is called as the peer calls
            one, ``model(input_ids=..., attention_mask=..., output_attentions=True,
            use_cache=False)``, and traced in the ``.attentions`` it returns
            (``tracer.model`` is then the model itself).
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
        # Neither TransformerLens nor Hugging Face, but it takes output_attentions: read the
        # attentions it returns (Tracer's constructor refuses a model without hook points).
        self._attentions = (
            not from_hf and not is_transformer_lens(model) and _takes_output_attentions(model)
        )
        if self._attentions:
            self.model, self.tokenizer = model, tokenizer
        else:
            super().__init__(model, tokenizer)
        params = model.parameters() if hasattr(model, "parameters") else iter(())
        first = next(iter(params), None)
        first = first if isinstance(first, Tensor) else None
        # the embedding's device: on a dispatched or offloaded model the first parameter may
        # be a meta placeholder
        model_device = (
            (first.device if first is not None else torch.device("cpu"))
            if self._attentions
            else input_device(model)
        )
        self.device = check_device(device) if device is not None else str(model_device)
        self.dtype = dtype if dtype is not None else (first.dtype if first is not None else None)
        # Only where reverse-attention could have run (a Hugging Face model) is its pad mask
        # a difference worth a warning.
        self._told_pad_mask = not from_hf

    def trace(
        self,
        input_ids,
        target_pos: Optional[int] = None,
        attention_mask=None,
        layer: Optional[int] = None,
        top_beam: Optional[int] = None,
        top_k: Optional[int] = None,
        min_attn: Optional[float] = None,
        agg_heads: Optional[str] = None,
        length_norm: Optional[str] = None,
        stop_at_bos: Optional[bool] = None,
        bos_token_id: Optional[int] = None,
        *,
        options: Optional[TraceOptions] = None,
        **keywords,
    ) -> TraceResult:
        """reverse-attention's ``trace``: its arguments in its order (``None``: its default,
        which is :class:`~rat_lens.options.TraceOptions`'s); for a TransformerLens model also
        ``options=`` and every keyword of :meth:`rat_lens.tracer.Tracer.trace`."""
        if isinstance(input_ids, Tensor) and (
            input_ids.ndim not in (1, 2) or (input_ids.ndim == 2 and input_ids.shape[0] != 1)
        ):
            raise RatLensError(
                f"Expected input_ids shape [1, seq_len] or [seq_len], got "
                f"{tuple(input_ids.shape)}: for several prompts use trace_batch"
            )
        args = (layer, top_beam, top_k, min_attn, agg_heads, length_norm, stop_at_bos)
        peer = {name: value for name, value in zip(PEER_ORDER, args) if value is not None}
        keywords = _peer_mode(options, {**peer, **keywords})
        peer = {name: keywords.pop(name) for name in PEER_ORDER if name in keywords}
        stops = (options or _DEFAULT).stop_at_bos if stop_at_bos is None else stop_at_bos
        if stops is True and isinstance(input_ids, Tensor):
            _warn_no_bos(input_ids, self.tokenizer, bos_token_id)
        if not self._attentions:
            result = super().trace(
                input_ids, target_pos, attention_mask, bos_token_id=bos_token_id,
                options=options, **peer, **keywords,
            )  # fmt: skip
        elif options is not None or keywords:
            given = sorted(keywords) + (["options"] if options is not None else [])
            raise RatLensError(
                f"{given} need a TransformerLens model: a {type(self.model).__name__} is "
                "traced in the attentions it returns, with reverse-attention's arguments only"
            )
        else:
            search_options = TraceOptions(**peer, edge_weight="attention").resolve()
            result = self._trace_attentions(
                input_ids, target_pos, attention_mask, search_options, bos_token_id
            )
        result.paths_text = [format_path_text(beam) for beam in result.beams]
        return result

    def _trace_attentions(self, input_ids, target_pos, attention_mask, options, bos_token_id):
        """The peer's trace of a model it calls: its pad mask (when no mask is given), one
        layer's attentions, rat_lens's search."""
        if not isinstance(input_ids, Tensor):
            raise RatLensError(
                f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}"
            )
        tokens = input_ids.reshape(1, -1)
        mask = get_attention_mask(tokens, self.tokenizer, attention_mask).cpu()
        attn, layer = extract_attention(self.model, tokens, mask, options.layer, options.agg_heads)
        # negative targets count back from the last unmasked token, as Tracer's do
        target = resolve_targets(-1 if target_pos is None else target_pos, mask)[0][0]
        bos = get_bos_positions(tokens, self.tokenizer, bos_token_id) if options.stop_at_bos else []
        beams = search(attn, target, options, bos, mask[0], layer)
        ids, strings = tokens[0].tolist(), get_token_strings(tokens, self.tokenizer)
        paths = [BeamPath.from_beam(beam, strings, ids) for beam in beams]
        sankey = build_sankey(paths, strings, "chain", layer)
        return TraceResult(
            len(ids), target, layer, options.top_beam, options.top_k, strings, paths, sankey, [],
            agg_heads=options.agg_heads, length_norm=options.length_norm, token_ids=ids,
        )  # fmt: skip

    def trace_batch(self, inputs, target_pos=-1, attention_mask=None, *, options=None, **keywords):
        """:meth:`rat_lens.tracer.Tracer.trace_batch` with reverse-attention's default mode (a
        chain in the last layer) unless ``options=``, ``layer`` or ``layers`` say otherwise."""
        keywords = _peer_mode(options, keywords)
        return super().trace_batch(inputs, target_pos, attention_mask, options=options, **keywords)

    def trace_text(self, text: str, target_pos: Optional[int] = None, **kwargs) -> TraceResult:
        """reverse-attention's ``trace_text``: a TransformerLens model tokenizes as it does
        (``to_tokens``, BOS prepended); any other model's tokenizer is called as the peer calls
        it, ``tokenizer(text, return_tensors="pt")``, and its mask is used."""
        if not self._attentions:
            return super().trace_text(text, target_pos, **kwargs)
        encoded = self.tokenizer(text, return_tensors="pt")
        return self.trace(encoded["input_ids"], target_pos, encoded.get("attention_mask"), **kwargs)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token decoded alone with ``decode`` (as the peer does: a tokenizer without
        ``batch_decode`` will do)."""
        if self.tokenizer is None:
            return super().token_strings(ids)
        return get_token_strings(torch.tensor(ids), self.tokenizer)

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


def _takes_output_attentions(model) -> bool:
    """Whether ``model``'s forward (or call) names an ``output_attentions`` parameter."""
    forward = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        return callable(forward) and "output_attentions" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin)
        return False


def _warn_no_bos(input_ids: Tensor, tokenizer, bos_token_id: Optional[int]) -> None:
    """The peer's warning: ``stop_at_bos`` with no BOS token in the prompt stops only at 0."""
    if bos_token_id is None:
        bos_token_id = getattr(tokenizer, "bos_token_id", None)
    if not get_bos_positions(input_ids, tokenizer, bos_token_id):
        warnings.warn(
            f"stop_at_bos=True, but the prompt holds no BOS token (bos_token_id="
            f"{bos_token_id}): beams run to position 0",
            UserWarning,
            stacklevel=3,
        )


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


def _peer_mode(options: Optional[TraceOptions], keywords: dict) -> dict:
    """``keywords`` with reverse-attention's default mode, a chain in the last layer, where
    neither ``options=`` nor ``layer`` / ``layers`` chose one (rat_lens's own default is a
    per-head trace at full depth)."""
    if options is None and "layer" not in keywords and "layers" not in keywords:
        return {**keywords, "layer": -1}
    return keywords
