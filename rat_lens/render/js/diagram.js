// diagram.js: the graph every view draws (layout), and the Sankey diagram: drawing (links
// labelled with their head, a run of stays as one band, the target's predictions), zoom,
// keyboard focus, the off-screen note, and the highlight/filter state painted as classes (for
// the route map of routemap.js too).
// Defines: NODE_W, COL_W, LABEL_W, PAD, TOP, MIN_NODE, READABLE, LIST_SHOWN, assignColumns,
//   edgeWeights, layout, headTable, sortedList, nodeTip, linkTip, stayTip, runTip, placeLabels,
//   stayRuns, drawDiagram, beamsThrough, paint.
// Uses: util.js: RESIDUAL_COLOR, fmt, headColor, beamColor, layerName, headName, headKey,
//   isResidual, edgeNumbers, isolate, shorten, visible, tokenAt, predictionsAt, predictionText,
//   prob, lensAt, lensTop, lensTarget, writeOf, writeTokens, writeDla, stayOf, stayWhere,
//   stayBlocks, stayMlp.

const NODE_W = 12;      // node bar width
const COL_W = 150;      // distance between columns: room for a label
const LABEL_W = 150;    // room right of the last column
const PAD = 18;         // vertical gap between nodes of a column
const TOP = 24;         // room for the column headings
const MIN_NODE = 4;     // a node carrying a near-zero weight must still be clickable
const READABLE = 0.85;  // smallest first-view zoom at which the 12px labels stay readable
const LIST_SHOWN = 8;   // entries of a per-head list in a tooltip

// Columns. Layers mode: one per layer, lowest on the left, so the target's layer is on the right.
// Chain mode: positions left to right, a new column starting whenever a node reads from one
// already in the current column; every link then points right, earlier tokens further left.
function assignColumns(nodes, mode) {
  if (mode === "layers") {
    const lowest = d3.min(nodes, function (n) { return n.lay; });
    nodes.forEach(function (n) { n.column = n.lay - lowest; });
    return;
  }
  let column = 0, members = new Set();
  nodes.slice().sort(function (a, b) { return a.position - b.position; }).forEach(function (n) {
    if (n.targetLinks.some(function (l) { return members.has(l.source); })) {
      column += 1;
      members = new Set();
    }
    n.column = column;
    members.add(n);
  });
}

// Each link's own numbers, read off its first beam (the same in every beam using it): `weight`,
// what the search used (attention, or in a share-weighted trace the edge's share), and
// `attention`, the head's attention weight (null for a stay, or where none was recorded). The
// Sankey weight is neither, and the tooltips show them all.
function edgeWeights(data, links) {
  const index = data.beams.map(function (b) {
    return new Map(b.node_ids.map(function (id, i) { return [id, i]; }));
  });
  links.forEach(function (l) {
    l.weight = null;
    l.attention = null;
    l.beams.forEach(function (b) {
      const beam = data.beams[b], i = index[b] ? index[b].get(l.target) : undefined;
      if (l.weight === null && i !== undefined && i < beam.edge_weights.length &&
          beam.node_ids[i + 1] === l.source && beam.layers[i] === l.lay &&
          isResidual(beam, i) === l.residual && (l.head === null || beam.heads[i] === l.head)) {
        l.weight = beam.edge_weights[i];
        l.attention = i < beam.edge_attns.length ? beam.edge_attns[i] : null;
      }
    });
  });
}

// d3-sankey links the graph (sourceLinks / targetLinks, node value = max of in- and out-flow)
// and routes the link ends; the columns and heights are ours, since its own columns follow
// graph depth, which neither keeps positions in order nor puts a path ending early (at BOS) in
// its layer. Within a column, nodes go top to bottom by position; a node's links by the other
// end's position, then by head, so the bands of one key -> query pair read H0, H1, ...
function layout(data) {
  const graph = {
    nodes: data.nodes.map(function (n) { return {id: n.id, position: n.position, lay: n.layer}; }),
    links: data.links.map(function (l, i) {
      const residual = l.residual === true;
      return {index: i, source: l.source, target: l.target, value: l.value, beams: l.beams,
              lay: l.layer, head: l.head, residual: residual,
              key: headKey(l.layer, l.head, residual),
              name: headName(l.layer, l.head, residual)};
    }),
  };
  edgeWeights(data, graph.links);
  const sankey = d3.sankey().nodeId(function (d) { return d.id; })
    .nodeWidth(NODE_W).nodePadding(PAD);
  if (!graph.nodes.length) return {graph: graph, width: COL_W, height: 120};
  sankey(graph);  // note: it writes its own `layer` field on nodes, hence ours is `lay`
  assignColumns(graph.nodes, data.meta.mode);
  const columns = d3.groups(graph.nodes, function (n) { return n.column; })
    .sort(function (a, b) { return a[0] - b[0]; })
    .map(function (entry) {
      return entry[1].sort(function (a, b) { return a.position - b.position; });
    });
  const tallest = d3.max(columns, function (c) { return c.length; });
  const inner = Math.max(320, tallest * 44);
  // One scale for all columns, chosen so that the fullest column fits (minimum heights included).
  let ky = d3.min(columns, function (c) {
    const total = d3.sum(c, function (n) { return n.value; });
    return total > 0 ? (inner - (c.length - 1) * PAD - c.length * MIN_NODE) / total : Infinity;
  });
  if (!isFinite(ky)) ky = 0;
  columns.forEach(function (c) {
    let y = TOP;
    c.forEach(function (n) {
      n.x0 = n.column * COL_W;
      n.x1 = n.x0 + NODE_W;
      n.y0 = y;
      n.y1 = y + Math.max(MIN_NODE, n.value * ky);
      y = n.y1 + PAD;
    });
    const spare = (TOP + inner - (y - PAD)) / (c.length + 1);  // spread the column out evenly
    c.forEach(function (n, i) { n.y0 += spare * (i + 1); n.y1 += spare * (i + 1); });
  });
  graph.links.forEach(function (l) { l.width = l.value * ky; });
  function byHead(a, b) { return a.lay - b.lay || (a.head === null ? 0 : a.head - b.head); }
  graph.nodes.forEach(function (n) {
    n.sourceLinks.sort(function (a, b) { return a.target.y0 - b.target.y0 || byHead(a, b); });
    n.targetLinks.sort(function (a, b) { return a.source.y0 - b.source.y0 || byHead(a, b); });
  });
  sankey.update(graph);  // link ends stacked on the nodes as placed above
  return {graph: graph, width: (columns.length - 1) * COL_W + NODE_W + LABEL_W,
          height: TOP + inner + 8};
}

// Traced mass per (layer, head): the sum of the Sankey weights of its links; heads first,
// heaviest first, then the stays in the residual stream. Each with its colour (headColor: the
// same on every widget; stays are grey).
function headTable(links) {
  return d3.rollups(links, function (ls) {
    return {key: ls[0].key, layer: ls[0].lay, head: ls[0].head, residual: ls[0].residual,
            name: ls[0].name, mass: d3.sum(ls, function (l) { return l.value; }), links: ls,
            color: ls[0].residual ? RESIDUAL_COLOR : headColor(ls[0].lay, ls[0].head || 0)};
  }, function (l) { return l.key; }).map(function (e) { return e[1]; })
    .sort(function (a, b) {
      return a.residual - b.residual || b.mass - a.mass || a.layer - b.layer || a.head - b.head;
    });
}

// "“blue”@4 via L1.H0 0.199, L1.H1 0.198, …": links grouped by their other end, each group's
// heads sorted by Sankey weight (heaviest first), the groups too.
function sortedList(data, links, other) {
  const groups = d3.groups(links, function (l) { return other(l).id; }).map(function (e) {
    return e[1].slice().sort(function (a, b) { return b.value - a.value; });
  }).sort(function (a, b) { return d3.sum(b, function (l) { return l.value; }) -
                                   d3.sum(a, function (l) { return l.value; }); });
  const lines = groups.slice(0, LIST_SHOWN).map(function (ls) {
    return "  " + tokenAt(data, other(ls[0]).position, 16) + " via " + ls.map(function (l) {
      return l.name + " " + fmt(l.value);
    }).join(", ");
  });
  if (groups.length > LIST_SHOWN) lines.push("  \u2026 " + (groups.length - LIST_SHOWN) + " more");
  return lines;
}

function nodeTip(data, n) {
  const where = data.meta.mode === "layers" ? " \u00b7 " + layerName(n.lay) : "";
  const lines = [tokenAt(data, n.position) + where +
    (n.id === data.meta.target_node_id ? " (the target)" : ""),
    "traced mass " + fmt(n.value)];
  if (n.targetLinks.length) {
    lines.push("reads (Sankey weight, by head):");
    lines.push.apply(lines, sortedList(data, n.targetLinks, function (l) { return l.source; }));
  }
  if (n.sourceLinks.length) {
    lines.push("read by:");
    lines.push.apply(lines, sortedList(data, n.sourceLinks, function (l) { return l.target; }));
  }
  const guesses = predictionText(data, n.position);
  if (guesses) lines.push("model's next token here: " + guesses);
  const lens = lensAt(data, n.lay, n.position);
  if (lens) lines.push("logit lens here: " + lensTop(lens), lensTarget(data, lens));
  return lines.join("\n");
}

function linkTip(data, l) {
  const numbers = edgeNumbers(data, l);
  const lines = [tokenAt(data, l.source.position) + " \u2192 " + tokenAt(data, l.target.position),
    l.name + (l.residual ? " (a stay in the residual stream)" : "") +
      (numbers ? " \u00b7 " + numbers : "") +
      " \u00b7 Sankey weight " + fmt(l.value),
    "beams " + l.beams.map(function (b) { return "#" + (b + 1); }).join(", ")];
  const w = l.residual ? null : writeOf(data, l.lay, l.head, l.target.position, l.source.position);
  if (w) {
    lines.push("wrote (direct logits): promotes " + writeTokens(w, "promoted"),
               "  suppresses " + writeTokens(w, "suppressed"), "  " + writeDla(data, w));
  }
  if (l.residual) lines.push.apply(lines, stayTip(data, l));
  const siblings = l.source.sourceLinks.filter(function (o) { return o.target === l.target; })
    .sort(function (a, b) { return b.value - a.value; });
  if (siblings.length > 1) {
    lines.push("this key \u2192 query, every head (Sankey weight):");
    siblings.slice(0, LIST_SHOWN).forEach(function (o) {
      lines.push("  " + o.name + " " + fmt(o.value) +
        (edgeNumbers(data, o) ? " (" + edgeNumbers(data, o) + ")" : "") +
        (o === l ? "  \u25c0 this" : ""));
    });
    if (siblings.length > LIST_SHOWN) {
      lines.push("  \u2026 " + (siblings.length - LIST_SHOWN) + " more");
    }
  }
  return lines.join("\n");
}

// What was written where a stay (or a run of them) kept its position: the StayWrite's span,
// its strongest blocks and its top MLP; nothing when the trace explained no stays.
function stayTip(data, l) {
  const s = stayOf(data, l);
  if (!s) return [];
  const mlp = stayMlp(data, s);
  return [stayWhere(data, s) + "; wrote most: " + stayBlocks(s)].concat(mlp ? ["  " + mlp] : []);
}

// A run of stays drawn as one band (stayRuns): its span, its weakest stay, its beams, what it kept.
function runTip(data, r) {
  return [tokenAt(data, r.source.position) + ": " + r.name + " (stays in the residual stream, " +
    r.links.length + " layers; the band is its weakest stay, Sankey weight " + fmt(r.value) + ")",
    "beams " + r.beams.map(function (b) { return "#" + (b + 1); }).join(", ")]
    .concat(stayTip(data, r)).join("\n");
}

// Head labels at the middle of their links, by `rank` (default: the widest links first); a label
// that would overlap one already placed is left out (class is-crowded; the link's tooltip still
// names the head), unless `keep` says it must show.
function placeLabels(labels, rank, keep) {
  const placed = [], by = rank || function (l) { return l.width; };
  labels.data().slice().sort(function (a, b) { return by(b) - by(a); }).forEach(function (l) {
    const w = 6.2 * l.name.length + 4, box = {
      x0: l.labelX - w / 2, x1: l.labelX + w / 2, y0: l.labelY - 6, y1: l.labelY + 6};
    l.crowded = !(keep && keep(l)) && placed.some(function (p) {
      return box.x0 < p.x1 && p.x0 < box.x1 && box.y0 < p.y1 && p.y0 < box.y1;
    });
    if (!l.crowded) placed.push(box);
  });
  labels.classed("is-crowded", function (l) { return l.crowded; });
}

// Runs of stays in the residual stream (layers mode), each to be drawn as one band: a node that
// only one stay enters and only one stay leaves is a step of a run, not a place where a route
// does anything. Each run: {links (bottom first), source, target, beams, ..., index: its top
// stay's}; the beams of a run are those of each of its stays, since nothing joins or leaves.
function stayRuns(graph, targetId) {
  function through(n) {
    return n.id !== targetId && n.targetLinks.length === 1 && n.sourceLinks.length === 1 &&
      n.targetLinks[0].residual && n.sourceLinks[0].residual;
  }
  const runs = [];
  graph.links.forEach(function (l) {
    if (!l.residual || through(l.source)) return;
    const links = [l];
    while (through(links[links.length - 1].target)) {
      links.push(links[links.length - 1].target.sourceLinks[0]);
    }
    if (links.length < 2) return;
    const last = links[links.length - 1];
    runs.push({links: links, source: l.source, target: last.target, beams: last.beams,
               key: last.key, lay: last.lay, head: null, residual: true, index: last.index,
               weight: null, attention: null,
               value: d3.min(links, function (s) { return s.value; }),
               width: d3.min(links, function (s) { return s.width; }), y0: l.y0, y1: last.y1,
               name: "stays " + layerName(l.lay) + "\u2013" + layerName(last.lay)});
  });
  return runs;
}

// box: the element to draw in; lay: layout(data), shared with the route map.
function drawDiagram(box, data, lay, on) {
  const svg = box.append("svg")
    .attr("height", Math.max(360, Math.min(560, lay.height)))
    .attr("role", "group").attr("aria-label", "attention trace diagram: Tab reaches its " +
      "links and nodes, Enter selects, Escape clears");
  const viewport = svg.append("g").attr("class", "ratlens-viewport");
  svg.on("click", on.background);

  const heads = data.meta.mode === "layers"
    ? d3.groups(lay.graph.nodes, function (n) { return n.column; }).map(function (e) {
        return {x: e[1][0].x0, text: layerName(e[1][0].lay)};
      })
    : [{x: 0, text: "chain in " + layerName(data.meta.layer) + ", positions \u2192"}];
  viewport.append("g").selectAll("text").data(heads).join("text")
    .attr("class", "ratlens-colhead").attr("x", function (d) { return d.x; }).attr("y", 12)
    .text(function (d) { return d.text; });

  function keys(pick) {
    return function (event, d) {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        event.stopPropagation();
        pick(d);
      } else if (event.key === "Escape") {
        on.background();
      }
    };
  }
  const links = viewport.append("g").selectAll("path").data(lay.graph.links).join("path")
    .attr("class", "ratlens-link")
    .attr("d", d3.sankeyLinkHorizontal())
    .attr("stroke-width", function (l) { return Math.max(1.5, l.width); })
    .attr("data-source", function (l) { return l.source.id; })
    .attr("data-target", function (l) { return l.target.id; })
    .attr("data-layer", function (l) { return l.lay; })
    .attr("data-head", function (l) { return l.head === null ? null : l.head; })
    .attr("data-residual", function (l) { return l.residual ? "1" : null; })
    .attr("data-beams", function (l) { return l.beams.join(","); })
    .attr("tabindex", 0).attr("role", "button")
    .attr("aria-label", function (l) {
      return l.name + ": " + tokenAt(data, l.source.position, 16) +
        " \u2192 " + tokenAt(data, l.target.position, 16) + ", Sankey weight " + fmt(l.value);
    })
    .on("click", function (event, l) { event.stopPropagation(); on.link(l); })
    .on("keydown", keys(on.link))
    .on("focus", function (event, l) { reveal(l.labelX, l.labelY); })
    .on("mousemove", function (event, l) { on.hover(event, linkTip(data, l)); })
    .on("mouseleave", on.leave);
  // A run of stays is one band from its first node to its last; its stays and inner nodes hide.
  const runs = data.meta.mode === "layers" ? stayRuns(lay.graph, data.meta.target_node_id) : [];
  const inner = new Set(runs.flatMap(function (r) {
    return r.links.slice(1).map(function (s) { return s.source; });
  }));
  const merged = new Set(runs.flatMap(function (r) { return r.links; }));
  links.classed("is-merged", function (l) { return merged.has(l); });
  const bands = viewport.insert("g", ".ratlens-linklabels").selectAll("path").data(runs)
    .join("path").attr("class", "ratlens-stayrun")
    .attr("d", function (r) {
      return d3.linkHorizontal()({source: [r.source.x1, r.y0], target: [r.target.x0, r.y1]});
    })
    .attr("stroke-width", function (r) { return Math.max(1.5, r.width); })
    .attr("data-source", function (r) { return r.source.id; })
    .attr("data-target", function (r) { return r.target.id; })
    .attr("data-beams", function (r) { return r.beams.join(","); })
    .on("click", function (event, r) { event.stopPropagation(); on.link(r); })
    .on("mousemove", function (event, r) { on.hover(event, runTip(data, r)); })
    .on("mouseleave", on.leave);

  lay.graph.links.forEach(function (l) {
    l.labelX = (l.source.x1 + l.target.x0) / 2;  // the middle of sankeyLinkHorizontal's curve
    l.labelY = (l.y0 + l.y1) / 2;
  });
  const labels = viewport.append("g").attr("class", "ratlens-linklabels").selectAll("text")
    .data(lay.graph.links.filter(function (l) { return l.head !== null || l.residual; }))
    .join("text")
    .attr("class", "ratlens-linklabel")
    .attr("x", function (l) { return l.labelX; }).attr("y", function (l) { return l.labelY; })
    .attr("dy", "0.35em").attr("text-anchor", "middle")
    .attr("paint-order", "stroke").attr("stroke", "#fff").attr("stroke-width", 3)
    .attr("data-layer", function (l) { return l.lay; })
    .attr("data-head", function (l) { return l.head === null ? null : l.head; })
    .text(function (l) { return l.name; });
  placeLabels(labels);
  labels.filter(function (l) { return merged.has(l); }).classed("is-crowded", true);

  const nodes = viewport.append("g").selectAll("g").data(lay.graph.nodes).join("g")
    .attr("class", function (n) {
      return "ratlens-node" + (n.id === data.meta.target_node_id ? " is-target" : "") +
        (inner.has(n) ? " is-merged" : "");
    })
    .attr("data-id", function (n) { return n.id; })
    .attr("data-pos", function (n) { return n.position; })
    .attr("transform", function (n) { return "translate(" + n.x0 + "," + n.y0 + ")"; })
    .attr("tabindex", 0).attr("role", "button")
    .attr("aria-label", function (n) {
      return tokenAt(data, n.position, 24) + (data.meta.mode === "layers"
        ? " at " + layerName(n.lay) : "") + ", traced mass " + fmt(n.value) +
        (n.id === data.meta.target_node_id ? ", the target" : "");
    })
    .on("click", function (event, n) { event.stopPropagation(); on.node(n); })
    .on("keydown", keys(on.node))
    .on("focus", function (event, n) { reveal(n.x0 + NODE_W / 2, (n.y0 + n.y1) / 2); })
    .on("mousemove", function (event, n) { on.hover(event, nodeTip(data, n)); })
    .on("mouseleave", on.leave);
  nodes.append("rect")
    .attr("width", NODE_W).attr("height", function (n) { return n.y1 - n.y0; })
    .attr("fill", "#c9d1e3");
  const label = nodes.append("text")
    .attr("x", NODE_W + 4).attr("y", function (n) { return (n.y1 - n.y0) / 2; })
    .attr("dy", "0.35em")
    .attr("paint-order", "stroke").attr("stroke", "#fff").attr("stroke-width", 3);
  label.append("tspan").text(function (n) {
    return isolate(shorten(visible(data.tokens[n.position]), 14));
  });
  label.append("tspan").attr("class", "ratlens-pos")
    .text(function (n) { return " " + n.position; });
  // The model's best next token (and its probability) under the target's label.
  const guess = predictionsAt(data, data.meta.target_pos);
  if (guess && guess.tokens.length) {
    nodes.filter(function (n) { return n.id === data.meta.target_node_id; }).append("text")
      .attr("class", "ratlens-pred")
      .attr("x", NODE_W + 4).attr("y", function (n) { return (n.y1 - n.y0) / 2 + 16; })
      .attr("dy", "0.35em")
      .attr("paint-order", "stroke").attr("stroke", "#fff").attr("stroke-width", 3)
      .text("\u2192 " + isolate(shorten(visible(guess.tokens[0]), 10)) + " " +
        prob(guess.probs[0]));
  }

  const note = box.append("button").attr("type", "button")
    .attr("class", "ratlens-offscreen").style("display", "none")
    .on("click", function (event) { event.stopPropagation(); show(true); });
  let pending = false;
  const zoom = d3.zoom().on("zoom", function (event) {
    viewport.attr("transform", event.transform);
    if (!pending) {
      pending = true;
      requestAnimationFrame(function () { pending = false; offscreen(); });
    }
  });
  svg.call(zoom).on("dblclick.zoom", null);

  // What the current view leaves out, said over the diagram (nothing when all is in view).
  function offscreen() {
    const t = d3.zoomTransform(svg.node()), w = svg.node().clientWidth || 900;
    const h = +svg.attr("height");
    const x0 = -t.x / t.k, x1 = (w - t.x) / t.k, y0 = -t.y / t.k, y1 = (h - t.y) / t.k;
    const out = {left: [], right: [], above: [], below: []};
    lay.graph.nodes.forEach(function (n) {
      if (n.x1 < x0) out.left.push(n.position);
      else if (n.x0 > x1) out.right.push(n.position);
      else if (n.y1 < y0) out.above.push(n.position);
      else if (n.y0 > y1) out.below.push(n.position);
    });
    const parts = [], count = d3.format(",");
    [["left", "to the left"], ["right", "to the right"], ["above", "above"], ["below", "below"]]
      .forEach(function (side) {
        const ps = out[side[0]];
        if (!ps.length) return;
        parts.push(count(ps.length) + (ps.length === 1 ? " node " : " nodes ") + side[1] +
          " (position" + (ps.length === 1 ? " " + count(ps[0]) : "s " + count(d3.min(ps)) +
          "\u2013" + count(d3.max(ps))) + ")");
      });
    note.style("display", parts.length ? null : "none")
      .text("Off screen: " + parts.join(", ") + ". Click to fit all.");
  }
  // `whole`: everything in view, never enlarged, centred. Otherwise (the first view) the whole
  // when that is readable (zoom >= READABLE); else READABLE, right-aligned: the target's end of
  // the trace, with the off-screen note saying what is left out.
  function show(whole) {
    const w = svg.node().clientWidth || 900, h = +svg.attr("height");
    const fitted = Math.min(1, (w - 16) / lay.width, (h - 8) / lay.height);
    const k = whole ? fitted : Math.max(fitted, READABLE);
    zoom.scaleExtent([Math.min(0.05, fitted / 2), 8]);
    const x = lay.width * k <= w - 16 ? (w - lay.width * k) / 2 : w - 8 - lay.width * k;
    svg.call(zoom.transform, d3.zoomIdentity.translate(x, Math.max(4, (h - lay.height * k) / 2))
      .scale(k));
    offscreen();
  }
  // Keyboard focus on something out of view pans to it.
  function reveal(x, y) {
    const t = d3.zoomTransform(svg.node()), w = svg.node().clientWidth || 900;
    const h = +svg.attr("height"), at = t.apply([x, y]);
    if (at[0] < 0 || at[0] > w || at[1] < 0 || at[1] > h) svg.call(zoom.translateTo, x, y);
  }
  show(false);
  return {svg: svg, viewport: viewport, links: links, bands: bands, labels: labels, nodes: nodes,
          fit: function () { show(true); }, first: function () { show(false); },
          width: lay.width, height: lay.height};
}

// The beams (indices) whose path goes through node `id`.
function beamsThrough(beamNodes, id) {
  const through = new Set();
  beamNodes.forEach(function (ids, b) { if (ids.has(id)) through.add(b); });
  return through;
}

// state.beam: the beam the filter shows alone (null: all); state.node: the clicked node's id;
// state.head: the picked head's key ("1:0"; from the grid, a link or the legend); state.link:
// the clicked link's index; state.colour: "head" or "beam"; state.strip: the position hovered in
// the token strip. A clicked node lights every link of every beam through it, a picked head its
// own links; the rest is dimmed. Links take their head's colour, or that of their best beam (of
// the one beam the filter shows). view: drawDiagram's or drawRouteMap's; heads: headTable's.
function paint(view, heads, beamNodes, state) {
  const nBeams = beamNodes.length;
  const colours = new Map(heads.map(function (h) { return [h.key, h.color]; }));
  const through = state.node === null ? null : beamsThrough(beamNodes, state.node);
  const lit = through !== null
    ? function (l) { return l.beams.some(function (b) { return through.has(b); }); }
    : state.head !== null ? function (l) { return l.key === state.head; } : null;
  const touched = new Set();  // the nodes left undimmed: on a beam through the node, or on a
  if (through !== null) {     // picked head's link
    through.forEach(function (b) { beamNodes[b].forEach(function (id) { touched.add(id); }); });
  } else if (lit !== null) {
    view.links.each(function (l) {
      if (lit(l)) { touched.add(l.source.id); touched.add(l.target.id); }
    });
  }
  function hidden(l) { return state.beam !== null && l.beams.indexOf(state.beam) < 0; }
  const drawn = view.bands ? d3.selectAll(view.links.nodes().concat(view.bands.nodes()))
    : view.links;
  drawn
    .attr("stroke", function (l) {
      return state.colour === "head" && (l.head !== null || l.residual) ? colours.get(l.key)
        : beamColor(state.beam === null ? d3.min(l.beams) : state.beam, nBeams);
    })
    .classed("is-hidden", hidden)
    .classed("is-hl", function (l) { return lit !== null && lit(l); })
    .classed("is-dim", function (l) { return lit !== null && !lit(l); })
    .classed("is-selected", function (l) { return l.index === state.link; });
  view.labels
    .classed("is-hidden", hidden)
    .classed("is-dim", function (l) { return lit !== null && !lit(l); });
  view.nodes
    .classed("is-hidden", function (n) {
      return state.beam !== null && !beamNodes[state.beam].has(n.id);
    })
    .classed("is-selected", function (n) { return n.id === state.node; })
    .classed("is-dim", function (n) { return lit !== null && !touched.has(n.id); })
    .classed("is-strip", function (n) { return n.position === state.strip; });
}
