"""A drop-in for reverse-attention 0.1.0: its public names, signatures and semantics.

``from reverse_attention import ReverseAttentionTracer`` becomes ``from rat_lens.compat import
ReverseAttentionTracer`` (also ``rat_lens.ReverseAttentionTracer``), and so for every public
name of the peer: each module of its package has a namesake here (``rat_lens.compat.beam``,
``.attn_extract``, ``.sankey``, ``.tokenize``, ``.utils``, ``.tracer``) and every name is also
importable from ``rat_lens.compat`` itself. They are thin adapters over rat_lens's own search,
capture, result types and renderer; reverse-attention's own test suite runs against them in
CI (tests/test_peer_suite.py). Every difference is listed in docs/migration.md.

Examples:
    >>> import torch
    >>> from rat_lens.compat import beam_search_backward
    >>> A = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.2, 0.7, 0.1]])
    >>> [s.positions for s in beam_search_backward(A, target_pos=2, top_beam=2)]
    [[2, 1, 0], [2, 0]]
"""

from .attn_extract import extract_attention, get_attention_mask
from .beam import (
    BeamPath,
    BeamState,
    SankeyData,
    SankeyLink,
    SankeyNode,
    TraceResult,
    beam_search_backward,
    extend_beam,
    get_top_k_predecessors,
    prune_beams,
)
from .sankey import (
    beams_to_sankey,
    compute_beam_weights,
    get_html_template_dir,
    render_html,
    sankey_to_dict,
    trace_result_to_json,
)
from .tokenize import beam_state_to_path, format_path_text, get_bos_positions, get_token_strings
from .tracer import ReverseAttentionTracer
from .utils import exp_normalize, normalize_score, safe_log

__version__ = "0.1.0"  # the reverse-attention release whose API this reproduces

__all__ = [
    "ReverseAttentionTracer",
    "BeamPath",
    "BeamState",
    "TraceResult",
    "SankeyData",
    "SankeyNode",
    "SankeyLink",
    "extract_attention",
    "get_attention_mask",
    "get_top_k_predecessors",
    "extend_beam",
    "prune_beams",
    "beam_search_backward",
    "compute_beam_weights",
    "beams_to_sankey",
    "sankey_to_dict",
    "trace_result_to_json",
    "get_html_template_dir",
    "render_html",
    "get_token_strings",
    "get_bos_positions",
    "beam_state_to_path",
    "format_path_text",
    "safe_log",
    "normalize_score",
    "exp_normalize",
]
