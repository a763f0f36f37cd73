// schema.js: the page's data, written down. rat_lens/render/_payload.py makes it (payload()) and
// inlines it as JSON; every other file reads it through the types below. Nothing here runs.
//
// The concatenation contract: SCRIPTS in rat_lens/render/_html.py concatenates these files, this
// one first, inside one function with `d3` in scope, so what a file declares at its top level is
// seen by the files after it and nothing becomes a global. Each file opens with two lines:
// "Defines:" lists its top-level names and "Uses:" the names it takes from earlier files, grouped
// by file ("util.js: fmt, layerName; diagram.js: paint."). tests/test_render.py checks both
// lists against the code, and checks a real payload against these typedefs, field by field.
// Defines: nothing (JSDoc types only).
// Uses: nothing.

/**
 * Everything one widget draws (`payload(result)`), from the element `ratlens-data-<id>`.
 * @typedef {Object} Payload
 * @property {Meta} meta  how the trace was made
 * @property {string[]} tokens  the prompt's token text, by position
 * @property {number[]} token_ids  the token ids, by position (empty when not known)
 * @property {Beam[]} beams  the traced paths, best first; a beam's index is its number minus 1
 * @property {Node[]} nodes  the diagram's nodes, sorted by (layer, position)
 * @property {Link[]} links  the diagram's links
 * @property {Strip} strip  what the token strip shows
 * @property {Prediction[]} predictions  the model's top next tokens at traced positions (empty
 *     unless traced with predictions=k)
 * @property {HeadRow[]} [head_rows]  whole attention rows of single heads at traced queries, only
 *     when the tracer recorded them; without them the head heatmap shows the beams' edges only
 * @property {Verification} [verification]  the causal check, only when the trace has one
 */

/**
 * The trace's settings (fields of the Python TraceResult).
 * @typedef {Object} Meta
 * @property {("chain"|"layers")} mode  one layer's chain, or one edge per layer
 * @property {number} layer  the target's layer (the top layer in layers mode)
 * @property {?number} layer_lo  the lowest traced layer in layers mode
 * @property {number} target_pos  the target token's position
 * @property {string} target_node_id  the id of the target's Node (`L{layer}_P{pos}`); set even
 *     when no beam left the target (then no drawn node has it); exported files are named after it
 * @property {number} seq_len  the number of tokens
 * @property {number} top_beam  beams kept
 * @property {number} top_k  keys expanded per step
 * @property {string} agg_heads  "mean" / "max" over heads, or "none": per-head edges
 * @property {string} length_norm  how a beam's score is length-normalised
 * @property {?number} move_threshold  contribution routes: a move scores log(weight / this)
 * @property {?number} depth_discount  contribution routes: the i-th move counts this^(i-1)
 * @property {string} residual  "none", or how the residual stream was mixed in
 * @property {boolean} exclude_bos  whether BOS / position 0 was left out of the search
 * @property {number} batch_index  which prompt of a batch
 */

/**
 * One path backward from the target. Edge i goes from query positions[i] to key positions[i + 1]
 * through layers[i] / heads[i]; the arrays of edges are one shorter than those of nodes.
 * @typedef {Object} Beam
 * @property {number[]} positions  node positions, the target first
 * @property {number[]} edge_attns  each edge's attention weight (6 significant digits)
 * @property {number[]} layers  each edge's layer
 * @property {Array<?number>} heads  each edge's head; null where heads were aggregated
 * @property {number[]} bos_mass  how much of each edge's attention row sat on BOS / position 0
 * @property {number} score_raw  the sum of log edge weights
 * @property {number} score_norm  score_raw, length-normalised: the rank of the beam
 * @property {string[]} kinds  each edge's kind, "head" or "residual" (a stay in the residual
 *     stream, head null) in a contribution-weighted trace (edge_weight "contribution" /
 *     "value_norm", whose edge_attns are each edge's share of what its layer wrote); empty in an
 *     attention trace
 * @property {string} text  the path as text, earliest token first
 * @property {string[]} node_ids  the Node id of each position (same order as positions)
 */

/**
 * A node of the diagram: one token at one layer.
 * @typedef {Object} Node
 * @property {string} id  made once, by rat_lens.result.node_id: `L{layer}_P{position}`
 * @property {number} position  the token's position
 * @property {number} layer  its layer; -1 is the embeddings (below layer 0, layers mode)
 */

/**
 * A link of the diagram, forward in time: from the key a token read to the query that read it.
 * Per head (agg_heads "none") there is one link per (layer, head, key, query) edge of the beams,
 * so one key -> query pair can have several links, one per head; with heads aggregated, one per
 * key -> query pair (rat_lens.result.build_sankey's links).
 * @typedef {Object} Link
 * @property {string} source  the key's Node id
 * @property {string} target  the query's Node id
 * @property {number} value  the Sankey weight: sum over its beams of softmax(score_norm over
 *     beams) x the edge's attention weight
 * @property {number[]} beams  indices of the beams using it, ascending
 * @property {number} layer  the layer it goes through
 * @property {?number} head  its head; null when heads were aggregated, or for a residual stay
 * @property {boolean} [residual]  true (and only then present) for a stay in the residual stream
 *     (a contribution-weighted trace's edge through no head)
 */

/**
 * The token strip's data.
 * @typedef {Object} Strip
 * @property {("attention"|"edges")} source  "attention": each query's strongest keys in the
 *     traced layers (a model trace); "edges": only the beams' edges (a bare tensor trace)
 * @property {StripRow[]} rows  in no particular order
 */

/**
 * One attention weight the strip shows: query attends to key.
 * @typedef {Object} StripRow
 * @property {number} query  the attending position
 * @property {number} key  the attended position
 * @property {number} weight  the attention weight (6 significant digits)
 * @property {?number} layer  the edge's layer; null when averaged over the traced layers
 * @property {?number} head  the edge's head; null when averaged or aggregated over heads
 */

/**
 * The model's top next tokens at one traced position (from its final logits), best first.
 * @typedef {Object} Prediction
 * @property {number} position  the position they are predicted at (the next token's is +1)
 * @property {string[]} tokens  the predicted tokens' text
 * @property {number[]} probs  their probabilities (6 significant digits)
 */

/**
 * One head's attention row at one query (optional data: Payload.head_rows). The keys may be the
 * whole row or its strongest keys; the page shows the keys given and nothing else.
 * @typedef {Object} HeadRow
 * @property {number} layer  the layer
 * @property {?number} head  the head; null for a row of the aggregated heads
 * @property {number} query  the attending position
 * @property {number[]} keys  attended positions
 * @property {number[]} weights  the attention weight on each of keys (6 significant digits)
 */

/**
 * What the page shows of a causal check (rat_lens.verify), rounded.
 * @typedef {Object} Verification
 * @property {string} prediction  the model's top next token, whose log p is measured
 * @property {string} ablation  how edges were ablated
 * @property {number} n_random  random paths per beam in the baseline
 * @property {BeamEffect[]} beams  by beam index
 * @property {?number} faithfulness_area  the area under the faithfulness curve
 * @property {Object<string, ?number>} spearman  Spearman correlation of blank-out importance
 *     with each of the trace's importances, by name ("beam_mass", "rollout")
 */

/**
 * One beam's causal effect.
 * @typedef {Object} BeamEffect
 * @property {number} effect  drop in log p of the prediction when the beam's edges are ablated
 * @property {?number} ratio  effect / mean |effect| of random paths; null when those are noise
 * @property {?number} p_value  share of random paths (plus one) with at least this effect
 */

/**
 * The census page's data (rat_lens/render/_census.py census_payload; drawn by census.js).
 * @typedef {Object} CensusPayload
 * @property {CensusMeta} meta  what was counted, and how
 * @property {CensusHead[]} heads  every (layer, head) on a beam of some prompt, most traced mass
 *     first (rat_lens.corpus.HeadCount)
 * @property {CensusPrompt[]} prompts  the first meta.listed prompts, in prompt order
 * @property {CensusRoles} [roles]  each head's role scores averaged over the prompts, only when
 *     the census computed them (census(..., roles=True))
 */

/**
 * @typedef {Object} CensusMeta
 * @property {number} n_prompts  prompts in the census (all counted)
 * @property {number} listed  prompts listed on the page (the first ones)
 * @property {number[]} layers  the heatmap's rows: every traced layer, the top layer first
 * @property {Array<?number>} heads  its columns: head numbers, or [null] when heads were
 *     aggregated
 * @property {Object<string, (string|number|boolean)>} options  the trace options shown
 *     (agg_heads, top_beam, top_k, length_norm, edge_weight, residual)
 * @property {string} traced_layers  the traced layers in words
 */

/**
 * One head's counts over the census.
 * @typedef {Object} CensusHead
 * @property {number} layer  the layer
 * @property {?number} head  the head; null when heads were aggregated
 * @property {number} top_beam_prompts  prompts whose best beam has an edge through it
 * @property {number} edges  beam edges through it, all beams of all prompts
 * @property {number} traced_mass  sum over prompts and beams of softmax(score_norm) x edge weight
 * @property {number} mass_share  its share of all traced mass
 */

/**
 * One prompt as the page lists it.
 * @typedef {Object} CensusPrompt
 * @property {number} index  the prompt's index in the census
 * @property {number} seq_len  its number of tokens
 * @property {number} target_pos  the traced token's position
 * @property {number} start  the position of before[0] (> 0: the tokens before it are left out)
 * @property {string[]} before  the tokens from start up to the traced one
 * @property {string} target  the traced token
 * @property {string[]} after  the tokens after it (the first few)
 * @property {string} path  the best beam as text; "" when no beam left the target
 * @property {number[]} layers  the layer of each head edge of the best beam
 * @property {Array<?number>} heads  the head of each (null when heads were aggregated)
 * @property {Verification} [verification]  the trace's causal check, only when the census ran
 *     one (census(..., verify=True))
 */

/**
 * Role scores per (layer, head): scores[name][i][head] belongs to layer layers[i].
 * @typedef {Object} CensusRoles
 * @property {number[]} layers  the layers scored
 * @property {Object<string, number[][]>} scores  by role name (TransformerLens's head detector:
 *     "previous_token_head", "duplicate_token_head", "induction_head")
 */
