"""Does the traced path matter? :func:`verify` checks a trace causally, by ablation through
TransformerLens hooks, and returns a :class:`~rat_lens.result.Verification`.

- ``check``: :func:`verify` (per-beam effects against random same-shape paths, the
  faithfulness curve, blank-out token importance);
- ``run``: the batched forwards with ablations in hooks (the model-facing half);
- ``ablation``: the ablation arithmetic (pure tensor functions).

The package is named for what it does, not ``verify``, so that ``rat_lens.verify`` is always
the function. Keep a check with its trace with ``result.verification = verify(model, result)``:
the summary and the page then show it.
"""

from .ablation import ABLATIONS, ablate_pattern, spearman
from .check import BLANKS, PERCENTS, verify

__all__ = ["verify", "ablate_pattern", "spearman", "ABLATIONS", "BLANKS", "PERCENTS"]
