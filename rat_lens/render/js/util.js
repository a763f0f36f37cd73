// util.js: helpers shared by the widget's parts (the contract of these headers: schema.js).
// Token text only ever reaches the page through textContent (d3's .text()), never as markup.
// Defines: WHITESPACE, RESIDUAL_COLOR, HEAD_COLORS, visible, shorten, fmt, sig2, prob, headColor,
//   beamColor, layerName, headName, headKey, isResidual, weighted, weightName, edgeNumbers,
//   averagedName,
//   scoreMeaning, isolate, tokenAt, nextToken, generatedFrom, predictionsAt, predictionText,
//   quoted, signed, lensAt, lensTop, lensTarget, writeOf, writeTokens, writeDla, stayOf,
//   stayWhere, stayBlocks, stayMlp, infoRow.
// Uses: nothing.

// Whitespace made visible, so that " dog", "dog" and "dog\n" look different.
const WHITESPACE = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u2192", "\r": "\u240d",
                    "\u2028": "\u2424", "\u2029": "\u00b6"};
const RESIDUAL_COLOR = "#9aa3b8";  // stays in the residual stream (contribution-weighted traces)

function visible(token) {
  if (token === "") return "\u2205";
  return Array.from(token, function (c) { return WHITESPACE[c] || c; }).join("");
}

// Cut by code points, so an emoji or a surrogate pair is never split in half.
function shorten(text, max) {
  const chars = Array.from(text);
  return chars.length <= max ? text : chars.slice(0, max - 1).join("") + "\u2026";
}

function fmt(x, digits) {
  return Number(x).toFixed(digits === undefined ? 3 : digits);
}

// A probability as a percentage: "99.9%", "0.02%", "<0.01%".
function prob(p) {
  if (p >= 0.1) return (100 * p).toFixed(1) + "%";
  if (p >= 0.0001) return (100 * p).toPrecision(2).replace(/\.?0+$/, "") + "%";
  return "<0.01%";
}

// Two significant digits, for the grids' numbers: "0.12", "0.0031", "1.2".
function sig2(x) {
  return Number(Number(x).toPrecision(2)).toString();
}

// Paul Tol's "muted" scheme ("Colour Schemes", SRON, 2021): nine categorical colours that stay
// apart for the common kinds of colour blindness. A head's colour depends on (layer, head) alone,
// so it is the same on every widget and every page; with nine colours, heads of a large model
// share them: the label (L17.H3) is the identity, the colour a hint.
const HEAD_COLORS = ["#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE", "#882255", "#44AA99",
                     "#999933", "#AA4499"];

// Step 4 is coprime with 9: the heads of one layer (up to 9) never share a colour, and the same
// head in the next layer moves on.
function headColor(layer, head) {
  return HEAD_COLORS[(((head + 4 * layer) % 9) + 9) % 9];
}

// Beams are told apart by shades of slate, which no head colour uses: the best beam darkest.
function beamColor(i, n) {
  return d3.interpolateRgb("#1f2430", "#b9bfcc")(n > 1 ? i / (n - 1) : 0);
}

// In layers mode a path ends on the residual stream below its last layer: below layer 0 that is
// the embeddings.
function layerName(layer) {
  return layer < 0 ? "emb" : "L" + layer;
}

// "L1.H0"; "L1.res" for a stay in the residual stream (a contribution-weighted trace's edge
// through no head); just "L1" when heads were aggregated (head null). The twin of Python's
// rat_lens.text.head_label: tests/test_render_browser.py checks that the two agree.
function headName(layer, head, residual) {
  return layerName(layer) +
    (residual ? ".res" : head === null || head === undefined ? "" : ".H" + head);
}

function headKey(layer, head, residual) {
  return layer + ":" + (residual ? "res" : head === null || head === undefined ? "" : head);
}

// Whether edge i of a Beam is a stay in the residual stream (its kinds name each edge's kind in
// a contribution-weighted trace; empty otherwise).
function isResidual(beam, i) {
  return beam.kinds.length > 0 && beam.kinds[i] === "residual";
}

// A contribution-weighted trace (edge_weight "contribution" / "value_norm"): its beams name each
// edge's kind, and an edge's weight is its share of what its layer wrote, not an attention weight.
function weighted(data) {
  return data.beams.some(function (b) { return b.kinds.length > 0; });
}

// What an edge's own weight (the one the search used) is called on the page.
function weightName(data) {
  return weighted(data) ? "share" : "attention";
}

// An edge's numbers as the page writes them: its weight, and in a share-weighted trace the
// head's attention beside it ("share 0.12 \u00b7 attention 0.70"); "" when it has neither.
function edgeNumbers(data, l) {
  const parts = [];
  if (l.weight !== null) parts.push(weightName(data) + " " + fmt(l.weight));
  if (weighted(data) && l.attention !== null) parts.push("attention " + fmt(l.attention));
  return parts.join(" \u00b7 ");
}

// What the strip's "attention" rows are: the captured patterns averaged over the traced layers
// (one in chain mode) and over heads (the max over heads when agg_heads was "max").
function averagedName(meta) {
  const layers = meta.mode === "layers" && meta.layer_lo !== meta.layer
    ? "L" + meta.layer_lo + "\u2013L" + meta.layer : "L" + meta.layer;
  return meta.agg_heads === "max" ? "mean of " + layers + ", max over heads"
    : "mean of " + layers + ", all heads";
}

// What score_norm is, for the legend: it depends on the trace's length norm (concepts.md).
// In a contribution-weighted trace only moves (edges through a head) count, each against the
// move threshold and discounted by its depth: stays are free.
function scoreMeaning(data) {
  const norm = data.meta.length_norm, word = weightName(data);
  const unit = weighted(data) ? "moves" : "edges", one = unit.slice(0, -1);
  const how = norm === "none" ? "= raw"
    : norm === "avg_logprob" ? "= raw / " + unit + ": the mean log " + word + " per " + one +
      " (e^score is the geometric-mean " + word + ")"
    : norm === "sqrt" ? "= raw / \u221a" + unit
    : norm.indexOf("pow:") === 0 ? "= raw / " + unit + "^" + norm.slice(4) : "(" + norm + ")";
  if (weighted(data) && data.meta.move_threshold == null) {  // saved before the threshold
    return "score (score_norm) " + how + "; raw (score_raw) = \u03a3 log(edge weight) over " +
      "the moves (edges through a head; stays in the residual stream are free). Beams rank " +
      "by score: higher is better.";
  }
  if (weighted(data)) {
    const t = data.meta.move_threshold, d = data.meta.depth_discount;
    return "score (score_norm) " + how + "; raw (score_raw) = \u03a3 over the moves (edges " +
      "through a head; stays in the residual stream are free) of " + d + "^(i\u22121) \u00b7 " +
      "log(edge weight / " + t + "), the i-th move first: a move stronger than " + t +
      " adds, a weaker one costs, deeper moves count less. Beams rank by score: higher is " +
      "better.";
  }
  return "score (score_norm) " + how + "; raw (score_raw) = \u03a3 log(edge attention). " +
    "Beams rank by score: 0 is best (every edge 1.0), lower is weaker.";
}

// Unicode isolates around token text, so a right-to-left token cannot reorder the text around
// it (its position number, the next token) in plain-text places: SVG labels, tooltips, readouts.
function isolate(text) {
  return "\u2068" + text + "\u2069";
}

// "dog"@5 as it appears everywhere: visible whitespace, position after. `data` is the Payload
// (schema.js), as in every file after this one.
function tokenAt(data, pos, max) {
  const text = visible(data.tokens[pos] === undefined ? "?" : data.tokens[pos]);
  return "\u201c" + isolate(max ? shorten(text, max) : text) + "\u201d@" + pos;
}

// The token after the target (what the model produced there when the page traces a generated
// continuation), or null at the end of the text.
function nextToken(data) {
  const next = data.meta.target_pos + 1;
  return next < data.tokens.length ? next : null;
}

// The first generated position of a --generate page (Meta.prompt_len), or null: the tokens from
// there on were produced by the model, not given.
function generatedFrom(data) {
  const n = data.meta.prompt_len;
  return n === null || n === undefined || n >= data.tokens.length ? null : n;
}

// The Prediction (schema.js) at a position, or null.
function predictionsAt(data, pos) {
  const found = data.predictions.filter(function (p) { return p.position === pos; });
  return found.length ? found[0] : null;
}

// "“blue” 99.9%, “owl” 0.02%": the model's next-token guesses at a position ("" when none).
function predictionText(data, pos, max) {
  const p = predictionsAt(data, pos);
  if (!p) return "";
  return p.tokens.slice(0, max || p.tokens.length).map(function (t, i) {
    return "\u201c" + isolate(shorten(visible(t), 16)) + "\u201d " + prob(p.probs[i]);
  }).join(", ");
}

// “blue”: a token of a list, whitespace visible, isolated, cut to `max` (default 16) characters.
function quoted(token, max) {
  return "\u201c" + isolate(shorten(visible(token), max || 16)) + "\u201d";
}

// A direct logit with its sign: "+4.06", "\u22122.43".
function signed(x) {
  return (x < 0 ? "\u2212" : "+") + fmt(Math.abs(x), 2);
}

// The LensRecord (schema.js) at node (layer, position), or null: the trace explained nothing
// there (no target or foil named) or no beam visits it.
function lensAt(data, layer, pos) {
  const found = (data.lens || []).filter(function (r) {
    return r.layer === layer && r.position === pos;
  });
  return found.length ? found[0] : null;
}

// "“blue” 99.9%, “owl” 0.02%": the lens's top tokens with their probabilities.
function lensTop(rec) {
  return rec.tokens.map(function (t, i) { return quoted(t) + " " + prob(rec.probs[i]); })
    .join(", ");
}

// "target “blue” rank 1, p 99.9%": where the token explained stands in the lens (rank 1 = top).
function lensTarget(data, rec) {
  const t = data.meta.target_token;
  return "target " + (t === null || t === undefined ? "" : quoted(t) + " ") + "rank " +
    (rec.target_rank + 1) + ", p " + prob(rec.target_prob);
}

// The HeadWrite (schema.js) of a move: head `head` of `layer` at query `query`, reading `key`;
// one of the same head and query when none names this key (they share the write); else null.
function writeOf(data, layer, head, query, key) {
  const same = (data.writes || []).filter(function (w) {
    return w.layer === layer && w.head === head && w.position === query;
  });
  const exact = same.filter(function (w) { return w.key === key; });
  return exact.length ? exact[0] : same.length ? same[0] : null;
}

// "“blue” +4.06, “owl” +1.82": a write's promoted (side "promoted") or suppressed tokens.
function writeTokens(w, side) {
  return w[side].map(function (t, i) { return quoted(t) + " " + signed(w[side + "_logits"][i]); })
    .join(", ");
}

// "DLA to “blue” +4.06; to “blue” − “cat” +6.49": the write's direct logit of the target (and,
// with a foil, of target minus foil).
function writeDla(data, w) {
  const m = data.meta, t = m.target_token === null ? "the target" : quoted(m.target_token);
  return "DLA to " + t + " " + signed(w.dla) + (w.dla_diff === null ? ""
    : "; to " + t + " \u2212 " + quoted(m.foil_token) + " " + signed(w.dla_diff));
}

// The StayWrite (schema.js) of a stay link, or of a run of them (diagram.js stayRuns: its
// `links`, bottom first): the one of exactly its span (position, layers top down to bottom), else
// the first (best beam first) whose span holds it; null when the trace explained nothing there.
function stayOf(data, link) {
  const ls = link.links || [link], top = ls[ls.length - 1].lay, bottom = ls[0].lay;
  const holding = (data.stays || []).filter(function (s) {
    return s.position === link.source.position && s.top >= top && s.bottom <= bottom;
  });
  const exact = holding.filter(function (s) { return s.top === top && s.bottom === bottom; });
  return exact.length ? exact[0] : holding.length ? holding[0] : null;
}

// "kept L2–L1 at “·x”@11": a StayWrite's span, top layer first.
function stayWhere(data, s) {
  return "kept " + layerName(s.top) + (s.bottom === s.top ? "" : "\u2013" + layerName(s.bottom)) +
    " at " + tokenAt(data, s.position, 16);
}

// "L2 mlp 43.6%, L1 attn 12.9%": the blocks that wrote most in a stay's span, with their shares.
function stayBlocks(s) {
  return s.blocks.map(function (b) {
    return layerName(b.layer) + " " + b.block + " " + prob(b.share);
  }).join(", ");
}

// "top MLP L2: DLA to “blue” +0.41; to “blue” − “cat” +0.87", or null without MLPs.
function stayMlp(data, s) {
  return s.mlp_layer === null ? null : "top MLP " + layerName(s.mlp_layer) + ": " +
    writeDla(data, {dla: s.mlp_dla, dla_diff: s.mlp_dla_diff});
}

// Build <div class="ratlens-row"><span>label</span><span>value</span></div> with text only.
function infoRow(parent, label, value, valueClass) {
  const row = parent.append("div").attr("class", "ratlens-row");
  row.append("span").text(label);
  row.append("span").attr("class", valueClass || null).text(value);
  return row;
}
