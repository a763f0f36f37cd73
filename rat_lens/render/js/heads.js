// heads.js: the layer x head grid of traced mass beside the diagram, and the head heatmap below
// it: one head's attention at the queries it was traced at, from the beams' edges, or from whole
// rows when the payload has head_rows (schema.js).
// Defines: HEATMAP_COLUMNS, gridLayers, gridKeys, buildHeadGrid, paintGrid, clearHeatmap,
//   heatmapRows, showHeatmap.
// Uses: util.js: fmt, sig2, headName, headKey, weightName, layerName, averagedName, tokenAt,
//   shorten, visible, isolate.

const HEATMAP_COLUMNS = 400;  // keys shown at most (whole rows of a long prompt)

// The grid's rows: the traced layers, the top (target's) layer first.
function gridLayers(data, heads) {
  const m = data.meta, layers = new Set(heads.map(function (h) { return h.layer; }));
  if (m.mode === "layers") {
    for (let l = m.layer; l >= m.layer_lo; l--) layers.add(l);
  } else {
    layers.add(m.layer);
  }
  return Array.from(layers).sort(function (a, b) { return b - a; });
}

// heads: the diagram's head table (diagram.js headTable: key, layer, head, mass, color).
function buildHeadGrid(ui, data, heads, pick) {
  const box = ui.grid;
  const perHead = data.links.some(function (l) { return l.head !== null; });
  box.append("h4").text(perHead ? "Heads: traced mass" : "Layers: traced mass");
  const seen = heads.map(function (h) { return h.head; })
    .concat((data.head_rows || []).map(function (r) { return r.head; }))
    .filter(function (h) { return h !== null; });
  // Per head: a column per head, and "res" for the stays in the residual stream, if any.
  const columns = (perHead ? d3.range(0, (d3.max(seen) || 0) + 1) : [null]).concat(
    heads.some(function (h) { return h.residual; }) ? ["res"] : []);
  const byKey = new Map(heads.map(function (h) { return [h.key, h]; }));
  // Shading: heads on one scale, the stays (the res column) on their own: stays carry most of a
  // contribution-weighted route's mass and would make every head look pale.
  const tops = {};
  [false, true].forEach(function (res) {
    tops[res] = d3.max(heads.filter(function (h) { return h.residual === res; }),
                       function (h) { return h.mass; }) || 1;
  });
  const table = box.append("table").attr("class", "ratlens-grid")
    .attr("role", "grid").attr("aria-label", "traced mass per layer and head: arrow keys move, " +
      "Enter picks");
  const head = table.append("thead").append("tr");
  head.append("th").text("");
  head.selectAll("th.ratlens-grid-col").data(columns).join("th")
    .attr("class", "ratlens-grid-col")
    .text(function (h) {
      if (h === "res") return "res";
      if (h !== null) return columns.length <= 8 ? "H" + h : String(h);
      return data.meta.agg_heads === "max" ? "max of heads" : "mean of heads";
    });
  const rows = table.append("tbody").selectAll("tr").data(gridLayers(data, heads)).join("tr");
  rows.append("th").text(function (l) { return layerName(l); });
  ui.gridCells = rows.selectAll("td").data(function (l) {
    return columns.map(function (h) {
      const residual = h === "res", head = residual ? null : h;
      const found = byKey.get(headKey(l, head, residual));
      return {key: headKey(l, head, residual), layer: l, head: head, residual: residual,
              name: headName(l, head, residual), mass: found ? found.mass : 0,
              color: found ? found.color : null};
    });
  }).join("td").append("button").attr("type", "button")
    .attr("class", "ratlens-grid-cell").attr("tabindex", -1)
    .attr("data-layer", function (c) { return c.layer; })
    .attr("data-head", function (c) { return c.head === null ? null : c.head; })
    .attr("data-residual", function (c) { return c.residual ? "1" : null; })
    .attr("aria-label", function (c) { return c.name + ", traced mass " + fmt(c.mass); })
    .attr("title", function (c) {
      return c.name + ": traced mass " + fmt(c.mass) +
        (c.mass > 0 ? " (click: its links light up, its attention shows below)" :
          " (no traced edge)");
    })
    .attr("aria-disabled", function (c) { return c.mass === 0 && !hasRows(c) ? "true" : null; })
    .style("background", function (c) {
      return c.mass > 0 ? "rgba(47, 59, 89, " +
        (0.08 + 0.8 * c.mass / tops[c.residual]).toFixed(3) + ")" : null;
    })
    .style("color", function (c) { return c.mass / tops[c.residual] > 0.5 ? "#fff" : null; })
    .style("box-shadow", function (c) {
      return c.color && perHead ? "inset 0 -3px 0 " + c.color : null;
    })
    .text(function (c) { return c.mass > 0 ? sig2(c.mass) : ""; })
    .on("click", function (event, c) {
      if (c.mass > 0 || hasRows(c)) pick(c.key);
    });
  gridKeys(ui.gridCells, columns.length);
  box.append("div").attr("class", "ratlens-note").text(
    "Traced mass: the sum of the Sankey weights of a " + (perHead ? "head's" : "layer's") +
    " links. Click a cell: its links light up and its attention shows below the diagram." +
    (perHead ? " The bar under a cell is its colour in the diagram." : "") +
    (columns.indexOf("res") >= 0 ? " res: stays in the residual stream, shaded on a scale " +
      "of their own." : "") + " One Tab stop: arrow keys move, Enter picks.");

  function hasRows(c) {
    return !c.residual && (data.head_rows || []).some(function (r) {
      return r.layer === c.layer && r.head === c.head;
    });
  }
}

// The grid is one Tab stop (a roving tabindex): the arrow keys move between cells, Home / End
// to a row's ends; Enter or Space (the cell is a button) picks.
function gridKeys(cells, width) {
  const all = cells.nodes();
  let at = Math.max(0, all.findIndex(function (el) { return el.textContent !== ""; }));
  function focus(i) {
    all[at].setAttribute("tabindex", -1);
    at = Math.max(0, Math.min(all.length - 1, i));
    all[at].setAttribute("tabindex", 0);
    all[at].focus();
  }
  if (!all.length) return;
  all[at].setAttribute("tabindex", 0);
  cells.on("focus", function () {
    all[at].setAttribute("tabindex", -1);
    at = all.indexOf(this);
    this.setAttribute("tabindex", 0);
  })
    .on("keydown", function (event) {
      const moves = {ArrowRight: 1, ArrowLeft: -1, ArrowDown: width, ArrowUp: -width,
                     Home: -(at % width), End: width - 1 - (at % width)};
      if (!(event.key in moves)) return;
      event.preventDefault();
      focus(at + moves[event.key]);
    });
}

function paintGrid(ui, state) {
  if (ui.gridCells) ui.gridCells.classed("is-on", function (c) { return c.key === state.head; });
}

function clearHeatmap(ui) {
  ui.heatmap.selectAll("*").remove();
  ui.heatmap.append("h4").text("Head attention");
  ui.heatmap.append("div").attr("class", "ratlens-empty")
    .text("Click a link, or a cell of the heads grid: that head's attention at the queries " +
      "it was traced at shows here.");
}

// One head's rows (key: headKey's; residual: the stream's shares, not attention): {query,
// kind ("head" | "mean"), cells: Map key -> weight, traced: Set of keys a beam took}. Whole rows
// (head_rows) where the payload has them, else the beams' edges; then, for comparison, the
// strip's averaged rows at the same queries (a model trace only).
function heatmapRows(data, links, key, residual) {
  const value = function (l) { return residual ? l.weight : l.attention; };
  const traced = d3.group(links.filter(function (l) {
    return l.key === key && value(l) !== null;
  }), function (l) { return l.target.position; });
  const whole = d3.group((data.head_rows || []).filter(function (r) {
    return headKey(r.layer, r.head) === key;
  }), function (r) { return r.query; });
  const queries = Array.from(new Set(Array.from(traced.keys()).concat(Array.from(whole.keys()))))
    .sort(d3.ascending);
  const rows = [];
  queries.forEach(function (q) {
    const took = new Set((traced.get(q) || []).map(function (l) { return l.source.position; }));
    const cells = new Map();
    if (whole.has(q)) {
      whole.get(q).forEach(function (r) {
        r.keys.forEach(function (k, i) { cells.set(k, r.weights[i]); });
      });
    } else {
      (traced.get(q) || []).forEach(function (l) { cells.set(l.source.position, value(l)); });
    }
    rows.push({query: q, kind: "head", cells: cells, traced: took, whole: whole.has(q)});
    if (data.strip.source === "attention") {
      const mean = new Map();
      data.strip.rows.forEach(function (r) { if (r.query === q) mean.set(r.key, r.weight); });
      if (mean.size) rows.push({query: q, kind: "mean", cells: mean, traced: took, whole: false});
    }
  });
  return rows;
}

// link: the clicked link (its cell is marked is-picked), or null for a head picked as a whole.
// Either way the table scrolls so that the picked (else the first traced) cell is in view.
function showHeatmap(ui, data, links, key, link) {
  const parts = key.split(":"), layer = +parts[0], residual = parts[1] === "res";
  const head = parts[1] === "" || residual ? null : +parts[1];
  // A head's cells are its attention; the residual stream's, its share (it attends nowhere).
  const name = headName(layer, head, residual), word = residual ? weightName(data) : "attention";
  const rows = heatmapRows(data, links, key, residual);
  const box = ui.heatmap;
  box.selectAll("*").remove();
  box.attr("data-key", key);
  box.append("h4").text(name + ": " + word + " at the traced queries");
  if (!rows.length) {
    box.append("div").attr("class", "ratlens-empty").text("No traced edge goes through " + name +
      " and no row of it was recorded.");
    return;
  }
  const wholeRows = rows.some(function (r) { return r.whole; });
  box.append("div").attr("class", "ratlens-note").text(
    (wholeRows ? "Rows: " + name + "'s attention as the tracer recorded it (head_rows); " +
      "outlined: the keys a beam took. "
      : "Cells: the edges the beams took through " + name + " (the edge's " + word + " on " +
      "that key); the trace holds no whole rows of this head, so its other keys are not " +
      "known. ") +
    (data.strip.source === "attention" ? "Grey rows, for comparison: the captured attention " +
      "(" + averagedName(data.meta) + "), each query's strongest keys." : ""));
  let keys = Array.from(new Set(rows.flatMap(function (r) { return Array.from(r.cells.keys()); })))
    .sort(d3.ascending);
  const total = keys.length, cut = total > HEATMAP_COLUMNS;
  if (cut) keys = keys.slice(total - HEATMAP_COLUMNS);
  const wrap = box.append("div").attr("class", "ratlens-hm-wrap");
  const table = wrap.append("table").attr("class", "ratlens-hm")
    .attr("data-layer", layer).attr("data-head", head === null ? null : head);
  const top = table.append("thead").append("tr");
  top.append("th").attr("class", "ratlens-hm-corner").text("query \u2193 key \u2192");
  top.selectAll("th.ratlens-hm-key").data(keys).join("th").attr("class", "ratlens-hm-key")
    .attr("title", function (k) { return tokenAt(data, k); })
    .text(function (k) {
      return isolate(shorten(visible(data.tokens[k] === undefined ? "?" : data.tokens[k]), 8)) +
        " " + k;
    });
  const tr = table.append("tbody").selectAll("tr").data(rows).join("tr")
    .attr("class", function (r) { return "ratlens-hm-row is-" + r.kind; })
    .attr("data-kind", function (r) { return r.kind; })
    .attr("data-query", function (r) { return r.query; });
  tr.append("th").text(function (r) {
    return r.kind === "mean" ? "mean" : tokenAt(data, r.query, 10);
  }).attr("title", function (r) {
    return r.kind === "mean" ? averagedName(data.meta) + " at " + tokenAt(data, r.query)
      : name + " at " + tokenAt(data, r.query);
  });
  tr.selectAll("td").data(function (r) {
    return keys.map(function (k) {
      return {row: r, key: k, weight: r.cells.has(k) ? r.cells.get(k) : null};
    });
  }).join("td")
    .attr("class", function (c) {
      const head = c.row.kind === "head";
      return c.weight === null ? "ratlens-hm-none"
        : "ratlens-hm-cell" + (head && c.row.traced.has(c.key) ? " is-traced" : "") +
          (head && link && c.row.query === link.target.position &&
           c.key === link.source.position ? " is-picked" : "");
    })
    .attr("data-key", function (c) { return c.key; })
    .attr("data-weight", function (c) { return c.weight; })
    .attr("title", function (c) {
      return c.weight === null ? null : (c.row.kind === "mean" ? averagedName(data.meta)
        : name) + ": " + tokenAt(data, c.row.query) + " \u2192 " + tokenAt(data, c.key) +
        " " + (c.row.kind === "mean" ? "attention" : word) + " " + fmt(c.weight, 4) +
        (c.row.kind === "head" && c.row.traced.has(c.key)
          ? " (a traced edge)" : "");
    })
    .style("background", function (c) {
      if (c.weight === null) return null;
      const alpha = (0.06 + 0.8 * Math.min(1, c.weight)).toFixed(3);
      return c.row.kind === "mean" ? "rgba(90, 98, 117, " + alpha + ")"
        : "rgba(214, 39, 40, " + alpha + ")";
    })
    .style("color", function (c) { return c.weight !== null && c.weight > 0.6 ? "#fff" : null; })
    .text(function (c) { return c.weight === null ? "" : fmt(c.weight, 2); });
  if (cut) {
    box.append("div").attr("class", "ratlens-note")
      .text("Showing the last " + HEATMAP_COLUMNS + " of " + total + " keys.");
  }
  const cell = table.select("td.is-picked").node() || table.select("td.is-traced").node();
  if (cell) {  // scroll the table (not the page) so the cell sits in the middle of the box
    const w = wrap.node();
    w.scrollLeft = cell.offsetLeft - (w.clientWidth - cell.offsetWidth) / 2;
    w.scrollTop = cell.offsetTop - (w.clientHeight - cell.offsetHeight) / 2;
  }
}
