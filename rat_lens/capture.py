"""Collect attention from any TransformerLens model through its ``hook_pattern`` hook points.

Works on whatever exposes ``blocks.{l}.attn.hook_pattern`` with TransformerLens's hook API
(``hook_dict``, ``hooks()``): ``TransformerBridge`` in TL 3.x/4.x, ``HookedTransformer`` in TL 2.x/3.x.
Patterns are reduced over heads as the forward runs, only the layers asked for are kept, and the
forward stops right after the highest of them (no later layers, no unembed).

Memory: TransformerBridge's fused-QKV attention (GPT-2 and kin) stores every layer's full pattern on
the module (``attn._pattern``, written, never read) and keeps it after the forward: 12 layers ×
[12, 2,048, 2,048] floats is 2.4 GB. Our forwards drop each one as soon as its layer is done
(a hook on ``blocks.{l}.attn.hook_out``), so only one layer's attention is alive at a time.
"""

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from ._errors import RatLensError
from ._pattern import aggregate_heads, check_choice, AGG_HEADS

__all__ = ["PatternCapture", "capture_patterns", "run_with_patterns", "patterns_from_cache",
           "pattern_layers", "hook_name"]

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.attn\.hook_pattern$")


def hook_name(layer: int) -> str:
    """TransformerLens's name for layer ``layer``'s attention pattern.

    >>> hook_name(3)
    'blocks.3.attn.hook_pattern'
    """
    return f"blocks.{layer}.attn.hook_pattern"


def pattern_layers(model) -> int:
    """How many layers expose ``hook_pattern``; a model without them gets a clear error."""
    hook_dict = getattr(model, "hook_dict", None)
    if not hasattr(model, "hooks") or not isinstance(hook_dict, dict):
        raise TypeError(f"expected a TransformerLens model (TransformerBridge or HookedTransformer)"
                        f" with hook points, got {type(model).__name__}")
    layers = sorted(int(m[1]) for m in map(_HOOK_RE.match, hook_dict) if m)
    if not layers or layers != list(range(len(layers))):
        raise RatLensError(f"{type(model).__name__} has no blocks.{{l}}.attn.hook_pattern hook "
                           f"points for every layer (found layers {layers})")
    return len(layers)


class _StopForward(Exception):
    """Raised from the last needed hook: everything after it would be thrown away."""


@dataclass
class PatternCapture:
    """Forward hooks that keep ``hook_pattern`` of ``layers``, reduced over heads by ``agg_heads``.

    Compose them with your own hooks in ``run_with_hooks`` / ``hooks()``, then read
    ``to_cache(model)``, a real ``ActivationCache`` (``cache["pattern", l]`` is
    ``[batch, head, query, key]``, head of length 1 unless ``agg_heads="none"``).

    >>> from rat_lens.models import load
    >>> model = load("induction-2l")
    >>> capture = PatternCapture([1])
    >>> _ = model.run_with_hooks(model.to_tokens("cat dog red cat"), fwd_hooks=capture.fwd_hooks)
    >>> capture.to_cache(model)["pattern", 1].shape
    torch.Size([1, 1, 5, 5])
    """

    layers: Sequence[int]
    agg_heads: str = "mean"
    stop_after: bool = False
    store: dict = field(default_factory=dict)

    def __post_init__(self):
        check_choice("agg_heads", self.agg_heads, AGG_HEADS)

    @property
    def fwd_hooks(self) -> list:
        last = max(self.layers)

        def keep(pattern: Tensor, hook):
            self.store[hook.name] = aggregate_heads(pattern.detach(), self.agg_heads)
            if self.stop_after and hook.name == hook_name(last):
                raise _StopForward
            return None  # the model's own pattern flows on unchanged

        return [(hook_name(layer), keep) for layer in sorted(set(self.layers))]

    def to_cache(self, model) -> ActivationCache:
        missing = [hook_name(layer) for layer in self.layers if hook_name(layer) not in self.store]
        if missing:
            raise RatLensError(f"no pattern was captured for {missing}: run the model with "
                               f"these hooks first")
        return ActivationCache(dict(self.store), model)


def capture_patterns(model, tokens: Int[Tensor, "batch seq"], layers: Sequence[int], *,
                     agg_heads: str = "mean",
                     attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
                     ) -> ActivationCache:
    """Run ``model`` once on ``tokens`` under no_grad and return the reduced patterns of ``layers``.

    The forward stops after the highest layer in ``layers``. Hooks are removed on every exit path
    (TransformerLens's ``hooks()`` context); the model's parameters are never touched.

    >>> from rat_lens.models import load
    >>> model = load("induction-2l")
    >>> cache = capture_patterns(model, model.to_tokens("cat dog red cat dog"), [0, 1], agg_heads="none")
    >>> sorted(cache.keys()), cache["pattern", 0].shape
    (['blocks.0.attn.hook_pattern', 'blocks.1.attn.hook_pattern'], torch.Size([1, 4, 6, 6]))
    """
    return _run(model, tokens, layers, agg_heads, attention_mask, stop_early=True)[1]


def run_with_patterns(model, tokens: Int[Tensor, "batch seq"], layers: Sequence[int], *,
                      agg_heads: str = "mean",
                      attention_mask: Optional[Int[Tensor, "batch seq"]] = None,
                      ) -> tuple[Float[Tensor, "batch seq vocab"], ActivationCache]:
    """:func:`capture_patterns` with the whole forward: the logits too, as ``run_with_cache``.

    >>> from rat_lens.models import load
    >>> model = load("induction-2l")
    >>> logits, cache = run_with_patterns(model, model.to_tokens("cat dog red"), [1])
    >>> logits.shape, cache["pattern", 1].shape
    (torch.Size([1, 4, 64]), torch.Size([1, 1, 4, 4]))
    """
    return _run(model, tokens, layers, agg_heads, attention_mask, stop_early=False)


def _run(model, tokens, layers, agg_heads, attention_mask, stop_early: bool):
    n_layers = pattern_layers(model)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise RatLensError(f"layers {list(layers)} must be non-empty and within 0..{n_layers - 1}")
    capture = PatternCapture(layers, agg_heads, stop_after=stop_early)
    last = max(layers) if stop_early else n_layers - 1
    logits = None
    with torch.no_grad(), model.hooks(fwd_hooks=capture.fwd_hooks + _release_hooks(model, last)):
        try:
            logits = model(tokens, attention_mask=attention_mask)
        except _StopForward:
            pass
    return logits, capture.to_cache(model)


def _release_hooks(model, last: int) -> list:
    """Hooks that free the bridge's own copy of each layer's pattern once the layer is done."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) <= last:  # a wrapper without the bridge's modules
        return []
    hooks = []
    for layer in range(last + 1):
        attn, name = getattr(blocks[layer], "attn", None), f"blocks.{layer}.attn.hook_out"
        if hasattr(attn, "_pattern") and name in model.hook_dict:
            def release(out, hook, attn=attn):
                attn._pattern = None  # the bridge's __init__ value
            hooks.append((name, release))
    return hooks


def patterns_from_cache(cache, layers: Sequence[int], agg_heads: str = "mean",
                        batch_seq: Optional[tuple[int, int]] = None) -> ActivationCache:
    """Reduce the patterns a user already cached (``run_with_cache``), without touching theirs."""
    store = {}
    for layer in layers:
        name = hook_name(layer)
        try:
            pattern = cache[name]
        except KeyError:
            raise RatLensError(f"the cache has no {name!r}: cache it with run_with_cache "
                               f"(names_filter may have left it out)") from None
        if pattern.ndim != 4 or (batch_seq and (pattern.shape[0], pattern.shape[-1]) != batch_seq):
            raise RatLensError(f"cached {name} has shape {tuple(pattern.shape)}, expected "
                               f"[batch, head, query, key] with (batch, seq) = {batch_seq}")
        store[name] = aggregate_heads(pattern.detach(), agg_heads)
    return ActivationCache(store, getattr(cache, "model", None))
