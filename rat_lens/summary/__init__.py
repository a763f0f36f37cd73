"""A trace in words and numbers: :func:`summarize` gives a :class:`Summary` (one-line circuits,
the heads and layers carrying traced mass, token importance, predictions, the causal check),
read as text, markdown, an HTML fragment, rich tables or JSON.

- ``build``: the summary's dataclasses and :func:`summarize`;
- ``text``: how a summary reads (sections → text / markdown / HTML / rich), and
  :func:`indent_wrapped` (a path on lines of at most 100 columns, as the command line prints it).

Needs no torch unless given patterns or logits.
"""

from .build import (
    ROLE_LABELS,
    BeamCircuit,
    EdgeMass,
    HeadMass,
    LayerMass,
    Summary,
    TokenScore,
    summarize,
)
from .text import indent_wrapped

__all__ = [
    "Summary",
    "BeamCircuit",
    "HeadMass",
    "LayerMass",
    "EdgeMass",
    "TokenScore",
    "summarize",
    "indent_wrapped",
    "ROLE_LABELS",
]
