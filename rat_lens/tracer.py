"""The model-facing API: tokens in, one forward through the hooks, ranked beams out.

:class:`Tracer` keeps reverse-attention's names, argument order and defaults; the model is a
TransformerLens model and the tokenizer defaults to its own. ``rat_lens.ReverseAttentionTracer``
(:mod:`rat_lens.compat`) adds what reverse-attention users also expect: Hugging Face models,
``render_html``, ``device`` / ``dtype``.
"""

import warnings
from collections.abc import Sequence
from dataclasses import fields
from typing import Optional, Union

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from . import options as option_defaults
from .capture import (
    BoundedCapture,
    capture_bounded,
    capture_contributions,
    capture_patterns,
    check_tokens,
    hook_name,
    model_session,
    pattern_layers,
    patterns_from_cache,
    run_with_patterns,
)
from .errors import RatLensError, check_choice, check_int
from .options import TraceOptions
from .result import BeamPath, TraceResult, build_sankey, path_text
from .search.beam import beam_search
from .search.pattern import check_pattern_values
from .search.stats import predictions_at, rollout_rows, top_attention
from .search.store import TopKeys, head_mean, layer_mean

__all__ = ["Tracer", "trace", "generate"]

Targets = Union[int, Sequence[int]]
QueryChunk = Union[int, str, None]
STORES = ("auto", "dense", "bounded")
_DEFAULT = TraceOptions()  # the defaults below are read from here, written only in options.py


class Tracer:
    """Trace which earlier tokens, through which layers and heads, fed a target token.

    Examples:
        >>> from rat_lens.models import load
        >>> tracer = Tracer(load("induction-2l"))
        >>> result = tracer.trace_text("cat dog red blue cat dog red", layers=(0, 1), top_beam=3)
        >>> result.beams[0].positions[0], len(result.beams) <= 3
        (7, True)
    """

    def __init__(self, model, tokenizer=None):
        pattern_layers(model)  # fail now, not at the first trace, on a model without hooks
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)

    def trace(
        self,
        input_ids,
        target_pos: Optional[int] = None,
        attention_mask=None,
        layer: int = _DEFAULT.layer,
        top_beam: int = _DEFAULT.top_beam,
        top_k: int = _DEFAULT.top_k,
        min_attn: float = _DEFAULT.min_attn,
        agg_heads: str = _DEFAULT.agg_heads,
        length_norm: Optional[str] = None,
        stop_at_bos: bool = _DEFAULT.stop_at_bos,
        bos_token_id: Optional[int] = None,
        *,
        layers: Optional[tuple[int, int]] = _DEFAULT.layers,
        residual: Optional[str] = _DEFAULT.residual,
        exclude_bos: bool = _DEFAULT.exclude_bos,
        edge_weight: Optional[str] = None,
        move_threshold: float = _DEFAULT.move_threshold,
        depth_discount: float = _DEFAULT.depth_discount,
        options: Optional[TraceOptions] = None,
        cache=None,
        predictions: int = 0,
        query_chunk: QueryChunk = "auto",
        store: str = "auto",
    ) -> TraceResult:
        """Trace one prompt (``input_ids`` ``[seq]`` or ``[1, seq]``) from ``target_pos``.

        Arguments in reverse-attention's order and meaning, up to ``bos_token_id``
        (``target_pos=None`` is the last token), then, by keyword, the
        rest of :class:`~rat_lens.options.TraceOptions` (``layers=(lo, hi)`` for layers mode,
        ``agg_heads="none"`` for per-head edges, ``residual``, ``exclude_bos``) or a whole
        ``options=TraceOptions(...)``; ``cache``, ``predictions``, ``query_chunk`` and ``store``
        as in :meth:`trace_batch`.
        """
        tokens = _as_batch(input_ids)
        if tokens.shape[0] != 1:
            raise RatLensError(
                f"trace takes one prompt, got a batch of {tokens.shape[0]}: use trace_batch"
            )
        self._before_trace(tokens, attention_mask)
        target_pos = -1 if target_pos is None else target_pos
        if not isinstance(target_pos, int) or isinstance(target_pos, bool):
            raise RatLensError(
                f"target_pos must be an int, got {target_pos!r}: for several "
                "targets use trace_batch"
            )
        options = _options(
            options,
            layer=layer,
            layers=layers,
            top_beam=top_beam,
            top_k=top_k,
            min_attn=min_attn,
            agg_heads=agg_heads,
            length_norm=length_norm,
            stop_at_bos=stop_at_bos,
            residual=residual,
            exclude_bos=exclude_bos,
            edge_weight=edge_weight,
            move_threshold=move_threshold,
            depth_discount=depth_discount,
        )
        return self.trace_batch(
            tokens,
            target_pos,
            attention_mask,
            options=options,
            bos_token_id=bos_token_id,
            cache=cache,
            predictions=predictions,
            query_chunk=query_chunk,
            store=store,
        )[0]

    def _before_trace(self, input_ids, attention_mask) -> None:
        """A subclass's say on the prompt before it is traced (``compat`` warns there)."""

    def trace_text(self, text: str, target_pos: Optional[int] = -1, **kwargs) -> TraceResult:
        """Tokenize ``text`` as the model does (``to_tokens``: BOS prepended) and trace it;
        keywords as :meth:`trace`."""
        tokens, mask = self.tokenize([text])
        return self.trace(tokens, target_pos, mask, **kwargs)

    def trace_batch(
        self,
        inputs,
        target_pos: Targets = -1,
        attention_mask=None,
        *,
        layer: int = _DEFAULT.layer,
        layers: Optional[tuple[int, int]] = _DEFAULT.layers,
        top_beam: int = _DEFAULT.top_beam,
        top_k: int = _DEFAULT.top_k,
        min_attn: float = _DEFAULT.min_attn,
        agg_heads: str = _DEFAULT.agg_heads,
        length_norm: Optional[str] = None,
        stop_at_bos: bool = _DEFAULT.stop_at_bos,
        residual: Optional[str] = _DEFAULT.residual,
        exclude_bos: bool = _DEFAULT.exclude_bos,
        edge_weight: Optional[str] = None,
        move_threshold: float = _DEFAULT.move_threshold,
        depth_discount: float = _DEFAULT.depth_discount,
        options: Optional[TraceOptions] = None,
        bos_token_id: Optional[int] = None,
        cache=None,
        predictions: int = 0,
        query_chunk: QueryChunk = "auto",
        store: str = "auto",
    ) -> list[TraceResult]:
        """Trace every prompt of a batch from every position in ``target_pos``: ONE forward.

        ``inputs`` is ``[batch, seq]`` token ids (pad them and give ``attention_mask``) or a
        list of strings (padded here). Negative targets count back from each prompt's last
        unmasked token. Results come prompt by prompt, targets in the order given.
        The search options are :class:`~rat_lens.options.TraceOptions`'s, given one by one or
        as ``options=`` (then the others keep their defaults).
        ``bos_token_id`` marks BOS positions (default: the tokenizer's). ``cache`` traces a
        ``run_with_cache`` cache of these tokens and runs nothing. ``predictions=k`` runs the
        whole forward (not stopping after the traced layers) and records the model's top-k next
        tokens at every traced position. ``query_chunk=N`` runs the forward N positions at a
        time over the model's KV cache, so it never holds more than N rows of attention scores
        (long contexts; unpadded prompts; same patterns); the default ``"auto"`` does so for
        unpadded prompts over 512 tokens where a probe shows it exact; ``None`` always runs one
        forward. ``store`` says what a per-head trace keeps of the attention: ``"dense"`` every
        head's whole pattern; ``"bounded"`` per (layer, head, query) row only its strongest keys
        (``max(top_k, 64)``), the diagonal and the BOS columns, filled as the forward runs
        (memory ∝ seq·heads, not seq²·heads; same beams, strip and head rows; the rollout only
        where the head-means fit in ``rat_lens.options.PATTERN_BUDGET``, else empty); ``"auto"``
        bounded when the dense patterns would exceed that budget.
        """
        options = _options(
            options,
            layer=layer,
            layers=layers,
            top_beam=top_beam,
            top_k=top_k,
            min_attn=min_attn,
            agg_heads=agg_heads,
            length_norm=length_norm,
            stop_at_bos=stop_at_bos,
            residual=residual,
            exclude_bos=exclude_bos,
            edge_weight=edge_weight,
            move_threshold=move_threshold,
            depth_discount=depth_discount,
        )
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
            if attention_mask is not None:
                raise RatLensError(
                    "attention_mask is built from the texts; pass token ids to give your own"
                )
            tokens, attention_mask = self.tokenize(list(inputs))
        else:
            tokens = _as_batch(inputs)
        mask = _check_mask(attention_mask, tokens)
        # Every option is checked before the forward: a typo costs nothing.
        layer_ids = options.layer_ids(pattern_layers(self.model))
        targets = _resolve_targets(target_pos, mask)
        deepest = max(t for row in targets for t in row) + 1
        options.check_budget(deepest if options.chain else len(layer_ids))
        if predictions:
            check_int("predictions", predictions)
            if cache is not None:
                raise RatLensError(
                    "predictions need the model's logits, which a cache does not "
                    "hold: trace without cache=, or pass logits to summarize()"
                )
        if isinstance(query_chunk, int) and cache is not None:
            raise RatLensError(
                "query_chunk splits the forward, and a trace from cache= runs "
                "none: give one or the other"
            )

        if options.stays and options.auto_edge_weight:
            options = self._fall_back(options, tokens, layer_ids, cache, query_chunk)
        bounded = self._bounded(store, options, tokens, layer_ids, cache)
        bos_id = (
            bos_token_id
            if bos_token_id is not None
            else getattr(self.tokenizer, "bos_token_id", None)
        )
        bos_of = [
            [p for p, t in enumerate(row.tolist()) if t == bos_id and mask[b, p]]
            for b, row in enumerate(tokens)
        ]

        if options.stays:
            logits, stacked, attention = self._contributions(
                tokens, mask, layer_ids, options.edge_weight, cache, predictions, query_chunk
            )
        elif bounded:
            logits, stacked, head_means, strips = self._bounded_patterns(
                tokens, mask, layer_ids, options, bos_of, cache, predictions, query_chunk
            )
            attention = stacked
        else:
            logits, stacked = self._patterns(
                tokens, mask, layer_ids, options.agg_heads, cache, predictions, query_chunk
            )
            attention = stacked
        if not bounded:
            # [layer (top first), batch, query, key]: the strip and rollout read attention
            head_means = torch.stack([head_mean(p) for p in attention])
            # The layers summed bottom up, as a forward delivers them to the bounded strip.
            overview = layer_mean(list(head_means.flip(0)))
            strips = [top_attention(overview[b], mask[b]) for b in range(tokens.shape[0])]
        results = []
        for b in range(tokens.shape[0]):
            ids = tokens[b].tolist()
            prompt = dict(
                tokens=self.token_strings(ids),
                token_ids=ids,
                seq_len=len(ids),
                batch_index=b,
                top_attention=strips[b],
                mode="chain" if options.chain else "layers",
                layer=layer_ids[0],
                layer_lo=layer_ids[-1],
                agg_heads=options.agg_heads,
                residual=options.residual,
                exclude_bos=options.exclude_bos,
                top_beam=options.top_beam,
                top_k=options.top_k,
                length_norm=options.length_norm,
                edge_weight=options.edge_weight,
                move_threshold=options.move_threshold if options.stays else None,
                depth_discount=options.depth_discount if options.stays else None,
            )
            bos = bos_of[b]
            patterns = [p[b] for p in stacked]
            # Rollout is not defined for max-aggregated heads, nor without every head-mean (a
            # bounded trace over the budget); all targets share one pass.
            rollouts = (
                [[] for _ in targets[b]]
                if options.agg_heads == "max" or head_means is None
                else rollout_rows(head_means[:, b, None].flip(0), targets[b]).tolist()
            )
            for target, rollout in zip(targets[b], rollouts):
                beams = beam_search(
                    patterns, layer_ids, target, options, bos_positions=bos, attention_mask=mask[b]
                )
                result = _result(prompt, target, beams, rollout)
                result.head_rows = _head_rows(beams, [a[b] for a in attention], layer_ids)
                if logits is not None:
                    result.predictions = predictions_at(
                        result, logits[b], self.tokenizer, predictions
                    )
                results.append(result)
        return results

    def _patterns(
        self, tokens, mask, layer_ids, agg_heads, cache, predictions, query_chunk
    ) -> tuple[Optional[Tensor], list[Tensor]]:
        """The reduced patterns of ``layer_ids`` (top first) from one forward or the user's cache;
        the logits too when predictions are asked for (then the forward runs to the end)."""
        logits = None
        model_mask = None if mask.all() else mask
        if cache is not None:
            patterns = patterns_from_cache(cache, layer_ids, agg_heads, tuple(tokens.shape))
        elif predictions:
            logits, patterns = run_with_patterns(
                self.model,
                tokens,
                layer_ids,
                agg_heads=agg_heads,
                attention_mask=model_mask,
                query_chunk=query_chunk,
            )
        else:
            patterns = capture_patterns(
                self.model,
                tokens,
                layer_ids,
                agg_heads=agg_heads,
                attention_mask=model_mask,
                query_chunk=query_chunk,
            )
        stacked = [patterns[hook_name(layer)].float().cpu() for layer in layer_ids]
        for layer, pattern in zip(layer_ids, stacked):
            check_pattern_values(pattern, hook_name(layer))
        return logits, stacked

    def _bounded(self, store, options, tokens, layer_ids, cache) -> bool:
        """Whether to keep the attention bounded (``store``, see :meth:`trace_batch`)."""
        check_choice("store", store, STORES)
        n_heads = getattr(getattr(self.model, "cfg", None), "n_heads", None)
        if not options.per_head:
            why = f"agg_heads={options.agg_heads!r} keeps one matrix per layer"
        elif options.stays:
            why = f"edge_weight={options.edge_weight!r} reads every head's whole rows"
        elif options.chain and n_heads == 1:
            why = "a chain through one head takes reverse-attention's order, from whole rows"
        else:
            why = None
        if store == "bounded" and why:
            raise RatLensError(
                f"store='bounded' is for per-head traces (agg_heads='none', attention weights), "
                f"but {why}: use store='auto' or 'dense'"
            )
        if store != "auto" or why or cache is not None:  # a cache already holds it all
            return store == "bounded"
        return _dense_bytes(tokens, layer_ids, n_heads or 1) > option_defaults.PATTERN_BUDGET

    def _bounded_patterns(
        self, tokens, mask, layer_ids, options, bos_of, cache, predictions, query_chunk
    ):
        """A bounded trace's attention, filled as the forward runs: per layer (top first) one
        :class:`~rat_lens.search.store.TopKeys` per prompt; the head-means ``[layer, batch,
        query, key]`` if they fit in ``PATTERN_BUDGET`` (else None); each prompt's strip; the
        logits when predictions are asked for."""
        batch, seq = tokens.shape
        means = _dense_bytes(tokens, layer_ids, 1)  # the rollout's head-means
        if means > option_defaults.PATTERN_BUDGET:
            warnings.warn(
                f"no rollout: it reads every traced layer's whole head-mean ({means / 2**30:.1f} "
                f"GB here), over rat_lens.options.PATTERN_BUDGET; raise that to have it",
                RuntimeWarning,
                stacklevel=4,
            )
        key_ok = mask.bool()  # the search's candidates: unmasked keys, sinks unless excluded
        if options.exclude_bos:
            key_ok[:, 0] = False
            for b, positions in enumerate(bos_of):
                key_ok[b, positions] = False
        capture = BoundedCapture(
            layer_ids,
            key_ok,
            sink_keys=sorted({p for positions in bos_of for p in positions}),
            keep=max(options.top_k, HEAD_ROW_KEYS),
            query_mask=mask,
            head_means=means <= option_defaults.PATTERN_BUDGET,
        )
        logits = None
        if cache is not None:
            patterns = patterns_from_cache(cache, layer_ids, "none", (batch, seq))
            for layer in sorted(layer_ids):  # in a forward's order
                capture.add(hook_name(layer), patterns[hook_name(layer)])
        else:
            logits = capture_bounded(
                self.model,
                tokens,
                capture,
                attention_mask=None if mask.all() else mask,
                query_chunk=query_chunk,
                logits=bool(predictions),
            )
        stores = capture.stores()
        stacked = [stores[layer] for layer in layer_ids]
        return logits, stacked, capture.head_mean_stack(layer_ids), capture.strips

    def _fall_back(self, options, tokens, layer_ids, cache, query_chunk) -> TraceOptions:
        """Attention edges where the default contribution edges cannot run: they need their
        own whole forward (no ``cache=``, no query chunks) and dense shares within
        ``PATTERN_BUDGET``. The result's ``edge_weight`` says which weights were used."""
        n_heads = getattr(getattr(self.model, "cfg", None), "n_heads", 1)
        shares = _dense_bytes(tokens, layer_ids, n_heads + 1)  # heads and the residual stream
        why = (
            "a trace from cache= runs no forward"
            if cache is not None
            else "query chunks split the forward"
            if isinstance(query_chunk, int)
            else f"their shares would take {shares / 2**30:.1f} GiB, over "
            "rat_lens.options.PATTERN_BUDGET"
            if shares > option_defaults.PATTERN_BUDGET
            else None
        )
        if why is None:
            return options
        fallback = options.attention_fallback()
        if (options.move_threshold, options.depth_discount) != (
            fallback.move_threshold,
            fallback.depth_discount,
        ):
            raise RatLensError(
                f"move_threshold / depth_discount score contribution routes, but this trace "
                f"cannot run contribution edges ({why}): drop them for attention edges, or "
                f"trace without cache= and query chunks, or raise the budget"
            )
        return fallback

    def _contributions(self, tokens, mask, layer_ids, weight, cache, predictions, query_chunk):
        """Per layer (top first) the parts' shares ``[batch, head + 1, query, key]`` (the last
        channel the residual stream), the attention patterns, and logits when asked for. A
        padded prompt runs alone, on its real tokens, its results placed back at their
        positions (zero rows and columns at the padding)."""
        if cache is not None or isinstance(query_chunk, int):
            raise RatLensError(
                f"edge_weight={weight!r} runs its own whole forward: no cache=, no "
                "query_chunk (pass edge_weight='attention' to trace from a cache or in chunks)"
            )
        if mask.all():
            shares, patterns, logits = capture_contributions(
                self.model, tokens, layer_ids, weight, with_patterns=True
            )
        else:
            shares, patterns, logits = self._padded_contributions(tokens, mask, layer_ids, weight)
        logits = logits if predictions else None  # the same forward ran to the end
        stacked = [shares[layer].float().cpu() for layer in layer_ids]
        for layer, share in zip(layer_ids, stacked):
            check_pattern_values(share, f"edge shares of layer {layer}")
        return logits, stacked, [patterns[layer].float().cpu() for layer in layer_ids]

    def _padded_contributions(self, tokens, mask, layer_ids, weight):
        batch, seq = tokens.shape
        shares, patterns, logits = {}, {}, None
        for b in range(batch):
            real = mask[b].nonzero().flatten()
            one = capture_contributions(
                self.model, tokens[b : b + 1, real], layer_ids, weight, with_patterns=True
            )
            for out, got in zip((shares, patterns), one[:2]):
                for layer, value in got.items():
                    if layer not in out:
                        out[layer] = value.new_zeros(batch, value.shape[1], seq, seq)
                    out[layer][b][:, real[:, None], real[None, :]] = value[0]
            if logits is None:
                logits = one[2].new_zeros(batch, seq, one[2].shape[-1])
            logits[b, real] = one[2][0]
        return shares, patterns, logits

    def tokenize(
        self, texts: list[str]
    ) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
        """Token ids and attention mask for ``texts``, each tokenized alone, right-padded."""
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise RatLensError(f"texts must be non-empty strings, got {texts!r}")
        if self.tokenizer is None:
            raise RatLensError(
                "this model has no tokenizer: pass token ids, or a tokenizer to "
                "the tracer (ReverseAttentionTracer(model, tokenizer))"
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
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return self.tokenizer.batch_decode([[i] for i in ids])


def trace(
    model,
    inputs,
    target_pos: Optional[int] = -1,
    *,
    tokenizer=None,
    layer: int = _DEFAULT.layer,
    layers: Optional[tuple[int, int]] = _DEFAULT.layers,
    top_beam: int = _DEFAULT.top_beam,
    top_k: int = _DEFAULT.top_k,
    min_attn: float = _DEFAULT.min_attn,
    agg_heads: str = _DEFAULT.agg_heads,
    length_norm: Optional[str] = None,
    stop_at_bos: bool = _DEFAULT.stop_at_bos,
    residual: Optional[str] = _DEFAULT.residual,
    exclude_bos: bool = _DEFAULT.exclude_bos,
    edge_weight: Optional[str] = None,
    move_threshold: float = _DEFAULT.move_threshold,
    depth_discount: float = _DEFAULT.depth_discount,
    options: Optional[TraceOptions] = None,
    attention_mask=None,
    bos_token_id: Optional[int] = None,
    cache=None,
    predictions: int = 0,
    query_chunk: QueryChunk = "auto",
    store: str = "auto",
) -> TraceResult:
    """One-call trace for notebooks: ``inputs`` is text or token ids of one prompt; keywords as
    :meth:`Tracer.trace`.

    Examples:
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> result = trace(model, "cat dog red blue cat dog red", layers=(0, 1), agg_heads="none")
        >>> best = result.beams[0]
        >>> [(lay, head is not None) for lay, head in zip(best.layers, best.heads)]
        [(1, True), (0, True)]
    """
    tracer = Tracer(model, tokenizer)
    options = _options(
        options,
        layer=layer,
        layers=layers,
        top_beam=top_beam,
        top_k=top_k,
        min_attn=min_attn,
        agg_heads=agg_heads,
        length_norm=length_norm,
        stop_at_bos=stop_at_bos,
        residual=residual,
        exclude_bos=exclude_bos,
        edge_weight=edge_weight,
        move_threshold=move_threshold,
        depth_discount=depth_discount,
    )
    run = dict(
        options=options,
        bos_token_id=bos_token_id,
        cache=cache,
        predictions=predictions,
        query_chunk=query_chunk,
        store=store,
    )
    if isinstance(inputs, str):
        if attention_mask is not None:
            raise RatLensError(
                "attention_mask is built from the text; pass token ids to give your own"
            )
        return tracer.trace_text(inputs, target_pos, **run)
    return tracer.trace(inputs, target_pos, attention_mask, **run)


def _dense_bytes(tokens: Tensor, layer_ids: list[int], channels: int) -> int:
    """Bytes of float32 ``[layer, batch, channel, seq, seq]``: what a dense trace would hold."""
    batch, seq = tokens.shape
    return 4 * len(layer_ids) * batch * channels * seq * seq


def _options(options: Optional[TraceOptions], **given) -> TraceOptions:
    """``options`` if given (then every keyword must be left at its default), else the options
    the keywords spell."""
    if options is None:
        return TraceOptions(**given)
    if not isinstance(options, TraceOptions):
        raise RatLensError(f"options must be a TraceOptions, got {type(options).__name__}")
    defaults = {f.name: f.default for f in fields(TraceOptions)}  # as given, not as resolved
    changed = sorted(k for k, v in given.items() if v != defaults[k])
    if changed:
        raise RatLensError(f"give options=TraceOptions(...) or the keywords {changed}, not both")
    return options


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
    with model_session(model), torch.no_grad():
        for _ in range(n_new):
            next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token.to(tokens.device)], dim=1)
    return tokens


def _result(prompt: dict, target: int, beams, rollout: list[float]) -> TraceResult:
    """One target's TraceResult: the beams with their tokens, the Sankey graph, the path texts
    and the target's rollout importance."""
    paths = [BeamPath.from_beam(beam, prompt["tokens"], prompt["token_ids"]) for beam in beams]
    return TraceResult(
        target_pos=target,
        beams=paths,
        paths_text=[path_text(p) for p in paths],
        sankey=build_sankey(paths, prompt["tokens"], prompt["mode"], prompt["layer"]),
        rollout=rollout,
        **prompt,
    )


HEAD_ROW_KEYS, HEAD_ROWS_MAX = 64, 512  # per row; per trace (the page's heatmap, bounded)


def _head_rows(beams, attention: list, layer_ids: list[int]) -> list[dict]:
    """The attention row each head edge leaves from, compactly: per distinct (layer, head,
    query), best beams first, the row's ``HEAD_ROW_KEYS`` strongest keys (equal weights: the
    earlier key first) and the beams' own keys (at most ``HEAD_ROWS_MAX`` rows).
    ``attention[t]`` is layer ``layer_ids[t]``'s pattern ``[head, query, key]`` (one channel,
    head None, when heads were aggregated), dense or a bounded ``TopKeys`` (which holds every
    row's strongest keys)."""
    index = {layer: t for t, layer in enumerate(layer_ids)}
    wanted: dict[tuple, set] = {}
    for beam in beams:
        for i in range(beam.num_edges):
            if not beam.is_residual(i) and len(wanted) < HEAD_ROWS_MAX:
                edge = (beam.layers[i], beam.heads[i], beam.positions[i])
                wanted.setdefault(edge, set()).add(beam.positions[i + 1])
    rows = []
    for (layer, head, query), keys in wanted.items():
        pattern, channel = attention[index[layer]], 0 if head is None else head
        if isinstance(pattern, TopKeys):
            row_keys, row_weights = pattern.row(channel, query)
        else:
            row_keys, row_weights = torch.arange(query + 1), pattern[channel, query, : query + 1]
        row_keys, row_weights = row_keys.numpy(), row_weights.double().numpy()
        strongest = row_keys[np.lexsort((row_keys, -row_weights))[:HEAD_ROW_KEYS]]
        weight_of = dict(zip(row_keys.tolist(), row_weights.tolist()))
        chosen = sorted(set(strongest.tolist()) | keys)
        rows.append(
            {
                "layer": layer,
                "head": head,
                "query": query,
                "keys": chosen,
                "weights": [round(weight_of[k], 6) for k in chosen],
            }
        )
    return rows


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
    mask = torch.as_tensor(attention_mask)
    mask = mask.unsqueeze(0) if mask.ndim == 1 else mask
    if mask.shape != tokens.shape:
        raise RatLensError(
            f"attention_mask shape {tuple(mask.shape)} does not match input_ids "
            f"shape {tuple(tokens.shape)}"
        )
    mask = mask.long().cpu()
    if not ((mask == 0) | (mask == 1)).all():
        raise RatLensError("attention_mask must hold only 0 and 1")
    if not mask.any(1).all():
        raise RatLensError(f"prompt {int((~mask.any(1)).nonzero()[0])} is fully masked")
    return mask


def _resolve_targets(target_pos: Targets, mask: Tensor) -> list[list[int]]:
    """Negative targets count back from each prompt's last unmasked token."""
    wanted = [target_pos] if isinstance(target_pos, int) else list(target_pos)
    if not wanted:
        raise RatLensError("target_pos is an empty list")
    out = []
    for row in mask:
        last = int(row.nonzero().max())
        resolved = []
        for t in wanted:
            if isinstance(t, bool) or not isinstance(t, int):
                raise RatLensError(f"target_pos must be ints, got {t!r}")
            p = last + 1 + t if t < 0 else t
            if not 0 <= p <= last or not row[p]:
                raise RatLensError(f"target_pos={t} out of range for a prompt of {last + 1} tokens")
            resolved.append(p)
        out.append(resolved)
    return out
