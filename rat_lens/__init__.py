"""rat_lens: a Reverse Attention Tracer for TransformerLens.

Which earlier tokens, through which heads and layers, fed this token? Capture attention through
``blocks.{l}.attn.hook_pattern`` hooks, walk it backward with a beam search, get ranked paths.

>>> import rat_lens
>>> from rat_lens.models import load
>>> result = rat_lens.trace(load("induction-2l"), "cat dog red blue cat dog red", layers=(0, 1))
>>> result.mode, result.layer, result.layer_lo
('layers', 1, 0)

The package is laid out as the pipeline (CONTRIBUTING.md): ``errors`` and ``options`` and
``result`` at the bottom (no torch), ``search`` (pure tensor code), ``capture`` and ``tracer``
(the TransformerLens-facing side), then ``summary``, ``causal`` and ``render`` on top.
Names are imported on first use (PEP 562), so ``import rat_lens`` and ``rat-lens --help`` load
neither torch nor TransformerLens until a name that needs them is touched.
"""

import importlib
import pkgutil
from typing import TYPE_CHECKING

# name -> the module that defines it; each is imported when the name is first used.
_EXPORTS = {
    "ReverseAttentionTracer": "compat",
    "Tracer": "tracer",
    "trace": "tracer",
    "trace_attention": "search.beam",
    "capture_patterns": "capture",
    "PatternCapture": "capture",
    "TraceOptions": "options",
    "TraceResult": "result",
    "BeamPath": "result",
    "Beam": "result",
    "SankeyData": "result",
    "SankeyNode": "result",
    "SankeyLink": "result",
    "Prediction": "result",
    "Verification": "result",
    "RatLensError": "errors",
    "summarize": "summary",
    "verify": "causal",
    "render_html": "render",
    "census": "corpus",
    "load": "models",
}
# Every submodule is an attribute too (``rat_lens.render.render_html`` after ``import
# rat_lens``), imported on first use like the names above.
_SUBMODULES = frozenset(module.name for module in pkgutil.iter_modules(__path__))

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # editors and type checkers see the names without the lazy indirection
    from .capture import PatternCapture, capture_patterns
    from .causal import verify
    from .compat import ReverseAttentionTracer
    from .corpus import census
    from .errors import RatLensError
    from .models import load
    from .options import TraceOptions
    from .render import render_html
    from .result import (
        Beam,
        BeamPath,
        Prediction,
        SankeyData,
        SankeyLink,
        SankeyNode,
        TraceResult,
        Verification,
    )
    from .search.beam import trace_attention
    from .summary import summarize
    from .tracer import Tracer, trace


def __getattr__(name: str):
    if name in _SUBMODULES and name not in _EXPORTS:
        return importlib.import_module(f".{name}", __name__)  # importing sets the attribute
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rat_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
