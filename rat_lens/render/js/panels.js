// panels.js: everything around the diagram: header and controls, the key (what width, direction,
// colour and score mean), trace facts, beam legend, info panel, tooltip. All text goes in with
// .text(); elements are found through `ui`, never by id, so any number of widgets can share a
// page.
// Defines: KEY_HEADS, LEGEND_MOVES, titleText, buildSkeleton, keyLines, buildKey, buildFacts,
//   beamEffect, beamMoves, buildLegend, clearInfo, revealInfo, edgeList, showNode, lensSection,
//   beamEdgesAt, beamEdgeNumbers, showHead, showLink, writeSection, staySection, showTooltip,
//   hideTooltip.
// Uses: util.js: visible, fmt, prob, headColor, beamColor, layerName, headName,
//   isResidual, weighted, weightName, edgeNumbers, scoreMeaning, isolate, tokenAt, nextToken, generatedFrom,
//   predictionsAt, predictionText, quoted, signed, lensAt, lensTarget, writeOf, writeDla,
//   stayOf, stayWhere, stayMlp, infoRow; diagram.js: sortedList.

const KEY_HEADS = 16;     // head chips in the key; the grid has them all
const LEGEND_MOVES = 12;  // moves listed per beam in the legend (a long chain's are cut)

// "prompt 2 · Trace from “red”@8 (→ “blue”@9) · layers L1→L0 · 5 beams · why “blue” and not
// “cat”". The prompt is named when the page shows several prompts (opts.prompt); the next token
// when there is one: on a page of a generated continuation it is what the model produced from
// the target; the token explained (and its foil) when the trace names them (rat_lens.lens).
function titleText(data, opts) {
  const m = data.meta, next = nextToken(data);
  const span = m.mode === "layers"
    ? "layers " + layerName(m.layer) + "\u2192" + layerName(m.layer_lo)
    : "chain in " + layerName(m.layer);
  return (opts && opts.prompt ? "Prompt " + m.batch_index + " \u00b7 " : "") +
    "Trace from " + tokenAt(data, m.target_pos, 24) +
    (next === null ? "" : " (\u2192 next " + tokenAt(data, next, 16) + ")") + " \u00b7 " +
    span + " \u00b7 " + data.beams.length + (data.beams.length === 1 ? " beam" : " beams") +
    (m.target_token === null || m.target_token === undefined ? ""
      : " \u00b7 why " + quoted(m.target_token, 24) +
        (m.foil_token === null ? "" : " and not " + quoted(m.foil_token, 24)));
}

function buildSkeleton(root, data, opts) {
  root.selectAll("*").remove();
  const perHead = data.links.some(function (l) { return l.head !== null; });
  const header = root.append("div").attr("class", "ratlens-header");
  header.append("div").attr("class", "ratlens-title").text(titleText(data, opts));
  const controls = header.append("div").attr("class", "ratlens-controls");
  const select = controls.append("select").attr("class", "ratlens-beam-filter")
    .attr("aria-label", "beams shown");
  select.append("option").attr("value", "all").text("All beams");
  data.beams.forEach(function (b, i) {
    select.append("option").attr("value", String(i))
      .text("Beam " + (i + 1) + " (score " + fmt(b.score_norm) + ")");
  });
  const ui = {root: root, select: select};
  const views = data.meta.mode === "layers" && data.nodes.length ? ["routes", "sankey"] : [];
  ui.viewButtons = controls.selectAll("button.ratlens-view").data(views).join("button")
    .attr("type", "button").attr("class", function (v) { return "ratlens-view ratlens-view-" + v; })
    .attr("title", function (v) {
      return v === "routes" ? "tokens across, layers up: each move through a head an arc"
        : "the Sankey diagram: one column per layer, bands as wide as their weight";
    })
    .text(function (v) { return v === "routes" ? "Route map" : "Sankey"; });
  if (perHead) {
    ui.colour = controls.append("select").attr("class", "ratlens-colour")
      .attr("aria-label", "colour links by");
    ui.colour.append("option").attr("value", "head").text("Colour: head");
    ui.colour.append("option").attr("value", "beam").text("Colour: best beam");
  }
  function button(cls, text, tip) {
    return controls.append("button").attr("type", "button").attr("class", cls)
      .attr("title", tip).text(text);
  }
  ui.reset = button("ratlens-reset", "Fit",
                    "fit the whole diagram in view (scroll to zoom, drag to pan)");
  ui.clear = button("ratlens-clear", "Clear", "clear the selection and show all beams");
  ui.svgButton = button("ratlens-export-svg", "SVG",
                        "download the diagram as SVG, with a title and its key");
  ui.pngButton = button("ratlens-export-png", "PNG",
                        "download the diagram as PNG, with a title and its key");
  const main = root.append("div").attr("class", "ratlens-main");
  const column = main.append("div").attr("class", "ratlens-column");
  if (views.length) ui.routes = column.append("div").attr("class", "ratlens-diagram ratlens-routes");
  ui.diagram = column.append("div").attr("class", "ratlens-diagram ratlens-sankey");
  ui.key = column.append("div").attr("class", "ratlens-key");
  ui.heatmap = column.append("div").attr("class", "ratlens-box ratlens-heatmap");
  // The side column stays in view while the page scrolls (sticky), the selection on top of it:
  // what a click selects shows beside the diagram.
  const side = main.append("div").attr("class", "ratlens-side");
  ui.info = side.append("div").attr("class", "ratlens-box ratlens-info").attr("aria-live", "polite");
  ui.legend = side.append("div").attr("class", "ratlens-box ratlens-legend");
  ui.grid = side.append("div").attr("class", "ratlens-box ratlens-heads");
  ui.facts = side.append("div").attr("class", "ratlens-box ratlens-facts");
  ui.strip = root.append("div").attr("class", "ratlens-strip");
  ui.tooltip = root.append("div").attr("class", "ratlens-tooltip").style("display", "none");
  buildFacts(ui.facts, data, opts);
  return ui;
}

// The key's sentences, also written under exported diagrams. colour: "head" or "beam"; routes:
// whether the route map is shown (else the Sankey diagram).
function keyLines(data, colour, routes) {
  const layers = data.meta.mode === "layers";
  const colourLine = colour === "head" ? "Colour: the link's head (labelled L<layer>.H<head>; " +
    "one colour per head on every page, from a colour-blind-safe set of nine, so the label is " +
    "what names it)" + (weighted(data) ? "; grey: a stay in the residual stream." : ".")
    : "Colour: the best beam using the link (see Beams).";
  if (routes) {
    return [
      "Route map: tokens across (only the positions a beam visits; \u22efN: N tokens skipped), " +
        "layers up (emb = the embeddings). A move through a head is an arc from the query, at " +
        "its layer, down to the key it read (the residual stream below), labelled with the " +
        "head; the best beam's moves are drawn solid and always labelled. A stay in the " +
        "residual stream is a thin vertical line.",
      "Width: the Sankey weight, \u03a3 over the beams using a move of softmax(score over " +
        "beams) \u00d7 the edge's " + (weighted(data) ? "weight (its share of what its layer " +
        "wrote)" : "attention weight") + ".",
      colourLine,
      "Score: " + scoreMeaning(data),
    ];
  }
  return [
    "Width: the Sankey weight, \u03a3 over the beams using a link of softmax(score over " +
      "beams) \u00d7 the edge's " + (weighted(data) ? "weight (its share of what its layer " +
      "wrote: a contribution-weighted trace)" : "attention weight") + ": how much of the traced " +
      "paths runs through it.",
    "Direction: left to right is key \u2192 query, forward in time: the query read the key. " +
      "The trace walks it backward from the target (outlined, right)." + (layers
      ? " Columns are layers: a link through layer l runs from column l\u22121 (the residual " +
        "stream below it; emb = the embeddings) to column l." : ""),
    colourLine + (layers && weighted(data) ? " A run of stays is one band (its width the " +
      "run's weakest stay)." : ""),
    "Score: " + scoreMeaning(data),
  ];
}

// The key under the diagram; in per-head mode with a chip per head (click: pick the head).
function buildKey(ui, data, heads, pickHead) {
  ui.key.selectAll("*").remove();
  const lines = ui.key.append("div").attr("class", "ratlens-key-lines");
  ui.keyColour = function (colour, routes) {
    lines.selectAll("*").remove();
    lines.selectAll("div").data(keyLines(data, colour, routes)).join("div").text(function (t) {
      return t;
    });
    chips.style("display", colour === "head" ? null : "none");
  };
  const chips = ui.key.append("div").attr("class", "ratlens-chips");
  const named = heads.filter(function (h) { return h.head !== null || h.residual; });
  chips.selectAll("button").data(named.slice(0, KEY_HEADS)).join("button")
    .attr("type", "button").attr("class", "ratlens-chip")
    .attr("data-layer", function (h) { return h.layer; })
    .attr("data-head", function (h) { return h.head; })
    .attr("title", function (h) {
      return h.name + ": traced mass " + fmt(h.mass) + " (click: its links)";
    })
    .on("click", function (event, h) { pickHead(h.key); })
    .call(function (b) {
      b.append("span").attr("class", "ratlens-swatch")
        .style("background", function (h) { return h.color; });
      b.append("span").text(function (h) { return h.name + " " + fmt(h.mass, 2); });
    });
  if (named.length > KEY_HEADS) {
    chips.append("span").attr("class", "ratlens-note")
      .text("+ " + (named.length - KEY_HEADS) + " more heads (see the grid)");
  }
  ui.keyColour(named.length ? "head" : "beam", Boolean(ui.routes));
}

function buildFacts(box, data, opts) {
  const m = data.meta, next = nextToken(data);
  box.append("h4").text("Trace");
  if (opts && opts.prompt) infoRow(box, "prompt", m.batch_index);
  infoRow(box, "target", tokenAt(data, m.target_pos, 20), "ratlens-tokentext");
  if (next !== null) {
    infoRow(box, "next token", tokenAt(data, next, 20), "ratlens-tokentext")
      .attr("title", "the token after the target: on a page of a generated continuation " +
        "(--generate), what the model produced from the target");
  }
  const guesses = predictionsAt(data, m.target_pos);
  if (guesses) {
    box.append("div").text("the model's next token here:");
    box.append("ul").attr("class", "ratlens-list ratlens-predictions").selectAll("li")
      .data(guesses.tokens).join("li").call(function (li) {
        li.append("span").attr("class", "ratlens-tokentext")
          .text(function (t) { return "\u201c" + isolate(visible(t)) + "\u201d"; });
        li.append("span").text(function (t, i) { return " " + prob(guesses.probs[i]); });
      });
  }
  infoRow(box, "mode", m.mode === "layers"
    ? "layers " + layerName(m.layer) + " \u2192 " + layerName(m.layer_lo)
    : "chain in " + layerName(m.layer));
  infoRow(box, "heads", m.agg_heads === "none" ? "per head" : m.agg_heads);
  infoRow(box, "length norm", m.length_norm);
  infoRow(box, "top_beam / top_k", m.top_beam + " / " + m.top_k);
  if (m.residual !== "none") infoRow(box, "residual", m.residual);
  if (m.exclude_bos) infoRow(box, "exclude_bos", "yes");
  infoRow(box, "tokens", m.seq_len);
  const generated = generatedFrom(data);
  if (generated !== null) {
    infoRow(box, "prompt / generated", generated + " / " + (data.tokens.length - generated))
      .attr("title", "positions " + generated + " on were generated by the model (--generate)");
  }
  const v = data.verification;
  if (v) {
    infoRow(box, "causal check", "ablation " + v.ablation + ", " + v.n_random +
      " random paths per beam");
    infoRow(box, "prediction", visible(v.prediction), "ratlens-tokentext");
    infoRow(box, "measured", v.metric_name, "ratlens-tokentext ratlens-metric");
    if (v.logit_diff !== null) infoRow(box, "clean value", fmt(v.logit_diff));
    if (v.faithfulness_area !== null) infoRow(box, "faithfulness area", fmt(v.faithfulness_area));
    Object.keys(v.spearman).forEach(function (k) {
      if (v.spearman[k] !== null) infoRow(box, "Spearman (" + k + ")", fmt(v.spearman[k]));
    });
  }
}

// "effect 0.405, 113.2× random, p 0.05": a beam's causal effect, when the trace was verified.
function beamEffect(data, i) {
  const e = data.verification && data.verification.beams[i];
  if (!e) return "";
  const parts = ["effect " + fmt(e.effect)];
  if (e.ratio !== null) parts.push(fmt(e.ratio, 1) + "\u00d7 random");
  if (e.p_value !== null) parts.push("p " + fmt(e.p_value, 2));
  return parts.join(", ");
}

// A beam's moves (edges through a head; every edge of a chain), target first: {name, layer,
// head, query, key, weight, attention}. Stays in the residual stream are left out: they change nothing.
function beamMoves(beam) {
  const moves = [];
  beam.layers.forEach(function (layer, i) {
    if (isResidual(beam, i)) return;
    moves.push({name: headName(layer, beam.heads[i]), layer: layer, head: beam.heads[i],
                query: beam.positions[i], key: beam.positions[i + 1], weight: beam.edge_weights[i],
                attention: i < beam.edge_attns.length ? beam.edge_attns[i] : null});
  });
  return moves;
}

function buildLegend(ui, data, pick) {
  ui.legend.append("h4").text("Beams");
  if (!data.beams.length) {
    ui.legend.append("div").attr("class", "ratlens-empty").text("no beam reached a stop");
    return;
  }
  ui.legendItems = ui.legend.selectAll("div.ratlens-legend-item").data(data.beams).join("div")
    .attr("class", "ratlens-legend-item")
    .attr("title", "show this beam alone (click again: all beams). " +
      scoreMeaning(data))
    .on("click", function (event, b) { pick(data.beams.indexOf(b)); });
  ui.legendItems.append("span").attr("class", "ratlens-swatch")
    .style("background", function (b, i) { return beamColor(i, data.beams.length); });
  const text = ui.legendItems.append("div");
  text.append("div").text(function (b, i) {
    return "#" + (i + 1) + "  score " + fmt(b.score_norm) + "  (raw " + fmt(b.score_raw) + ")";
  });
  if (data.verification) {
    text.append("div").attr("class", "ratlens-effect").attr("title",
      "drop in " + data.verification.metric_name + " when this beam's edges are ablated, " +
      "against random " +
      "paths of the same shape").text(function (b, i) { return beamEffect(data, i); });
  }
  // Its moves from the target back, each head in its colour; a long chain's are cut, with the
  // whole path on hover.
  const moves = text.append("ol").attr("class", "ratlens-moves").attr("title", function (b) {
    return b.text;
  }).selectAll("li").data(function (b) {
    const all = beamMoves(b), shown = all.slice(0, LEGEND_MOVES);
    return all.length > shown.length ? shown.concat([{more: all.length - shown.length}]) : shown;
  }).join("li").attr("class", "ratlens-move-item");
  moves.filter(function (m) { return m.more; })
    .text(function (m) { return "\u2026 " + m.more + " more"; });
  const named = moves.filter(function (m) { return !m.more; });
  named.append("span").attr("class", "ratlens-swatch").style("background", function (m) {
    return m.head === null ? null : headColor(m.layer, m.head);
  });
  named.append("b").text(function (m) { return m.name; });
  named.append("span").attr("class", "ratlens-tokentext").text(function (m) {
    return " " + tokenAt(data, m.query, 12) + " reads " + tokenAt(data, m.key, 12) + " " +
      fmt(m.weight, 2);
  });
  text.filter(function (b) { return !beamMoves(b).length; }).append("div")
    .attr("class", "ratlens-path").text("no move: the route stays at the target");
}

// After a click, the selection panel comes into view if it is not (it normally is: it sits on
// top of the side column, which sticks to the window's top).
function revealInfo(ui) {
  const node = ui.info.node();
  node.parentNode.scrollTop = 0;
  const box = node.getBoundingClientRect();
  if (box.top < 0 || box.top > window.innerHeight - 40) {
    node.scrollIntoView({block: "nearest"});
  }
}

function clearInfo(ui) {
  ui.info.selectAll("*").remove();
  ui.info.append("h4").text("Selected");
  ui.info.append("div").attr("class", "ratlens-empty")
    .text("Click (or Tab to and press Enter on) a node: its beams light up; a link: its head. " +
      "Hover anything for details.");
}

// Links grouped by the token at their other end, heads sorted by Sankey weight.
function edgeList(box, data, title, links, other) {
  if (!links.length) return;
  box.append("div").text(title);
  box.append("ul").attr("class", "ratlens-list").selectAll("li")
    .data(sortedList(data, links, other)).join("li")
    .text(function (line) { return line.trim(); });
}

// What the clicked node is, which links touch it, and each beam through it with its edges here.
function showNode(ui, data, node, through) {
  ui.info.selectAll("*").remove();
  const box = ui.info;
  box.append("h4").text("Selected node");
  box.append("div").attr("class", "ratlens-tokentext ratlens-info-token")
    .text(visible(data.tokens[node.position]));
  infoRow(box, "position", node.position);
  infoRow(box, "layer", data.meta.mode === "layers" && node.lay < 0
    ? "embeddings (below L0)" : layerName(node.lay));
  if (data.token_ids.length) infoRow(box, "token id", data.token_ids[node.position]);
  infoRow(box, "traced mass", fmt(node.value));
  const guesses = predictionText(data, node.position);
  if (guesses) {
    infoRow(box, "model's next token", guesses, "ratlens-tokentext ratlens-predictions");
  }
  lensSection(box, data, node);
  edgeList(box, data, "reads from (Sankey weight, by head):", node.targetLinks,
           function (l) { return l.source; });
  edgeList(box, data, "read by (Sankey weight, by head):", node.sourceLinks,
           function (l) { return l.target; });
  box.append("div").text("beams through it:");
  const items = box.append("ul").attr("class", "ratlens-list").selectAll("li")
    .data(Array.from(through).sort(d3.ascending)).join("li");
  items.append("div").text(function (b) {
    const beam = data.beams[b];
    const effect = beamEffect(data, b);
    return "#" + (b + 1) + " score " + fmt(beam.score_norm) + " (raw " + fmt(beam.score_raw) + ")" +
      (effect ? "; " + effect : "");
  });
  items.append("div").attr("class", "ratlens-path").text(function (b) {
    return beamEdgesAt(data, data.beams[b], node.id);
  });
}

// The logit lens at the node: where the token explained stands there, then its top tokens.
function lensSection(box, data, node) {
  const rec = lensAt(data, node.lay, node.position);
  if (!rec) return;
  const section = box.append("div").attr("class", "ratlens-lens")
    .attr("title", "the residual stream here through the model's final norm and unembedding");
  section.append("div").text("logit lens " + (node.lay < 0 ? "at the embeddings"
    : "after " + layerName(node.lay)) + ":");
  section.append("div").attr("class", "ratlens-lens-target ratlens-tokentext")
    .text(lensTarget(data, rec));
  section.append("ul").attr("class", "ratlens-list ratlens-tokens ratlens-tokentext")
    .selectAll("li").data(rec.tokens).join("li")
    .text(function (t, i) { return quoted(t) + " " + prob(rec.probs[i]); });
}

// A beam's edges at one node: the one it takes from there (to an earlier key) and the one that
// led to it (from a later query), with heads and edge numbers; "row on BOS" is how much
// of the query's attention row sat on BOS / position 0 (the sink; left out by exclude_bos).
function beamEdgesAt(data, beam, id) {
  const i = beam.node_ids.indexOf(id), parts = [];
  if (i < beam.edge_weights.length) {
    parts.push("reads " + tokenAt(data, beam.positions[i + 1], 16) + " via " +
      headName(beam.layers[i], beam.heads[i], isResidual(beam, i)) + ", " +
      beamEdgeNumbers(data, beam, i) + " (row on BOS: " + fmt(beam.bos_mass[i], 2) + ")");
  }
  if (i > 0) {
    parts.push("read by " + tokenAt(data, beam.positions[i - 1], 16) + " via " +
      headName(beam.layers[i - 1], beam.heads[i - 1], isResidual(beam, i - 1)) + ", " +
      beamEdgeNumbers(data, beam, i - 1));
  }
  return parts.length ? parts.join("; ") : "the target, no edge";
}

function beamEdgeNumbers(data, beam, i) {
  return edgeNumbers(data, {weight: beam.edge_weights[i],
                            attention: i < beam.edge_attns.length ? beam.edge_attns[i] : null});
}

// A head picked in the grid or the key: its traced mass and its links, heaviest first.
function showHead(ui, data, head) {
  ui.info.selectAll("*").remove();
  const box = ui.info;
  box.append("h4").text("Selected head");
  infoRow(box, "head", head.name + (head.residual ? " (stays in the residual stream)" : ""));
  infoRow(box, "traced mass", fmt(head.mass, 4));
  box.append("div").text("its links (key \u2192 query, Sankey weight, " + weightName(data) +
    (weighted(data) ? ", attention" : "") + "):");
  box.append("ul").attr("class", "ratlens-list").selectAll("li")
    .data(head.links.slice().sort(function (a, b) { return b.value - a.value; })).join("li")
    .text(function (l) {
      return tokenAt(data, l.source.position, 16) + " \u2192 " +
        tokenAt(data, l.target.position, 16) + " " + fmt(l.value) +
        (edgeNumbers(data, l) ? " (" + edgeNumbers(data, l) + ")" : "");
    });
}

function showLink(ui, data, link) {
  ui.info.selectAll("*").remove();
  const box = ui.info;
  box.append("h4").text("Selected link");
  infoRow(box, "key", tokenAt(data, link.source.position, 20), "ratlens-tokentext");
  infoRow(box, "query", tokenAt(data, link.target.position, 20), "ratlens-tokentext");
  infoRow(box, "through", link.name + (!link.residual ? "" : link.links
    ? " (" + link.links.length + " stays in the residual stream)"
    : " (a stay in the residual stream)"));
  if (link.weight !== null) infoRow(box, weightName(data), fmt(link.weight, 4));
  if (weighted(data) && link.attention !== null) infoRow(box, "attention", fmt(link.attention, 4));
  infoRow(box, "Sankey weight", fmt(link.value, 4));
  infoRow(box, "beams", link.beams.map(function (b) { return "#" + (b + 1); }).join(", "));
  if (link.residual) staySection(box, data, link);
  else writeSection(box, data, link);
  const siblings = link.source.sourceLinks.filter(function (o) {
    return o.target === link.target;
  }).sort(function (a, b) { return b.value - a.value; });
  if (siblings.length > 1) {
    box.append("div").text("this key \u2192 query, every head (Sankey weight):");
    box.append("ul").attr("class", "ratlens-list").selectAll("li").data(siblings).join("li")
      .classed("is-this", function (o) { return o === link; })
      .text(function (o) {
        return o.name + " " + fmt(o.value) +
          (edgeNumbers(data, o) ? " (" + edgeNumbers(data, o) + ")" : "");
      });
  }
}

// What the move's head wrote at its query: its direct logit of the target (and of target minus
// foil), then the tokens it promotes and suppresses most (direct logits), side by side.
function writeSection(box, data, link) {
  const w = writeOf(data, link.lay, link.head, link.target.position, link.source.position);
  if (!w) return;
  const section = box.append("div").attr("class", "ratlens-write");
  section.append("div").text(link.name + " wrote at " + tokenAt(data, w.position, 16) +
    " (direct logits):");
  section.append("div").attr("class", "ratlens-dla").text(writeDla(data, w));
  const sides = section.append("div").attr("class", "ratlens-write-sides");
  [["promoted", "promotes"], ["suppressed", "suppresses"]].forEach(function (side) {
    const column = sides.append("div");
    column.append("div").text(side[1] + ":");
    column.append("ul").attr("class", "ratlens-list ratlens-tokentext ratlens-" + side[0])
      .selectAll("li").data(w[side[0]]).join("li").text(function (t, i) {
        return quoted(t, 12) + " " + signed(w[side[0] + "_logits"][i]);
      });
  });
}

// What was written where the stay (or the run of stays) kept its position: the span's blocks
// that wrote most, by share of the span's block output norms, then its MLP with the largest
// direct logit of the target (of target minus foil with a foil).
function staySection(box, data, link) {
  const s = stayOf(data, link);
  if (!s) return;
  const section = box.append("div").attr("class", "ratlens-staywrite")
    .attr("title", "a block's share: its output norm over the sum of the span's block norms");
  section.append("div").text(stayWhere(data, s) + "; the blocks that wrote most there:");
  section.append("ul").attr("class", "ratlens-list ratlens-stay-blocks").selectAll("li")
    .data(s.blocks).join("li")
    .text(function (b) { return layerName(b.layer) + " " + b.block + " " + prob(b.share); });
  const mlp = stayMlp(data, s);
  if (mlp) section.append("div").attr("class", "ratlens-stay-mlp").text(mlp);
}

function showTooltip(ui, event, text) {
  const root = ui.root.node(), at = d3.pointer(event, root);
  const x = Math.min(at[0] + 14, root.clientWidth - 370);
  ui.tooltip.style("display", "block").text(text)
    .style("left", Math.max(4, x) + "px").style("top", (at[1] + 14) + "px");
}

function hideTooltip(ui) {
  ui.tooltip.style("display", "none");
}
