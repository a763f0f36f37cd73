// panels.js: everything around the diagram: header and controls, trace facts, beam legend, info
// panel, tooltip. All text goes in with .text(); elements are found through `ui`, never by id, so
// any number of widgets can share a page.
// Defines: titleText, buildSkeleton, buildFacts, beamEffect, buildLegend, clearInfo, edgeList,
//   showNode, beamEdgesAt, showLink, showTooltip, hideTooltip.
// Uses: util.js: visible, shorten, fmt, beamColor, layerName, edgeName, tokenAt, infoRow.

function titleText(data) {
  const m = data.meta;
  const span = m.mode === "layers"
    ? "layers " + layerName(m.layer) + "\u2192" + layerName(m.layer_lo)
    : "chain in " + layerName(m.layer);
  return "Trace from " + tokenAt(data, m.target_pos, 24) + " \u00b7 " + span + " \u00b7 " +
    data.beams.length + (data.beams.length === 1 ? " beam" : " beams");
}

function buildSkeleton(root, data) {
  root.selectAll("*").remove();
  const header = root.append("div").attr("class", "ratlens-header");
  header.append("div").attr("class", "ratlens-title").text(titleText(data));
  const controls = header.append("div").attr("class", "ratlens-controls");
  const select = controls.append("select").attr("class", "ratlens-beam-filter")
    .attr("aria-label", "beams shown");
  select.append("option").attr("value", "all").text("All beams");
  data.beams.forEach(function (b, i) {
    select.append("option").attr("value", String(i))
      .text("Beam " + (i + 1) + " (score " + fmt(b.score_norm) + ")");
  });
  function button(cls, text, tip) {
    return controls.append("button").attr("type", "button").attr("class", cls)
      .attr("title", tip).text(text);
  }
  const ui = {
    root: root, select: select,
    reset: button("ratlens-reset", "Fit",
                  "fit the whole diagram in view (scroll to zoom, drag to pan)"),
    clear: button("ratlens-clear", "Clear", "clear the selection and show all beams"),
    svgButton: button("ratlens-export-svg", "SVG", "download the diagram as SVG"),
    pngButton: button("ratlens-export-png", "PNG", "download the diagram as PNG"),
  };
  const main = root.append("div").attr("class", "ratlens-main");
  ui.diagram = main.append("div").attr("class", "ratlens-diagram");
  const side = main.append("div").attr("class", "ratlens-side");
  ui.info = side.append("div").attr("class", "ratlens-box ratlens-info");
  ui.legend = side.append("div").attr("class", "ratlens-box ratlens-legend");
  ui.facts = side.append("div").attr("class", "ratlens-box ratlens-facts");
  ui.strip = root.append("div").attr("class", "ratlens-strip");
  ui.tooltip = root.append("div").attr("class", "ratlens-tooltip").style("display", "none");
  buildFacts(ui.facts, data);
  return ui;
}

function buildFacts(box, data) {
  const m = data.meta;
  box.append("h4").text("Trace");
  infoRow(box, "target", tokenAt(data, m.target_pos, 20), "ratlens-tokentext");
  infoRow(box, "mode", m.mode === "layers"
    ? "layers " + layerName(m.layer) + " \u2192 " + layerName(m.layer_lo)
    : "chain in " + layerName(m.layer));
  infoRow(box, "heads", m.agg_heads === "none" ? "per head" : m.agg_heads);
  infoRow(box, "length norm", m.length_norm);
  infoRow(box, "top_beam / top_k", m.top_beam + " / " + m.top_k);
  if (m.residual !== "none") infoRow(box, "residual", m.residual);
  if (m.exclude_bos) infoRow(box, "exclude_bos", "yes");
  infoRow(box, "tokens", m.seq_len);
  const v = data.verification;
  if (v) {
    infoRow(box, "causal check", "ablation " + v.ablation + ", " + v.n_random +
      " random paths per beam");
    infoRow(box, "prediction", visible(v.prediction), "ratlens-tokentext");
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

function buildLegend(ui, data, pick) {
  ui.legend.append("h4").text("Beams");
  if (!data.beams.length) {
    ui.legend.append("div").attr("class", "ratlens-empty").text("no beam reached a stop");
    return;
  }
  ui.legendItems = ui.legend.selectAll("div.ratlens-legend-item").data(data.beams).join("div")
    .attr("class", "ratlens-legend-item")
    .attr("title", "show this beam alone (click again: all beams)")
    .on("click", function (event, b) { pick(data.beams.indexOf(b)); });
  ui.legendItems.append("span").attr("class", "ratlens-swatch")
    .style("background", function (b, i) { return beamColor(i, data.beams.length); });
  const text = ui.legendItems.append("div");
  text.append("div").text(function (b, i) {
    return "#" + (i + 1) + "  score " + fmt(b.score_norm) + "  (raw " + fmt(b.score_raw) + ")";
  });
  if (data.verification) {
    text.append("div").attr("class", "ratlens-effect").attr("title",
      "drop in log p of the prediction when this beam's edges are ablated, against random " +
      "paths of the same shape").text(function (b, i) { return beamEffect(data, i); });
  }
  // A 2,000-hop chain's path is pages long: cut, with the whole of it on hover.
  text.append("div").attr("class", "ratlens-path")
    .attr("title", function (b) { return b.text.length > 240 ? b.text : null; })
    .text(function (b) { return shorten(b.text, 240); });
}

function clearInfo(ui) {
  ui.info.selectAll("*").remove();
  ui.info.append("h4").text("Selected");
  ui.info.append("div").attr("class", "ratlens-empty")
    .text("Click a node: its beams light up. Hover anything for details.");
}

function edgeList(box, data, title, links, other) {
  if (!links.length) return;
  box.append("div").text(title);
  box.append("ul").attr("class", "ratlens-list").selectAll("li").data(links).join("li")
    .text(function (l) {
      return tokenAt(data, other(l).position, 20) + " \u00b7 " + edgeName(l.lay, l.heads) +
        " \u00b7 " + fmt(l.value);
    });
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
  edgeList(box, data, "reads from (Sankey weight):", node.targetLinks,
           function (l) { return l.source; });
  edgeList(box, data, "read by (Sankey weight):", node.sourceLinks,
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

// A beam's edges at one node: the one it takes from there (to an earlier key) and the one that
// led to it (from a later query), with heads and attention weights; "row on BOS" is how much
// of the query's attention row sat on BOS / position 0 (the sink; left out by exclude_bos).
function beamEdgesAt(data, beam, id) {
  const i = beam.node_ids.indexOf(id), parts = [];
  if (i < beam.edge_attns.length) {
    parts.push("reads " + tokenAt(data, beam.positions[i + 1], 16) + " via " +
      edgeName(beam.layers[i], [beam.heads[i]]) + " at " + fmt(beam.edge_attns[i]) +
      " (row on BOS: " + fmt(beam.bos_mass[i], 2) + ")");
  }
  if (i > 0) {
    parts.push("read by " + tokenAt(data, beam.positions[i - 1], 16) + " via " +
      edgeName(beam.layers[i - 1], [beam.heads[i - 1]]) + " at " + fmt(beam.edge_attns[i - 1]));
  }
  return parts.length ? parts.join("; ") : "the target, no edge";
}

function showLink(ui, data, link) {
  ui.info.selectAll("*").remove();
  const box = ui.info;
  box.append("h4").text("Selected link");
  infoRow(box, "key", tokenAt(data, link.source.position, 20), "ratlens-tokentext");
  infoRow(box, "query", tokenAt(data, link.target.position, 20), "ratlens-tokentext");
  infoRow(box, "through", edgeName(link.lay, link.heads));
  infoRow(box, "Sankey weight", fmt(link.value, 4));
  box.append("ul").attr("class", "ratlens-list").selectAll("li").data(link.beams).join("li")
    .text(function (b) {
      const beam = data.beams[b], i = beam.node_ids.indexOf(link.target.id);
      return "beam #" + (b + 1) + ": attention " + fmt(beam.edge_attns[i], 4) +
        (beam.heads[i] === null ? "" : " (H" + beam.heads[i] + ")");
    });
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
