// routemap.js: the route map, the first view of a layers trace, drawn as information-flow-route
// graphs are (Ferrando & Voita 2024): tokens across, layers up, a node per (layer, position) the
// beams visit, each move through a head an arc labelled with the head, each stay in the residual
// stream a thin vertical line. Only positions some beam visits get a column; a gap between two
// columns says how many tokens it skips. It fits its box: no pan, no zoom.
// Defines: ROUTE_MARGIN, ROUTE_MAX_COL, ROUTE_MAX_ROW, routeColumns, routeLayout, movePath,
//   topMoves, drawRouteMap.
// Uses: util.js: fmt, prob, layerName, isolate, shorten, visible, tokenAt,
//   predictionsAt, generatedFrom; diagram.js: nodeTip, linkTip, placeLabels.

const ROUTE_MARGIN = {left: 40, right: 16, top: 34, bottom: 70};
const ROUTE_MAX_COL = 110;  // a column is never wider than this, however few there are
const ROUTE_MAX_ROW = 40;   // nor a layer taller

// The columns: every visited position in order, a gap (half a column) where positions are
// skipped. Returns {x: Map position -> column index + gaps before it, gaps: [{after, skipped}],
// units: the width in columns}.
function routeColumns(positions) {
  const x = new Map(), gaps = [];
  let units = 0;
  positions.forEach(function (p, i) {
    if (i > 0 && p - positions[i - 1] > 1) {
      gaps.push({at: units + 0.25, skipped: p - positions[i - 1] - 1,
                 from: positions[i - 1] + 1, to: p - 1});
      units += 0.5;
    }
    x.set(p, units);
    units += 1;
  });
  return {x: x, gaps: gaps, units: units};
}

// Coordinates of every node of `graph` (diagram.js layout's) in a box of width x height: rx, ry.
function routeLayout(data, graph, width, height) {
  const positions = Array.from(new Set(graph.nodes.map(function (n) { return n.position; })))
    .sort(d3.ascending);
  const cols = routeColumns(positions);
  const lo = d3.min(graph.nodes, function (n) { return n.lay; });
  const hi = Math.max(data.meta.layer, d3.max(graph.nodes, function (n) { return n.lay; }));
  const m = ROUTE_MARGIN, rows = Math.max(1, hi - lo);
  const colW = Math.min(ROUTE_MAX_COL, (width - m.left - m.right) / Math.max(1, cols.units));
  const rowH = Math.min(ROUTE_MAX_ROW, (height - m.top - m.bottom) / rows);
  const xAt = function (units) { return m.left + (units + 0.5) * colW; };
  const yAt = function (layer) { return m.top + (hi - layer) * rowH; };
  graph.nodes.forEach(function (n) {
    n.rx = xAt(cols.x.get(n.position));
    n.ry = yAt(n.lay);
  });
  return {positions: positions, cols: cols, colW: colW, rowH: rowH, lo: lo, hi: hi, xAt: xAt,
          yAt: yAt, width: width, height: m.top + rows * rowH + m.bottom};
}

// A move from the query node down to the key node one layer below, as an arch above both: its
// apex (where the head label goes) rises with the distance it spans, but stays 14 px inside the
// map's top edge (the apex is 3/4 of the rise up): a label above it would be cut off.
function movePath(l, rowH) {
  const a = l.target, b = l.source, dx = Math.abs(a.rx - b.rx);
  const rise = Math.min(3 * rowH, 10 + dx / 6, (Math.min(a.ry, b.ry) - 14) / 0.75);
  const top = Math.min(a.ry, b.ry) - rise;
  l.labelX = (a.rx + b.rx) / 2;
  l.labelY = top + rise * 0.25;
  return "M" + b.rx + "," + b.ry + "C" + b.rx + "," + top + " " + a.rx + "," + top + " " +
    a.rx + "," + a.ry;
}

// The top beam's moves (edges through a head) as link objects: drawn last, labelled first.
function topMoves(data, links) {
  return new Set(links.filter(function (l) {
    return !l.residual && l.beams.indexOf(0) >= 0;
  }));
}

// graph: diagram.js layout's graph (nodes with position / lay, links with source / target /
// residual / name / beams); on: the widget's handlers (node, link, background, hover, leave).
function drawRouteMap(box, data, graph, on) {
  const width = Math.max(480, box.node().clientWidth || 900);
  const lay = routeLayout(data, graph, width, 560);
  const svg = box.append("svg").attr("class", "ratlens-routes-svg")
    .attr("viewBox", "0 0 " + width + " " + lay.height).attr("height", lay.height)
    .attr("role", "group").attr("aria-label", "route map: tokens across, layers up; Tab " +
      "reaches its moves and nodes, Enter selects, Escape clears");
  svg.on("click", on.background);
  const viewport = svg.append("g").attr("class", "ratlens-viewport");
  const best = topMoves(data, graph.links);
  const keyPositions = new Set(Array.from(best).map(function (l) { return l.source.position; }));
  const moveLayers = new Set(Array.from(best).map(function (l) { return l.lay; }));

  // Layer rows: a faint line and a label each (every other one when rows are short).
  const layers = d3.range(lay.lo, lay.hi + 1);
  const axis = viewport.append("g").attr("class", "ratlens-route-axis");
  axis.selectAll("line").data(layers).join("line").attr("class", "ratlens-route-row")
    .attr("x1", ROUTE_MARGIN.left - 4).attr("x2", width - ROUTE_MARGIN.right)
    .attr("y1", lay.yAt).attr("y2", lay.yAt);
  axis.selectAll("text.ratlens-route-layer").data(layers.filter(function (l) {
    return lay.rowH >= 12 || (lay.hi - l) % 2 === 0 || moveLayers.has(l);
  })).join("text").attr("class", "ratlens-route-layer")
    .classed("is-move", function (l) { return moveLayers.has(l); })
    .attr("x", ROUTE_MARGIN.left - 6).attr("y", lay.yAt).attr("dy", "0.35em")
    .attr("text-anchor", "end").text(layerName);

  // Token columns, labelled under the lowest row; the top beam's keys and the target stand out.
  const generated = generatedFrom(data), bottom = lay.yAt(lay.lo);
  const slanted = lay.colW < 64;
  const ticks = axis.selectAll("g.ratlens-route-token").data(lay.positions).join("g")
    .attr("class", function (p) {
      return "ratlens-route-token" + (keyPositions.has(p) ? " is-key" : "") +
        (p === data.meta.target_pos ? " is-target" : "") +
        (generated !== null && p >= generated ? " is-generated" : "");
    })
    .attr("data-pos", function (p) { return p; })
    .attr("transform", function (p) {
      return "translate(" + lay.xAt(lay.cols.x.get(p)) + "," + (bottom + 12) + ")";
    });
  ticks.append("line").attr("class", "ratlens-route-col").attr("y1", -12)
    .attr("y2", -(bottom - ROUTE_MARGIN.top) - 12);
  ticks.append("text").attr("text-anchor", slanted ? "end" : "middle")
    .attr("transform", slanted ? "rotate(-35)" : null).attr("dy", slanted ? "0.7em" : "0.8em")
    .text(function (p) {
      return isolate(shorten(visible(data.tokens[p] === undefined ? "?" : data.tokens[p]),
        slanted ? 10 : Math.max(4, Math.floor(lay.colW / 7)))) + " " + p;
    })
    .append("title").text(function (p) { return tokenAt(data, p); });
  const gaps = axis.selectAll("g.ratlens-route-gap").data(lay.cols.gaps).join("g")
    .attr("class", "ratlens-route-gap")
    .attr("transform", function (g) { return "translate(" + lay.xAt(g.at - 0.5) + ",0)"; });
  gaps.append("line").attr("y1", ROUTE_MARGIN.top - 8).attr("y2", bottom + 4);
  gaps.append("text").attr("y", bottom + 16).attr("text-anchor", "middle")
    .text(function (g) { return "\u22ef" + g.skipped; })
    .append("title").text(function (g) {
      return g.skipped + (g.skipped === 1 ? " token" : " tokens") + " on no beam (positions " +
        g.from + (g.to > g.from ? "\u2013" + g.to : "") + ")";
    });
  if (generated !== null) {
    const at = lay.positions.find(function (p) { return p >= generated; });
    if (at !== undefined) {
      const x = lay.xAt(lay.cols.x.get(at)) - lay.colW / 2;
      axis.append("line").attr("class", "ratlens-route-generated")
        .attr("x1", x).attr("x2", x).attr("y1", ROUTE_MARGIN.top - 14).attr("y2", bottom + 4);
      axis.append("text").attr("class", "ratlens-route-generated").attr("x", x + 3)
        .attr("y", ROUTE_MARGIN.top - 16).text("generated \u2192");
    }
  }

  const keys = function (pick) {
    return function (event, d) {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        event.stopPropagation();
        pick(d);
      }
    };
  };
  const stays = graph.links.filter(function (l) { return l.residual; });
  const moves = graph.links.filter(function (l) { return !l.residual; })
    .sort(function (a, b) { return best.has(a) - best.has(b) || a.value - b.value; });
  const top = d3.max(moves, function (l) { return l.value; }) || 1;
  const stayLines = viewport.append("g").selectAll("line").data(stays).join("line")
    .attr("class", "ratlens-stay")
    .attr("x1", function (l) { return l.source.rx; }).attr("x2", function (l) { return l.target.rx; })
    .attr("y1", function (l) { return l.source.ry; }).attr("y2", function (l) { return l.target.ry; })
    .attr("data-source", function (l) { return l.source.id; })
    .attr("data-target", function (l) { return l.target.id; })
    .attr("data-layer", function (l) { return l.lay; })
    .attr("data-beams", function (l) { return l.beams.join(","); })
    .on("click", function (event, l) { event.stopPropagation(); on.link(l); })
    .on("mousemove", function (event, l) { on.hover(event, linkTip(data, l)); })
    .on("mouseleave", on.leave);
  const arcs = viewport.append("g").selectAll("path").data(moves).join("path")
    .attr("class", function (l) { return "ratlens-move" + (best.has(l) ? " is-top" : ""); })
    .attr("d", function (l) { return movePath(l, lay.rowH); })
    .attr("stroke-width", function (l) { return 1.5 + 4.5 * l.value / top; })
    .attr("data-source", function (l) { return l.source.id; })
    .attr("data-target", function (l) { return l.target.id; })
    .attr("data-layer", function (l) { return l.lay; })
    .attr("data-head", function (l) { return l.head === null ? null : l.head; })
    .attr("data-beams", function (l) { return l.beams.join(","); })
    .attr("tabindex", 0).attr("role", "button")
    .attr("aria-label", function (l) {
      return l.name + ": " + tokenAt(data, l.target.position, 16) + " reads " +
        tokenAt(data, l.source.position, 16) + ", Sankey weight " + fmt(l.value);
    })
    .on("click", function (event, l) { event.stopPropagation(); on.link(l); })
    .on("keydown", keys(on.link))
    .on("mousemove", function (event, l) { on.hover(event, linkTip(data, l)); })
    .on("mouseleave", on.leave);
  // Labels: the top beam's first (always shown), then the others by weight while they fit.
  const labels = viewport.append("g").selectAll("text").data(moves.slice().reverse()).join("text")
    .attr("class", function (l) {
      return "ratlens-linklabel ratlens-movelabel" + (best.has(l) ? " is-top" : "");
    })
    .attr("x", function (l) { return l.labelX; }).attr("y", function (l) { return l.labelY; })
    .attr("dy", "0.35em").attr("text-anchor", "middle")
    .attr("paint-order", "stroke").attr("stroke", "#fff").attr("stroke-width", 3)
    .attr("data-layer", function (l) { return l.lay; })
    .attr("data-head", function (l) { return l.head === null ? null : l.head; })
    .text(function (l) { return l.name; })
    .on("click", function (event, l) { event.stopPropagation(); on.link(l); })
    .on("mousemove", function (event, l) { on.hover(event, linkTip(data, l)); })
    .on("mouseleave", on.leave);
  placeLabels(labels, function (l) { return (best.has(l) ? 1 : 0) * top + l.value; },
              function (l) { return best.has(l); });

  const nodes = viewport.append("g").selectAll("g").data(graph.nodes).join("g")
    .attr("class", function (n) {
      return "ratlens-route-node" + (n.id === data.meta.target_node_id ? " is-target" : "");
    })
    .attr("data-id", function (n) { return n.id; })
    .attr("data-pos", function (n) { return n.position; })
    .attr("transform", function (n) { return "translate(" + n.rx + "," + n.ry + ")"; })
    .attr("tabindex", 0).attr("role", "button")
    .attr("aria-label", function (n) {
      return tokenAt(data, n.position, 24) + " at " + layerName(n.lay) + ", traced mass " +
        fmt(n.value) + (n.id === data.meta.target_node_id ? ", the target" : "");
    })
    .on("click", function (event, n) { event.stopPropagation(); on.node(n); })
    .on("keydown", keys(on.node))
    .on("mousemove", function (event, n) { on.hover(event, nodeTip(data, n)); })
    .on("mouseleave", on.leave);
  // A node a route only passes through (a stay in, a stay out) is a dot; where a route turns,
  // starts or ends, a ring.
  nodes.classed("is-passing", function (n) {
    return n.id !== data.meta.target_node_id && n.targetLinks.length > 0 &&
      n.sourceLinks.length > 0 && n.targetLinks.concat(n.sourceLinks).every(function (l) {
        return l.residual;
      });
  });
  nodes.append("circle").attr("r", function (n) {
    return n.id === data.meta.target_node_id ? 6 : 3.5;
  });
  const guess = predictionsAt(data, data.meta.target_pos);
  if (guess && guess.tokens.length) {
    nodes.filter(function (n) { return n.id === data.meta.target_node_id; }).append("text")
      .attr("class", "ratlens-pred").attr("y", -10).attr("text-anchor", "middle")
      .attr("paint-order", "stroke").attr("stroke", "#fff").attr("stroke-width", 3)
      .text("\u2192 " + isolate(shorten(visible(guess.tokens[0]), 10)) + " " +
        prob(guess.probs[0]));
  }
  svg.on("keydown", function (event) { if (event.key === "Escape") on.background(); });
  return {svg: svg, viewport: viewport, labels: labels, nodes: nodes, width: width,
          height: lay.height, links: d3.selectAll(stayLines.nodes().concat(arcs.nodes()))};
}
