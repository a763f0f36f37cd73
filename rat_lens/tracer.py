"""The model-facing API: tokens in, one forward through the hooks, ranked beams out.

A trace runs four steps, each its own module: :func:`~rat_lens.plan.make_plan` (options
resolved once from the model and the inputs), :func:`~rat_lens.record.capture_record` (one
forward, whatever the source), :func:`~rat_lens.search.beam.beam_search` (pure tensors) and
:func:`~rat_lens.assemble.assemble` (the results). :class:`Tracer` holds a model and its
tokenizer for many calls; :func:`trace` is the one-call form. ``rat_lens.compat`` adds
reverse-attention's own class on top.
"""

from typing import Optional, SupportsIndex

import torch
from jaxtyping import Int
from torch import Tensor

from .assemble import assemble
from .capture import check_tokens, input_device, model_session, pattern_layers
from .errors import RatLensError, check_int, check_tokenizer, checked_call
from .lens import explain, explain_capture
from .options import TraceOptions, merge_keywords
from .plan import Targets, TracePlan, is_position, make_plan
from .record import Record, capture_record
from .result import TraceResult
from .search import store
from .search.beam import beam_search
from .search.stats import decode_each

__all__ = ["Tracer", "trace", "generate"]


@checked_call
class Tracer:
    """Trace which earlier tokens, through which layers and heads, fed a target token.

    Examples:
        >>> from rat_lens.models import load
        >>> tracer = Tracer(load("induction-2l"))
        >>> result = tracer.trace("cat dog red blue cat dog red", layers=(0, 1), top_beam=3)
        >>> result.beams[0].positions[0], len(result.beams) <= 3
        (7, True)
    """

    def __init__(self, model, tokenizer=None):
        pattern_layers(model)  # fail now, not at the first trace, on a model without hooks
        self.model = model
        self.tokenizer = check_tokenizer(
            tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        )

    @checked_call
    def trace(
        self,
        inputs,
        target_pos: Optional[SupportsIndex] = None,
        attention_mask=None,
        *,
        options: Optional[TraceOptions] = None,
        **keywords,
    ) -> TraceResult:
        """Trace one prompt, text or token ids (``[seq]`` or ``[1, seq]``), from
        ``target_pos`` (``None``: the last token).

        Keywords: the fields of :class:`~rat_lens.options.TraceOptions` (over ``options=`` when
        given) and of :class:`~rat_lens.options.TraceInputs`, as :meth:`trace_batch`.
        reverse-attention's positional order is :class:`rat_lens.compat.ReverseAttentionTracer`'s.
        """
        input_ids = inputs
        options, inputs = merge_keywords(options, keywords, "trace")
        if isinstance(input_ids, str):
            tokens, mask = self._texts([input_ids], attention_mask)
        else:
            tokens = _as_batch(input_ids)
            mask = attention_mask
        if tokens.shape[0] != 1:
            raise RatLensError(
                f"trace takes one prompt, got a batch of {tokens.shape[0]}: use trace_batch"
            )
        self._before_trace(tokens, attention_mask)
        target = -1 if target_pos is None else target_pos
        if not is_position(target):
            raise RatLensError(
                f"target_pos must be an int, got {target_pos!r}: for several targets use "
                "trace_batch"
            )
        return self._run(tokens, mask, target, options, inputs)[0]

    def _before_trace(self, input_ids, attention_mask) -> None:
        """A subclass's say on the prompt before it is traced (``compat`` warns there)."""

    @checked_call
    def trace_text(
        self, text: str, target_pos: Optional[SupportsIndex] = -1, **keywords
    ) -> TraceResult:
        """Tokenize ``text`` as the model does (``to_tokens``: BOS prepended) and trace it;
        keywords as :meth:`trace` (reverse-attention's name for a text's trace)."""
        if not isinstance(text, str):
            raise RatLensError(f"text must be a string, got {type(text).__name__}")
        return self.trace(text, target_pos, **keywords)

    @checked_call
    def trace_batch(
        self,
        inputs,
        target_pos: Targets = -1,
        attention_mask=None,
        *,
        options: Optional[TraceOptions] = None,
        **keywords,
    ) -> list[TraceResult]:
        """Trace every prompt of a batch from every position in ``target_pos``: ONE forward.

        ``inputs`` is ``[batch, seq]`` token ids (pad them and give ``attention_mask``) or a
        list of strings (padded here). Negative targets count back from each prompt's last
        unmasked token. Results come prompt by prompt, targets in the order given.
        Keywords: the fields of :class:`~rat_lens.options.TraceOptions` (the search; over
        ``options=`` when given) and of :class:`~rat_lens.options.TraceInputs` (``cache``: a
        ``run_with_cache`` cache of these tokens, no forward; ``predictions=k``: the model's
        top-k next tokens at every traced position; ``query_chunk``: the forward N positions
        at a time over the KV cache; ``store``: dense or bounded per-head attention;
        ``bos_token_id``). An unknown keyword is an error naming the closest one.
        """
        options, run = merge_keywords(options, keywords, "trace_batch")
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
            tokens, mask = self._texts(list(inputs), attention_mask)
        else:
            tokens, mask = _as_batch(inputs), attention_mask
        return self._run(tokens, mask, target_pos, options, run)

    def _run(self, tokens, attention_mask, target_pos, options, inputs) -> list[TraceResult]:
        """Plan, capture, search, assemble."""
        mask = _check_mask(attention_mask, tokens)
        keep = max(options.top_k, store.STORE_KEYS)  # read now: tests narrow it
        bos_id = getattr(self.tokenizer, "bos_token_id", None)
        plan = make_plan(self.model, tokens, mask, target_pos, options, inputs, bos_id, keep)
        also = explain_capture(self.model, plan)  # its hooks ride the trace's own forward
        record = capture_record(self.model, tokens, plan, also)
        explained = None
        if also is not None:
            decode = self.token_strings
            explained = explain(self.model, tokens, plan, also, record.top, self.tokenizer, decode)
        results = []
        for b, row in enumerate(tokens.tolist()):
            beams = [search(plan, record, b, target, explained) for target in plan.targets[b]]
            prompt = (self.token_strings(row), row)
            found = assemble(plan, record, b, beams, prompt, self.tokenizer)
            results += found if explained is None else explained.attach(found, beams, b)
        return results

    def _texts(self, texts: list[str], attention_mask) -> tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise RatLensError(
                "attention_mask is built from the texts; pass token ids to give your own"
            )
        return self.tokenize(texts)

    def tokenize(
        self, texts: list[str]
    ) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
        """Token ids and attention mask for ``texts``, each tokenized alone, right-padded."""
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise RatLensError(f"texts must be non-empty strings, got {texts!r}")
        if self.tokenizer is None or not callable(self.tokenizer):
            raise RatLensError(
                "this model has no tokenizer that reads text: pass token ids, or a tokenizer "
                "to the tracer (Tracer(model, tokenizer))"
            )
        if self.tokenizer is getattr(self.model, "tokenizer", None) and hasattr(
            self.model, "to_tokens"
        ):
            # truncate=False: a text over the context is refused (check_tokens), never cut.
            rows = [self.model.to_tokens(t, truncate=False)[0].cpu() for t in texts]
        else:
            rows = [self.tokenizer(t, return_tensors="pt").input_ids[0] for t in texts]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
        mask = torch.zeros_like(tokens)
        for i, row in enumerate(rows):
            mask[i, : len(row)] = 1
        return tokens, mask

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token decoded alone (as reverse-attention shows them); ids when no tokenizer."""
        return decode_each(self.tokenizer, ids)


def search(plan: TracePlan, record: Record, b: int, target: int, explained=None) -> list:
    """The beam search on prompt ``b`` of the record, from ``target`` (with a foil, its first
    move scored against it: ``rat_lens.lens``)."""
    weights = [weights[b] for weights in record.weights]
    if explained is not None:
        weights = explained.contrast(weights, [a[b] for a in record.attention], b, target)
    return beam_search(
        weights,
        plan.layer_ids,
        target,
        plan.options,
        bos_positions=plan.bos[b],
        attention_mask=plan.mask[b],
    )


@checked_call
def trace(
    model,
    inputs,
    target_pos: Optional[SupportsIndex] = -1,
    *,
    tokenizer=None,
    attention_mask=None,
    options: Optional[TraceOptions] = None,
    **keywords,
) -> TraceResult:
    """One-call trace for notebooks: ``inputs`` is text or token ids of one prompt; keywords
    as :meth:`Tracer.trace_batch` (the fields of ``TraceOptions`` and ``TraceInputs``).

    Examples:
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> result = trace(model, "cat dog red blue cat dog red", layers=(0, 1), agg_heads="none")
        >>> best = result.beams[0]
        >>> [(lay, head is not None) for lay, head in zip(best.layers, best.heads)]
        [(1, True), (0, True)]
    """
    tracer = Tracer(model, tokenizer)
    return tracer.trace(inputs, target_pos, attention_mask, options=options, **keywords)


@checked_call
def generate(model, tokens: Int[Tensor, "batch seq"], n_new: int) -> Int[Tensor, "batch seq_out"]:
    """Append ``n_new`` greedily chosen tokens (argmax of the last logits), one forward each.

    Examples:
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> out = generate(model, model.to_tokens("cat dog red blue cat dog"), 2)
        >>> model.to_string(out[0, -2:])
        'red blue'
    """
    check_int("generate", n_new)
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if n_ctx is not None and tokens.shape[1] + n_new > n_ctx:
        raise RatLensError(
            f"generating {n_new} tokens after {tokens.shape[1]} exceeds the "
            f"model's context of {n_ctx}"
        )
    check_tokens(model, tokens)
    given, tokens = tokens.device, tokens.to(input_device(model))
    with model_session(model), torch.no_grad():
        for _ in range(n_new):
            next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token.to(tokens.device)], dim=1)
    return tokens.to(given)  # where the caller keeps them


def _as_batch(input_ids) -> Int[Tensor, "batch seq"]:
    if not isinstance(input_ids, Tensor):
        raise RatLensError(
            f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise RatLensError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    tokens = input_ids.unsqueeze(0) if input_ids.ndim == 1 else input_ids
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise RatLensError(
            f"input_ids must be [seq] or [batch, seq] and non-empty, got shape "
            f"{tuple(input_ids.shape)}"
        )
    return tokens


def _check_mask(attention_mask, tokens: Tensor) -> Tensor:
    if attention_mask is None:
        return torch.ones_like(tokens, dtype=torch.long, device="cpu")
    if not isinstance(attention_mask, (Tensor, list, tuple)):
        raise RatLensError(
            f"attention_mask must be a tensor (or list) of 0 and 1, got "
            f"{type(attention_mask).__name__}"
        )
    try:
        mask = torch.as_tensor(attention_mask).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise RatLensError(f"attention_mask is not a tensor of 0 and 1: {err}") from None
    mask = mask.unsqueeze(0) if mask.ndim == 1 else mask
    if mask.shape != tokens.shape:
        raise RatLensError(
            f"attention_mask shape {tuple(mask.shape)} does not match input_ids "
            f"shape {tuple(tokens.shape)}"
        )
    if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        raise RatLensError("attention_mask must hold only 0 and 1")
    mask = mask.long()
    if not mask.any(1).all():
        raise RatLensError(f"prompt {int((~mask.any(1)).nonzero()[0])} is fully masked")
    return mask
