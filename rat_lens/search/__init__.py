"""The search: pure tensor code on attention patterns, no model and no TransformerLens.

- ``pattern``: the ``[batch, head, query, key]`` vocabulary, head aggregation, value checks;
- ``beam``: the beam search backward (chain and layers modes, per-head edges) and
  ``trace_attention`` for any attention tensor;
- ``stats``: per-head attention statistics, attention rollout, beam-mass token importance;
- ``store``: per-head attention in bounded memory (each row's strongest keys), filled as a
  forward runs, read by the search like the dense patterns.

The options it runs with are :class:`rat_lens.options.TraceOptions`; what it returns are
:class:`rat_lens.result.Beam` records.
"""
