"""Collect attention from any TransformerLens model through its ``hook_pattern`` hook points.

Works on whatever exposes ``blocks.{l}.attn.hook_pattern`` with TransformerLens's hook API
(``hook_dict``, ``hooks()``): ``TransformerBridge`` in TL 3.x/4.x, ``HookedTransformer`` in
TL 2.x/3.x.
Patterns are reduced over heads as the forward runs, only the layers asked for are kept, and the
forward stops right after the highest of them (no later layers, no unembed).

Memory: TransformerBridge's fused-QKV attention (GPT-2 and kin) stores every layer's full pattern on
the module (``attn._pattern``, written, never read) and keeps it after the forward: 12 layers ×
[12, 2,048, 2,048] floats is 2.4 GB. Our forwards drop each one as soon as its layer is done
(a hook on ``blocks.{l}.attn.hook_out``), so only one layer's attention is alive at a time.

Long contexts: ``query_chunk=N`` runs the forward N query positions at a time with a KV cache, so
the model never holds more than ``[batch, head, N, seq]`` of attention scores (the full
``[seq, seq]`` scores of one layer are 3.2 GB at 8,192 tokens on GPT-2 small). The captured rows
are the one-shot forward's wherever the model computes each query's attention from its cache as
it would in one pass (checked against ``run_with_cache`` in the tests). The default,
``query_chunk="auto"``, chunks prompts longer than ``AUTO_ABOVE`` tokens by ``AUTO_CHUNK`` when a
probe on the prompt's first ``PROBE_LEN`` tokens shows the chunked forward reproduces the one-shot
patterns (two forwards of 16 tokens); otherwise, and for padded batches, one forward.

Per-head traces over ``rat_lens.options.PATTERN_BUDGET``: :class:`BoundedCapture` keeps, as each
block of rows arrives, only each row's strongest keys (:mod:`rat_lens.search.store`), so no
layer's whole ``[head, seq, seq]`` pattern outlives its query chunk.
"""

import inspect
import re
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from .errors import RatLensError, check_choice, check_int, checked_call
from .models import check_device
from .options import AGG_HEADS, EDGE_WEIGHTS
from .search.contrib import (
    ShareRows,
    ValueNormRows,
    edge_shares,
    head_shares,
    key_norms,
    norm_factor,
    row_totals,
)
from .search.pattern import aggregate_heads, check_pattern_values
from .search.recompute import AttentionRows, attention_rows, check_rows, fit_scale, row_error
from .search.stats import TopTokens, top_attention
from .search.store import (
    CausalRows,
    LayerMeanRows,
    TopKeys,
    TopKeysBuilder,
    head_mean,
    stack_rows,
)

AUTO_ABOVE, AUTO_CHUNK, PROBE_LEN, PROBE_ATOL = 512, 128, 16, 2e-5
_warned = weakref.WeakSet()  # models told once that the probe failed

__all__ = [
    "PatternCapture",
    "capture_patterns",
    "BoundedCapture",
    "capture_bounded",
    "run_with_patterns",
    "patterns_from_cache",
    "pattern_layers",
    "hook_name",
    "kv_cache_reaches_attention",
    "model_session",
    "check_tokens",
    "capture_contributions",
    "ContributionCapture",
    "ValueNormCapture",
    "Forward",
    "Joined",
    "run_forward",
    "check_layers",
    "input_device",
    "offloaded_weights_loaded",
    "ProgressBar",
]

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.attn\.hook_pattern$")


def hook_name(layer: int) -> str:
    """TransformerLens's name for layer ``layer``'s attention pattern.

    Examples:
        >>> hook_name(3)
        'blocks.3.attn.hook_pattern'
    """
    return f"blocks.{layer}.attn.hook_pattern"


def pattern_layers(model) -> int:
    """How many layers expose ``hook_pattern``; a model without them gets a clear error."""
    hook_dict = getattr(model, "hook_dict", None)
    if not hasattr(model, "hooks") or not isinstance(hook_dict, dict):
        raise RatLensError(
            f"expected a TransformerLens model (TransformerBridge or HookedTransformer)"
            f" with hook points, got {type(model).__name__}"
        )
    layers = sorted(int(m[1]) for m in map(_HOOK_RE.match, hook_dict) if m)
    if not layers or layers != list(range(len(layers))):
        raise RatLensError(
            f"{type(model).__name__} has no blocks.{{l}}.attn.hook_pattern hook "
            f"points for every layer (found layers {layers})"
        )
    return len(layers)


def check_layers(layers) -> list[int]:
    """``layers`` as a list if it is a non-empty sequence of layer indices (ints >= 0).

    Examples:
        >>> check_layers((1, 0))
        [1, 0]
        >>> check_layers([])
        Traceback (most recent call last):
        ...
        rat_lens.errors.RatLensError: layers must be a non-empty list of layer indices ...
    """
    ok = isinstance(layers, Sequence) and not isinstance(layers, str) and len(layers) > 0
    if not ok or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
        raise RatLensError(
            f"layers must be a non-empty list of layer indices (ints >= 0), got {layers!r}"
        )
    return list(layers)


class _StopForward(Exception):
    """Raised from the last needed hook: everything after it would be thrown away."""


@checked_call
@dataclass
class PatternCapture:
    """Forward hooks that keep ``hook_pattern`` of ``layers``, reduced over heads by ``agg_heads``.

    Compose them with your own hooks in ``run_with_hooks`` / ``hooks()``, then read
    ``to_cache(model)``, a real ``ActivationCache`` (``cache["pattern", l]`` is
    ``[batch, head, query, key]``, head of length 1 unless ``agg_heads="none"``).

    A pattern with more keys than queries comes from a forward that continues a KV cache: its
    rows are appended below the rows captured so far (so one capture spans a chunked or
    incremental run, e.g. token-by-token generation with ``past_key_values``).

    Examples:
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> capture = PatternCapture([1])
        >>> tokens = model.to_tokens("cat dog red cat")
        >>> _ = model.run_with_hooks(tokens, fwd_hooks=capture.fwd_hooks)
        >>> capture.to_cache(model)["pattern", 1].shape
        torch.Size([1, 1, 5, 5])
    """

    layers: Sequence[int]
    agg_heads: str = "mean"
    store: dict = field(default_factory=dict)  # hook name -> list of row blocks
    device: Optional[torch.device] = None  # where rows land (None: each layer's own device)

    def __post_init__(self):
        self.layers = check_layers(self.layers)
        check_choice("agg_heads", self.agg_heads, AGG_HEADS)
        if self.device is not None:
            self.device = torch.device(check_device(self.device))

    def add(self, name: str, pattern: Float[Tensor, "batch head query key"]) -> None:
        """Keep a block of query rows of the layer hooked at ``name`` (the hooks call it)."""
        rows = aggregate_heads(pattern.detach(), self.agg_heads)
        rows = rows if self.device is None else rows.to(self.device)
        queries, keys = rows.shape[-2:]
        blocks = self.store.setdefault(name, [])
        if keys == queries:  # a forward from position 0: starts afresh
            blocks.clear()
        seen = sum(block.shape[-2] for block in blocks)
        if seen + queries != keys:
            raise RatLensError(
                f"{name} gave {queries} query rows over {keys} keys after {seen} rows "
                f"captured: the model did not continue its KV cache (past_key_values)"
            )
        blocks.append(rows)

    @property
    def fwd_hooks(self) -> list:
        def keep(pattern: Tensor, hook):
            self.add(hook.name, pattern)  # returns None: the model's own pattern flows on

        return _by_filter(self.layers, keep)  # a layer the model lacks: our error

    def rows_captured(self) -> dict[str, int]:
        return {
            name: sum(block.shape[-2] for block in blocks) for name, blocks in self.store.items()
        }

    def to_cache(self, model) -> ActivationCache:
        names = [hook_name(layer) for layer in self.layers]
        missing = [name for name in names if not self.store.get(name)]
        if missing and set(missing) - set(model.hook_dict):
            raise RatLensError(_not_layers_of(self.layers, model.hook_dict))
        if missing:
            raise RatLensError(
                f"no pattern was captured for {missing}: run the model with these hooks first"
            )
        return ActivationCache(
            {name: stack_rows(blocks) for name, blocks in self.store.items()}, model
        )


def _by_filter(layers: Sequence[int], keep: Callable) -> list:
    """``[(filter, hook)]`` for ``run_with_hooks`` / ``hooks()``: a name filter, not the hook
    names. TransformerLens shows the filter every hook name before the forward, so a layer the
    model lacks is one RatLensError naming the model's layers (raised by the first pattern
    kept, or by ``to_cache`` when none was), not TransformerLens's KeyError."""
    wanted = {hook_name(layer) for layer in layers}
    offered: set[str] = set()

    def pick(name: str) -> bool:
        offered.add(name)
        return name in wanted

    def checked_keep(pattern: Tensor, hook):
        if wanted - offered:
            raise RatLensError(_not_layers_of(layers, offered))
        return keep(pattern, hook)

    return [(pick, checked_keep)]


def _not_layers_of(layers: Sequence[int], hook_names) -> str:
    """The message for capture layers that a model (with these hook names) does not have."""
    lacking = sorted({layer for layer in layers if hook_name(layer) not in hook_names})
    n_layers = sum(hook_name(layer) in hook_names for layer in range(len(hook_names)))
    return (
        f"PatternCapture layers {lacking} are not layers of this model (its layers: "
        f"0..{n_layers - 1})"
    )


@dataclass
class BoundedCapture:
    """Forward hooks that keep the per-head attention of ``layers`` in bounded memory as the
    forward runs (:mod:`rat_lens.search.store`), one block of query rows at a time:

    - ``stores()``: per layer and prompt a :class:`~rat_lens.search.store.TopKeys` (per row the
      ``keep`` strongest keys a search may pick, ``key_ok``; the diagonal; the ``sink_keys``);
    - ``strips[b]``: prompt ``b``'s token strip, the 4 strongest keys of each query where
      ``query_mask`` is 1 in the head-mean averaged over the layers (finished, and its rows
      dropped, as soon as every layer has delivered them);
    - with ``head_means``: each layer's dense head-mean too (``head_mean_stack``; the rollout
      needs all of it).

    ``add(name, pattern)`` takes a ``[batch, head, query, key]`` block of the layer hooked at
    ``name`` (the hooks call it; so can a caller holding patterns). Without ``overview`` only
    the stores are kept (no strip, no head-means): a store of edge shares.
    """

    layers: Sequence[int]
    key_ok: Tensor  # [batch, seq] bool
    sink_keys: Sequence[int]
    keep: int
    query_mask: Tensor  # [batch, seq]
    head_means: bool = False
    overview: bool = True

    def __post_init__(self):
        batch, seq = self.key_ok.shape
        names = [hook_name(layer) for layer in sorted(set(self.layers))]
        self.builders = {
            n: TopKeysBuilder(seq, self.keep, self.key_ok, self.sink_keys) for n in names
        }
        self.strip_rows = LayerMeanRows(len(names), seq)
        self.strips: list[list] = [[] for _ in range(batch)]
        self.means: dict[str, CausalRows] = {}

    def add(
        self,
        name: str,
        pattern: Float[Tensor, "batch head query key"],
        stay: Optional[Tensor] = None,
        also: Optional[Tensor] = None,
    ) -> Tensor:
        """Keep a block of rows; ``stay`` and ``also`` as
        :meth:`~rat_lens.search.store.TopKeysBuilder.add`, whose kept keys it returns.
        Shares (no ``overview``) come from checked attention: not checked again."""
        if not self.overview:
            return self.builders[name].add(pattern, stay, also)
        check_pattern_values(pattern, name)
        kept = self.builders[name].add(pattern, stay, also)
        mean = head_mean(pattern.detach().float()).cpu()
        if self.head_means:
            self.means.setdefault(name, CausalRows()).add(mean)
        done = self.strip_rows.add(mean)
        if done is not None:
            first, rows = done
            for b, strip in enumerate(self.strips):
                strip.extend(top_attention(rows[b], self.query_mask[b], first))
        return kept

    @property
    def fwd_hooks(self) -> list:
        def keep(pattern: Tensor, hook):
            self.add(hook.name, pattern)

        return [(name, keep) for name in self.builders]

    def rows_captured(self) -> dict[str, int]:
        return {name: builder.rows for name, builder in self.builders.items()}

    def stores(self) -> dict[int, list[TopKeys]]:
        """Layer -> one store per prompt (call once, after the forward)."""
        return {
            int(_HOOK_RE.match(name)[1]): builder.build() for name, builder in self.builders.items()
        }

    def head_mean_list(self, layers: Sequence[int]) -> Optional[list[CausalRows]]:
        """Per layer (in the order given) its head-means, if kept."""
        if not self.head_means:
            return None
        return [self.means[hook_name(layer)] for layer in layers]


@dataclass(frozen=True)
class Joined:
    """Several captures run by one forward: their hooks together (in the order given), their
    layers and captured rows joined, so a trace and its explanation share the forward."""

    parts: Sequence

    @property
    def layers(self) -> list[int]:
        return sorted({layer for part in self.parts for layer in part.layers})

    @property
    def fwd_hooks(self) -> list:
        return [hook for part in self.parts for hook in part.fwd_hooks]

    def rows_captured(self) -> dict[str, int]:
        return {name: n for part in self.parts for name, n in part.rows_captured().items()}


@dataclass(frozen=True)
class Forward:
    """How one forward of a capture runs.

    Attributes:
        attention_mask: ``[batch, seq]`` 1 for real tokens (None: no padding).
        query_chunk: ``N``, ``"auto"`` or ``None`` (one pass); see the module docstring.
        logits: run to the end and return the logits; otherwise the forward stops right after
            the capture's highest layer.
        top_tokens: with ``logits``, keep only each position's ``top_tokens`` most likely next
            tokens as each query chunk's logits arrive (a ``TopTokens``), never ``[seq, vocab]``.
    """

    attention_mask: Optional[Tensor] = None
    query_chunk: Union[int, str, None] = "auto"
    logits: bool = False
    progress: bool = False  # a ProgressBar of the capture's layers (per query chunk)
    top_tokens: int = 0


def run_forward(
    model, tokens: Int[Tensor, "batch seq"], capture, forward: Forward = Forward()
) -> Union[Float[Tensor, "batch seq vocab"], TopTokens, None]:
    """The one forward every capture runs through: ``capture`` (anything with ``layers``,
    ``fwd_hooks`` and ``rows_captured()``, e.g. :class:`PatternCapture`) hooked in, under
    no_grad and :func:`model_session`, the tokens on the model's input device, in query
    chunks where asked, each layer's bridge-side copy of its pattern freed as it finishes.

    Checks the layers and tokens first; hooks are gone on every exit path (TransformerLens's
    ``hooks()`` context), and the caller's capture is only filled, never reconfigured. Returns
    the logits with ``forward.logits`` (their ``TopTokens`` with ``forward.top_tokens``), else
    None.

    Examples:
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> capture = PatternCapture([0])
        >>> run_forward(model, model.to_tokens("cat dog"), capture) is None
        True
        >>> capture.to_cache(model)["pattern", 0].shape
        torch.Size([1, 1, 3, 3])
    """
    n_layers = _check_layer_range(model, capture.layers)
    check_tokens(model, tokens)
    tokens = tokens.to(input_device(model))
    mask = forward.attention_mask
    mask = None if mask is None else mask.to(tokens.device)
    with model_session(model):
        seq = tokens.shape[-1]
        chunk = _chunk_size(model, tokens, capture.layers, mask, forward.query_chunk)
        kwargs = _chunk_kwargs(model, tokens) if chunk < seq else lambda _: {"attention_mask": mask}
        last = n_layers - 1 if forward.logits else max(capture.layers)
        layers = sorted(set(capture.layers))
        bar = ProgressBar(len(layers) * -(-seq // chunk), "layers", forward.progress)
        hooks = capture.fwd_hooks + _release_hooks(model, last)
        hooks += [(hook_name(layer), lambda _, hook: bar.advance()) for layer in layers]
        if not forward.logits:
            hooks.append((hook_name(last), _stop))  # after the capture's own hook there
        logits = None
        with bar, torch.no_grad(), kv_cache_reaches_attention(model), model.hooks(fwd_hooks=hooks):
            for start in range(0, seq, chunk):
                piece = tokens[:, start : start + chunk]
                try:
                    out = model(piece, **kwargs(piece))
                    logits = _logits_into(logits, out, start, seq, forward.top_tokens)
                except _StopForward:
                    pass
    short = {name: n for name, n in capture.rows_captured().items() if n != seq}
    if short:  # each chunk restarted from position 0
        raise RatLensError(
            f"{type(model).__name__} ignored the KV cache across query chunks "
            f"(rows captured per layer {short}, expected {seq}): query_chunk is "
            f"not available for this model; trace without it"
        )
    return logits


def _logits_into(logits, piece: Tensor, start: int, seq: int, top_tokens: int = 0):
    """The logits of a query chunk placed at ``start`` of the whole prompt's (allocated by the
    first chunk): the chunks are never all held beside their concatenation ([seq, vocab] is
    0.4 GB at 2,048 tokens on a 49k vocabulary); with ``top_tokens``, only its top tokens."""
    if top_tokens:
        if logits is None:
            batch, _, vocab = piece.shape
            logits = TopTokens.empty(batch, seq, vocab, top_tokens, piece.device)
        logits.add(piece, start)
        return logits
    if piece.shape[1] == seq:
        return piece
    if logits is None:
        logits = piece.new_empty(piece.shape[0], seq, *piece.shape[2:])
    logits[:, start : start + piece.shape[1]] = piece
    return logits


def _check_layer_range(model, layers: Sequence[int]) -> int:
    """The model's number of layers, if ``layers`` are some of them."""
    n_layers = pattern_layers(model)
    if not layers or any(not 0 <= layer < n_layers for layer in layers):
        raise RatLensError(f"layers {list(layers)} must be non-empty and within 0..{n_layers - 1}")
    return n_layers


class ProgressBar:
    """Work done of ``total`` (in ``unit``) as a rich progress bar with rate and ETA on stderr,
    shown only once the work has run ``SHOW_AFTER`` seconds and only on a terminal (short runs,
    pipes and ``show=False`` print nothing). A context manager; ``advance(n)`` counts.

    Examples:
        >>> with ProgressBar(3, "layers", show=False) as bar:
        ...     bar.advance(2)
        >>> bar.done
        2
    """

    SHOW_AFTER = 2.0  # seconds

    def __init__(self, total: int, unit: str, show: bool = True, done: int = 0):
        self.total, self.unit, self.done = total, unit, done
        self.show = show and sys.stderr.isatty()
        self.started, self.bar, self.task = time.monotonic(), None, None

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.show:
            return
        if self.bar is None and time.monotonic() - self.started >= self.SHOW_AFTER:
            self._start()
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        unit = self.unit

        class Rate(ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed:.2f} {unit}/s" if task.speed else f"… {unit}/s")

        self.bar = Progress(
            TextColumn(unit),
            BarColumn(),
            MofNCompleteColumn(),
            Rate(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task(unit, total=self.total, completed=self.done)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False


def _stop(activation: Tensor, hook):
    raise _StopForward


def capture_bounded(
    model,
    tokens: Int[Tensor, "batch seq"],
    capture: BoundedCapture,
    *,
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
    query_chunk: Union[int, str, None] = "auto",
    logits: bool = False,
) -> Optional[Float[Tensor, "batch seq vocab"]]:
    """Run ``model`` on ``tokens`` with ``capture``'s hooks (a :class:`BoundedCapture`), in
    query chunks as :func:`capture_patterns` does; stopped after its highest layer unless
    ``logits`` (then the whole forward's logits are returned).

    Examples:
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> tokens = model.to_tokens("cat dog red cat dog")
        >>> ok = torch.ones_like(tokens, dtype=torch.bool)
        >>> capture = BoundedCapture([0, 1], ok, sink_keys=[0], keep=3, query_mask=ok)
        >>> _ = capture_bounded(model, tokens, capture)
        >>> capture.stores()[1][0]
        TopKeys(head=4, query=6, keep=3, sinks=1)
    """
    return run_forward(model, tokens, capture, Forward(attention_mask, query_chunk, logits))


@checked_call
def capture_patterns(
    model,
    tokens: Int[Tensor, "batch seq"],
    layers: Sequence[int],
    *,
    agg_heads: str = "mean",
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
    query_chunk: Union[int, str, None] = "auto",
) -> ActivationCache:
    """Run ``model`` once on ``tokens`` under no_grad and return the reduced patterns of ``layers``.

    The forward stops after the highest layer in ``layers``. Hooks are removed on every exit path
    (TransformerLens's ``hooks()`` context); the model's parameters are never touched.
    ``query_chunk=N`` runs it N positions at a time over the model's KV cache, ``None`` in one
    pass; the default ``"auto"`` chunks long unpadded prompts where that is exact (see above).

    Examples:
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> tokens = model.to_tokens("cat dog red cat dog")
        >>> cache = capture_patterns(model, tokens, [0, 1], agg_heads="none")
        >>> sorted(cache.keys()), cache["pattern", 0].shape
        (['blocks.0.attn.hook_pattern', 'blocks.1.attn.hook_pattern'], torch.Size([1, 4, 6, 6]))
    """
    capture = PatternCapture(layers, agg_heads, device=input_device(model))
    run_forward(model, tokens, capture, Forward(attention_mask, query_chunk))
    return capture.to_cache(model)


@checked_call
def run_with_patterns(
    model,
    tokens: Int[Tensor, "batch seq"],
    layers: Sequence[int],
    *,
    agg_heads: str = "mean",
    attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
    query_chunk: Union[int, str, None] = "auto",
) -> tuple[Float[Tensor, "batch seq vocab"], ActivationCache]:
    """:func:`capture_patterns` with the whole forward: the logits too, as ``run_with_cache``.

    Examples:
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> logits, cache = run_with_patterns(model, model.to_tokens("cat dog red"), [1])
        >>> logits.shape, cache["pattern", 1].shape
        (torch.Size([1, 4, 64]), torch.Size([1, 1, 4, 4]))
    """
    capture = PatternCapture(layers, agg_heads, device=input_device(model))
    logits = run_forward(model, tokens, capture, Forward(attention_mask, query_chunk, logits=True))
    return logits, capture.to_cache(model)


_locks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its RLock
_locks_guard = threading.Lock()


@contextmanager
def model_session(model):
    """Run a forward of ``model`` with our hooks safely: one thread at a time per model, in
    eval mode.

    Hooks live on the model, so two threads tracing one model would see each other's hooks
    (wrong patterns, a stop raised into the other's forward): a per-model re-entrant lock
    serialises every rat_lens run on it (other models run in parallel). Dropout would make
    traces random, so the forward runs in eval mode; every module's own ``training`` flag is
    put back afterwards, errors included.
    """
    with _locks_guard:
        lock = _locks.setdefault(model, threading.RLock())
    with lock:
        modes = [(module, module.training) for module in _all_modules(model)]
        if isinstance(model, torch.nn.Module) and any(training for _, training in modes):
            model.eval()  # the bridge's own eval() also reaches the HF model it wraps
        try:
            yield model
        finally:
            for module, training in modes:
                module.training = training


def _all_modules(model) -> list:
    """Every module whose mode a forward depends on: the model's, and those of a Hugging Face
    model a bridge wraps without registering it as a submodule. A duck-typed wrapper without
    torch's Module API has none."""
    found: dict[int, torch.nn.Module] = {}
    for root in (model, getattr(model, "original_model", None)):
        if isinstance(root, torch.nn.Module):
            found.update((id(m), m) for m in root.modules())
    return list(found.values())


def input_device(model) -> torch.device:
    """Where ``model`` takes its tokens, and where rat_lens puts what it captures: the device of
    its embedding (``cfg.device``) even when its layers are dispatched over other devices, each
    hook computing on its own layer's. A model whose embedding is offloaded (meta placeholders)
    runs it on the device accelerate names; lacking one, CPU.

    Examples:
        >>> from rat_lens.models import load
        >>> input_device(load("induction-2l"))
        device(type='cpu')
    """
    embed = getattr(model, "embed", None)
    dispatched = getattr(getattr(model, "original_model", None), "hf_device_map", None)
    if isinstance(embed, torch.nn.Module) and not dispatched:
        # the weights themselves: a bridge built around a CPU model may record another device
        real = next((p.device for p in embed.parameters() if p.device.type != "meta"), None)
        if real is not None:
            return real
    device = getattr(getattr(model, "cfg", None), "device", None)
    if device is not None and torch.device(device).type != "meta":
        return torch.device(device)
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return next((p.device for p in params if p.device.type != "meta"), torch.device("cpu"))


@contextmanager
def offloaded_weights_loaded(module):
    """Within this block every weight under ``module`` holds its values, on the device its
    layer runs on. accelerate's CPU / disk offload (a model loaded with ``device_map``) keeps
    offloaded weights as meta placeholders outside their own module's forward, so reading one
    (``attn.W_O``) needs this; elsewhere it does nothing. They are offloaded again afterwards.
    """
    offloaded = [m for m in module.modules() if getattr(getattr(m, "_hf_hook", None), "offload", 0)]
    if not offloaded:
        yield module
        return
    from accelerate.utils import align_module_device  # installed wherever a model is offloaded

    with ExitStack() as stack:
        for submodule in offloaded:
            stack.enter_context(align_module_device(submodule))
        yield module


def check_tokens(model, tokens: Tensor) -> None:
    """Token ids the model can embed, and no more positions than its context: a clear error here
    rather than an IndexError from inside torch (or TL silently cutting the prompt)."""
    cfg = getattr(model, "cfg", None)
    vocab, n_ctx = getattr(cfg, "d_vocab", None), getattr(cfg, "n_ctx", None)
    if tokens.numel() and (int(tokens.min()) < 0 or (vocab and int(tokens.max()) >= vocab)):
        bad = tokens[(tokens < 0) | (tokens >= (vocab or 2**62))].unique()[:5].tolist()
        raise RatLensError(
            f"token ids {bad} are outside the model's vocabulary (valid: 0..{vocab - 1})"
        )
    if n_ctx and tokens.shape[-1] > n_ctx:
        raise RatLensError(
            f"the prompt has {tokens.shape[-1]} tokens, more than the model's "
            f"context of {n_ctx}: shorten it (rat_lens never cuts a prompt "
            f"silently)"
        )


def _chunk_size(model, tokens, layers, attention_mask, query_chunk) -> int:
    """How many positions each forward takes: the whole prompt unless chunking is asked for or,
    with "auto", the prompt is long and the model's KV-cached forward passes the probe."""
    seq = tokens.shape[-1]
    if query_chunk is None:
        return seq
    if query_chunk == "auto":
        if seq <= AUTO_ABOVE or attention_mask is not None:
            return seq
        return AUTO_CHUNK if _chunks_match(model, tokens[:, :PROBE_LEN], layers) else seq
    if isinstance(query_chunk, str):
        raise RatLensError(f"query_chunk must be an int, 'auto' or None, got {query_chunk!r}")
    check_int("query_chunk", query_chunk)
    if query_chunk < seq and attention_mask is not None:
        raise RatLensError(
            "query_chunk needs unpadded prompts (no attention_mask): trace long "
            "prompts one at a time"
        )
    return query_chunk


def _chunks_match(model, probe: Tensor, layers) -> bool:
    """Whether forwards in chunks over the model's KV cache reproduce a one-shot forward's
    patterns on ``probe`` (a model may ignore the cache, or lack one). A model built to continue
    its cache (HookedTransformer, a Hugging Face model in a bridge) that fails gets one warning:
    it then runs in one forward, with the memory that costs."""
    try:
        chunked = capture_patterns(model, probe, layers, agg_heads="none", query_chunk=5)
        why = "it did not continue the KV cache"
    except RatLensError as error:
        chunked, why = None, str(error)
    whole = capture_patterns(model, probe, layers, agg_heads="none", query_chunk=None)
    if chunked is not None:
        worst = max(float((chunked[name] - whole[name]).abs().max()) for name in whole.keys())
        if worst <= PROBE_ATOL:
            return True
        why = f"its chunked patterns differ from one forward's by {worst:.2g} (> {PROBE_ATOL})"
    if _keeps_a_kv_cache(model) and model not in _warned:
        _warned.add(model)
        warnings.warn(
            f"query_chunk='auto': {type(model).__name__} should continue its KV cache "
            f"across query chunks, but on a {probe.shape[-1]}-token probe {why}; long "
            f"prompts run in one forward (attention memory grows with seq²). Pass "
            f"query_chunk=None to silence this.",
            RuntimeWarning,
            stacklevel=4,
        )
    return False


def _keeps_a_kv_cache(model) -> bool:
    """HookedTransformer, or a bridge around a Hugging Face model (not TL's native modules)."""
    from transformers import PreTrainedModel  # the bridge itself imports it

    return "past_kv_cache" in inspect.signature(model.forward).parameters or isinstance(
        getattr(model, "original_model", None), PreTrainedModel
    )


def _chunk_kwargs(model, tokens) -> Callable[[Tensor], dict]:
    """Each chunk's forward keywords: the model's KV cache, carried from chunk to chunk."""
    params = inspect.signature(model.forward).parameters
    if "past_kv_cache" in params:  # HookedTransformer
        from transformer_lens import TransformerLensKeyValueCache

        kv = TransformerLensKeyValueCache.init_cache(model.cfg, tokens.device, tokens.shape[0])
        # Without a mask it infers one from the tokens, masking any that equal the pad token.
        return lambda chunk: {"past_kv_cache": kv, "attention_mask": torch.ones_like(chunk)}
    if "past_key_values" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        from transformers import DynamicCache  # the bridge hands it to the HF model

        kv = DynamicCache()
        hf_forward = getattr(getattr(model, "original_model", None), "forward", None)
        # Newer transformers name the forward's cache `cache` (`past_key_values` deprecated);
        # give it the name the installed model's forward declares.
        if hf_forward is not None and "cache" in inspect.signature(hf_forward).parameters:
            kwargs = {"cache": kv, "use_cache": True}
        else:
            kwargs = {"past_key_values": kv}
        return lambda chunk: kwargs
    raise RatLensError(
        f"{type(model).__name__}.forward takes no KV cache: query_chunk is not available for it"
    )


@contextmanager
def kv_cache_reaches_attention(model):
    """Within this block, a KV cache handed to a TransformerBridge forward reaches its attention
    layers whatever the installed transformers calls it.

    Newer transformers blocks call their attention with ``cache=`` (``past_key_values`` is
    deprecated); TransformerBridge's attention layers (TL 3.9, 4.3) read ``past_key_values`` or
    ``layer_past`` and, finding neither, silently run without the cache: every cached step then
    attends to itself alone. A pre-hook on each ``blocks.{l}.attn`` passes the cache under both
    names; where the caller already passes ``past_key_values`` nothing changes. rat_lens's own
    chunked forwards use it; wrap your own cached generation in it to capture it with
    ``PatternCapture``. The hooks are gone when the block ends, errors included.
    """

    def alias(module, args, kwargs):
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            return args, {**kwargs, "past_key_values": kwargs["cache"]}
        return None

    blocks = getattr(model, "blocks", None) or []
    handles = [
        block.attn.register_forward_pre_hook(alias, with_kwargs=True)
        for block in blocks
        if isinstance(getattr(block, "attn", None), torch.nn.Module)
    ]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _release_hooks(model, last: int) -> list:
    """Hooks that free the bridge's own copy of each layer's pattern once the layer is done."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) <= last:  # a wrapper without the bridge's modules
        return []
    hooks, hook_dict = [], model.hook_dict  # the bridge builds it anew on every read
    for layer in range(last + 1):
        attn, name = getattr(blocks[layer], "attn", None), f"blocks.{layer}.attn.hook_out"
        if hasattr(attn, "_pattern") and name in hook_dict:

            def release(out, hook, attn=attn):
                attn._pattern = None  # the bridge's __init__ value

            hooks.append((name, release))
    return hooks


def check_cache(model, cache, tokens: Int[Tensor, "batch seq"]) -> None:
    """A ``cache=`` must be an ``ActivationCache`` (or a dict of hook name -> tensor) of these
    ``tokens``; else one RatLensError, before anything is read from it.

    The cache holds no token ids of its own, so they are checked where it keeps a trace of them:
    ``embed.hook_in`` (the ids, on a TransformerBridge), else ``hook_embed`` (each position's
    embedding against ``W_E`` of the token: same direction). A cache filtered to the patterns
    alone keeps neither: only its (batch, seq) shape is checked then (``patterns_from_cache``).
    """
    if not isinstance(cache, (ActivationCache, Mapping)):
        raise RatLensError(
            f"cache must be the ActivationCache of run_with_cache on these tokens (or a dict of "
            f"hook name -> tensor), got {type(cache).__name__}"
        )
    found = {name: cache[name] for name in ("embed.hook_in", "hook_embed") if name in cache}
    ids, embedded = found.get("embed.hook_in"), found.get("hook_embed")  # no .get on a cache
    if isinstance(ids, Tensor) and not ids.is_floating_point():
        same = ids.shape == tokens.shape and torch.equal(ids.cpu(), tokens.cpu())
    elif isinstance(embedded, Tensor) and isinstance(getattr(model, "W_E", None), Tensor):
        same = embedded.shape[:2] == tokens.shape and bool(
            (_cosine(embedded, model.W_E[tokens.to(model.W_E.device)]) > 0.99).all()
        )
    else:
        return
    if not same:
        raise RatLensError(
            f"cache was captured on other tokens than these {tuple(tokens.shape)} (its "
            f"{'embed.hook_in' if ids is not None else 'hook_embed'} differs): run_with_cache "
            f"on the prompt you trace"
        )


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)


def patterns_from_cache(
    cache,
    layers: Sequence[int],
    agg_heads: str = "mean",
    batch_seq: Optional[tuple[int, int]] = None,
) -> ActivationCache:
    """Reduce the patterns a user already cached (``run_with_cache``), without touching theirs."""
    store = {}
    for layer in layers:
        name = hook_name(layer)
        try:
            pattern = cache[name]
        except KeyError:
            raise RatLensError(
                f"the cache has no {name!r}: cache it with run_with_cache "
                f"(names_filter may have left it out)"
            ) from None
        if pattern.ndim != 4 or (batch_seq and (pattern.shape[0], pattern.shape[-1]) != batch_seq):
            raise RatLensError(
                f"cached {name} has shape {tuple(pattern.shape)}, expected "
                f"[batch, head, query, key] with (batch, seq) = {batch_seq}"
            )
        store[name] = aggregate_heads(pattern.detach(), agg_heads)
    return ActivationCache(store, getattr(cache, "model", None))


@dataclass
class ContributionCapture:
    """Forward hooks that keep what contribution weights need of ``layers``, block of query
    rows by block (one forward, KV-cached query chunks, or a cache fed to :meth:`add_cache`):
    per layer ``hook_resid_pre`` and ``hook_v``, and its patterns, handed to ``attention``:

    - a :class:`PatternCapture` (``agg_heads="none"``) keeps every head's whole pattern;
    - a :class:`BoundedCapture` keeps each row's strongest keys (and the strips, the
      head-means), and the layer's queries and keys are kept too (``queries_keys``: the hooks
      :func:`query_key_parts` names), so :meth:`attention_rows` recomputes any row exactly
      (:class:`~rat_lens.search.recompute.AttentionRows`). The attention scale is measured on
      the first block's rows (:func:`~rat_lens.search.recompute.fit_scale`) and probe rows of
      every block are checked against the forward's own: a model whose attention is not
      ``softmax(scale · q·kᵀ)`` is one RatLensError after its first block.

    ``mask``: ``[batch, seq]`` 1 for real tokens (None: no padding). :meth:`rows` then gives
    each prompt's proximity shares, computed only for the rows the search reads.

    Examples:
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> ok = torch.ones(1, 5, dtype=torch.bool)
        >>> bounded = BoundedCapture([1], ok, sink_keys=[0], keep=2, query_mask=ok)
        >>> capture = ContributionCapture.of(model, [1], bounded)
        >>> _ = run_forward(model, model.to_tokens("cat dog red cat"), capture)
        >>> A = capture.attention_rows(1, bounded.stores()[1])[0]
        >>> A, capture.rows(model, 1, [A])[0][:, [4]].shape    # 4 heads + the residual stream
        (AttentionRows(head=4, query=5), torch.Size([5, 1, 5]))
    """

    layers: Sequence[int]
    attention: Union[PatternCapture, BoundedCapture]
    queries_keys: tuple = ()  # e.g. ("attn.hook_rot_q", "attn.hook_rot_k"): rows recomputed
    mask: Optional[Tensor] = None

    PROBE_ROWS = 8  # rows of a forward's first block checked as it runs (and the scale's)

    def __post_init__(self):
        self.layers = check_layers(self.layers)
        self.kept: dict[tuple[int, str], list[Tensor]] = {}  # (layer, part) -> row blocks
        self.scale: dict[int, float] = {}

    @classmethod
    def of(cls, model, layers: Sequence[int], attention, mask=None) -> "ContributionCapture":
        """The capture for ``model``: with a :class:`BoundedCapture`, its query/key hooks."""
        _check_layer_range(model, layers)
        parts = query_key_parts(model) if isinstance(attention, BoundedCapture) else ()
        check_contribution_hooks(model, layers, parts)
        return cls(layers, attention, parts, mask)

    @property
    def parts(self) -> tuple[str, ...]:
        """The hooks read per layer, in a forward's order."""
        return ("hook_resid_pre", "attn.hook_v", *self.queries_keys, "attn.hook_pattern")

    def names(self) -> list[str]:
        return [f"blocks.{layer}.{part}" for layer in self.layers for part in self.parts]

    @property
    def fwd_hooks(self) -> list:
        def keeper(layer: int, part: str):  # by the name asked for: the bridge fires aliases
            return lambda activation, hook: self.add(layer, part, activation)

        layers = sorted(set(self.layers))
        return [(f"blocks.{layer}.{p}", keeper(layer, p)) for layer in layers for p in self.parts]

    def rows_captured(self) -> dict[str, int]:
        return self.attention.rows_captured()

    def add(self, layer: int, part: str, activation: Tensor) -> None:
        """Take a block of one of :attr:`parts` of ``layer`` (the hooks call it; so can a
        caller holding a cache, in a forward's order)."""
        activation = activation.detach()
        if part != "attn.hook_pattern":
            self.kept.setdefault((layer, part), []).append(activation)
            return
        queries, keys = activation.shape[-2:]
        if keys == queries:  # a forward from position 0: only its own blocks count
            for earlier in self.parts[:-1]:
                del self.kept[(layer, earlier)][:-1]
        values = sum(block.shape[1] for block in self.kept[(layer, "attn.hook_v")])
        if values != keys:
            raise RatLensError(
                f"{hook_name(layer)} gave {queries} query rows over {keys} keys after values "
                f"of {values} keys: the model did not continue its KV cache"
            )
        if self.queries_keys and keys == queries:  # needs no key blocks joined
            self._check_block(layer, activation)
        self.attention.add(hook_name(layer), activation)

    def _check_block(self, layer: int, pattern: Float[Tensor, "batch head query key"]) -> None:
        """The first block of a forward (from position 0): the layer's scale fitted on
        ``PROBE_ROWS`` rows of the first prompt, and those rows of every prompt (its real
        ones) recomputed and compared with the forward's. Later rows are checked as read."""
        seq = pattern.shape[-1]
        q, k = (self.kept[(layer, part)][-1] for part in self.queries_keys)
        probe = torch.linspace(0, seq - 1, self.PROBE_ROWS).round().long().unique()
        for b in range(pattern.shape[0]):
            key_ok = self._key_ok(b, seq, q.device)
            rows = probe[key_ok[probe.to(q.device)].cpu()]
            forward = pattern[b][:, rows.to(pattern.device)].to(q.device)
            if b == 0:
                self.scale[layer] = fit_scale(forward, q[b][rows], k[b], rows)
            exact = attention_rows(q[b][rows], k[b], self.scale[layer], rows, key_ok)
            error = row_error(exact, forward)
            check_rows(error, hook_name(layer), rows, "the forward's attention on probe rows")

    def _key_ok(self, b: int, keys: int, device) -> Tensor:
        """Prompt ``b``'s real keys among the first ``keys``."""
        if self.mask is None:
            return torch.ones(keys, dtype=torch.bool, device=device)
        return self.mask[b, :keys].bool().to(device)

    def _whole(self, layer: int, part: str) -> Tensor:
        """A part's blocks as one ``[batch, seq, ...]`` tensor (joined once, kept joined)."""
        blocks = self.kept[(layer, part)]
        if len(blocks) > 1:
            blocks[:] = [torch.cat(blocks, dim=1)]
        return blocks[0]

    def attention_rows(self, layer: int, stores: list[TopKeys]) -> list[AttentionRows]:
        """Layer ``layer``'s attention, one :class:`AttentionRows` per prompt (each checked,
        row by row as read, against ``stores[b]``, what the bounded store kept)."""
        q, k = (self._whole(layer, part) for part in self.queries_keys)
        scale, name = self.scale[layer], hook_name(layer)
        return [
            AttentionRows(q[b], k[b], scale, self._key_ok(b, k.shape[1], q.device), stores[b], name)
            for b in range(len(stores))
        ]

    def rows(self, model, layer: int, attention: Union[Tensor, list]) -> list[ShareRows]:
        """Layer ``layer``'s proximity shares, one :class:`~rat_lens.search.contrib.ShareRows`
        per prompt from its ``attention[b]`` (``[head, query, key]``, dense or recomputed):
        computed only for the rows a search reads, where the layer's activations are."""
        values, W_O, resid, b_O = self._block_parts(model, layer)
        return [
            ShareRows(attention[b], values[b], W_O, resid[b], b_O) for b in range(len(attention))
        ]

    def shares(self, model, layer: int, weight: str) -> Float[Tensor, "batch part query key"]:
        """Layer ``layer``'s shares of every row ``[batch, head + 1, query, key]`` (the last
        channel the residual stream), from whole patterns (``attention`` a PatternCapture)."""
        pattern = self.attention.to_cache(model)[hook_name(layer)]
        values, W_O, resid, b_O = self._block_parts(model, layer)
        pattern = pattern.to(values.device)
        return torch.stack(
            [
                edge_shares(pattern[b], values[b], W_O, resid[b], b_O, weight)
                for b in range(pattern.shape[0])
            ]
        )

    def _block_parts(self, model, layer: int) -> tuple:
        """The layer's values, ``W_O``, residual stream and ``b_O`` (or None), the weights
        where the activations are (a dispatched model's layers sit on several devices)."""
        values, resid = (self._whole(layer, part) for part in ("attn.hook_v", "hook_resid_pre"))
        W_O, b_O = _output_weights(model, layer, values.device)
        return values, W_O, resid, b_O

    def add_cache(self, cache, batch_seq: tuple[int, int]) -> None:
        """Feed a ``run_with_cache`` cache of the prompts (``batch_seq``: their shape)."""
        patterns = patterns_from_cache(cache, self.layers, "none", batch_seq)
        for layer in sorted(set(self.layers)):
            for part in self.parts[:-1]:
                try:
                    self.add(layer, part, cache[f"blocks.{layer}.{part}"])
                except KeyError:
                    raise RatLensError(
                        f"contribution edges from cache= read blocks.{layer}.{part}, which the "
                        f"cache lacks: cache {', '.join(p.split('.')[-1] for p in self.parts)} "
                        "(names_filter=lambda n: n.endswith((...))), or pass "
                        "edge_weight='value_norm'"
                    ) from None
            self.add(layer, self.parts[-1], patterns[hook_name(layer)])


def query_key_parts(model) -> tuple[str, str]:
    """The hooks of the queries and keys attention is computed from: the post-rotary ones
    (``attn.hook_rot_q`` / ``attn.hook_rot_k``) where the model has them, else ``attn.hook_q``
    / ``attn.hook_k``."""
    rotary = "blocks.0.attn.hook_rot_q" in model.hook_dict
    return ("attn.hook_rot_q", "attn.hook_rot_k") if rotary else ("attn.hook_q", "attn.hook_k")


def _output_weights(model, layer: int, device) -> tuple[Tensor, Optional[Tensor]]:
    """Layer ``layer``'s ``W_O`` and ``b_O`` (None where it has none), on ``device``."""
    with offloaded_weights_loaded(model.blocks[layer].attn) as attn:
        W_O = attn.W_O.detach().to(device)
        b_O = getattr(attn, "b_O", None)
        return W_O, None if b_O is None else b_O.detach().to(device)


@dataclass
class ValueNormCapture:
    """Forward hooks that stream value-norm edge shares of ``layers`` as the forward runs, at
    the cost of keeping the attention: per layer, ``hook_resid_pre`` gives each row's ``‖x_q‖``
    and ``hook_v`` each key's ``‖v_k W_O[h]‖`` (through the layer's ``W_O`` factor,
    :func:`rat_lens.search.contrib.norm_factor`), over a KV cache too. The patterns go to
    ``attention`` under their hook name: a :class:`PatternCapture` with ``agg_heads="none"``,
    whose shares :meth:`rows` then reads lazily (a
    :class:`~rat_lens.search.contrib.ValueNormRows` per prompt: only the rows the search
    visits are computed), or a :class:`BoundedCapture`, when ``shares`` is one too: each block
    of rows becomes its shares at once, ``shares`` keeps each row's strongest (and the stay),
    and ``attention`` keeps, besides its own strongest keys, those.

    Examples:
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> vn = ValueNormCapture.of(model, [1], PatternCapture([1], "none"))
        >>> _ = run_forward(model, model.to_tokens("cat dog red cat"), vn)
        >>> pattern = vn.attention.to_cache(model)["pattern", 1]
        >>> vn.rows(1, pattern)[0][:, [4]].shape   # 4 heads + the residual stream, row 4
        torch.Size([5, 1, 5])
    """

    layers: Sequence[int]
    factors: dict  # layer -> norm_factor(W_O): [head, d_head, rank]
    attention: Union[PatternCapture, BoundedCapture]
    shares: Optional[BoundedCapture] = None

    PARTS = ("hook_resid_pre", "attn.hook_v", "attn.hook_pattern")  # in a forward's order

    def __post_init__(self):
        self.layers = check_layers(self.layers)
        self.norms: dict[int, Tensor] = {}  # layer -> [batch, head, keys so far]
        self.resid: dict[int, Tensor] = {}  # layer -> ‖x_q‖ [batch, query] of the rows in flight
        self.kept: dict[int, list] = {}  # layer -> (row totals, ‖x_q‖) of every block (dense)

    @classmethod
    def of(cls, model, layers: Sequence[int], attention, shares=None) -> "ValueNormCapture":
        """The capture for ``model``, each ``W_O`` read (loaded where offloaded) and factored
        (``norm_factor``; the factor is kept per module while its weights are unchanged)."""
        _check_layer_range(model, layers)
        check_contribution_hooks(model, layers)
        factors = {}
        for layer in set(layers):
            with offloaded_weights_loaded(model.blocks[layer].attn) as attn:
                factors[layer] = _norm_factor(attn)
        return cls(layers, factors, attention, shares)

    def add(self, layer: int, part: str, activation: Tensor) -> None:
        """Take one of ``PARTS`` of ``layer`` (the hooks call it; so can a caller holding a
        cache, in a forward's order)."""
        activation = activation.detach()
        if part == "hook_resid_pre":
            self.resid[layer] = activation.float().norm(dim=-1)
            return
        if part == "attn.hook_v":
            norms = key_norms(activation, self.factors[layer].to(activation.device))
            earlier = self.norms.get(layer)
            self.norms[layer] = norms if earlier is None else torch.cat([earlier, norms], -1)
            return
        queries, keys = activation.shape[-2:]
        if keys == queries:  # a forward from position 0: only its own values and rows count
            self.norms[layer], self.kept[layer] = self.norms[layer][..., -keys:], []
        if self.norms[layer].shape[-1] != keys:
            raise RatLensError(
                f"{hook_name(layer)} gave {queries} query rows over {keys} keys after values "
                f"of {self.norms[layer].shape[-1]} keys: the model did not continue its KV cache"
            )
        resid = self.resid.pop(layer)
        if self.shares is None:  # the rows read are computed later: keep their totals
            totals = row_totals(activation, self.norms[layer], resid)
            self.attention.add(hook_name(layer), activation)
            self.kept[layer].append((totals, resid))
            return
        shares, totals = head_shares(activation, self.norms[layer], resid)
        kept = self.shares.add(hook_name(layer), shares, stay=resid / totals)
        self.attention.add(hook_name(layer), activation, also=kept)

    def rows(
        self, layer: int, pattern: Float[Tensor, "batch head query key"]
    ) -> list[ValueNormRows]:
        """Layer ``layer``'s shares, one :class:`~rat_lens.search.contrib.ValueNormRows` per
        prompt, after the forward, from the layer's ``pattern`` (what ``attention``, a
        :class:`PatternCapture`, kept)."""
        totals, resid = (torch.cat(t, dim=-1) for t in zip(*self.kept[layer]))
        norms = self.norms[layer]
        return [
            ValueNormRows(pattern[b], norms[b], totals[b], resid[b]) for b in range(len(pattern))
        ]

    @property
    def fwd_hooks(self) -> list:
        def keeper(layer: int, part: str):  # by the name asked for: the bridge fires aliases
            return lambda activation, hook: self.add(layer, part, activation)

        layers = sorted(set(self.layers))
        return [(f"blocks.{layer}.{p}", keeper(layer, p)) for layer in layers for p in self.PARTS]

    def rows_captured(self) -> dict[str, int]:
        return self.attention.rows_captured()

    def add_cache(self, cache, batch_seq: tuple[int, int]) -> None:
        """Feed a ``run_with_cache`` cache of the prompts (``batch_seq``: their shape)."""
        patterns = patterns_from_cache(cache, self.layers, "none", batch_seq)
        for layer in sorted(set(self.layers)):
            for part in self.PARTS[:2]:
                try:
                    self.add(layer, part, cache[f"blocks.{layer}.{part}"])
                except KeyError:
                    raise RatLensError(
                        f"value_norm edges from cache= read blocks.{layer}.{part}, which the "
                        "cache lacks: cache hook_pattern, hook_v and hook_resid_pre (names_filter="
                        "lambda n: n.endswith(('hook_pattern', 'hook_v', 'hook_resid_pre'))), "
                        "or pass edge_weight='attention'"
                    ) from None
            self.add(layer, self.PARTS[2], patterns[hook_name(layer)])


_factors: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # attn -> (weights, factor)


def _norm_factor(attn) -> Tensor:
    """``norm_factor`` of the module's ``W_O``, a factored one kept for the next traces while
    ``W_O`` is the same tensor, unchanged: factoring 30 layers is 0.1 s, paid once, and every
    trace after it, however short, computes its key norms through the small factor."""
    W_O = attn.W_O
    weights = W_O._base if W_O._base is not None else W_O  # a view of the module's Parameter
    W_O = W_O.detach()
    kept = _factors.get(attn)
    if kept is not None and kept[0]() is weights and kept[1] == weights._version:
        return kept[2]
    factor = norm_factor(W_O)
    if factor.shape[-1] < W_O.shape[-1]:
        _factors[attn] = (weakref.ref(weights), weights._version, factor)
    return factor


def check_contribution_hooks(
    model, layers: Sequence[int], queries_keys: Sequence[str] = ()
) -> None:
    """A clear error where ``model`` lacks a hook point contribution weights read
    (``queries_keys`` too where rows are recomputed)."""
    parts = ("hook_resid_pre", "attn.hook_v", *queries_keys, "attn.hook_pattern")
    wanted = {f"blocks.{layer}.{part}" for layer in layers for part in parts}
    missing = sorted(wanted - set(model.hook_dict))
    if missing:
        raise RatLensError(
            f"{type(model).__name__} lacks the hook points {missing[:3]}: contribution weights "
            f"need {', '.join(part.split('.')[-1] for part in parts)}"
        )


@checked_call
def capture_contributions(
    model,
    tokens: Int[Tensor, "batch seq"],
    layers: Sequence[int],
    weight: str = "contribution",
) -> dict[int, Float[Tensor, "batch part query key"]]:
    """Per layer, each part's share of every row's attention-block output (heads' edges and the
    residual stream, :func:`rat_lens.search.contrib.edge_shares`), from one forward stopped
    after the highest layer (:class:`ContributionCapture`; run it with :func:`run_forward`
    yourself for its patterns and the logits too).

    ``W_O`` and ``b_O`` are read from ``blocks[l].attn``. Unpadded prompts only. Returns
    ``{layer: [batch, head + 1, query, key]}``.

    Examples:
        >>> from rat_lens.models import load
        >>> model = load("induction-2l")
        >>> shares = capture_contributions(model, model.to_tokens("cat dog red cat"), [1])
        >>> shares[1].shape, round(float(shares[1][0, :, 4].sum()), 4)
        (torch.Size([1, 5, 5, 5]), 1.0)
    """
    check_choice("weight", weight, EDGE_WEIGHTS[1:])
    capture = ContributionCapture.of(model, check_layers(layers), PatternCapture(layers, "none"))
    run_forward(model, tokens, capture, Forward(None, None))
    device = input_device(model)
    return {layer: capture.shares(model, layer, weight).to(device) for layer in capture.layers}
