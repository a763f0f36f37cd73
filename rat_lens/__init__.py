"""rat_lens: a Reverse Attention Tracer for TransformerLens.

Which earlier tokens, through which heads and layers, fed this token? Capture attention through
``blocks.{l}.attn.hook_pattern`` hooks, walk it backward with a beam search, get ranked paths.

>>> import rat_lens
>>> from rat_lens.models import load
>>> result = rat_lens.trace(load("induction-2l"), "cat dog red blue cat dog red", layers=(0, 1))
>>> result.mode, result.layer, result.layer_lo
('layers', 1, 0)
"""

from ._errors import RatLensError
from .capture import PatternCapture, capture_patterns
from .result import Beam, BeamPath, SankeyData, SankeyLink, SankeyNode, TraceResult
from .beam import trace_attention
from .tracer import ReverseAttentionTracer, trace
from .verify import Verification, verify

__all__ = [
    "ReverseAttentionTracer",
    "trace",
    "trace_attention",
    "capture_patterns",
    "PatternCapture",
    "TraceResult",
    "BeamPath",
    "Beam",
    "SankeyData",
    "SankeyNode",
    "SankeyLink",
    "RatLensError",
    "verify",
    "Verification",
]
