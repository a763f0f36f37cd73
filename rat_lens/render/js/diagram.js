// diagram.js: the Sankey diagram: layout, drawing, zoom, and the highlight/filter state painted
// as classes.
// Defines: NODE_W, COL_W, LABEL_W, PAD, TOP, MIN_NODE, READABLE, assignColumns, layout,
//   drawDiagram, beamsThrough, paint.
// Uses: util.js: fmt, beamColor, layerName, edgeName, isolate, shorten, visible, tokenAt.

const NODE_W = 12;      // node bar width
const COL_W = 150;      // distance between columns: room for a label
const LABEL_W = 140;    // room right of the last column
const PAD = 18;         // vertical gap between nodes of a column
const TOP = 24;         // room for the column headings
const MIN_NODE = 4;     // a node carrying a near-zero weight must still be clickable
const READABLE = 0.85;  // smallest first-view zoom at which the 12px labels stay readable

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

// d3-sankey links the graph (sourceLinks / targetLinks, node value = max of in- and out-flow)
// and routes the link ends; the columns and heights are ours, since its own columns follow
// graph depth, which neither keeps positions in order nor puts a path ending early (at BOS) in
// its layer. Within a column, nodes go top to bottom by position.
function layout(data) {
  const graph = {
    nodes: data.nodes.map(function (n) { return {id: n.id, position: n.position, lay: n.layer}; }),
    links: data.links.map(function (l) {
      return {source: l.source, target: l.target, value: l.value, beams: l.beams, lay: l.layer,
              heads: l.heads};
    }),
  };
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
  graph.nodes.forEach(function (n) {
    n.sourceLinks.sort(function (a, b) { return a.target.y0 - b.target.y0; });
    n.targetLinks.sort(function (a, b) { return a.source.y0 - b.source.y0; });
  });
  sankey.update(graph);  // link ends stacked on the nodes as placed above
  return {graph: graph, width: (columns.length - 1) * COL_W + NODE_W + LABEL_W,
          height: TOP + inner + 8};
}

function drawDiagram(ui, data, on) {
  const lay = layout(data);
  const svg = ui.diagram.append("svg")
    .attr("height", Math.max(360, Math.min(560, lay.height)))
    .attr("role", "img").attr("aria-label", "attention trace diagram");
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

  const links = viewport.append("g").selectAll("path").data(lay.graph.links).join("path")
    .attr("class", "ratlens-link")
    .attr("d", d3.sankeyLinkHorizontal())
    .attr("stroke-width", function (l) { return Math.max(1.5, l.width); })
    .attr("data-source", function (l) { return l.source.id; })
    .attr("data-target", function (l) { return l.target.id; })
    .attr("data-beams", function (l) { return l.beams.join(","); })
    .on("click", function (event, l) { event.stopPropagation(); on.link(l); })
    .on("mousemove", function (event, l) {
      on.hover(event, tokenAt(data, l.source.position) + " \u2192 " +
        tokenAt(data, l.target.position) + "\n" + edgeName(l.lay, l.heads) + " \u00b7 weight " +
        fmt(l.value) + "\nbeams " + l.beams.map(function (b) { return b + 1; }).join(", "));
    })
    .on("mouseleave", on.leave);

  const nodes = viewport.append("g").selectAll("g").data(lay.graph.nodes).join("g")
    .attr("class", function (n) {
      return "ratlens-node" + (n.id === data.meta.target_node_id ? " is-target" : "");
    })
    .attr("data-id", function (n) { return n.id; })
    .attr("transform", function (n) { return "translate(" + n.x0 + "," + n.y0 + ")"; })
    .on("click", function (event, n) { event.stopPropagation(); on.node(n); })
    .on("mousemove", function (event, n) {
      const where = data.meta.mode === "layers" ? " \u00b7 " + layerName(n.lay) : "";
      on.hover(event, tokenAt(data, n.position) + where + "\nweight " + fmt(n.value));
    })
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

  const zoom = d3.zoom().on("zoom", function (event) {
    viewport.attr("transform", event.transform);
  });
  svg.call(zoom).on("dblclick.zoom", null);
  // `whole`: everything in view, never enlarged, centred. Otherwise (the first view) no smaller
  // than READABLE, right-aligned when it overflows: the target's end of the trace is what people
  // read first; "Fit" shows the whole.
  function show(whole) {
    const w = svg.node().clientWidth || 900, h = +svg.attr("height");
    const fitted = Math.min(1, (w - 16) / lay.width, (h - 8) / lay.height);
    const k = whole ? fitted : Math.max(fitted, READABLE);
    zoom.scaleExtent([Math.min(0.05, fitted / 2), 8]);
    const x = lay.width * k <= w - 16 ? (w - lay.width * k) / 2 : w - 8 - lay.width * k;
    svg.call(zoom.transform, d3.zoomIdentity.translate(x, Math.max(4, (h - lay.height * k) / 2))
      .scale(k));
  }
  show(false);
  return {svg: svg, viewport: viewport, links: links, nodes: nodes,
          fit: function () { show(true); },
          width: lay.width, height: lay.height};
}

// The beams (indices) whose path goes through node `id`.
function beamsThrough(beamNodes, id) {
  const through = new Set();
  beamNodes.forEach(function (ids, b) { if (ids.has(id)) through.add(b); });
  return through;
}

// state.beam: the beam the filter shows alone (null: all); state.node: the clicked node's id.
// A clicked node highlights every link of every beam through it and dims the rest. Links take
// the colour of their best beam, or of the one beam the filter shows.
function paint(view, beamNodes, state) {
  const nBeams = beamNodes.length;
  const through = state.node === null ? null : beamsThrough(beamNodes, state.node);
  function lit(beams) { return beams.some(function (b) { return through.has(b); }); }
  function onNodeBeam(id) {
    return Array.from(through).some(function (b) { return beamNodes[b].has(id); });
  }
  view.links
    .attr("stroke", function (l) {
      return beamColor(state.beam === null ? d3.min(l.beams) : state.beam, nBeams);
    })
    .classed("is-hidden", function (l) {
      return state.beam !== null && l.beams.indexOf(state.beam) < 0;
    })
    .classed("is-hl", function (l) { return through !== null && lit(l.beams); })
    .classed("is-dim", function (l) { return through !== null && !lit(l.beams); });
  view.nodes
    .classed("is-hidden", function (n) {
      return state.beam !== null && !beamNodes[state.beam].has(n.id);
    })
    .classed("is-selected", function (n) { return n.id === state.node; })
    .classed("is-dim", function (n) { return through !== null && !onNodeBeam(n.id); });
}
